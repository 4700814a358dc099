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

from service.stores.group_commit import GroupCommit, LockWaitTooLong
from service.stores.port import StoreUnavailable


class Lost(Exception):
    """The connection was lost: the outcome of a whole batch is unknown."""


class FakeDatabase:
    """Runs a statement by returning (statement, args); records every call, and
    how many statements of one merchant (args[0]) ran at once."""

    def __init__(self, *, roll_back=(), lose=(), fail_alone=(), blocked=()):
        self.roll_back = set(roll_back)    # batch numbers (from 0) rolled back as a whole
        self.lose = set(lose)              # batch numbers whose connection is lost
        self.fail_alone = set(fail_alone)  # args whose statement fails when run alone
        self.blocked = set(blocked)        # merchants whose rows another client holds: a lane gives up on them
        self.released: asyncio.Event | None = None  # when set, what runs aside waits for it (the lock to go)
        self.alone_calls: list[tuple] = []
        self.batches: list[list[tuple]] = []
        self.aside_calls: list[tuple] = []  # args run aside, alone or together
        self.running = Counter()
        self.most_at_once = Counter()
        self.gate: asyncio.Event | None = None  # when set, statements wait for it
        self.batch_gate: asyncio.Event | None = None  # when set, batches wait for it

    async def _hold(self, merchants, gate=None):
        gate = gate or self.gate
        for merchant in merchants:
            self.running[merchant] += 1
            self.most_at_once[merchant] = max(self.most_at_once[merchant], self.running[merchant])
        try:
            if gate is not None:
                await gate.wait()
            await asyncio.sleep(0)
        finally:
            for merchant in merchants:
                self.running[merchant] -= 1

    async def alone(self, statement, args):
        self.alone_calls.append(args)
        await self._hold({args[0]})
        if args[0] in self.blocked:
            raise LockWaitTooLong("lock_timeout")
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
        if any(args[0] in self.blocked for args in many):
            raise LockWaitTooLong("lock_timeout")
        return [(statement, args) for args in many]

    async def alone_aside(self, statement, args):
        return (await self.together_aside(statement, [args]))[0]

    async def together_aside(self, statement, many):
        """With no bound on lock waits: waits for `released`, then runs."""
        self.aside_calls += many
        await self._hold({args[0] for args in many}, self.released)
        return [(statement, args) for args in many]

    def group(self, **options) -> GroupCommit:
        return GroupCommit(self.alone, self.together, aside=(self.alone_aside, self.together_aside), **options)


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


def test_a_merchant_whose_rows_another_client_holds_moves_aside_and_the_lane_goes_on():
    """Merchant 1's rows are held by another client. Its refunds wait in one batch
    with merchants 2 and 3; the lane gives up on that batch, runs each alone, gives
    up on merchant 1's first and moves it aside, and sends merchant 1's others
    straight after it: the lane spends two bounded waits on merchant 1, not one per
    refund. Merchants 2 and 3 are answered while merchant 1 still waits; merchant
    1's later refunds go aside too; once the lock goes all are answered, and the
    side lane is gone."""
    database = FakeDatabase(blocked={1})
    group = database.group(lanes=1)
    calls = [("S", (merchant, order)) for order in range(3) for merchant in (1, 2, 3)]

    async def main():
        database.released = asyncio.Event()
        first, rest = await first_and_waiting(group, database, [("S", (9, 0))] + calls)
        database.gate.set()
        await first
        others = [task for task, (_, args) in zip(rest, calls, strict=True) if args[0] != 1]
        answered = await asyncio.wait_for(asyncio.gather(*others), 1)
        later = asyncio.ensure_future(group.run(1, "S", (1, 3)))
        await asyncio.sleep(0)
        while_held = (group.in_side_lanes(), group.waiting()[0], sum(t.done() for t in rest) - len(others))
        database.released.set()
        return answered, while_held, await asyncio.gather(*rest, later)

    answered, while_held, results = run(main())
    assert answered == [c for c in calls if c[1][0] != 1]
    assert while_held == (4, 0, 0)  # merchant 1's three and the later one, aside; none in the lane
    assert results == calls + [("S", (1, 3))]
    tried_in_lane = [args for args in database.alone_calls if args[0] == 1]
    assert tried_in_lane == [(1, 0)]  # its first alone; the rest of its batch went straight aside
    assert database.batches[0] == sorted(args for _, args in calls)  # the batch given up on
    assert database.aside_calls == [(1, 0), (1, 1), (1, 2), (1, 3)]  # (1, 0) alone, then the rest in one batch
    assert (group.moved_aside, group.rolled_back, group.in_side_lanes()) == (4, 1, 0)
    assert set(database.most_at_once.values()) == {1}


