"""Group commit for refunds: PostgreSQL's refund statements, SQLite's applies.

Every refund is a small transaction: PostgreSQL pays for each one's snapshot,
commit and flush, and for the round trip, and under load many backends contend
for two cores. An approved refund also locks its merchant's balance row until
its commit is flushed, so when many refunds of one merchant arrive at once (a
cancelled event's ten thousand tickets), each waits on that lock for the one
before it.

So a process sends its refunds through a few lanes (LANES, `--db-lanes`), and
each lane runs one refund, or one batch of refunds, at a time. A merchant always
goes to the same lane, so no two refunds of one merchant run at once in a process.
Refunds that arrive while their lane is busy wait in its queue; when the running
one is done they go to PostgreSQL together, as a batch: each refund is still its
own IN_ONE_STATEMENT (every guard, its audit row, its journal entry), but the
batch is sent in one round trip and runs as one transaction, which takes each
balance row's lock once and flushes once. Each refund statement first takes its
merchant's advisory lock (postgres_refund.MERCHANT_LOCK), so a batch, in
merchant order, takes them in increasing order: no two refund transactions of
two processes wait for each other in a cycle. A refund that finds its lane
idle goes alone at once: nothing waits for a batch to fill.

A batch commits or rolls back as a whole:
- if one of its statements fails on a constraint, or PostgreSQL rolls it back
  (deadlock, serialization), nothing of the batch was written, and each of its
  refunds runs again alone, as if it had never been batched;
- if anything else fails (the connection is lost, the statement times out), each
  refund of the batch gets that error, exactly as a refund alone would: its
  outcome is unknown, the caller gets UNAVAILABLE, and a retry is safe.

No refund is answered before its batch's commit returned, so an answered
refund is durable like any other.

SQLite (service/stores/sqlite.py) uses it with one lane (one writer) for its
applies: a batch is one trip to its database thread and one BEGIN IMMEDIATE,
each apply under a savepoint of its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

# The most refunds in one batch: bounds how long a batch holds its rows and how
# long its last refund waits for the first.
BATCH_LIMIT = 32
# Lanes per process. On 2 cores, 32 connections (bench.ab, docs/performance.md): one
# lane against two, 7 alternated rounds, 1.10x the signed edge's rate (faster in 6 of 7)
# and 1.11x gRPC's (7 of 7), PostgreSQL CPU per refund 352 -> 284 us: fewer, larger
# batches, so fewer commits. The cost: a refund waiting for a row lock that another
# client holds (an open transaction on a balance) holds up the refunds of every
# merchant of its lane, up to --db-timeout (`waiting()`, exported as the lane gauges,
# shows it); more lanes spread them.
LANES = 1


@dataclass
class _Waiting:
    merchant: int
    statement: str
    args: tuple
    future: asyncio.Future
    since: float  # time.monotonic() when it began to wait


@dataclass
class _Lane:
    """A lane with a refund or a batch running: the refunds waiting behind it."""
    waiting: collections.deque[_Waiting] = field(default_factory=collections.deque)


class GroupCommit:
    """`alone(statement, args)` runs one statement and returns its row;
    `together(statement, [args, ...])` runs the statement once per args in one
    transaction and returns their rows, or None when that transaction was
    rolled back as a whole (then each runs again alone)."""

    def __init__(self, alone: Callable[[str, tuple], Awaitable],
                 together: Callable[[str, list[tuple]], Awaitable[Sequence | None]], limit: int = BATCH_LIMIT,
                 stopped: Callable[[], Exception] = lambda: RuntimeError("stopped"), lanes: int = LANES):
        self._alone = alone
        self._lanes = lanes
        self._stopped = stopped  # what a refund whose batch was stopped (by close) gets
        self._together = together
        self._limit = limit
        self._running: dict[int, _Lane] = {}
        self._drains: set[asyncio.Task] = set()
        # What happened so far (tests and the bench read them).
        self.batches = 0
        self.batched = 0
        self.rolled_back = 0
        self.alone_rolled_back = 0  # counted by the store: a refund alone rolled back and run again

    async def run(self, merchant: int, statement: str, args: tuple):
        """The row of `statement` run with `args`, alone or in a batch of its lane."""
        lane = merchant % self._lanes
        running = self._running.get(lane)
        if running is not None:
            future = asyncio.get_running_loop().create_future()
            running.waiting.append(_Waiting(merchant, statement, args, future, time.monotonic()))
            return await future
        self._running[lane] = _Lane()
        try:
            return await self._alone(statement, args)
        finally:
            self._hand_over(lane)

    def waiting(self) -> tuple[int, float]:
        """(refunds waiting for their lane, seconds the longest of them has waited). A
        lane held for long by one transaction (another client holds a row lock that it
        waits for) shows here. Safe from another thread (the metrics scrape): it reads copies."""
        now = time.monotonic()
        waiting = [w for lane in list(self._running.values()) for w in list(lane.waiting) if not w.future.done()]
        return len(waiting), max((now - w.since for w in waiting), default=0.0)

    def _hand_over(self, lane: int) -> None:
        """The lane's running refund is done: start on those waiting, or mark the lane idle."""
        waiting = self._running[lane].waiting
        while waiting and waiting[0].future.done():  # their callers gave up
            waiting.popleft()
        if not waiting:
            del self._running[lane]
            return
        # A context of its own: the batches belong to no one caller's request (its id, its trace).
        task = asyncio.get_running_loop().create_task(self._drain(lane), context=contextvars.Context())
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, lane: int) -> None:
        waiting = self._running[lane].waiting
        try:
            while waiting:
                batch = self._next_batch(waiting)
                if batch:
                    await self._run_batch(batch)
        finally:
            del self._running[lane]
            for left in waiting:  # only when the drain itself was cancelled (close)
                if not left.future.done():
                    left.future.set_exception(self._stopped())

    def _next_batch(self, waiting: collections.deque[_Waiting]) -> list[_Waiting]:
        """Up to `limit` waiting refunds of one statement, in merchant order (each
        merchant's in their order of arrival)."""
        batch: list[_Waiting] = []
        while waiting and len(batch) < self._limit:
            if waiting[0].future.done():
                waiting.popleft()
            elif batch and waiting[0].statement != batch[0].statement:
                break
            else:
                batch.append(waiting.popleft())
        batch.sort(key=lambda w: w.merchant)
        return batch

    async def _run_batch(self, batch: list[_Waiting]) -> None:
        try:
            if len(batch) == 1:
                await self._settle_alone(batch[0])
                return
            rows = await self._together(batch[0].statement, [w.args for w in batch])
            if rows is None:  # rolled back, nothing written: each again alone
                self.rolled_back += 1
                for waiting in batch:
                    await self._settle_alone(waiting)
                return
            self.batches += 1
            self.batched += len(batch)
            for waiting, row in zip(batch, rows, strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(row)
        except BaseException as exc:
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(exc if isinstance(exc, Exception) else self._stopped())
            if not isinstance(exc, Exception):
                raise

    async def _settle_alone(self, waiting: _Waiting) -> None:
        if waiting.future.done():
            return
        try:
            row = await self._alone(waiting.statement, waiting.args)
        except Exception as exc:
            if not waiting.future.done():
                waiting.future.set_exception(exc)
        else:
            if not waiting.future.done():
                waiting.future.set_result(row)

    async def close(self) -> None:
        """Stop the batches under way; whoever waits on them gets `stopped()`."""
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)
