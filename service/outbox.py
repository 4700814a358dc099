"""The transactional outbox: every journal entry is an event, numbered so that
a reader resuming with `seq > cursor` never skips one (docs/events.md).

On SQLite the number is the entry's id (see migration 0004). On PostgreSQL
concurrent transactions take ids that commit out of order: a transaction that
took id 7 may commit after the one that took id 8, and a reader that had
already read 8 would skip 7 for ever. So the entries are numbered after they
commit, by a sequencer: each entry keeps the id of the transaction that wrote
it (`xact_id`), and SEQUENCE numbers, in one statement, the entries visible
in its snapshot (so committed) and not numbered yet. Those can only have been
written by a transaction that was in progress at the last numbering (in that
snapshot's xip list) or began after it (xid >= its xmax): the index on
xact_id finds them without scanning the journal, and no transaction, however
long and in whichever database of the cluster, holds the others back.

One sequencer at a time holds the advisory lock SEQUENCER_LOCK; every
refund-service and refund-relay runs the loop and one of them wins, the
others stand by (and take over when the winner's session ends). As one
writer, one statement per batch, gives `max(seq) + 1, + 2, ...`, the
sequence has no gaps and grows in commit order: a reader's `seq > cursor`
sees every event. The primary key on seq and the unique entry_id stop a
second numbering even if two sequencers ever ran.

The cost: an event is numbered at most one poll interval (IDLE_POLL) after
its transaction commits; one small statement per poll, which writes only
when it numbers something.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from service import tracing

log = logging.getLogger(__name__)

# pg_try_advisory_lock keys (any two 64-bit numbers of our own).
SEQUENCER_LOCK = 0x7265_6675_6E64_0001
RELAY_LOCK = 0x7265_6675_6E64_0002

# Seconds between numberings when the last one found nothing, and when it did.
# Each numbering that numbers something is one committed (flushed) write
# transaction: under load it numbers a batch every BUSY_POLL, not every entry.
IDLE_POLL = 0.02
BUSY_POLL = 0.01
# Seconds between attempts to take the lock, or to reconnect after an error.
STANDBY_POLL = 0.5
MAX_RETRY_PAUSE = 5.0

# The last numbering's snapshot: entries of transactions at or above its xmax,
# or in progress then (its xip list), may not be numbered yet; all others are.
LAST = """
SELECT pg_snapshot_xmax(last)::text, ARRAY(SELECT pg_snapshot_xip(last)::text) FROM event_sequencer WHERE id = 1"""
# $1 the last numbering's xmax, $2 its xip list (LAST). It must cost the few
# candidates, never the journal's size: the candidates are found apart (a
# materialized CTE, so no ordering by id can pull in a scan of the journal's
# primary key), and the session (`connector`) plans the statement once (a
# generic plan) with scans of whole tables and hash or merge joins turned off,
# so the index on xact_id finds the candidates and each is looked up in
# event_sequence by its entry id. A plan per poll cost up to 3 ms of planning
# (PostgreSQL probing the xact_id index for its newest values) and, with the
# statistics of a growing journal, chose to scan it.
SEQUENCE = """
WITH candidates AS MATERIALIZED (
    SELECT e.id FROM ledger_entries e WHERE e.xact_id >= $1::text::xid8 OR e.xact_id = ANY ($2::text[]::xid8[])
), numbered AS (
    INSERT INTO event_sequence (seq, entry_id)
    SELECT (SELECT COALESCE(MAX(seq), 0) FROM event_sequence) + row_number() OVER (ORDER BY c.id), c.id
    FROM candidates c
    WHERE NOT EXISTS (SELECT 1 FROM event_sequence q WHERE q.entry_id = c.id)
    ORDER BY c.id
    RETURNING seq
), moved AS (
    UPDATE event_sequencer SET last = pg_current_snapshot() WHERE id = 1 AND EXISTS (SELECT 1 FROM numbered)
)
SELECT COUNT(*), pg_snapshot_xmax(pg_current_snapshot())::text,
       ARRAY(SELECT pg_snapshot_xip(pg_current_snapshot())::text)
FROM numbered"""

# Errors after which the sequencer reconnects: the database went away or refused.
RECONNECT_ON = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                asyncpg.exceptions.InternalClientError)


# The sequencer's session settings: see SEQUENCE.
SEQUENCER_PLANS = {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off", "enable_hashjoin": "off",
                   "enable_mergejoin": "off"}


def connector(url: str, timeout: float = 5.0, application_name: str = "refund-sequencer",
              settings: dict | None = None):
    """A function that opens one asyncpg connection to the database at `url` (a
    SQLAlchemy URL), with the sequencer's session `settings` unless others are given."""
    settings = SEQUENCER_PLANS if settings is None else settings
    from sqlalchemy.engine import make_url

    parsed = make_url(url)

    def connect():
        return asyncpg.connect(host=parsed.host or "127.0.0.1", port=parsed.port or 5432, user=parsed.username,
                               password=parsed.password, database=parsed.database, timeout=timeout,
                               command_timeout=timeout,
                               server_settings={"application_name": application_name, **settings})

    return connect


class Sequencer:
    """Runs the numbering loop in a task while this process holds SEQUENCER_LOCK
    (on its own connection, so the lock goes with the connection if the
    process dies). `connect` opens that connection."""

    def __init__(self, connect, name: str = "sequencer"):
        self._connect = connect
        self._name = name
        self._task: asyncio.Task | None = None
        self.leader = False
        self.numbered = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        with tracing.untraced():  # background work for no request: it makes no traces
            await self._number()

    async def _number(self) -> None:
        pause = STANDBY_POLL
        while True:
            connection = None
            try:
                connection = await self._connect()
                pause = STANDBY_POLL
                while not await connection.fetchval("SELECT pg_try_advisory_lock($1)", SEQUENCER_LOCK):
                    await asyncio.sleep(STANDBY_POLL)
                self.leader = True
                log.info("event sequencer: numbering events")
                last = tuple(await connection.fetchrow(LAST))
                while True:
                    count, *moved_to = await connection.fetchrow(SEQUENCE, *last)
                    if count:  # the snapshot `moved` stored, as LAST would read it now (one statement fewer)
                        self.numbered += count
                        last = tuple(moved_to)
                    await asyncio.sleep(BUSY_POLL if count else IDLE_POLL)
            except RECONNECT_ON as exc:
                if pause == STANDBY_POLL:  # once per outage, not once per retry
                    log.warning("event sequencer: %s; retrying", type(exc).__name__)
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_RETRY_PAUSE)
            finally:
                self.leader = False
                if connection is not None:
                    connection.terminate()  # the session's advisory lock goes with it
