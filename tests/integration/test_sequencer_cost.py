"""The event sequencer's numbering (service/outbox.py SEQUENCE) costs the few
entries it numbers, never the journal's size: on its own session's settings it
scans no table whole and looks up each candidate by index, however large the
journal and whatever the statistics say."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from service import db, outbox

pytestmark = pytest.mark.postgres

JOURNAL = 20_000
FILL = """
INSERT INTO ledger_entries (merchant_id, currency, kind, amount, balance_after, created_at)
SELECT 3500001, 'HKD', 'OPENING', 100, 100, now() FROM generate_series(1, :n)"""

COUNTERS = """
SELECT (SELECT COALESCE(sum(seq_scan), 0) FROM pg_stat_xact_user_tables
        WHERE relname IN ('ledger_entries', 'event_sequence')),
       (SELECT COALESCE(sum(pg_stat_get_xact_tuples_returned(indexrelid)), 0) FROM pg_index
        WHERE indrelid IN ('ledger_entries'::regclass, 'event_sequence'::regclass))"""


@pytest.mark.parametrize("analyzed", [True, False], ids=["analyzed", "stale statistics"])
def test_numbering_reads_only_the_new_entries_of_a_large_journal(postgres_url, analyzed):
    engine = db.make_engine(postgres_url)
    try:
        with engine.begin() as connection:  # a journal already numbered ...
            connection.execute(sa.text(FILL), {"n": JOURNAL})
            connection.execute(sa.text("INSERT INTO event_sequence (seq, entry_id) "
                                       "SELECT row_number() OVER (ORDER BY id), id FROM ledger_entries"))
        with engine.begin() as connection:  # numbered as of this snapshot (as the sequencer leaves it)
            connection.execute(sa.text("UPDATE event_sequencer SET last = pg_current_snapshot() WHERE id = 1"))
        with engine.begin() as connection:  # ... and three entries committed since
            connection.execute(sa.text(FILL), {"n": 3})
        if analyzed:
            with engine.connect() as connection:
                connection.execute(sa.text("ANALYZE ledger_entries, event_sequence"))
                connection.commit()
    finally:
        engine.dispose()

    async def number_twice():
        connection = await outbox.connector(postgres_url)()
        try:
            counts, moved_to = [], []
            for _ in range(2):  # the second run uses the session's one plan
                last = await connection.fetchrow(outbox.LAST)
                async with connection.transaction():
                    numbered, *snapshot = await connection.fetchrow(outbox.SEQUENCE, *last)
                    counts.append((numbered, *await connection.fetchrow(COUNTERS)))
                moved_to.append((tuple(snapshot), tuple(await connection.fetchrow(outbox.LAST))))
            # what SEQUENCE returns is the snapshot it stored when it numbered something
            # (the sequencer goes on from it without reading LAST)
            assert moved_to[0][0] == moved_to[0][1]
            return counts
        finally:
            await connection.close()

    (first, scans, tuples), (second, *_) = asyncio.run(number_twice())
    assert (first, second) == (3, 0)
    assert scans == 0, "the numbering scanned a table whole"
    assert tuples <= 20, f"the numbering read {tuples} index entries for 3 new entries of {JOURNAL}"
