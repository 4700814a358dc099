"""The refund in one store call (issue 5).

On PostgreSQL the common refund is one statement (PostgresStore.try_refund,
service/stores/postgres_refund.py IN_ONE_STATEMENT) that
reads, decides and applies; what it does not apply is decided in Python on the
snapshot it read. The statement must approve exactly what domain.decide
approves, with the same answer and the same writes, and for anything else
write nothing and return the same snapshot as the full path's read.

A signed refund whose merchant's keys were read before verifies its signature
first and then refunds in one store call guarded by `SignedBy`: the store refunds
only while that key is still active and the merchant ACTIVE without a required
timestamp; otherwise nothing is written and the service authenticates afresh.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refund.v1 import refund_pb2
from service import domain
from service.stores.port import Attempt, SignedBy
from service.stores.postgres import PostgresStore
from service.usecases import refunds
from tests.support import data
from tests.support.data import admin, balance_of, deactivate_key, insert_key_directly, set_merchant_status
from tests.support.in_process import InProcessService, error_info, with_store
from tests.support.keys import generated_key, public_pem, sign
from tests.support.ledger import read_ledger

MERCHANT, OTHER = 3300001, 3300002
CURRENCIES = {"HKD": 2, "JPY": 0, "BHD": 3, "CLF": 4}


# -- the one statement decides as domain.decide does (PostgreSQL) -------------------

ORDER_STATES = st.fixed_dictionaries({
    "status": st.sampled_from(["SUCCESS", "SUCCESS", "SUCCESS", "SETTLED", "SETTLED", "REFUNDED", "PARTIALLY_REFUNDED", "VOIDED", "OPEN"]),
    "method": st.sampled_from([m["code"] for m in data.PAYMENT_METHODS]),
    "currency": st.sampled_from(sorted(CURRENCIES)),
    "amount": st.integers(1, 10_000),
    "balance": st.one_of(st.just(10**9), st.integers(0, 12_000)),
    "refunded_before": st.sampled_from([False, False, False, True]),
    "owner": st.sampled_from([MERCHANT] * 7 + [OTHER]),
})
ODD_AMOUNTS = st.one_of(
    st.integers(-5, 12_000).map(lambda units: str(Decimal(units).scaleb(-2))),   # 76.19, 0.00, -0.03
    st.integers(1, 12_000).map(str),                                             # 76 (whole units)
    st.integers(1, 12_000).map(lambda units: str(Decimal(units).scaleb(-3))),    # 7.619 (three decimals)
    st.sampled_from(["1e2", "0.10", "abc", "", "1e-9", "NaN", "99999999999999999999999"]),
)
LOOKUPS = st.sampled_from(["id", "reference", "both"] * 3 + ["id, other reference"])


@st.composite
def attempts(draw):
    """(order state, amount text, lookup): often an amount the order could take, in its
    currency, and often at a rule's edge: the order amount, one unit over or under it, one
    unit; a balance equal to the amount asked, one unit short or over."""
    state = dict(draw(ORDER_STATES))
    whole = state["amount"]
    units = draw(st.one_of(st.sampled_from([whole, whole + 1, max(1, whole - 1), 1]), st.integers(1, whole)))
    amount = draw(st.one_of(st.just(domain.format_minor(units, state["currency"])),
                            st.just(domain.format_minor(units, state["currency"])), ODD_AMOUNTS))
    state["balance"] = draw(st.one_of(st.just(state["balance"]), st.sampled_from([units, units - 1, units + 1])))
    return state, amount, draw(LOOKUPS)


@pytest.mark.postgres
def test_the_one_statement_approves_exactly_what_decide_approves(postgres_url):
    data.load(postgres_url, [data.merchant(MERCHANT, balances={c: "0" for c in CURRENCIES}),
                             data.merchant(OTHER, balances={c: "0" for c in CURRENCIES})], [])
    loop = asyncio.new_event_loop()
    store = loop.run_until_complete(PostgresStore.open(postgres_url))
    next_order = iter(range(10_000, 1_000_000))
    seen = {True: 0, False: 0}  # examples that decide approved / declined

    async def example(state, amount_text, lookup):
        order_id = next(next_order)
        async with store._connection() as conn:
            await _make_order(conn, order_id, state)
        command = _command(order_id, amount_text, lookup)
        before = await store.read_snapshot(command)
        decision = domain.decide(command, before)
        ledger = await _ledger(store, order_id, state["owner"], state["currency"])
        attempt = await store.try_refund(command, None)
        result = attempt.applied or attempt.snapshot
        after = await _ledger(store, order_id, state["owner"], state["currency"])
        if not decision.approved:  # decided on what the statement read: the decline's audit row
            declined = await refunds.finish(store, command, attempt)
            audited = await _ledger(store, order_id, state["owner"], state["currency"])
        seen[decision.approved] += 1
        audit_row = (MERCHANT, command.merchant_reference, amount_text[:64], decision.code.value)
        if not decision.approved:
            assert attempt.interrupted is None and attempt.applied is None
            assert result == before, (state, amount_text, lookup, decision)  # what it read, to decide on
            assert after == ledger, "a refund the rules decline wrote something"
            assert declined.code is decision.code
            assert audited == {**ledger, "attempts": ledger["attempts"] + [(*audit_row, None)]}  # rule 8
            return
        assert isinstance(result, domain.RefundResult), ("decide approves, the statement does not", state, lookup)
        expected = domain.refunded_order(before.order, decision, result.order.update_time)
        assert result.code is domain.ResponseCode.SUCCESS and result.order == expected
        txn = result.transaction
        assert (txn.order_id, txn.merchant_id, txn.type, txn.currency, txn.amount, txn.status, txn.masked_pan) == \
            (order_id, MERCHANT, "REFUND", state["currency"], decision.amount, "SUCCESS", "411111******1111")
        assert txn.stan == f"{txn.id % 1_000_000:06d}" and txn.create_time == result.order.update_time
        assert after == {"status": decision.new_status, "balance": ledger["balance"] - decision.amount,
                         "refunds": ledger["refunds"] + [(txn.id, decision.amount)],
                         "attempts": ledger["attempts"] + [(*audit_row, txn.id)]}

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(attempts())
    def check(attempt):
        loop.run_until_complete(example(*attempt))

    try:
        check()
    finally:
        loop.run_until_complete(store.close())
        loop.close()
    assert seen[True] >= 15 and seen[False] >= 15, seen  # both sides were tried


def _command(order_id: int, amount_text: str, lookup: str) -> domain.RefundCommand:
    reference = f"ref-{order_id}"
    if lookup == "id":
        return domain.RefundCommand(MERCHANT, order_id, None, amount_text)
    if lookup == "reference":
        return domain.RefundCommand(MERCHANT, None, reference, amount_text)
    if lookup == "both":
        return domain.RefundCommand(MERCHANT, order_id, reference, amount_text)
    return domain.RefundCommand(MERCHANT, order_id, reference + "-other", amount_text)


async def _make_order(conn, order_id: int, state: dict) -> None:
    owner, currency = state["owner"], state["currency"]
    await conn.execute(
        "INSERT INTO orders (id, merchant_id, merchant_reference, currency, amount, status, payment_method, "
        "create_time, update_time) VALUES ($1, $2, $3, $4, $5, $6, $7, now(), now())",
        order_id, owner, f"ref-{order_id}", currency, state["amount"], state["status"], state["method"])
    await conn.execute(
        "INSERT INTO transactions (order_id, merchant_id, type, currency, amount, status, masked_pan, stan, "
        "create_time) VALUES ($1, $2, 'SALE', $3, $4, 'SUCCESS', '411111******1111', '000001', now())",
        order_id, owner, currency, state["amount"])
    if state["refunded_before"]:
        await conn.execute(
            "INSERT INTO transactions (order_id, merchant_id, type, currency, amount, status, masked_pan, stan, "
            "create_time) VALUES ($1, $2, 'REFUND', $3, 1, 'SUCCESS', '', '000002', now())",
            order_id, owner, currency)
    await conn.execute("UPDATE balances SET unsettled = $3 WHERE merchant_id = $1 AND currency = $2",
                       owner, currency, state["balance"])


async def _ledger(store, order_id: int, owner: int, currency: str) -> dict:
    async with store._connection() as conn:
        return await _read_ledger(conn, order_id, owner, currency)


async def _read_ledger(conn, order_id: int, owner: int, currency: str) -> dict:
    return {
        "status": await conn.fetchval("SELECT status FROM orders WHERE id = $1", order_id),
        "balance": await conn.fetchval("SELECT unsettled FROM balances WHERE merchant_id = $1 AND currency = $2",
                                       owner, currency),
        "refunds": [tuple(r) for r in await conn.fetch(
            "SELECT id, amount FROM transactions WHERE order_id = $1 AND type = 'REFUND' ORDER BY id", order_id)],
        # every attempt since the order was made (a decline by reference of a missing order names none)
        "attempts": [tuple(r) for r in await conn.fetch(
            "SELECT merchant_id, merchant_reference, amount, response_code, transaction_id FROM refund_attempts "
            "WHERE created_at >= (SELECT create_time FROM orders WHERE id = $1) ORDER BY id", order_id)],
    }


@pytest.mark.postgres
def test_a_stale_snapshot_never_refunds_twice(postgres_url):
    """What the one statement read may be stale by the time a decision on it is
    applied: the guarded apply refuses it, and the answer is the earlier refund."""
    data.load(postgres_url, [data.merchant(MERCHANT, balances={"HKD": "100.00"})], [data.order(1, MERCHANT, "10.00")])
    command = domain.RefundCommand(MERCHANT, 1, None, "10.00")

    async def work(store):
        stale = await store.read_snapshot(command)
        first = await refunds.refund(store, command)  # refunded since that read
        second = await refunds.finish(store, command, Attempt(snapshot=stale))
        return first, second

    first, second = with_store(postgres_url, work)
    assert first.code is domain.ResponseCode.SUCCESS
    assert second.code is domain.ResponseCode.ALREADY_REFUNDED
    assert second.transaction.id == first.transaction.id


# -- SignedBy: the key and the merchant are checked where the refund is made ----


@pytest.fixture
def keyed(database_url):
    key = generated_key("at-once")
    data.load(database_url, [data.merchant(MERCHANT, public_pem(key), balances={"HKD": "1000.00"}),
                             data.merchant(OTHER, balances={"HKD": "1000.00"})],
              [data.order(order_id, MERCHANT, "10.00") for order_id in range(1, 8)]
              + [data.order(OTHERS_ORDER, OTHER, "10.00")])
    return database_url


OTHERS_ORDER = 8


def _refund(order_id: int, signed_with: str | None):
    async def work(store):
        return await refunds.refund(store, domain.RefundCommand(MERCHANT, order_id, None, "10.00"),
                                    SignedBy(signed_with) if signed_with else None)
    return work


def test_a_refund_signed_with_an_active_key_is_made_in_one_call(keyed):
    result = with_store(keyed, _refund(1, "k1"))
    assert result.code is domain.ResponseCode.SUCCESS and result.order.status == "REFUNDED"
    assert with_store(keyed, _refund(1, None)).code is domain.ResponseCode.ALREADY_REFUNDED


@pytest.mark.parametrize("change", ["key deactivated", "merchant suspended", "timestamp required", "other key"])
def test_signed_with_a_key_that_no_longer_holds_writes_nothing(keyed, change):
    signed_with = "k1"
    if change == "key deactivated":
        deactivate_key(keyed, MERCHANT, "k1")
    elif change == "merchant suspended":
        set_merchant_status(keyed, MERCHANT, "SUSPENDED")
    elif change == "timestamp required":
        admin(keyed, "merchant", "timestamp", str(MERCHANT), "required")
    else:
        signed_with = "k2"  # not a key of this merchant
    assert with_store(keyed, _refund(2, signed_with)) is None
    order, transactions = with_store(keyed, lambda store: store.get_order(MERCHANT, 2, None))
    assert order.status == "SUCCESS" and [t.type for t in transactions] == ["SALE"]
    assert balance_of(keyed, MERCHANT, "HKD") == 100_000
    assert _audit(keyed, 2) == []  # the full path that follows records the attempt, once


# -- the service: known keys, then a refund that checks them -------------------------


class CountingReads:
    """Counts the store's credential reads (the full path); the refund in one call makes none."""

    def __init__(self, store):
        self.count = 0
        store.merchant_credentials = self._counted(store.merchant_credentials)

    def _counted(self, method):
        async def counted(*args, **kwargs):
            self.count += 1
            return await method(*args, **kwargs)
        return counted


