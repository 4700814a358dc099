"""GroupCommit (service/stores/group_commit.py) with a fake database: who goes
alone, who goes in which batch, and what each caller gets back when a batch
commits, is rolled back, fails, or its caller gives up."""

from __future__ import annotations

import asyncio
import contextvars
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.stores.group_commit import GroupCommit


class Lost(Exception):
    """The connection was lost: the outcome of a whole batch is unknown."""


class FakeDatabase:
    """Runs a statement by returning (statement, args); records every call, and
    how many statements of one merchant (args[0]) ran at once."""

    def __init__(self, *, roll_back=(), lose=(), fail_alone=()):
        self.roll_back = set(roll_back)    # batch numbers (from 0) rolled back as a whole
        self.lose = set(lose)              # batch numbers whose connection is lost
        self.fail_alone = set(fail_alone)  # args whose statement fails when run alone
        self.alone_calls: list[tuple] = []
        self.batches: list[list[tuple]] = []
        self.running = Counter()
        self.most_at_once = Counter()
        self.gate: asyncio.Event | None = None  # when set, statements wait for it
        self.batch_gate: asyncio.Event | None = None  # when set, batches wait for it

    async def _hold(self, merchants):
        for merchant in merchants:
            self.running[merchant] += 1
            self.most_at_once[merchant] = max(self.most_at_once[merchant], self.running[merchant])
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
        finally:
            for merchant in merchants:
                self.running[merchant] -= 1

    async def alone(self, statement, args):
        self.alone_calls.append(args)
        await self._hold({args[0]})
        if args in self.fail_alone:
            raise ValueError(f"refused {args}")
        return statement, args

    async def together(self, statement, many):
        number = len(self.batches)
        self.batches.append(list(many))
        if self.batch_gate is not None:
            await self.batch_gate.wait()
        await self._hold({args[0] for args in many})
        if number in self.lose:
            raise Lost()
        if number in self.roll_back:
            return None
        return [(statement, args) for args in many]


async def first_and_waiting(group: GroupCommit, database: FakeDatabase, calls: list[tuple[str, tuple]]):
    """Start the first call and let it reach the database (held at the gate), then
    start the rest: they are all waiting behind the first. (first, [the rest])."""
    database.gate = asyncio.Event()
    first = asyncio.ensure_future(group.run(calls[0][1][0], *calls[0]))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(group.run(args[0], statement, args)) for statement, args in calls[1:]]
    await asyncio.sleep(0)
    return first, rest


async def storm(group: GroupCommit, database: FakeDatabase, calls: list[tuple[str, tuple]]):
    """All of `calls` waiting behind the first, then the gate opened; every result."""
    first, rest = await first_and_waiting(group, database, calls)
    database.gate.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_refund_with_none_other_of_its_merchant_running_goes_alone_at_once():
    database = FakeDatabase()
    group = GroupCommit(database.alone, database.together)

    async def main():
        return [await group.run(1, "S", (1, order)) for order in range(3)]

    assert run(main()) == [("S", (1, 0)), ("S", (1, 1)), ("S", (1, 2))]
    assert database.batches == [] and group.batches == 0


def test_refunds_arriving_while_one_runs_go_together_in_order_of_arrival():
    database = FakeDatabase()
    group = GroupCommit(database.alone, database.together)
    calls = [("S", (1, order)) for order in range(6)]

    results = run(storm(group, database, calls))

    assert results == calls  # each caller gets its own row
    assert database.alone_calls == [(1, 0)]
    assert database.batches == [[(1, order) for order in range(1, 6)]]
    assert (group.batches, group.batched, group.rolled_back) == (1, 5, 0)


def test_a_batch_holds_at_most_the_limit():
    database = FakeDatabase()
    group = GroupCommit(database.alone, database.together, limit=4)
    calls = [("S", (1, order)) for order in range(11)]

    assert run(storm(group, database, calls)) == calls
    assert [len(b) for b in database.batches] == [4, 4, 2]


def test_merchants_of_other_lanes_never_wait_for_each_other():
    database = FakeDatabase()
    group = GroupCommit(database.alone, database.together, lanes=3)
    calls = [("S", (merchant, order)) for order in range(8) for merchant in (1, 2, 3)]

    assert run(storm(group, database, calls)) == calls
    assert set(database.most_at_once.values()) == {1}
    assert all(len({args[0] for args in batch}) == 1 for batch in database.batches)
    assert {args[0] for args in database.alone_calls} == {1, 2, 3}  # each lane's first went at once


