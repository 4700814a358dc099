"""Property tests of service/domain.py with Hypothesis.

(a) to_minor / format_minor are exact: an amount is refused or read without
    losing anything, never through float.
(b) A small in-memory model of the store (orders, balances, refunds) applies
    domain.decide to random sequences of attempts; the money rules of docs/api.md
    section 3 must hold after every step.

Long (about 490 lines) on purpose: the strategies and the model the properties share live beside them.
"""

from __future__ import annotations

import pathlib
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal, InvalidOperation
from fractions import Fraction

from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

ROOT = pathlib.Path(__file__).resolve().parents[2]

from service import domain
from service.domain import (
    InvalidAmount,
    Order,
    OrderSnapshot,
    RefundCommand,
    ResponseCode,
    Transaction,
    decide,
    format_minor,
    refunded_order,
    result_of,
    to_minor,
)

DIGITS = {"HKD": 2, "JPY": 0, "BHD": 3, "CLF": 4}
CURRENCIES = sorted(DIGITS)
MAX_UNITS = 10**15 - 1  # the documented maximum of any amount or balance, in minor units
# The documented grammar of amount text, written out independently of domain.AMOUNT_TEXT.
AMOUNT_GRAMMAR = re.compile(r"(0|[1-9][0-9]*)(\.[0-9]+)?")
MERCHANT = 3000001
OTHER_MERCHANT = 3000002
STATUSES = ["OPEN", "SUCCESS", "SETTLED", "VOIDED", "CLOSED", "REFUNDED", "PARTIALLY_REFUNDED"]
CAPABILITIES = ["NONE", "FULL_ONLY", "FULL_AND_PARTIAL"]
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


# =========================================================================== (a) exact amounts

EXACT = Context(prec=200, Emax=10**6, Emin=-10**6)  # builds test inputs without rounding them


def coefficient_and_exponent(coefficient: int, exponent: int) -> Decimal:
    return Decimal(coefficient).scaleb(exponent, EXACT)


decimal_amounts = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=False, allow_infinity=False, places=4),
    st.builds(coefficient_and_exponent, st.integers(-10**25, 10**25), st.integers(-40, 25)),
    # Up to 45 significant digits: more than Decimal's default 28-digit context.
    st.builds(coefficient_and_exponent, st.integers(1, 10**45), st.integers(-48, 0)),
)


def acceptable_units(amount: Decimal, currency: str, as_text: bool) -> int | None:
    """Independently: the exact minor units of a valid amount, None for one the
    rules refuse (or too long to read: over 64 characters of text, over 40 digits)."""
    if not amount.is_finite() or amount <= 0 or len(amount.as_tuple().digits) > 40:
        return None
    if as_text and (len(str(amount)) > 64 or not AMOUNT_GRAMMAR.fullmatch(str(amount))):
        return None
    if amount.adjusted() > 25:  # beyond the maximum whatever the currency
        return None
    exact = Fraction(amount) * 10 ** DIGITS[currency]
    if exact.denominator != 1 or exact > MAX_UNITS:
        return None
    return int(exact)


@settings(max_examples=500, deadline=None)
@given(amount=decimal_amounts, currency=st.sampled_from(CURRENCIES), as_text=st.booleans())
def test_to_minor_refuses_an_amount_or_reads_it_exactly(amount, currency, as_text):
    expected = acceptable_units(amount, currency, as_text)
    try:
        units = to_minor(str(amount) if as_text else amount, currency)
    except InvalidAmount:
        assert expected is None, f"{amount!s} {currency} refused though valid"
        return
    assert expected is not None, f"{amount!s} {currency} accepted as {units}"
    assert type(units) is int
    assert units == expected
    assert 0 < units <= MAX_UNITS
    # Exact, no float: the text of the units is numerically the very same decimal.
    assert Decimal(format_minor(units, currency)) == amount
    assert Fraction(units, 10 ** DIGITS[currency]) == Fraction(amount)


@settings(max_examples=300, deadline=None)
@given(units=st.integers(1, MAX_UNITS), currency=st.sampled_from(CURRENCIES))
def test_format_minor_then_to_minor_is_the_identity(units, currency):
    text = format_minor(units, currency)
    assert to_minor(text, currency) == units
    whole, _, frac = text.partition(".")
    assert len(frac) == DIGITS[currency]
    assert (frac == "") is (DIGITS[currency] == 0)


