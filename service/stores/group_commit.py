"""Group commit for one merchant's refunds on PostgreSQL.

Every approved refund debits its merchant's balance row, and PostgreSQL holds
that row's lock until the commit is flushed to disk. When many refunds of one
merchant arrive at once (a cancelled event's ten thousand tickets), each would
wait on that lock for the refund before it: the merchant's refunds would go one
flush at a time, and every wait costs PostgreSQL CPU.

So a process runs at most one refund statement per merchant at a time. The
refunds of that merchant that arrive meanwhile wait in the merchant's queue;
when the running one is done, they go to PostgreSQL together as a batch. Each
refund in a batch is still its own statement (IN_ONE_STATEMENT, with every
guard, its audit row and its journal entry), but the batch is sent in one round
trip and runs as one transaction: it takes the balance row's lock once and
flushes once. A refund that finds no other of its merchant running goes alone
at once, as it would without this module: nothing waits for a batch to fill.

A batch commits or rolls back as a whole:
- if one of its statements fails on a constraint, or PostgreSQL rolls it back
  (deadlock, serialization), nothing of the batch was written, and each of its
  refunds runs again alone, as if it had never been batched;
- if anything else fails (the connection is lost, the statement times out), each
  refund of the batch gets that error, exactly as a refund alone would: its
  outcome is unknown, the caller gets UNAVAILABLE, and a retry is safe.

No refund is answered before its batch's commit returned, so an answered
refund is durable like any other.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

# The most refunds in one batch: bounds how long a batch holds the balance row
# and how long its last refund waits for the first.
BATCH_LIMIT = 32


@dataclass
class _Waiting:
    statement: str
    args: tuple
    future: asyncio.Future


@dataclass
class _Merchant:
    """A merchant with a refund running: the refunds waiting behind it."""
    waiting: collections.deque[_Waiting] = field(default_factory=collections.deque)


class GroupCommit:
    """`alone(statement, args)` runs one statement and returns its row;
    `together(statement, [args, ...])` runs the statement once per args in one
    transaction and returns their rows, or None when that transaction was
    rolled back as a whole (then each runs again alone)."""

    def __init__(self, alone: Callable[[str, tuple], Awaitable],
                 together: Callable[[str, list[tuple]], Awaitable[Sequence | None]], limit: int = BATCH_LIMIT,
                 stopped: Callable[[], Exception] = lambda: RuntimeError("stopped")):
        self._alone = alone
        self._stopped = stopped  # what a refund whose batch was stopped (by close) gets
        self._together = together
        self._limit = limit
        self._running: dict[object, _Merchant] = {}
        self._drains: set[asyncio.Task] = set()
        # What happened so far (tests and the bench read them).
        self.batches = 0
        self.batched = 0
        self.rolled_back = 0

    async def run(self, merchant: object, statement: str, args: tuple):
        """The row of `statement` run with `args`, alone or in a batch of `merchant`'s refunds."""
        running = self._running.get(merchant)
        if running is not None:
            future = asyncio.get_running_loop().create_future()
            running.waiting.append(_Waiting(statement, args, future))
            return await future
        self._running[merchant] = _Merchant()
        try:
            return await self._alone(statement, args)
        finally:
            self._hand_over(merchant)

    def _hand_over(self, merchant: object) -> None:
        """The merchant's running refund is done: start on those waiting, or mark it idle."""
        waiting = self._running[merchant].waiting
        while waiting and waiting[0].future.done():  # their callers gave up
            waiting.popleft()
        if not waiting:
            del self._running[merchant]
            return
        task = asyncio.get_running_loop().create_task(self._drain(merchant))
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, merchant: object) -> None:
        waiting = self._running[merchant].waiting
        try:
            while waiting:
                batch = self._next_batch(waiting)
                if batch:
                    await self._run_batch(batch)
        finally:
            del self._running[merchant]
            for left in waiting:  # only when the drain itself was cancelled (close)
                if not left.future.done():
                    left.future.set_exception(self._stopped())

    def _next_batch(self, waiting: collections.deque[_Waiting]) -> list[_Waiting]:
        """Up to `limit` waiting refunds in their order of arrival, all of one statement."""
        batch: list[_Waiting] = []
        while waiting and len(batch) < self._limit:
            if waiting[0].future.done():
                waiting.popleft()
            elif batch and waiting[0].statement != batch[0].statement:
                break
            else:
                batch.append(waiting.popleft())
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
