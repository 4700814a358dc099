"""The rules' edges on the databases' own statements (issue 17).

On PostgreSQL the common refund is decided by SQL (service/stores/postgres_refund.py IN_ONE_STATEMENT):
its conditions must approve exactly at the edges where domain.decide does —
the order amount and one unit more, a balance equal to the amount and one unit
short, each status, each capability, the merchant's own balance in the order's
currency — and every approval at an edge must be made by that one statement
(a condition one unit too strict would hand the refund to the slower full path
and still answer 0000). On SQLite the refund transaction's guarded writes are
tried at the same edges. After each attempt the whole ledger (every balance,
order, transaction and audit row) is compared with what the rule allows, so a
debit of the wrong balance or an order marked without a refund fails too.

`make mutation` (mutation/sql.py) alters these statements' conditions one at a
time; each alteration must fail a test here or in tests/integration/test_refund_at_once.py.

Long (about 480 lines) on purpose: the ledger harness and the edges it runs are read together.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import pytest
import sqlalchemy as sa

from service import db, domain, schema
from service.stores import open_store
from service.stores.port import Attempt, Interrupted, SignedBy, StoreUnavailable
from service.usecases import refunds
from tests.support import data
from tests.support.keys import generated_key, public_pem
from tests.support.postgres import fresh_postgres_database

MERCHANT, OTHER = 3700001, 3700002
MAX = domain.MAX_MINOR_UNITS
CURRENCIES = {"JPY": 0, "HKD": 2, "KWD": 3, "CLF": 4, "USD": 2}
CAPABILITY = {"FULL_AND_PARTIAL": "VISA", "FULL_ONLY": "ALIPAY", "NONE": "OCTOPUS"}
T0 = datetime(2026, 11, 20, 8, 15, tzinfo=UTC)
PAN = "411111******1111"
OTHERS_BALANCE = 10**12  # every other balance: never touched by a refund here


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger(request, tmp_path_factory):
    """One migrated database per store for the whole module; each case makes its own order."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('edges') / 'refund.db'}"
        db.migrate(url)
        with Ledger(url) as opened:
            yield opened
        return
    scratch = os.environ.get("REFUND_TEST_PG_SCRATCH_URL")
    if scratch:  # mutation/sql.py: one migrated database for every mutant, emptied here
        engine = db.make_engine(scratch)
        with engine.begin() as connection:  # replica: the journal's append-only trigger stays quiet
            # The service's tables (not views, not what migrations seed, such as the sequencer's row).
            real = set(connection.execute(sa.text(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")).scalars())
            tables = ", ".join(t.name for t in schema.metadata.sorted_tables if t.name in real)
            connection.execute(sa.text("SET LOCAL session_replication_role = replica"))
            connection.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        engine.dispose()
        with Ledger(scratch) as opened:
            yield opened
        return
    with fresh_postgres_database() as url:
        db.migrate(url)
        with Ledger(url) as opened:
            yield opened


@dataclass
class Case:
    """An order (currency, amount, status, payment method's capability), the merchant's
    balance in its currency, an earlier refund or not, and the amount asked."""

    currency: str = "HKD"
    amount: int = 7619
    balance: int = MAX
    asked: str | int = 7619           # minor units (written in the currency), or the text itself
    capability: str = "FULL_AND_PARTIAL"
    status: str = "SUCCESS"
    refunded_before: bool = False
    owner: int = MERCHANT
    masked_pan: str = PAN
    asker: int = MERCHANT             # the merchant asking for the refund

    @property
    def text(self) -> str:
        return domain.format_minor(self.asked, self.currency) if isinstance(self.asked, int) else self.asked


@dataclass
class Outcome:
    result: domain.RefundResult
    at_once: bool | str | None  # PostgreSQL: made by the one statement (True), declined on what it
                                # read (False), or "not read" (it failed: the balance fell during it); None on SQLite
    before: dict = field(repr=False)
    after: dict = field(repr=False)


class Ledger:
    """A database with two merchants holding OTHERS_BALANCE in every currency, and a store on it."""

    def __init__(self, url: str):
        self.url = url
        self.postgres = url.startswith("postgresql")
        self.engine = db.make_engine(url)
        self.loop = asyncio.new_event_loop()
        self.ids = itertools.count(1)
        # OTHER has an active key "k1"; MERCHANT has none.
        data.load(url, [data.merchant(MERCHANT, balances={c: "0" for c in CURRENCIES}),
                        data.merchant(OTHER, public_pem(generated_key("edges")), balances={c: "0" for c in CURRENCIES})],
                  [])
        with self.engine.begin() as connection:
            connection.execute(sa.update(schema.balances).values(unsettled=OTHERS_BALANCE))
        self.store = self.loop.run_until_complete(open_store(url))

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.loop.run_until_complete(self.store.close())
        self.loop.close()
        self.engine.dispose()

    def make_order(self, case: Case) -> int:
        order_id = next(self.ids)
        with self.engine.begin() as connection:
            connection.execute(sa.insert(schema.orders).values(
                id=order_id, merchant_id=case.owner, merchant_reference=f"ref-{order_id}", currency=case.currency,
                amount=case.amount, status=case.status, payment_method=CAPABILITY[case.capability],
                create_time=T0, update_time=T0))
            connection.execute(sa.insert(schema.transactions).values(
                order_id=order_id, merchant_id=case.owner, type="SALE", currency=case.currency, amount=case.amount,
                status="SUCCESS", masked_pan=case.masked_pan, stan="000001", create_time=T0))
            if case.refunded_before:
                connection.execute(sa.insert(schema.transactions).values(
                    order_id=order_id, merchant_id=case.owner, type="REFUND", currency=case.currency, amount=1,
                    status="SUCCESS", masked_pan="", stan="000002", create_time=T0))
            connection.execute(sa.update(schema.balances).where(
                schema.balances.c.merchant_id == case.owner, schema.balances.c.currency == case.currency)
                .values(unsettled=case.balance))
        return order_id

    def reset_balance(self, case: Case) -> None:
        with self.engine.begin() as connection:
            connection.execute(sa.update(schema.balances).where(
                schema.balances.c.merchant_id == case.owner, schema.balances.c.currency == case.currency)
                .values(unsettled=OTHERS_BALANCE))

    def read(self) -> dict:
        with self.engine.connect() as connection:
            def rows(statement):
                return sorted(tuple(r) for r in connection.execute(statement))
            return {
                "balances": {(m, c): u for m, c, u in rows(sa.select(
                    schema.balances.c.merchant_id, schema.balances.c.currency, schema.balances.c.unsettled))},
                "orders": rows(sa.select(schema.orders.c.id, schema.orders.c.status)),
                "transactions": rows(sa.select(
                    schema.transactions.c.id, schema.transactions.c.order_id, schema.transactions.c.merchant_id,
                    schema.transactions.c.type, schema.transactions.c.currency, schema.transactions.c.amount,
                    schema.transactions.c.status, schema.transactions.c.masked_pan)),
                "attempts": rows(sa.select(
                    schema.refund_attempts.c.id, schema.refund_attempts.c.merchant_id,
                    schema.refund_attempts.c.order_id, schema.refund_attempts.c.amount,
                    schema.refund_attempts.c.response_code, schema.refund_attempts.c.transaction_id)),
            }

    def refund(self, case: Case, order_id: int | None = None, full_path: bool = False) -> Outcome:
        """The case's order refunded by MERCHANT; on PostgreSQL through the one statement
        first and, when it does not apply, domain.decide on what it read (as the store does);
        `full_path`: PostgreSQL's guarded apply alone, on a fresh read."""
        order_id = order_id or self.make_order(case)
        command = domain.RefundCommand(case.asker, order_id, None, case.text)
        before = self.read()
        refund = self._full_path(command) if full_path else self._refund(command)
        result, at_once = self.loop.run_until_complete(refund)
        after = self.read()
        self.reset_balance(case)
        return Outcome(result, at_once, before, after)

    async def _full_path(self, command: domain.RefundCommand):
        snapshot = await self.store.read_snapshot(command)
        return await refunds.finish(self.store, command, Attempt(snapshot=snapshot)), None

    async def _refund(self, command: domain.RefundCommand):
        store = self.store
        if not self.postgres:
            return await refunds.refund(store, command), None
        attempt = await store.try_refund(command, None)
        if attempt.applied is not None:
            return attempt.applied, True
        at_once = "not read" if attempt.interrupted is Interrupted.STATE_MOVED else False  # the balance fell during it
        return await refunds.finish(store, command, attempt), at_once


def assert_approved(outcome: Outcome, case: Case, units: int, status: str) -> None:
    """0000 with exactly this ledger change: the order marked, its merchant's balance in
    its currency debited `units` (no other balance), one refund row, one audit row."""
    result, before, after = outcome.result, outcome.before, outcome.after
    assert result.code is domain.ResponseCode.SUCCESS, (case, result.code)
    assert outcome.at_once in (True, None), "approved by the full path: the one statement refused an approval"
    order_id = result.order.id
    assert result.order.status == status and result.transaction.amount == units
    balances = dict(before["balances"])
    balances[(MERCHANT, case.currency)] -= units
    assert after["balances"] == balances
    assert after["orders"] == sorted((i, status if i == order_id else s) for i, s in before["orders"])
    refund = (result.transaction.id, order_id, MERCHANT, "REFUND", case.currency, units, "SUCCESS", case.masked_pan)
    assert after["transactions"] == sorted(before["transactions"] + [refund])
    assert [a[1:] for a in after["attempts"][len(before["attempts"]):]] == \
        [(MERCHANT, order_id, case.text[:64], "0000", result.transaction.id)]


def assert_declined(outcome: Outcome, case: Case, code: domain.ResponseCode) -> None:
    """The code, and nothing written but the attempt's audit row."""
    result, before, after = outcome.result, outcome.before, outcome.after
    assert result.code is code, (case, result.code)
    assert outcome.at_once in (False, None), "the one statement did not decline cleanly on what it read"
    assert result.transaction is None or code is domain.ResponseCode.ALREADY_REFUNDED
    assert {k: v for k, v in after.items() if k != "attempts"} == {k: v for k, v in before.items() if k != "attempts"}
    new = [a[1:] for a in after["attempts"][len(before["attempts"]):]]
    assert len(new) == 1 and new[0][2:4] == (case.text[:64], code.value) and new[0][4] is None
    assert new[0][0] == case.asker


S, C = domain.ResponseCode, CURRENCIES


def _edges(currency: str, amount: int) -> list:
    """The edges of one order amount in one currency: (id, case, expected code or (units, status))."""
    big = MAX
    return [
        ("full", Case(currency, amount, big, amount), (amount, "REFUNDED")),
        ("one-unit-over", Case(currency, amount, big, amount + 1), S.AMOUNT_EXCEEDS_ORDER),
        ("one-unit-under", Case(currency, amount, big, amount - 1), (amount - 1, "PARTIALLY_REFUNDED")),
        ("full-only-full", Case(currency, amount, big, amount, "FULL_ONLY"), (amount, "REFUNDED")),
        ("full-only-one-under", Case(currency, amount, big, amount - 1, "FULL_ONLY"), S.PARTIAL_REFUND_NOT_SUPPORTED),
        ("full-only-one-over", Case(currency, amount, big, amount + 1, "FULL_ONLY"), S.AMOUNT_EXCEEDS_ORDER),
        ("none-full", Case(currency, amount, big, amount, "NONE"), S.REFUND_NOT_SUPPORTED),
        ("balance-equal", Case(currency, amount, amount, amount), (amount, "REFUNDED")),
        ("balance-one-short", Case(currency, amount, amount - 1, amount), S.INSUFFICIENT_BALANCE),
        ("balance-one-over", Case(currency, amount, amount + 1, amount), (amount, "REFUNDED")),
        ("partial-balance-equal", Case(currency, amount, amount - 1, amount - 1), (amount - 1, "PARTIALLY_REFUNDED")),
        ("partial-balance-one-short", Case(currency, amount, amount - 2, amount - 1), S.INSUFFICIENT_BALANCE),
        ("one-unit", Case(currency, amount, big, 1), (1, "PARTIALLY_REFUNDED")),
        ("zero", Case(currency, amount, big, domain.format_minor(0, currency)), S.INVALID_AMOUNT),
        ("a-decimal-too-many", Case(currency, amount, big, domain.format_minor(1, currency) + "1"
                                    if C[currency] else "1.1"), S.INVALID_AMOUNT),
    ]


EDGES = [pytest.param(case, expected, id=f"{currency}-{name}")
         for currency in ("JPY", "HKD", "KWD", "CLF") for name, case, expected in _edges(currency, 7619)]
EDGES += [pytest.param(case, expected, id=f"HKD-largest-{name}")
          for name, case, expected in _edges("HKD", MAX - 1)
          if name in ("full", "one-unit-over", "balance-equal", "balance-one-short")]


def _check(outcome: Outcome, case: Case, expected) -> None:
    if isinstance(expected, tuple):
        assert_approved(outcome, case, *expected)
    else:
        assert_declined(outcome, case, expected)


@pytest.mark.parametrize(("case", "expected"), EDGES)
def test_amount_and_balance_edges(ledger, case, expected):
    _check(ledger.refund(case), case, expected)


@pytest.mark.parametrize(("status", "expected"), [
    ("SUCCESS", (7619, "REFUNDED")), ("SETTLED", (7619, "REFUNDED")),
    ("OPEN", S.ORDER_NOT_REFUNDABLE), ("VOIDED", S.ORDER_NOT_REFUNDABLE), ("CLOSED", S.ORDER_NOT_REFUNDABLE),
    ("REFUNDED", S.ALREADY_REFUNDED), ("PARTIALLY_REFUNDED", S.ALREADY_REFUNDED),
])
def test_each_order_status(ledger, status, expected):
    case = Case(status=status)
    _check(ledger.refund(case), case, expected)


@pytest.mark.parametrize("status", ["SUCCESS", "SETTLED"])
def test_a_paid_order_that_has_a_refund_row_is_already_refunded(ledger, status):
    case = Case(status=status, refunded_before=True)
    assert_declined(ledger.refund(case), case, S.ALREADY_REFUNDED)


def test_the_largest_order_is_refunded_in_full_and_one_unit_more_is_not_an_amount(ledger):
    case = Case("HKD", MAX, MAX, MAX)
    assert_approved(ledger.refund(case), case, MAX, "REFUNDED")
    over = Case("HKD", MAX, MAX, domain.format_minor(MAX + 1, "HKD"))
    assert_declined(ledger.refund(over), over, S.INVALID_AMOUNT)


@pytest.mark.parametrize("owner", [MERCHANT, OTHER])
def test_only_the_merchant_s_own_balance_in_the_order_s_currency_covers_a_refund(ledger, owner):
    """The order's merchant has nothing in HKD; its USD balance and the other merchant's HKD
    balance are large (each merchant in turn, whichever balance row a database reads first)."""
    case = Case("HKD", balance=0, owner=owner, asker=owner)
    other = OTHER if owner == MERCHANT else MERCHANT
    assert ledger.read()["balances"][(other, "HKD")] == ledger.read()["balances"][(owner, "USD")] == OTHERS_BALANCE
    assert_declined(ledger.refund(case), case, S.INSUFFICIENT_BALANCE)


def test_a_key_of_another_merchant_does_not_hold_for_a_signed_refund(ledger):
    """MERCHANT has no key; OTHER's active key is "k1". A refund for MERCHANT said to be
    signed with "k1" writes nothing (the service then authenticates afresh)."""
    case = Case()
    order_id = ledger.make_order(case)
    before = ledger.read()
    command = domain.RefundCommand(MERCHANT, order_id, None, case.text)
    assert ledger.loop.run_until_complete(refunds.refund(ledger.store, command, SignedBy("k1"))) is None
    assert ledger.read() == before
    ledger.reset_balance(case)


def test_another_merchant_s_order_is_not_found(ledger):
    case = Case(owner=OTHER)
    assert_declined(ledger.refund(case), case, S.ORDER_NOT_FOUND)


@pytest.mark.parametrize(("digits", "expected"), [(40, (100, "PARTIALLY_REFUNDED")), (41, S.INVALID_AMOUNT)])
def test_forty_significant_digits_are_read_and_forty_one_are_refused(ledger, digits, expected):
    case = Case(asked="1." + "0" * (digits - 1))
    _check(ledger.refund(case), case, expected)


@pytest.mark.parametrize("length", [64, 65])
def test_an_amount_text_of_64_or_65_characters_is_refused_and_audited_in_at_most_64(ledger, length):
    """No text of 64 characters is an amount in the strict grammar (over 40 digits); the
    audit row keeps the first 64 characters of what was asked."""
    case = Case(asked="1." + "0" * (length - 2))
    assert len(case.text) == length
    assert_declined(ledger.refund(case), case, S.INVALID_AMOUNT)


def test_a_masked_pan_of_19_characters_is_copied_whole_to_the_refund(ledger):
    case = Case(masked_pan="550000*********0004")
    assert len(case.masked_pan) == 19
    assert_approved(ledger.refund(case), case, 7619, "REFUNDED")


FULL_PATH = [pytest.param(case, expected, id=f"HKD-{name}") for name, case, expected in _edges("HKD", 7619)
             if name in ("full", "one-unit-under", "full-only-full", "balance-equal", "partial-balance-equal")]


@pytest.mark.postgres
@pytest.mark.parametrize(("case", "expected"), FULL_PATH)
def test_the_guarded_apply_of_the_full_path_approves_at_the_same_edges(ledger, case, expected):
    """What the one statement does not apply, the full path applies with _APPLY_REFUND,
    whose own conditions re-check the read: they must let through exactly what decide
    approved, at the edge too (a balance equal to the amount), with the sale's card number."""
    if not ledger.postgres:
        pytest.skip("PostgreSQL's second statement")
    case = Case(**{**case.__dict__, "masked_pan": "550000******0004"})  # not the other orders' card
    assert_approved(ledger.refund(case, full_path=True), case, *expected)


# -- what the statements guard against while they wait for a row (PostgreSQL) ---------


@contextlib.asynccontextmanager
async def _held(url: str, statement: str, *args):
    """A transaction that has run `statement` (taking its row locks) and commits on exit."""
    connection = await asyncpg.connect(url.replace("+psycopg", ""))
    try:
        transaction = connection.transaction()
        await transaction.start()
        await connection.execute(statement, *args)
        yield
        await transaction.commit()
    finally:
        await connection.close()


async def _waiting_for_a_lock(ledger: Ledger, timeout: float = 60.0) -> None:
    async with ledger.store._connection() as conn:
        for _ in range(int(timeout / 0.02)):
            # This database only: other tests' services on the same server wait for locks too.
            if await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                   "AND datname = current_database()"):
                return
            await asyncio.sleep(0.02)
    raise AssertionError("the refund never waited for the held row")


def _race(ledger: Ledger, case: Case, statement: str, *args) -> Outcome:
    """Refund the case's order while another transaction holds a row the refund writes
    and changes it, committing once the refund waits for it."""
    order_id = ledger.make_order(case)
    command = domain.RefundCommand(MERCHANT, order_id, None, case.text)

    async def race():
        async with _held(ledger.url, statement, order_id, *args):
            refund = asyncio.ensure_future(ledger._refund(command))
            await _waiting_for_a_lock(ledger)
        return await asyncio.wait_for(refund, 60)

    before = ledger.read()
    result, at_once = ledger.loop.run_until_complete(race())
    return Outcome(result, at_once, before, ledger.read())


@pytest.mark.postgres
@pytest.mark.parametrize("status", ["VOIDED", "REFUNDED"])
def test_an_order_whose_status_changes_while_the_refund_waits_is_not_marked(ledger, status):
    """The order is read SUCCESS; before the refund can mark it, another transaction
    makes it VOIDED (or REFUNDED) and commits: the refund marks nothing and debits nothing."""
    if not ledger.postgres:
        pytest.skip("SQLite takes the write lock before it reads")
    case = Case()
    outcome = _race(ledger, case, "UPDATE orders SET status = $2 WHERE id = $1", status)
    expected = S.ORDER_NOT_REFUNDABLE if status == "VOIDED" else S.ALREADY_REFUNDED
    assert outcome.result.code is expected
    order_id = outcome.result.order.id
    assert dict(outcome.after["orders"])[order_id] == status
    assert outcome.after["balances"] == outcome.before["balances"]
    assert [t for t in outcome.after["transactions"] if t[1] == order_id and t[3] == "REFUND"] == []
    ledger.reset_balance(case)


@pytest.mark.postgres
@pytest.mark.parametrize("left", [7618, 0])
def test_a_balance_that_falls_below_the_amount_while_the_refund_waits_is_not_debited(ledger, left):
    """The balance covers 76.19 when read; before the debit, another transaction lowers it
    to one unit short and commits: no debit, the order stays SUCCESS, the answer is 4004."""
    if not ledger.postgres:
        pytest.skip("SQLite takes the write lock before it reads")
    case = Case(balance=7619)
    outcome = _race(ledger, case, "UPDATE balances SET unsettled = $3 WHERE merchant_id = $2 AND currency = 'HKD' "
                                  "AND $1::bigint IS NOT NULL", MERCHANT, left)
    assert outcome.result.code is S.INSUFFICIENT_BALANCE
    order_id = outcome.result.order.id
    assert dict(outcome.after["orders"])[order_id] == "SUCCESS"
    assert outcome.after["balances"][(MERCHANT, "HKD")] == left
    assert [t for t in outcome.after["transactions"] if t[1] == order_id and t[3] == "REFUND"] == []
    ledger.reset_balance(case)


# -- the guards behind domain.decide: what a wrong approval would write is refused ------


def _approving_anything(units: int, status: str):
    def decide(command, snapshot):
        return domain.Decision(S.SUCCESS, "SUCCESS", amount=units, new_status=status)
    return decide


@pytest.mark.parametrize("order_status", ["OPEN", "VOIDED", "PARTIALLY_REFUNDED"])
def test_no_store_marks_an_unpaid_or_refunded_order_even_when_the_decision_is_wrong(ledger, monkeypatch,
                                                                                    order_status):
    """Both stores' guarded apply checks the status itself (sql.refundable, written from
    domain.REFUNDABLE_STATUSES): were domain.decide to approve an unpaid or refunded
    order, nothing is written (the refund reads and decides again until it gives up
    with 9001)."""
    case = Case(status=order_status)
    order_id = ledger.make_order(case)
    monkeypatch.setattr(domain, "decide", _approving_anything(7619, "REFUNDED"))
    before = ledger.read()
    with pytest.raises(StoreUnavailable, match="kept changing"):
        ledger.loop.run_until_complete(ledger._refund(domain.RefundCommand(MERCHANT, order_id, None, "76.19")))
    assert ledger.read() == before
    ledger.reset_balance(case)


def test_no_store_debits_more_than_the_balance_even_when_the_decision_is_wrong(ledger, monkeypatch):
    """Were domain.decide to approve one unit more than the balance, the debit's own
    condition refuses it: nothing is written (SQLite rolls back; PostgreSQL reads and
    decides again until it gives up with 9001)."""
    case = Case(balance=7618)
    order_id = ledger.make_order(case)
    monkeypatch.setattr(domain, "decide", _approving_anything(7619, "REFUNDED"))
    before = ledger.read()
    with pytest.raises((RuntimeError, StoreUnavailable)):
        ledger.loop.run_until_complete(ledger._refund(domain.RefundCommand(MERCHANT, order_id, None, "76.19")))
    assert ledger.read() == before
    ledger.reset_balance(case)
