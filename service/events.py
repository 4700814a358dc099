"""WatchEvents: the money movements as a stream, from the journal (docs/events.md).

Every journal entry is an event; the view `events` numbers them (migration
0004, service/outbox.py) so that `seq > cursor` never skips one. A stream
replays from the caller's cursor, then follows: it reads at most BATCH
events at a time, writes each and awaits the write (gRPC's flow control holds
the write while the consumer does not read), and reads the next batch only
then. So a slow consumer holds at most one batch in the service's memory and
slows only its own stream. When caught up it looks for new events every
POLL seconds. On drain (`drain()`, called on SIGTERM) every stream ends with
OK after the event it is writing.

A filtered stream (merchant, types) scans at most SCAN sequence numbers per
read and then moves its position past them, so each read stays bounded
however rare its matches are.
"""

from __future__ import annotations

import asyncio
import sqlite3
import weakref
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from refund.v1 import refund_pb2
from service import domain
from service.schema import JOURNAL_KINDS
from service.stores.port import StoreUnavailable

BATCH = 100
POLL = 0.05
# A read scans at most this many sequence numbers, so that a filtered stream
# replaying a long history with rare matches never runs one long query.
SCAN = 10_000

COLUMNS = ("seq, entry_id, merchant_id, currency, kind, amount, balance_after, order_id, transaction_id, "
           "settlement_id, adjustment_id, request_id, created_at")

_FEEDS: weakref.WeakSet[EventFeed] = weakref.WeakSet()


def event_id(entry_id: int) -> str:
    return f"evt-{entry_id}"


def _timestamp(moment) -> timestamp_pb2.Timestamp:
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def event_message(row) -> refund_pb2.Event:
    """The Event of one row of `events` (COLUMNS, in order)."""
    (seq, entry_id, merchant_id, currency, kind, amount, balance_after, order_id, transaction_id, settlement_id,
     adjustment_id, request_id, created_at) = row
    return refund_pb2.Event(
        event_id=event_id(entry_id), sequence=seq, type=kind, merchant_id=str(merchant_id), order_id=order_id or 0,
        transaction_id=transaction_id or 0, amount=domain.format_minor(amount, currency), currency=currency,
        balance_after=domain.format_minor(balance_after, currency), time=_timestamp(created_at),
        request_id=request_id or "", settlement_id=settlement_id or "", adjustment_id=adjustment_id or "")


def check_request(request: refund_pb2.WatchEventsRequest) -> tuple[int | None, tuple[str, ...]]:
    """(merchant id or None, types) of a request; domain.InvalidRequest if it is malformed."""
    if request.after_sequence < 0:
        raise domain.InvalidRequest("after_sequence must not be negative")
    unknown = sorted(set(request.types) - set(JOURNAL_KINDS))
    if unknown:
        raise domain.InvalidRequest(f"unknown event type(s) {', '.join(repr(t[:32]) for t in unknown[:5])}; "
                                    f"known: {', '.join(JOURNAL_KINDS)}")
    merchant = domain.parse_merchant_id(request.merchant_id) if request.merchant_id else None
    return merchant, tuple(sorted(set(request.types)))


def _query(placeholder, merchant: int | None, kinds: tuple[str, ...]) -> str:
    """Events after cursor (1st parameter) up to head (2nd), with the filters, in order, at most BATCH."""
    conditions = [f"seq > {placeholder(1)}", f"seq <= {placeholder(2)}"]
    position = 3
    if merchant is not None:
        conditions.append(f"merchant_id = {placeholder(position)}")
        position += 1
    if kinds:
        conditions.append(f"kind IN ({', '.join(placeholder(position + i) for i in range(len(kinds)))})")
    return f"SELECT {COLUMNS} FROM events WHERE {' AND '.join(conditions)} ORDER BY seq LIMIT {BATCH}"


class _PostgresEvents:
    HEAD = "SELECT COALESCE(MAX(seq), 0) FROM event_sequence"

    def __init__(self, store):
        self._store = store

    async def read(self, cursor: int, merchant, kinds) -> tuple[int, int, list]:
        async with self._store.connection() as conn:
            head = await conn.fetchval(self.HEAD)
            if head <= cursor:
                return head, head, []
            upto = min(head, cursor + SCAN)
            params = [cursor, upto] + ([merchant] if merchant is not None else []) + list(kinds)
            rows = await conn.fetch(_query(lambda n: f"${n}", merchant, kinds), *params)
            return upto, head, [tuple(r) for r in rows]

    def close(self) -> None:
        pass


class _SqliteEvents:
    """Reads on a connection and thread of its own: WAL readers never wait for
    the service's writer, nor it for them."""

    HEAD = "SELECT COALESCE(MAX(id), 0) FROM ledger_entries"

    def __init__(self, path: str, timeout: float):
        self._path, self._timeout = path, timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-events")
        self._connection: sqlite3.Connection | None = None

    def _read(self, cursor, merchant, kinds):
        if self._connection is None:
            from service.stores.sqlite import connect

            self._connection = connect(self._path, self._timeout)
        db = self._connection
        db.execute("BEGIN")  # one snapshot for the head and the rows
        try:
            head = db.execute(self.HEAD).fetchone()[0]
            if head <= cursor:
                return head, head, []
            upto = min(head, cursor + SCAN)
            params = [cursor, upto] + ([merchant] if merchant is not None else []) + list(kinds)
            return upto, head, db.execute(_query(lambda n: "?", merchant, kinds), params).fetchall()
        finally:
            db.execute("COMMIT")

    async def read(self, cursor: int, merchant, kinds) -> tuple[int, int, list]:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._read, cursor, merchant,
                                                                    kinds)
        except sqlite3.Error as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    def close(self) -> None:
        def _close():
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        self._executor.submit(_close)
        self._executor.shutdown(wait=False)


def _source_for(store):
    from service.stores.sqlite import SqliteStore

    if isinstance(store, SqliteStore):
        return _SqliteEvents(store._path, store._timeout)
    return _PostgresEvents(store)


class EventFeed:
    """The WatchEvents streams of one servicer."""

    def __init__(self, store):
        self._store = store
        self._source = None
        self._closing = asyncio.Event()
        self.streams = 0
        _FEEDS.add(self)

    async def watch(self, request: refund_pb2.WatchEventsRequest, context) -> None:
        """Write the events after request.after_sequence, then new ones, until drain
        or the caller goes. Raises domain.InvalidRequest or StoreUnavailable."""
        merchant, kinds = check_request(request)
        if self._source is None:
            self._source = _source_for(self._store)
        cursor = request.after_sequence
        self.streams += 1
        try:
            while not self._closing.is_set():
                scanned, head, rows = await self._source.read(cursor, merchant, kinds)
                for row in rows:
                    await context.write(refund_pb2.WatchEventsResponse(event=event_message(row)))
                    if self._closing.is_set():
                        return
                # A full batch may be followed by more within the scan; otherwise the scan was read whole.
                cursor = rows[-1][0] if len(rows) == BATCH else max(cursor, scanned)
                if len(rows) < BATCH and cursor >= head:
                    try:
                        await asyncio.wait_for(self._closing.wait(), POLL)
                    except TimeoutError:
                        pass
        finally:
            self.streams -= 1

    def drain(self) -> None:
        """End every stream (with OK) after the event it is writing."""
        self._closing.set()

    def close(self) -> None:
        self.drain()
        if self._source is not None:
            self._source.close()
            self._source = None


def drain() -> None:
    """End the WatchEvents streams of every servicer of this process (on SIGTERM)."""
    for feed in list(_FEEDS):
        feed.drain()