def test_merchants_of_one_lane_share_batches_in_merchant_order_never_two_of_one_merchant_at_once():
    database = FakeDatabase()
    group = GroupCommit(database.alone, database.together, lanes=1)
    calls = [("S", (merchant, order)) for order in range(4) for merchant in (3, 1, 2)]

    assert run(storm(group, database, calls)) == calls
    assert database.alone_calls == [(3, 0)]
    assert database.batches == [sorted(args for _, args in calls[1:])]  # merchant order; each merchant's in order of arrival
    assert set(database.most_at_once.values()) == {1}


def test_statements_of_two_kinds_are_never_in_one_batch():
    database = FakeDatabase()
    group = GroupCommit(database.alone, database.together)
    calls = [("BY_ID", (1, 0)), ("BY_ID", (1, 1)), ("BY_ID", (1, 2)), ("BY_REF", (1, 3)), ("BY_REF", (1, 4)),
             ("BY_ID", (1, 5))]

    assert run(storm(group, database, calls)) == calls
    assert database.batches == [[(1, 1), (1, 2)], [(1, 3), (1, 4)]]
    assert database.alone_calls == [(1, 0), (1, 5)]  # a batch of one goes alone


def test_a_rolled_back_batch_runs_again_one_by_one_each_with_its_own_answer():
    database = FakeDatabase(roll_back={0}, fail_alone={(1, 3)})
    group = GroupCommit(database.alone, database.together)
    calls = [("S", (1, order)) for order in range(5)]

    results = run(storm(group, database, calls))

    assert results[:3] == calls[:3] and results[4] == calls[4]
    assert isinstance(results[3], ValueError)  # only the refund that fails alone fails
    assert database.alone_calls == [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]
    assert (group.batches, group.rolled_back) == (0, 1)


def test_a_batch_whose_outcome_is_unknown_gives_every_refund_in_it_that_error():
    database = FakeDatabase(lose={0})
    group = GroupCommit(database.alone, database.together, limit=3)
    calls = [("S", (1, order)) for order in range(6)]

    results = run(storm(group, database, calls))

    assert results[0] == calls[0]
    assert [type(r) for r in results[1:4]] == [Lost, Lost, Lost]
    assert results[4:] == calls[4:]  # the next batch still ran
    assert database.alone_calls == [(1, 0)]


def test_a_caller_who_gives_up_while_waiting_is_left_out_and_the_others_are_answered():
    database = FakeDatabase()
    group = GroupCommit(database.alone, database.together)

    async def main():
        first, waiting = await first_and_waiting(group, database, [("S", (1, order)) for order in range(5)])
        waiting[1].cancel()
        database.gate.set()
        return await asyncio.gather(first, *waiting, return_exceptions=True)

    results = run(main())
    assert results[0] == ("S", (1, 0))
    assert isinstance(results[2], asyncio.CancelledError)
    assert [results[1], results[3], results[4]] == [("S", (1, 1)), ("S", (1, 3)), ("S", (1, 4))]
    assert database.batches == [[(1, 1), (1, 3), (1, 4)]]


def test_waiting_counts_the_refunds_held_behind_a_busy_lane_and_how_long_the_first_has_waited():
    """What refund_service_refunds_waiting_for_lane and ..._lane_wait_seconds export: a
    lane held by one statement (a row lock another client holds), seen while it lasts."""
    database = FakeDatabase()
    group = GroupCommit(database.alone, database.together, lanes=1)

    async def main():
        idle = group.waiting()
        first, waiting = await first_and_waiting(group, database, [("S", (m, 0)) for m in (1, 2, 3, 4)])
        await asyncio.sleep(0.05)
        held = group.waiting()
        waiting[0].cancel()  # its caller gave up: no longer waiting
        await asyncio.sleep(0)
        after_one_left = group.waiting()
        database.gate.set()
        await asyncio.gather(first, *waiting[1:])
        return idle, held, after_one_left, group.waiting()

    idle, held, after_one_left, done = run(main())
    assert idle == (0, 0.0) and done == (0, 0.0)
    assert held[0] == 3 and 0.05 <= held[1] < 5  # merchants 2, 3, 4 behind merchant 1's statement
    assert after_one_left[0] == 2 and 0.05 <= after_one_left[1] < 5