@settings(max_examples=300, deadline=None)
@given(units=st.integers(1, 10**15), extra=st.integers(1, 9), currency=st.sampled_from(CURRENCIES))
def test_one_decimal_too_many_is_always_refused(units, extra, currency):
    text = format_minor(units, currency)
    text = (text if "." in text else text + ".") + str(extra)
    try:
        to_minor(text, currency)
    except InvalidAmount:
        return
    raise AssertionError(f"{text} {currency} accepted")


@settings(max_examples=300, deadline=None)
@given(units=st.integers(1, 10**15), noise_digits=st.integers(27, 40), currency=st.sampled_from(CURRENCIES))
def test_a_stray_digit_beyond_28_significant_digits_is_never_rounded_away(units, noise_digits, currency):
    text = format_minor(units, currency)
    if "." not in text:
        text += "."
    text += "0" * noise_digits + "1"
    assume(len(text) <= 64)
    try:
        to_minor(text, currency)
    except InvalidAmount:
        return
    raise AssertionError(f"{text} {currency} accepted")


# =========================================================================== (b) the model store


@dataclass
class FakeStore:
    """What a store keeps: orders, a capability per order, unsettled balances
    per (merchant, currency) and refund transactions. It applies approved
    decisions the way the real stores do: debit, mark the order, record."""

    orders: dict[int, Order]
    capabilities: dict[int, str]
    balances: dict[tuple[int, str], int]
    initial_balances: dict[tuple[int, str], int] = field(default_factory=dict)
    refunds: list[Transaction] = field(default_factory=list)
    preexisting_refunds: dict[int, Transaction] = field(default_factory=dict)
    log: list[tuple[RefundCommand, domain.Decision]] = field(default_factory=list)
    clock: datetime = T0

    def __post_init__(self):
        self.initial_balances = dict(self.balances)

    def refund_of(self, order_id: int) -> Transaction | None:
        for refund in self.refunds:
            if refund.order_id == order_id:
                return refund
        return self.preexisting_refunds.get(order_id)

    def find(self, command: RefundCommand) -> Order | None:
        # A deliberately sloppy lookup: by id whoever owns the order, else by
        # reference across all merchants. decide() must guard ownership itself.
        if command.order_id is not None:
            return self.orders.get(command.order_id)
        for order in self.orders.values():
            if order.merchant_reference == command.merchant_reference:
                return order
        return None

    def snapshot(self, command: RefundCommand) -> OrderSnapshot | None:
        order = self.find(command)
        if order is None:
            return None
        return OrderSnapshot(order=order, refund_capability=self.capabilities[order.id],
                             unsettled_balance=self.balances[(order.merchant_id, order.currency)],
                             refund=self.refund_of(order.id))

    def attempt(self, command: RefundCommand) -> tuple[OrderSnapshot | None, domain.Decision]:
        snapshot = self.snapshot(command)
        decision = decide(command, snapshot)
        self.log.append((command, decision))
        self.clock += timedelta(seconds=1)
        if decision.approved:
            order = snapshot.order
            key = (order.merchant_id, order.currency)
            if self.balances[key] < decision.amount:  # the database's own guard
                raise AssertionError("approved a refund the balance cannot cover")
            self.balances[key] -= decision.amount
            self.orders[order.id] = refunded_order(order, decision, self.clock)
            self.refunds.append(Transaction(
                id=90000 + len(self.refunds), merchant_id=order.merchant_id, order_id=order.id, type="REFUND",
                currency=order.currency, amount=decision.amount, status="SUCCESS", masked_pan="411111******1111",
                stan=f"{len(self.refunds):06d}", create_time=self.clock))
        return snapshot, decision


def expected_units(text: str, currency: str) -> int | None:
    """An independent reading of an amount: exact minor units, or None if invalid."""
    if not AMOUNT_GRAMMAR.fullmatch(text):
        return None
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if not value.is_finite() or value <= 0 or len(text.strip()) > 64 or len(value.as_tuple().digits) > 40:
        return None
    if value.adjusted() > 25:
        return None
    exact = Fraction(value) * 10 ** DIGITS[currency]
    if exact.denominator != 1 or exact > MAX_UNITS:
        return None
    return int(exact)


