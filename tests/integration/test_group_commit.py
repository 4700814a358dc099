"""Group commit (service/stores/group_commit.py) on both stores: refunds that
arrive together are applied in one transaction, each still with every guard,
its audit row and its journal entry; a batch the database rolls back is run
again refund by refund, and never half of it survives."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import sqlalchemy as sa

from service import db, domain, stores
from service.usecases import refunds
from tests.support import data
from tests.support.data import admin, balance_of
from tests.support.in_process import with_store
from tests.support.ledger import check_ledger
from tests.support.postgres import look_for_deadlocks_after

MERCHANT, OTHER = 3400001, 3400002
ORDERS = 60


def storm(url: str, commands: list[domain.RefundCommand], lanes: int = 2, batches=lambda store: store.group_commit):
    """Every command at once through one store; (results, the store's `batches`)."""
    async def work(store):
        return await asyncio.gather(*(refunds.refund(store, c) for c in commands)), batches(store)
    return with_store(url, work, lanes=lanes)


def load(url: str, balance: str) -> None:
    data.load(url, [data.merchant(MERCHANT, balances={"HKD": balance}),
                    data.merchant(OTHER, balances={"HKD": "1000.00"})],
              [data.order(order_id, MERCHANT, "10.00") for order_id in range(1, ORDERS + 1)]
              + [data.order(1000 + order_id, OTHER, "10.00") for order_id in range(1, 6)])


def test_one_merchants_storm_is_batched_and_every_refund_still_guarded(database_url):
    """60 refunds of one merchant at once, with a balance for 45 of them: they go
    in batches, 45 are approved, 15 declined for the balance, nothing twice,
    and the journal still adds up (refund-admin verify)."""
    load(database_url, "450.00")
    commands = [domain.RefundCommand(MERCHANT, order_id, None, "10.00") for order_id in range(1, ORDERS + 1)]
    results, group = storm(database_url, commands)

    codes = Counter(r.code for r in results)
    assert codes == {domain.ResponseCode.SUCCESS: 45, domain.ResponseCode.INSUFFICIENT_BALANCE: 15}
    assert group.batches >= 1 and group.batched >= 2, "the storm formed no batch"
    assert group.rolled_back == 0
    for command, result in zip(commands, results, strict=True):
        assert result.order.id == command.order_id  # each caller got its own refund's answer
    assert balance_of(database_url, MERCHANT, "HKD") == 0
    check_ledger(database_url, {(MERCHANT, "HKD"): 45000, (OTHER, "HKD"): 100000})
    assert "the ledger holds" in admin(database_url, "verify")


def test_the_same_order_many_times_in_one_batch_is_refunded_once(database_url):
    """Duplicates of one order in one batch see each other's writes: one
    approval, the rest answer that the order was already refunded."""
    load(database_url, "1000.00")
    commands = [domain.RefundCommand(MERCHANT, 1, None, "10.00")] + \
        [domain.RefundCommand(MERCHANT, 2, None, "10.00") for _ in range(12)]
    results, group = storm(database_url, commands)

    assert group.batched >= 2
    codes = Counter(r.code for r in results[1:])
    assert codes == {domain.ResponseCode.SUCCESS: 1, domain.ResponseCode.ALREADY_REFUNDED: 11}
    refund_ids = {r.transaction.id for r in results[1:]}
    assert len(refund_ids) == 1  # every answer names the one refund
    assert balance_of(database_url, MERCHANT, "HKD") == 100000 - 2000
    assert "the ledger holds" in admin(database_url, "verify")


@pytest.mark.postgres
def test_a_batch_rolled_back_by_postgresql_is_run_again_one_by_one_and_never_half_kept(postgres_url):
    """A trigger makes the first batch of three or more fail on its third refund's audit row:
    PostgreSQL rolls the whole batch back, so the two refunds before it must
    not be kept; each refund then runs alone and is approved exactly once."""
    load(postgres_url, "1000.00")
    engine = db.make_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE audit_rows_seen (xact xid8)"))
        connection.execute(sa.text("CREATE SEQUENCE failures"))
        connection.execute(sa.text("""
            CREATE FUNCTION fail_one_batch() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                -- the third audit row of one transaction, i.e. of a batch, fails once
                -- (the sequence is not rolled back with it)
                INSERT INTO audit_rows_seen VALUES (pg_current_xact_id());
                IF (SELECT count(*) FROM audit_rows_seen WHERE xact = pg_current_xact_id()) = 3
                   AND nextval('failures') = 1 THEN
                    RAISE EXCEPTION 'injected' USING ERRCODE = 'unique_violation';
                END IF;
                RETURN NEW;
            END $$"""))
        connection.execute(sa.text("CREATE TRIGGER fail_one_batch BEFORE INSERT ON refund_attempts "
                                   "FOR EACH ROW EXECUTE FUNCTION fail_one_batch()"))
    engine.dispose()
    commands = [domain.RefundCommand(MERCHANT, order_id, None, "10.00") for order_id in range(1, 21)]
    results, group = storm(postgres_url, commands)

    assert group.rolled_back == 1
    assert [r.code for r in results] == [domain.ResponseCode.SUCCESS] * 20
    assert balance_of(postgres_url, MERCHANT, "HKD") == 100000 - 20 * 1000
    ledger = check_ledger(postgres_url, {(MERCHANT, "HKD"): 100000, (OTHER, "HKD"): 100000})
    assert sorted(ledger.refunds) == list(range(1, 21))
    assert all(len(made) == 1 for made in ledger.refunds.values())
    assert "the ledger holds" in admin(postgres_url, "verify")


@pytest.mark.parametrize("lanes", [1, 2])
def test_merchants_sharing_a_lane_share_batches_and_each_refund_keeps_its_answer(database_url, lanes):
    """With one lane both merchants' refunds go in the same batches (in merchant
    order); with two, each merchant has its own lane. Either way each caller
    gets its own refund, and each balance only its own debits."""
    load(database_url, "1000.00")
    commands = [domain.RefundCommand(MERCHANT, o, None, "10.00") for o in range(1, 26)] + \
        [domain.RefundCommand(OTHER, 1000 + o, None, "10.00") for o in range(1, 6)]
    commands = [commands[i] for i in sorted(range(30), key=lambda i: (i % 6, i))]  # the two merchants mixed
    results, group = storm(database_url, commands, lanes=lanes)

    assert group.batched >= 2
    assert all(r.code is domain.ResponseCode.SUCCESS for r in results)
    assert [(r.order.merchant_id, r.order.id) for r in results] == [(c.merchant_id, c.order_id) for c in commands]
    assert balance_of(database_url, MERCHANT, "HKD") == 100000 - 25 * 1000
    assert balance_of(database_url, OTHER, "HKD") == 100000 - 5 * 1000
    assert "the ledger holds" in admin(database_url, "verify")


def test_a_sqlite_batch_that_fails_is_run_again_one_by_one_and_never_half_kept(sqlite_url, monkeypatch):
    """The second refund of SQLite's first batch fails on a constraint: the
    batch's write transaction is rolled back whole (the refund before it in the
    batch is not kept), and each refund then runs alone, approved once."""
    import sqlite3

    from service.stores import sqlite as sqlite_store

    load(sqlite_url, "1000.00")
    insert_refund, apply_many = sqlite_store._insert_refund, sqlite_store.SqliteStore._apply_many
    calls = {"in batch": 0, "failed": False}

    def failing_insert(db, *args):
        if calls["batching"]:
            calls["in batch"] += 1
            if calls["in batch"] == 2 and not calls["failed"]:
                calls["failed"] = True
                raise sqlite3.IntegrityError("injected")
        return insert_refund(db, *args)

    def batching(connection, many):
        calls["batching"] = len(many) > 1  # a refund alone goes through _apply_many too
        try:
            return apply_many(connection, many)
        finally:
            calls["batching"] = False

    calls["batching"] = False
    monkeypatch.setattr(sqlite_store, "_insert_refund", failing_insert)
    monkeypatch.setattr(sqlite_store.SqliteStore, "_apply_many", staticmethod(batching))
    commands = [domain.RefundCommand(MERCHANT, order_id, None, "10.00") for order_id in range(1, 21)]
    results, group = storm(sqlite_url, commands)

    assert calls["failed"] and group.rolled_back == 1
    assert [r.code for r in results] == [domain.ResponseCode.SUCCESS] * 20
    ledger = check_ledger(sqlite_url, {(MERCHANT, "HKD"): 100000, (OTHER, "HKD"): 100000})
    assert sorted(ledger.refunds) == list(range(1, 21))
    assert all(len(made) == 1 for made in ledger.refunds.values())
    assert "the ledger holds" in admin(sqlite_url, "verify")


def test_in_a_batch_a_refund_whose_key_was_revoked_writes_nothing_and_the_others_are_applied(database_url):
    """Each refund of a batch is checked against its own credentials: those
    signed with a key revoked before the apply write nothing (the use case then
    authenticates afresh), the others in the same batch are applied."""
    from service.stores.port import SignedBy
    from tests.support.data import deactivate_key, insert_key_directly
    from tests.support.keys import generated_key, public_pem

    load(database_url, "1000.00")
    insert_key_directly(database_url, MERCHANT, "old", public_pem(generated_key("old")))
    insert_key_directly(database_url, MERCHANT, "new", public_pem(generated_key("new")))
    deactivate_key(database_url, MERCHANT, "old")

    results = with_store(database_url, lambda store: asyncio.gather(*(
        refunds.refund(store, domain.RefundCommand(MERCHANT, order_id, None, "10.00"),
                       SignedBy("old" if order_id % 3 == 0 else "new"))
        for order_id in range(1, 25))))
    for order_id, result in zip(range(1, 25), results, strict=True):
        if order_id % 3 == 0:
            assert result is None, order_id  # nothing written: authenticate afresh
        else:
            assert result.code is domain.ResponseCode.SUCCESS, order_id
    ledger = check_ledger(database_url, {(MERCHANT, "HKD"): 100000, (OTHER, "HKD"): 100000})
    assert sorted(ledger.refunds) == [o for o in range(1, 25) if o % 3]
    assert "the ledger holds" in admin(database_url, "verify")


def test_sqlite_applies_in_one_transaction_check_each_refunds_own_key_and_state(sqlite_url):
    """SQLite's batch of applies (SqliteStore._apply_many): a refund whose key
    was revoked since its read, whose order was refunded since, or whose
    merchant's balance no longer covers it, is left out (nothing of it written,
    its own answer); the others in the batch are applied."""
    from service.clock import utc_now
    from service.stores.port import Interrupted, Settlement, SignedBy
    from tests.support.data import deactivate_key, insert_key_directly
    from tests.support.keys import generated_key, public_pem

    load(sqlite_url, "1000.00")
    insert_key_directly(sqlite_url, MERCHANT, "old", public_pem(generated_key("old")))
    insert_key_directly(sqlite_url, MERCHANT, "new", public_pem(generated_key("new")))
    signers = {1: "new", 2: "old", 3: "new", 4: "new", 1001: None}
    commands = {o: domain.RefundCommand(MERCHANT if o < 1000 else OTHER, o, None, "10.00") for o in signers}

    async def work(store):
        snapshots = {o: await store.read_snapshot(c) for o, c in commands.items()}
        deactivate_key(sqlite_url, MERCHANT, "old")  # revoked after the read
        await refunds.refund(store, commands[3])  # refunded after the read
        await store.settle(Settlement("drain", OTHER, "HKD", 99_500, 0, utc_now()))  # 5.00 left after the read
        many = [(commands[o], domain.decide(commands[o], snapshots[o]), snapshots[o],
                 SignedBy(signers[o]) if signers[o] else None, None) for o in signers]
        return await store._run(store._apply_many, many)

    first, second, third, fourth, fifth = with_store(sqlite_url, work)
    assert isinstance(first, domain.Transaction) and isinstance(fourth, domain.Transaction)
    assert (second, third, fifth) == (Interrupted.CREDENTIALS_CHANGED, Interrupted.STATE_MOVED,
                                      Interrupted.STATE_MOVED)
    # OTHER's balance is what the settlement left: the fifth refund neither debited it nor marked its order
    ledger = check_ledger(sqlite_url, {(MERCHANT, "HKD"): 100000, (OTHER, "HKD"): 500})
    assert sorted(ledger.refunds) == [1, 3, 4] and all(len(made) == 1 for made in ledger.refunds.values())
    assert "the ledger holds" in admin(sqlite_url, "verify")


def test_sqlite_reads_that_arrive_together_go_in_one_trip_and_each_gets_its_own_snapshot(sqlite_url):
    """SQLite's refund reads are batched too (SqliteStore.reads): each refund of
    a storm still reads its own order, and is decided and applied on it."""
    load(sqlite_url, "1000.00")
    commands = [domain.RefundCommand(MERCHANT, order_id, None, "10.00") for order_id in range(1, 31)] + \
        [domain.RefundCommand(MERCHANT, 999, None, "10.00"), domain.RefundCommand(OTHER, 1001, None, "10.00")]

    results, reads = storm(sqlite_url, commands, batches=lambda store: store.reads)
    assert reads.batches >= 1 and reads.batched >= 2
    assert [r.code for r in results] == [domain.ResponseCode.SUCCESS] * 30 + \
        [domain.ResponseCode.ORDER_NOT_FOUND, domain.ResponseCode.SUCCESS]
    assert [r.order.id for r in results if r.order] == [*range(1, 31), 1001]
    assert "the ledger holds" in admin(sqlite_url, "verify")


@pytest.mark.postgres
def test_a_refund_statement_chosen_as_deadlock_victim_runs_again_and_is_approved(postgres_url):
    """Another client's transaction (a script, an operator's UPDATE) can hold the
    balance row and wait for an order whose refund statement, alone here, waits
    for that balance row. PostgreSQL rolls one back; when it is the statement
    alone, it wrote nothing and runs again: the caller gets its approval, not
    UNAVAILABLE."""
    import asyncpg

    load(postgres_url, "1000.00")
    url = sa.make_url(postgres_url)

    async def work(store):
        other = await asyncpg.connect(host=url.host, port=url.port, user=url.username, database=url.database)
        try:
            await other.execute("SET deadlock_timeout = '10s'")  # this side waits: the statement is the victim
            await other.execute("BEGIN")
            await other.execute("UPDATE balances SET unsettled = unsettled WHERE merchant_id = $1", MERCHANT)
            refund = asyncio.ensure_future(refunds.refund(store, domain.RefundCommand(MERCHANT, 7, None, "10.00")))
            await asyncio.sleep(0.5)  # the statement has marked order 7 and waits for the balance row
            await other.execute("UPDATE orders SET update_time = update_time WHERE id = 7")  # the cycle
            await other.execute("ROLLBACK")
            return await asyncio.wait_for(refund, 20), store.group_commit.alone_rolled_back
        finally:
            await other.close()

    result, rolled_back = with_store(postgres_url, work)
    assert result.code is domain.ResponseCode.SUCCESS
    assert rolled_back == 1  # counted (refund_service_refund_statements_rolled_back_total)
    assert balance_of(postgres_url, MERCHANT, "HKD") == 100000 - 1000
    assert "the ledger holds" in admin(postgres_url, "verify")


@pytest.mark.postgres
def test_two_processes_refunding_the_same_orders_at_once_never_deadlock(postgres_url):
    """Two service processes (two stores, two pools) get the same refunds at once,
    in opposite orders, on a merchant with balances in two currencies. Each
    refund statement first takes the merchant's advisory lock, so no refund
    holds an order or a balance row while waiting for another refund: PostgreSQL
    finds no deadlock (detected within 20 ms here, were there one) and rolls
    nothing back. Each order is still refunded exactly once."""
    orders = [data.order(o, MERCHANT, "10.00", currency="HKD" if o % 2 else "USD") for o in range(1, 121)]
    data.load(postgres_url, [data.merchant(MERCHANT, balances={"HKD": "1000.00", "USD": "1000.00"})], orders)
    look_for_deadlocks_after(postgres_url, "20ms")
    commands = [domain.RefundCommand(MERCHANT, o, None, "10.00") for o in range(1, 121)]

    async def work(first):
        second = await stores.open_store(postgres_url)
        try:
            results = []
            for start in range(0, 120, 30):  # four storms, each of 30 orders asked twice at once
                chunk = commands[start:start + 30]
                results += await asyncio.gather(*(refunds.refund(first, c) for c in chunk),
                                                *(refunds.refund(second, c) for c in reversed(chunk)))
            return results, [first.group_commit, second.group_commit]
        finally:
            await second.close()

    results, groups = with_store(postgres_url, work)

    assert sum(g.batched for g in groups) >= 4, "no batch formed: the test proves nothing"
    assert [(g.rolled_back, g.alone_rolled_back) for g in groups] == [(0, 0), (0, 0)]
    codes = Counter(r.code for r in results)
    assert codes == {domain.ResponseCode.SUCCESS: 120, domain.ResponseCode.ALREADY_REFUNDED: 120}
    for currency in ("HKD", "USD"):
        assert balance_of(postgres_url, MERCHANT, currency) == 100000 - 60 * 1000
    assert "the ledger holds" in admin(postgres_url, "verify")


@pytest.mark.postgres
def test_the_merchant_lock_never_waits_for_the_event_sequencers_lock(postgres_url):
    """The sequencer holds its advisory lock (outbox.SEQUENCER_LOCK, a bigint key)
    for as long as its session lives. A merchant whose id is that same number
    still refunds at once: MERCHANT_LOCK takes two int4 keys, another key space.
    With the bigint form the refund would wait for the sequencer for ever (here:
    until the store's command timeout, then UNAVAILABLE)."""
    from service import outbox

    merchant = outbox.SEQUENCER_LOCK
    data.load(postgres_url, [data.merchant(merchant, balances={"HKD": "100.00"})],
              [data.order(1, merchant, "10.00")])

    async def work(store):
        for _ in range(100):  # the sequencer takes its lock once its session is up
            async with store.connection() as conn:
                if await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted"):
                    break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the sequencer never took its lock: the test would prove nothing")
        return await refunds.refund(store, domain.RefundCommand(merchant, 1, None, "10.00"))

    result = with_store(postgres_url, work, command_timeout=2.0)
    assert result.code is domain.ResponseCode.SUCCESS


@pytest.mark.postgres
def test_a_merchant_whose_balance_another_client_holds_waits_aside_and_the_others_go_on(postgres_url):
    """Another client holds MERCHANT's balance row (an open transaction). With one
    lane, MERCHANT's first refund waits for it LANE_LOCK_TIMEOUT, gives up (nothing
    written) and moves aside, and its later ones join it there; OTHER's refunds,
    which arrived behind and among them in the same lane, are approved while the
    lock is still held. Once it goes, MERCHANT's are approved, each exactly once."""
    from service.stores.postgres import LANE_LOCK_TIMEOUT

    load(postgres_url, "1000.00")
    mine = [domain.RefundCommand(MERCHANT, order_id, None, "10.00") for order_id in range(1, 6)]
    others = [domain.RefundCommand(OTHER, 1000 + order_id, None, "10.00") for order_id in range(1, 6)]
    engine = db.make_engine(postgres_url)
    holder = engine.connect()
    holder.execute(sa.text("SELECT 1 FROM balances WHERE merchant_id = :m FOR UPDATE"), {"m": MERCHANT})

    async def work(store):
        group = store.group_commit
        first = asyncio.ensure_future(refunds.refund(store, mine[0]))
        await asyncio.sleep(0.05)  # MERCHANT's first is in the lane, waiting for the row
        mixed = [mine[1], others[0], mine[2], others[1], mine[3], others[2], mine[4], others[3], others[4]]
        behind = {c: asyncio.ensure_future(refunds.refund(store, c)) for c in mixed}
        done, _ = await asyncio.wait([behind[c] for c in others], timeout=10)
        while_held = (len(done), first.done() + sum(behind[c].done() for c in mine[1:]), group.in_side_lanes(),
                      group.waiting()[0])
        await asyncio.to_thread(holder.rollback)
        results = [await first] + [await behind[c] for c in mine[1:] + others]
        return while_held, results, group.moved_aside, group.in_side_lanes()

    try:
        while_held, results, moved_aside, aside_after = with_store(postgres_url, work, lanes=1)
    finally:
        holder.close()
        engine.dispose()
    assert LANE_LOCK_TIMEOUT == "250ms"
    assert while_held == (5, 0, 5, 0)  # OTHER's answered, MERCHANT's five aside, none held in the lane
    assert [r.code for r in results] == [domain.ResponseCode.SUCCESS] * 10
    assert (moved_aside, aside_after) == (5, 0)
    ledger = check_ledger(postgres_url, {(MERCHANT, "HKD"): 100000, (OTHER, "HKD"): 100000})
    assert sorted(ledger.refunds) == list(range(1, 6)) + list(range(1001, 1006))
    assert all(len(made) == 1 for made in ledger.refunds.values())
    assert "the ledger holds" in admin(postgres_url, "verify")


@pytest.mark.postgres
def test_a_lane_statements_lock_timeout_ends_with_its_transaction(postgres_url):
    """The lane's bound is set for the statement's own transaction: the pooled
    connection it ran on goes back with PostgreSQL's default (no lock_timeout)."""
    load(postgres_url, "1000.00")

    async def work(store):
        result = await refunds.refund(store, domain.RefundCommand(MERCHANT, 1, None, "10.00"))
        async with store.connection() as connection:
            return result.code, await connection.fetchval("SHOW lock_timeout")

    assert with_store(postgres_url, work, lanes=1, min_size=1, max_size=1) == (domain.ResponseCode.SUCCESS, "0")


@pytest.mark.postgres
def test_with_every_side_lane_taken_another_blocked_merchant_is_answered_unavailable_and_the_lane_still_serves(
        postgres_url):
    """A pool of 6 connections and one lane leaves (6 - 1) // 2 = 2 side lanes. Another
    client holds the balance rows of three merchants: two of their refunds wait aside,
    the third is answered StoreUnavailable (nothing written) instead of taking a
    connection the lane needs, and a fourth merchant's refunds are still approved
    while the locks are held. Once they go, the two waiting aside are approved."""
    from service.stores.port import StoreUnavailable

    blocked = [3400011, 3400012, 3400013]
    free = 3400014
    data.load(postgres_url, [data.merchant(m, balances={"HKD": "100.00"}) for m in blocked + [free]],
              [data.order(m, m, "1.00") for m in blocked] + [data.order(free * 10 + n, free, "1.00") for n in range(3)])
    engine = db.make_engine(postgres_url)
    holder = engine.connect()
    holder.execute(sa.text("SELECT 1 FROM balances WHERE merchant_id = ANY(:m) FOR UPDATE"), {"m": blocked})

    async def work(store):
        def refund(merchant):
            return asyncio.ensure_future(refunds.refund(store, domain.RefundCommand(merchant, merchant, None, "1.00")))

        waiting = []
        for merchant in blocked[:2]:  # one at a time, each until it waits aside
            waiting.append(refund(merchant))
            for _ in range(300):
                if store.group_commit.in_side_lanes() == len(waiting):
                    break
                await asyncio.sleep(0.01)
        waiting.append(refund(blocked[2]))
        await asyncio.wait(waiting[2:], timeout=3)
        served = await asyncio.wait_for(asyncio.gather(*(
            refunds.refund(store, domain.RefundCommand(free, free * 10 + n, None, "1.00")) for n in range(3))), 5)
        refused = waiting[2].exception() if waiting[2].done() else None
        aside = store.group_commit.in_side_lanes()
        await asyncio.to_thread(holder.rollback)
        return refused, aside, served, await asyncio.gather(*waiting[:2])

    try:
        refused, aside, served, approved = with_store(postgres_url, work, lanes=1, max_size=6)
    finally:
        holder.close()
        engine.dispose()
    assert isinstance(refused, StoreUnavailable) and aside == 2
    assert [r.code for r in served + approved] == [domain.ResponseCode.SUCCESS] * 5
    ledger = check_ledger(postgres_url, {**{(m, "HKD"): 10000 for m in blocked + [free]}})
    assert sorted(ledger.refunds) == sorted(blocked[:2] + [free * 10 + n for n in range(3)])
    assert "the ledger holds" in admin(postgres_url, "verify")