def test_when_the_first_caller_gives_up_those_waiting_behind_it_still_run():
    database = FakeDatabase()
    group = GroupCommit(database.alone, database.together)

    async def main():
        first, waiting = await first_and_waiting(group, database, [("S", (1, order)) for order in range(3)])
        first.cancel()
        await asyncio.sleep(0)
        database.gate.set()
        return await asyncio.gather(*waiting), first.cancelled()

    assert run(main()) == ([("S", (1, 1)), ("S", (1, 2))], True)
    assert database.batches == [[(1, 1), (1, 2)]]


def test_close_answers_everyone_still_waiting_and_nothing_hangs():
    database = FakeDatabase()
    group = GroupCommit(database.alone, database.together, stopped=lambda: Lost("closing"))

    async def main():
        first, waiting = await first_and_waiting(group, database, [("S", (1, order)) for order in range(3)])
        database.batch_gate = asyncio.Event()  # never set: the batch stays in the database
        database.gate.set()
        await first
        await asyncio.sleep(0)
        assert database.batches == [[(1, 1), (1, 2)]]
        await asyncio.wait_for(group.close(), 1)
        return await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 1)

    assert [type(r) for r in run(main())] == [Lost, Lost]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.sampled_from(["A", "B"]), st.integers(0, 2)), min_size=1,
                max_size=40),
       st.sets(st.integers(0, 10), max_size=3), st.sets(st.integers(0, 10), max_size=3), st.integers(1, 5),
       st.integers(1, 3))
def test_every_caller_gets_exactly_its_own_answer_whatever_the_arrivals(arrivals, roll_back, lose, limit, lanes):
    """Callers arrive in random order and pauses, over three merchants and two
    statements, in one to three lanes; batches are rolled back or lost at random.
    Every caller gets its own row or the error of its own batch; one merchant
    never has two statements running; a batch is in merchant order; a refund runs
    at most twice (in a rolled-back batch, then alone)."""
    database = FakeDatabase(roll_back=roll_back, lose=lose - roll_back)
    group = GroupCommit(database.alone, database.together, limit=limit, lanes=lanes)

    async def call(index, merchant, statement, pause):
        for _ in range(pause):
            await asyncio.sleep(0)
        return await group.run(merchant, statement, (merchant, index))

    async def main():
        return await asyncio.gather(*(call(i, m, s, p) for i, (m, s, p) in enumerate(arrivals)),
                                    return_exceptions=True)

    results = run(main())
    lost_batches = [batch for number, batch in enumerate(database.batches) if number in lose - roll_back]
    lost = {args for batch in lost_batches for args in batch}
    for index, ((merchant, statement, _), result) in enumerate(zip(arrivals, results, strict=True)):
        if (merchant, index) in lost:
            assert isinstance(result, Lost)
        else:
            assert result == (statement, (merchant, index))
    assert set(database.most_at_once.values()) <= {1}
    assert all(len(batch) <= limit and [a[0] for a in batch] == sorted(a[0] for a in batch)
               for batch in database.batches)
    assert all(len({a[0] % lanes for a in batch}) == 1 for batch in database.batches)
    runs = Counter(database.alone_calls) + Counter(a for batch in database.batches for a in batch)
    assert max(runs.values()) <= 2
    assert len(runs) == len(arrivals)


@pytest.mark.parametrize("limit", [1, 2])
def test_a_limit_of_one_or_two_still_answers_everyone(limit):
    database = FakeDatabase()
    group = GroupCommit(database.alone, database.together, limit=limit)
    calls = [("S", (1, order)) for order in range(5)]
    assert run(storm(group, database, calls)) == calls


def test_a_batch_runs_in_no_callers_context():
    """The drain that runs a batch is not the first caller's task: it must not
    carry that caller's request id (or trace) into the other callers' statements."""
    request_id = contextvars.ContextVar("request_id", default=None)
    seen = []

    async def together(statement, many):
        seen.append(request_id.get())
        return [(statement, args) for args in many]

    database = FakeDatabase()
    group = GroupCommit(database.alone, together)

    async def call(order):
        request_id.set(f"req-{order}")
        return await group.run(1, "S", (1, order))

    async def main():
        database.gate = asyncio.Event()
        first = asyncio.ensure_future(call(0))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(call(order)) for order in (1, 2)]
        await asyncio.sleep(0)
        database.gate.set()
        return await asyncio.gather(first, *rest)

    assert run(main()) == [("S", (1, 0)), ("S", (1, 1)), ("S", (1, 2))]
    assert seen == [None]