def allowed_codes(command: RefundCommand, snapshot: OrderSnapshot | None) -> set[ResponseCode]:
    """Every rule of docs/api.md section 3 the attempt breaks; an empty set means it must be approved.
    (Which of several broken rules is answered first is the implementation's choice.)"""
    if snapshot is None or snapshot.order.merchant_id != command.merchant_id:
        return {ResponseCode.ORDER_NOT_FOUND}
    order = snapshot.order
    broken = set()
    if (command.order_id is not None and command.order_id != order.id) or (
            command.merchant_reference and command.merchant_reference != order.merchant_reference):
        broken.add(ResponseCode.INVALID_REQUEST)
    if order.status in ("REFUNDED", "PARTIALLY_REFUNDED") or snapshot.refund is not None:
        broken.add(ResponseCode.ALREADY_REFUNDED)
    elif order.status not in ("SUCCESS", "SETTLED"):
        broken.add(ResponseCode.ORDER_NOT_REFUNDABLE)
    if snapshot.refund_capability == "NONE":
        broken.add(ResponseCode.REFUND_NOT_SUPPORTED)
    units = expected_units(command.amount, order.currency)
    if units is None:
        broken.add(ResponseCode.INVALID_AMOUNT)
    else:
        if units > order.amount:
            broken.add(ResponseCode.AMOUNT_EXCEEDS_ORDER)
        elif units < order.amount and snapshot.refund_capability == "FULL_ONLY":
            broken.add(ResponseCode.PARTIAL_REFUND_NOT_SUPPORTED)
        if snapshot.unsettled_balance < units:
            broken.add(ResponseCode.INSUFFICIENT_BALANCE)
    return broken


def check_step(store: FakeStore, command: RefundCommand, snapshot: OrderSnapshot | None,
               decision: domain.Decision) -> None:
    """The properties that must hold after every attempt."""
    broken = allowed_codes(command, snapshot)
    if broken:
        assert decision.code in broken, (command, snapshot, decision, broken)
        assert not decision.approved
    else:
        assert decision.approved, (command, snapshot, decision)

    result = result_of(decision, snapshot)
    if decision.code is ResponseCode.ORDER_NOT_FOUND:
        assert result.order is None and result.transaction is None
    if decision.code is ResponseCode.ALREADY_REFUNDED:
        assert result.transaction is snapshot.refund

    if decision.approved:
        order = snapshot.order
        # Another merchant never gets an approval.
        assert command.merchant_id == order.merchant_id
        # Exact integer minor units consistent with the currency's decimals.
        assert type(decision.amount) is int and decision.amount > 0
        assert decision.amount == expected_units(command.amount, order.currency)
        assert Fraction(decision.amount, 10 ** DIGITS[order.currency]) == Fraction(Decimal(command.amount))
        assert Decimal(format_minor(decision.amount, order.currency)) == Decimal(command.amount)
        assert decision.amount <= order.amount
        assert order.status in ("SUCCESS", "SETTLED")
        assert snapshot.refund_capability != "NONE"
        full = decision.amount == order.amount
        assert decision.new_status == ("REFUNDED" if full else "PARTIALLY_REFUNDED")
        assert full or snapshot.refund_capability == "FULL_AND_PARTIAL"
        assert store.orders[order.id].status == decision.new_status

    check_store(store)


def check_store(store: FakeStore) -> None:
    approvals = Counter(refund.order_id for refund in store.refunds)
    # At most one approval per order ever, and none for an order refunded before the run.
    assert all(count == 1 for count in approvals.values()), approvals
    assert not set(approvals) & set(store.preexisting_refunds)
    for refund in store.refunds:
        order = store.orders[refund.order_id]
        assert 0 < refund.amount <= order.amount
        assert refund.currency == order.currency and refund.merchant_id == order.merchant_id
        assert order.status == ("REFUNDED" if refund.amount == order.amount else "PARTIALLY_REFUNDED")
    for key, balance in store.balances.items():
        assert balance >= 0, key
        debited = sum(r.amount for r in store.refunds if (r.merchant_id, r.currency) == key)
        assert balance == store.initial_balances[key] - debited, key
    approved_commands = [command for command, decision in store.log if decision.approved]
    assert len(approved_commands) == len(store.refunds)


# --------------------------------------------------------------------------- strategies