def _signed(key, order_id: int, amount: str = "10.00", **extra) -> refund_pb2.MerchantRefundRequest:
    fields = "".join(f',"{name}":"{value}"' for name, value in extra.items())
    request = f'{{"merchantId":"{MERCHANT}","orderId":{order_id},"amount":{amount}{fields}}}'
    return refund_pb2.MerchantRefundRequest(request=request.encode(), signature=sign(key, request))


def test_the_service_refunds_in_one_store_call_once_it_knows_the_keys_and_checks_them_each_time(keyed):
    key = generated_key("at-once")
    service = InProcessService(keyed)
    try:
        reads = CountingReads(service.store)
        assert service.stub.MerchantRefund(_signed(key, 1)).order.status == "REFUNDED"
        assert reads.count == 1  # the keys are read once...
        assert service.stub.MerchantRefund(_signed(key, 2)).order.status == "REFUNDED"
        assert service.stub.MerchantRefund(_signed(key, 3, "4.00")).transaction.amount == "4.00"
        assert reads.count == 1  # ...and then verify the next refunds before any database call

        # Declines are answered in that one call too, each recorded once with its code (rule 8);
        # another merchant's order is one that does not exist (rule 1).
        _assert_refused(service, _signed(key, 1), "ALREADY_REFUNDED")
        _assert_refused(service, _signed(key, 4, "0.001"), "INVALID_AMOUNT")
        _assert_refused(service, _signed(key, OTHERS_ORDER), "ORDER_NOT_FOUND")
        assert reads.count == 1
        assert _audit(keyed, 1) == [(MERCHANT, "0000"), (MERCHANT, "3003")]
        assert _audit(keyed, 4) == [(MERCHANT, "1002")]
        assert _audit(keyed, OTHERS_ORDER) == [(MERCHANT, "3001")]
        order, transactions = with_store(keyed, lambda store: store.get_order(OTHER, OTHERS_ORDER, None))
        assert order.status == "SUCCESS" and [t.type for t in transactions] == ["SALE"]
        assert balance_of(keyed, OTHER, "HKD") == 100_000
        # A timestamp takes the full path (the replay window) and gets its code.
        _assert_refused(service, _signed(key, 4, timestamp="2001-01-01T00:00:00Z"), "REQUEST_EXPIRED")

        set_merchant_status(keyed, MERCHANT, "SUSPENDED")
        _assert_refused(service, _signed(key, 5), "MERCHANT_INACTIVE")
        set_merchant_status(keyed, MERCHANT, "ACTIVE")
        admin(keyed, "merchant", "timestamp", str(MERCHANT), "required")
        _assert_refused(service, _signed(key, 5), "INVALID_REQUEST")
        admin(keyed, "merchant", "timestamp", str(MERCHANT), "optional")
        assert service.stub.MerchantRefund(_signed(key, 5)).order.status == "REFUNDED"

        deactivate_key(keyed, MERCHANT, "k1")  # the service still knows k1: the refund's own check refuses it
        _assert_refused(service, _signed(key, 6), "AUTHENTICATION_FAILED")
        _assert_refused(service, _signed(key, 7), "AUTHENTICATION_FAILED")
    finally:
        service.close()
    for order_id in (6, 7):
        order, transactions = with_store(keyed, lambda store, order_id=order_id: store.get_order(MERCHANT, order_id, None))
        assert order.status == "SUCCESS" and [t.type for t in transactions] == ["SALE"]
        assert _audit(keyed, order_id) == []  # a refused signature decides nothing about the order


def _assert_refused(service: InProcessService, request: refund_pb2.MerchantRefundRequest, reason: str) -> None:
    with pytest.raises(Exception) as caught:
        service.stub.MerchantRefund(request)
    assert error_info(caught.value)[0].reason == reason


def test_a_new_key_is_read_when_the_known_ones_do_not_verify(keyed):
    old, new = generated_key("at-once"), generated_key("at-once-new")
    service = InProcessService(keyed)
    try:
        assert service.stub.MerchantRefund(_signed(old, 1)).order.status == "REFUNDED"
        insert_key_directly(keyed, MERCHANT, "k2", public_pem(new))
        assert service.stub.MerchantRefund(_signed(new, 2)).order.status == "REFUNDED"
        reads = CountingReads(service.store)
        assert service.stub.MerchantRefund(_signed(new, 3)).order.status == "REFUNDED"
        assert reads.count == 0  # k2 is known now
    finally:
        service.close()


def _audit(url: str, order_id: int) -> list[tuple[int, str]]:
    """(merchant, response code) of every attempt recorded for the order."""
    return [(merchant, code) for merchant, oid, _, code, _ in read_ledger(url).audit if oid == order_id]
