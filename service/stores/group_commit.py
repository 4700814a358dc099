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

A lane's statements wait for a lock only so long (the store bounds them,
LANE_LOCK_TIMEOUT on PostgreSQL): one that waits longer for a row that another
client holds (an operator's open transaction on a balance) would hold up every
refund behind it. It gives up (nothing written) with LockWaitTooLong, and its
refund moves aside: to a side lane of its merchant's own, whose statements wait
as long as a lone refund would (up to --db-timeout). While that side lane runs,
the merchant's later refunds go there too, so a blocked merchant costs its lane
one or two bounded waits (its batch's, then its first refund's alone), not one
per refund, and the other merchants go on. Each side
lane holds a database connection while it waits, so there are at most
`side_lanes` of them; a refund that would need another is answered
StoreUnavailable at once (retry-safe, nothing written), leaving the lanes their
connections.

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

from service.stores.port import StoreUnavailable

# The most refunds in one batch: bounds how long a batch holds its rows and how
# long its last refund waits for the first.
BATCH_LIMIT = 32
# Lanes per process. On 2 cores, 32 connections (bench.ab, docs/performance.md): one
# lane against two, 7 alternated rounds, 1.10x the signed edge's rate (faster in 6 of 7)
# and 1.11x gRPC's (7 of 7), PostgreSQL CPU per refund 352 -> 284 us: fewer, larger
# batches, so fewer commits. The cost: a refund waiting for a row lock that another
# client holds (an open transaction on a balance) holds up every merchant of its lane,
# up to the store's bound on a lane's lock waits (250 ms on PostgreSQL), after which it
# moves aside (`waiting()`, exported as the lane gauges, shows the waits).
LANES = 1


class LockWaitTooLong(StoreUnavailable):
    """A lane's statement (or batch) gave up waiting for a lock, and wrote nothing.
    Never the answer of a side lane's refund; were it one, it is a retry-safe
    UNAVAILABLE like any other store that could not finish."""


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
    rolled back as a whole (then each runs again alone). Either may raise
    LockWaitTooLong; `aside`, the same pair without that bound, then runs the
    refunds of that merchant in its side lane (by default the same pair)."""

    def __init__(self, alone: Callable[[str, tuple], Awaitable],
                 together: Callable[[str, list[tuple]], Awaitable[Sequence | None]], limit: int = BATCH_LIMIT,
                 stopped: Callable[[], Exception] = lambda: RuntimeError("stopped"), lanes: int = LANES,
                 aside: tuple[Callable[[str, tuple], Awaitable],
                              Callable[[str, list[tuple]], Awaitable[Sequence | None]]] | None = None,
                 side_lanes: int = 8):
        self._run_alone = {False: alone, True: aside[0] if aside else alone}  # by whether the lane is a side lane
        self._run_together = {False: together, True: aside[1] if aside else together}
        self._lanes = lanes
        self._side_lanes = side_lanes  # the most side lanes open at once
        self._stopped = stopped  # what a refund whose batch was stopped (by close) gets
        self._limit = limit
        self._running: dict[int | tuple[str, int], _Lane] = {}  # lanes by number, side lanes by _side
        self._drains: set[asyncio.Task] = set()
        # What happened so far (tests and the bench read them).
        self.batches = 0
        self.batched = 0
        self.rolled_back = 0
        self.alone_rolled_back = 0  # counted by the store: a refund alone rolled back and run again
        self.moved_aside = 0  # refunds run in their merchant's side lane (their lane gave up waiting for a lock)
        self.refused_aside = 0  # refunds answered StoreUnavailable: no room for another side lane
        self._in_side_lanes = 0

    async def run(self, merchant: int, statement: str, args: tuple):
        """The row of `statement` run with `args`, alone or in a batch of its lane
        (its merchant's side lane while there is one)."""
        side = _side(merchant)
        if side in self._running:
            return await self._run_in(side, merchant, statement, args)
        try:
            return await self._run_in(merchant % self._lanes, merchant, statement, args)
        except LockWaitTooLong:  # it ran first in its lane, in this task, and gave up (nothing written)
            self._check_room_aside(merchant)
            return await self._run_in(side, merchant, statement, args)

    async def _run_in(self, key, merchant: int, statement: str, args: tuple):
        """Behind the lane `key`'s running refund or batch; or, when the lane is idle,
        at once in this task (so a caller who gives up cancels its own statement)."""
        side = _is_side(key)
        if side:
            self.moved_aside += 1
        running = self._running.get(key)
        if running is not None:
            future = self._future()
            if side:
                self._count_aside(future)
            running.waiting.append(_Waiting(merchant, statement, args, future, time.monotonic()))
            return await future
        self._running[key] = _Lane()
        self._in_side_lanes += side
        try:
            return await self._run_alone[side](statement, args)
        finally:
            self._in_side_lanes -= side
            self._hand_over(key)

    def waiting(self) -> tuple[int, float]:
        """(refunds waiting for their lane, seconds the longest of them has waited). A
        lane held for long by one transaction shows here. Safe from another thread (the
        metrics scrape): it reads copies."""
        now = time.monotonic()
        waiting = [w for key, lane in list(self._running.items()) if not _is_side(key)
                   for w in list(lane.waiting) if not w.future.done()]
        return len(waiting), max((now - w.since for w in waiting), default=0.0)

    def in_side_lanes(self) -> int:
        """Refunds in side lanes now: waiting, past their lane's bound, for a lock
        that another client holds (or behind one that does)."""
        return self._in_side_lanes

    @staticmethod
    def _future() -> asyncio.Future:
        return asyncio.get_running_loop().create_future()

    def _check_room_aside(self, merchant: int) -> None:
        """StoreUnavailable when `merchant` has no side lane and no other may open."""
        if _side(merchant) not in self._running and \
                sum(_is_side(key) for key in self._running) >= self._side_lanes:
            self.refused_aside += 1
            raise StoreUnavailable("too many refunds waiting for locks that other clients hold")

    def _move_aside(self, waiting: _Waiting) -> None:
        """A lane's waiting refund, to its merchant's side lane (opened if none
        runs); answered StoreUnavailable when there is no room for one."""
        try:
            self._check_room_aside(waiting.merchant)
        except StoreUnavailable as exc:
            if not waiting.future.done():
                waiting.future.set_exception(exc)
            return
        self.moved_aside += 1
        self._count_aside(waiting.future)
        side = _side(waiting.merchant)
        running = self._running.get(side)
        if running is not None:
            running.waiting.append(waiting)
        else:
            self._running[side] = _Lane(collections.deque([waiting]))
            self._start_drain(side)

    def _count_aside(self, future: asyncio.Future) -> None:
        """Count a refund in a side lane until it is answered."""
        self._in_side_lanes += 1
        future.add_done_callback(self._left_side_lane)

    def _left_side_lane(self, _future) -> None:
        self._in_side_lanes -= 1

    def _hand_over(self, lane) -> None:
        """The lane's running refund is done: start on those waiting, or mark the lane idle."""
        waiting = self._running[lane].waiting
        while waiting and waiting[0].future.done():  # their callers gave up
            waiting.popleft()
        if not waiting:
            del self._running[lane]
            return
        self._start_drain(lane)

    def _start_drain(self, lane) -> None:
        # A context of its own: the batches belong to no one caller's request (its id, its trace).
        task = asyncio.get_running_loop().create_task(self._drain(lane), context=contextvars.Context())
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, lane) -> None:
        waiting = self._running[lane].waiting
        side = _is_side(lane)
        try:
            while waiting:
                batch = self._next_batch(waiting, side)
                if batch:
                    await self._run_batch(batch, side)
        finally:
            del self._running[lane]
            for left in waiting:  # only when the drain itself was cancelled (close)
                if not left.future.done():
                    left.future.set_exception(self._stopped())

    def _next_batch(self, waiting: collections.deque[_Waiting], side: bool) -> list[_Waiting]:
        """Up to `limit` waiting refunds of one statement, in merchant order (each
        merchant's in their order of arrival). A lane's refunds of a merchant that
        has a side lane now go there."""
        batch: list[_Waiting] = []
        while waiting and len(batch) < self._limit:
            if waiting[0].future.done():
                waiting.popleft()
            elif not side and _side(waiting[0].merchant) in self._running:
                self._move_aside(waiting.popleft())
            elif batch and waiting[0].statement != batch[0].statement:
                break
            else:
                batch.append(waiting.popleft())
        batch.sort(key=lambda w: w.merchant)
        return batch

    async def _run_batch(self, batch: list[_Waiting], side: bool) -> None:
        try:
            if len(batch) == 1:
                await self._settle_alone(batch[0], side)
                return
            try:
                rows = await self._run_together[side](batch[0].statement, [w.args for w in batch])
            except LockWaitTooLong:  # nothing written; which refund waited is unknown
                if side:  # a side lane's statements have no bound of their own: an error like any other
                    raise
                rows = None
            if rows is None:  # rolled back, nothing written: each again alone
                self.rolled_back += 1
                for waiting in batch:
                    await self._settle_alone(waiting, side)
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

    async def _settle_alone(self, waiting: _Waiting, side: bool) -> None:
        if waiting.future.done():
            return
        if not side and _side(waiting.merchant) in self._running:
            self._move_aside(waiting)
            return
        try:
            row = await self._run_alone[side](waiting.statement, waiting.args)
        except Exception as exc:
            if isinstance(exc, LockWaitTooLong) and not side:
                self._move_aside(waiting)
            elif not waiting.future.done():
                waiting.future.set_exception(exc)
        else:
            if not waiting.future.done():
                waiting.future.set_result(row)

    async def close(self) -> None:
        """Stop the batches under way; whoever waits on them gets `stopped()`."""
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)


def _side(merchant: int) -> tuple[str, int]:
    """The key of `merchant`'s side lane (a lane's key is its number)."""
    return ("aside", merchant)


def _is_side(key) -> bool:
    return isinstance(key, tuple)