@st.composite
def fake_stores(draw) -> FakeStore:
    n = draw(st.integers(1, 5))
    orders, capabilities, preexisting = {}, {}, {}
    for i in range(n):
        order_id = 1001 + i
        currency = draw(st.sampled_from(CURRENCIES))
        owner = draw(st.sampled_from([MERCHANT, MERCHANT, MERCHANT, OTHER_MERCHANT]))
        status = draw(st.sampled_from(STATUSES + ["SUCCESS"] * 4 + ["SETTLED"] * 3))
        amount = draw(st.one_of(st.integers(1, 10), st.integers(1, 10**7), st.just(MAX_UNITS)))
        orders[order_id] = Order(id=order_id, merchant_id=owner, merchant_reference=f"ref-{order_id}",
                                 currency=currency, amount=amount, status=status, payment_method="CARD",
                                 create_time=T0, update_time=T0)
        capabilities[order_id] = draw(st.sampled_from(CAPABILITIES + ["FULL_ONLY", "FULL_AND_PARTIAL"] * 2))
        # Refunded orders may or may not have their refund transaction at hand;
        # now and then a paid order has one too (a store that lost the status update).
        refunded = status in ("REFUNDED", "PARTIALLY_REFUNDED")
        if draw(st.booleans()) if refunded else draw(st.integers(0, 9)) == 0:
            preexisting[order_id] = Transaction(
                id=80000 + i, merchant_id=owner, order_id=order_id, type="REFUND", currency=currency,
                amount=amount if status == "REFUNDED" else max(1, amount // 2), status="SUCCESS", masked_pan="",
                stan="000001", create_time=T0)
    # Balances often at an order amount's edge: equal to it, one unit short, one over.
    edges = sorted({units for order in orders.values() for units in (order.amount - 1, order.amount, order.amount + 1)
                    if 0 <= units <= MAX_UNITS})
    balances = {
        (merchant, currency): draw(st.one_of(st.just(0), st.integers(0, 10**7), st.just(MAX_UNITS),
                                             st.sampled_from(edges), st.sampled_from(edges)))
        for merchant in (MERCHANT, OTHER_MERCHANT) for currency in CURRENCIES
    }
    return FakeStore(orders=orders, capabilities=capabilities, balances=balances, preexisting_refunds=preexisting)


def amount_texts(order: Order | None, balance: int | None = None):
    """Amounts that matter for `order`: exact, one unit under and over, one unit, the
    balance and one unit over it, partial, over, zero, negative, too many decimals, not
    finite, junk, and arbitrary decimals."""
    currency = order.currency if order else "HKD"
    digits = DIGITS[currency]
    amount = order.amount if order else 7619

    def fmt(units: int) -> str:
        return format_minor(units, currency)

    def with_extra_decimal(units_and_digit):
        units, digit = units_and_digit
        text = fmt(units)
        return (text if "." in text else text + ".") + str(digit)

    def trailing_zeros(units_and_zeros):
        units, zeros = units_and_zeros
        text = fmt(units)
        return (text if "." in text else text + ".") + "0" * zeros

    return st.one_of(
        st.just(fmt(amount)),                                                 # full
        st.just(fmt(amount)),
        st.integers(1, max(1, amount - 1)).map(fmt),                          # partial (full when amount == 1)
        st.integers(1, max(1, amount - 1)).map(fmt),
        st.just(fmt(amount + 1)),                                             # over by one minor unit
        st.just(fmt(max(1, amount - 1))),                                     # under by one minor unit
        st.just(fmt(1)),                                                      # the smallest amount
        st.sampled_from([fmt(units) for units in (balance or 0, (balance or 0) + 1) if 0 < units <= amount] or
                        [fmt(amount)]),                                       # the balance's edge
        st.integers(amount + 1, amount + 10**6).map(fmt),                     # over
        st.sampled_from(["0", "0.00", "-0", "-1", "-" + fmt(amount), "NaN", "Infinity", "-Infinity", "1e400",
                         "1e-400", "abc", "", " ", "1.00000000000000000000000000001", "9" * 5000]),
        st.tuples(st.integers(0, amount), st.integers(1, 9)).map(with_extra_decimal),   # too many decimals
        st.tuples(st.integers(1, amount), st.integers(1, 20)).map(trailing_zeros),     # exact, written long
        st.integers(1, amount).map(lambda u: str(Decimal(u).scaleb(-digits))),          # exponent notation
        st.decimals(allow_nan=False, allow_infinity=False, min_value=Decimal("-10"), max_value=Decimal(10**8))
        .map(str),
        st.text(alphabet="0123456789.-eE+", max_size=12),
    )


@st.composite
def commands(draw, store: FakeStore) -> RefundCommand:
    order_ids = sorted(store.orders)
    target = draw(st.sampled_from(order_ids * 3 + [9999]))           # 9999: missing order
    order = store.orders.get(target)
    owner = order.merchant_id if order else MERCHANT
    merchant = draw(st.sampled_from([owner] * 5 + [MERCHANT, OTHER_MERCHANT, 3000009]))
    how = draw(st.sampled_from(["id", "ref", "both", "both-disagree"]))
    reference = order.merchant_reference if order else "ref-missing"
    if how == "id":
        order_id, merchant_reference = target, None
    elif how == "ref":
        order_id, merchant_reference = None, reference
    elif how == "both":
        order_id, merchant_reference = target, reference
    else:
        other = draw(st.sampled_from(order_ids + [9999]))
        order_id, merchant_reference = target, f"ref-{other}"
    command = RefundCommand(merchant_id=merchant, order_id=order_id, merchant_reference=merchant_reference,
                            amount=draw(amount_texts(order, store.balances.get((owner, order.currency)) if order
                                                     else None)))
    event(f"merchant {'owner' if order and merchant == owner else 'not owner'}, ids {how}")
    return command


# --------------------------------------------------------------------------- the properties


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_any_sequence_of_attempts_keeps_the_money_rules(data):
    store = data.draw(fake_stores(), label="store")
    steps = data.draw(st.integers(1, 25), label="steps")
    for _ in range(steps):
        command = data.draw(commands(store), label="command")
        snapshot, decision = store.attempt(command)
        event(f"decision {decision.code.name}")
        check_step(store, command, snapshot, decision)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_same_full_refund_retried_is_approved_once_then_already_refunded(data):
    store = data.draw(fake_stores(), label="store")
    order = data.draw(st.sampled_from(sorted(store.orders.values(), key=lambda o: o.id)), label="order")
    command = RefundCommand(order.merchant_id, order.id, None, format_minor(order.amount, order.currency))
    decisions = []
    for _ in range(data.draw(st.integers(2, 6), label="retries")):
        snapshot, decision = store.attempt(command)
        check_step(store, command, snapshot, decision)
        decisions.append(decision)
    approved = [d for d in decisions if d.approved]
    assert len(approved) <= 1
    if approved:
        first = decisions.index(approved[0])
        assert all(d.code is ResponseCode.ALREADY_REFUNDED for d in decisions[first + 1:])


# --------------------------------------------------------------------------- a state machine version


class RefundMachine(RuleBasedStateMachine):
    """The same model driven by Hypothesis' stateful testing: attempts
    interleave with sales credited to the balance and settlements that
    debit it, and the invariants are checked after every rule."""

    @initialize(store=fake_stores())
    def start(self, store):
        self.store = store

    @rule(data=st.data())
    def attempt(self, data):
        command = data.draw(commands(self.store))
        snapshot, decision = self.store.attempt(command)
        check_step(self.store, command, snapshot, decision)

    @rule(data=st.data())
    def full_refund_by_the_owner(self, data):
        order = data.draw(st.sampled_from(sorted(self.store.orders.values(), key=lambda o: o.id)))
        command = RefundCommand(order.merchant_id, None, order.merchant_reference,
                                format_minor(order.amount, order.currency))
        snapshot, decision = self.store.attempt(command)
        check_step(self.store, command, snapshot, decision)

    @rule(merchant=st.sampled_from([MERCHANT, OTHER_MERCHANT]), currency=st.sampled_from(CURRENCIES),
          units=st.integers(1, 10**6))
    def sale_credits_the_balance(self, merchant, currency, units):
        key = (merchant, currency)
        if self.store.balances[key] + units <= MAX_UNITS:
            self.store.balances[key] += units
            self.store.initial_balances[key] += units

    @precondition(lambda self: any(b > 0 for b in self.store.balances.values()))
    @rule(data=st.data())
    def settlement_debits_the_balance(self, data):
        key = data.draw(st.sampled_from(sorted(k for k, b in self.store.balances.items() if b > 0)))
        units = data.draw(st.integers(1, self.store.balances[key]))
        self.store.balances[key] -= units
        self.store.initial_balances[key] -= units

    @invariant()
    def money_rules_hold(self):
        if hasattr(self, "store"):
            check_store(self.store)


RefundMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
test_refund_state_machine = RefundMachine.TestCase