def test_a_caller_who_gives_up_aside_cancels_its_own_statement_and_those_behind_it_still_run():
    """The refund that opens its merchant's side lane runs there in its caller's
    task, as it did in its lane: a caller who gives up (a deadline) cancels its
    statement there (on PostgreSQL, test_caller_deadline_shorter_than_the_database_...
    shows nothing of it is written); the refund waiting behind it in the side lane
    still runs, and the count of refunds aside ends at 0."""
    database = FakeDatabase(blocked={1})
    group = database.group(lanes=1)

    async def main():
        database.released = asyncio.Event()
        first = asyncio.ensure_future(group.run(1, "S", (1, 0)))
        for _ in range(5):
            await asyncio.sleep(0)
        second = asyncio.ensure_future(group.run(1, "S", (1, 1)))
        await asyncio.sleep(0)
        aside_before = group.in_side_lanes()
        first.cancel()
        await asyncio.sleep(0)
        database.released.set()
        return aside_before, await asyncio.gather(first, second, return_exceptions=True), group.in_side_lanes()

    aside_before, (first, second), aside_after = run(main())
    assert aside_before == 2 and aside_after == 0
    assert isinstance(first, asyncio.CancelledError) and second == ("S", (1, 1))
    assert database.aside_calls == [(1, 0), (1, 1)]  # (1, 0) was cancelled while it waited for the lock
    assert database.alone_calls == [(1, 0)]  # its one bounded try in the lane


@pytest.mark.parametrize("first_in_lane", [True, False])
def test_with_every_side_lane_taken_a_refund_that_would_need_another_is_answered_unavailable_at_once(
        first_in_lane):
    """Side lanes hold a connection each while they wait, so there are only so
    many: with the one allowed held by merchant 1, merchant 2's blocked refund (run
    first in its lane, or waiting in it) is answered StoreUnavailable, nothing
    written; merchant 1's later refund still joins its side lane, and merchant 3,
    not blocked, is served."""
    database = FakeDatabase(blocked={1, 2})
    group = database.group(lanes=1, side_lanes=1)

    async def main():
        database.released = asyncio.Event()
        aside = asyncio.ensure_future(group.run(1, "S", (1, 0)))
        for _ in range(5):
            await asyncio.sleep(0)
        if first_in_lane:
            [refused] = await asyncio.wait_for(asyncio.gather(group.run(2, "S", (2, 0)), return_exceptions=True), 1)
            others = []
        else:
            database.gate = asyncio.Event()
            first = asyncio.ensure_future(group.run(3, "S", (3, 0)))
            await asyncio.sleep(0)
            waiting = [asyncio.ensure_future(group.run(m, "S", (m, 1))) for m in (2, 3)]
            await asyncio.sleep(0)
            database.gate.set()
            others = await asyncio.wait_for(asyncio.gather(first, *waiting, return_exceptions=True), 1)
            refused = others.pop(1)
        joined = asyncio.ensure_future(group.run(1, "S", (1, 1)))
        await asyncio.sleep(0)
        database.released.set()
        return refused, others, await asyncio.gather(aside, joined)

    refused, others, served = run(main())
    assert isinstance(refused, StoreUnavailable) and not isinstance(refused, LockWaitTooLong)
    assert others == ([] if first_in_lane else [("S", (3, 0)), ("S", (3, 1))])
    assert served == [("S", (1, 0)), ("S", (1, 1))]
    assert (2, 0) not in database.aside_calls and (2, 1) not in database.aside_calls


def test_a_side_lanes_own_error_reaches_only_its_callers():
    """What runs aside has no bound of its own: were it to give up anyway, its
    callers get that (a retry-safe unavailable), not a loop back into the lane."""
    database = FakeDatabase(blocked={1})
    group = GroupCommit(database.alone, database.together)  # no unbounded pair: aside, the lane's own

    async def main():
        return await asyncio.wait_for(asyncio.gather(group.run(1, "S", (1, 0)), group.run(2, "S", (2, 0)),
                                                     return_exceptions=True), 1)

    blocked, other = run(main())
    assert isinstance(blocked, LockWaitTooLong) and other == ("S", (2, 0))
    assert isinstance(blocked, StoreUnavailable)  # answered 9001 UNAVAILABLE, a retry is safe


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


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.sampled_from(["A", "B"]), st.integers(0, 2)), min_size=1,
                max_size=40),
       st.sets(st.integers(0, 10), max_size=3), st.sets(st.integers(0, 10), max_size=3), st.integers(1, 5),
       st.integers(1, 3), st.sets(st.integers(1, 3), max_size=2))
def test_every_caller_gets_exactly_its_own_answer_whatever_the_arrivals(arrivals, roll_back, lose, limit, lanes,
                                                                          blocked):
    """Callers arrive in random order and pauses, over three merchants and two
    statements, in one to three lanes; batches are rolled back or lost at random,
    and the rows of some merchants are held by another client (their lane gives up
    on them; aside they run). Every caller gets its own row or the error of its own
    batch; one merchant never has two statements running, in its lane and its side
    lane together; a batch is in merchant order; a refund runs at most three times
    (in a batch given up, alone given up, then aside), and a blocked merchant's
    refund is run aside exactly once."""
    database = FakeDatabase(roll_back=roll_back, lose=lose - roll_back, blocked=blocked)
    group = database.group(limit=limit, lanes=lanes)

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
    runs = Counter(database.alone_calls) + Counter(a for batch in database.batches for a in batch) \
        + Counter(database.aside_calls)
    assert max(runs.values()) <= 3
    assert len(runs) == len(arrivals)
    aside = Counter(database.aside_calls)
    assert set(aside) == {(m, i) for i, (m, _, _) in enumerate(arrivals) if m in blocked} - lost
    assert set(aside.values()) <= {1}
    assert group.in_side_lanes() == 0 and group.waiting() == (0, 0.0)


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
