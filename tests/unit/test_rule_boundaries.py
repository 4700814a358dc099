"""Every limit and every rule comparison of service/domain.py at its edge (issue 17).

Each rule is tried where it flips: the order amount and one minor unit more,
the balance equal to the amount and one unit short, each length or digit
limit at n and n + 1, in a currency of every precision (0, 2, 3 and 4
decimals). `make mutation` holds these tests to the code: a mutant that moves
one of these edges by one must fail here. The same edges on the databases'
own statements are in tests/integration/test_rule_boundaries_sql.py.
"""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refund_wire import formats
from service import domain
from service.domain import (
    InvalidAmount,
    InvalidRequest,
    Order,
    OrderSnapshot,
    RefundCommand,
    ResponseCode,
    decide,
    format_minor,
    minor_units_by_decimals,
    to_minor,
)

MERCHANT = 3000001
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
MAX = domain.MAX_MINOR_UNITS  # the one maximum of amounts and balances
# One currency of each precision ISO 4217 has.
ONE_OF_EACH_PRECISION = {"JPY": 0, "HKD": 2, "KWD": 3, "CLF": 4}
ORDER_AMOUNTS = [1, 7619, MAX]


def snapshot_of(currency: str, amount: int, balance: int, capability: str = "FULL_AND_PARTIAL",
                status: str = "SUCCESS") -> OrderSnapshot:
    order = Order(id=1001, merchant_id=MERCHANT, merchant_reference="ref-1001", currency=currency, amount=amount,
                  status=status, payment_method="VISA", create_time=T0, update_time=T0)
    return OrderSnapshot(order=order, refund_capability=capability, unsettled_balance=balance)


def asking(units: int, currency: str) -> RefundCommand:
    return RefundCommand(MERCHANT, 1001, None, format_minor(units, currency))


def edges(currency_amounts=ORDER_AMOUNTS):
    return [pytest.param(currency, amount, id=f"{currency}-{amount}")
            for currency in ONE_OF_EACH_PRECISION for amount in currency_amounts]


# --------------------------------------------------------------------------- amount against the order


@pytest.mark.parametrize(("currency", "order_amount"), edges())
def test_the_order_amount_is_refunded_in_full_and_one_unit_more_exceeds_it(currency, order_amount):
    snapshot = snapshot_of(currency, order_amount, balance=MAX)
    full = decide(asking(order_amount, currency), snapshot)
    assert (full.code, full.amount, full.new_status) == (ResponseCode.SUCCESS, order_amount, "REFUNDED")
    if order_amount < MAX:  # above MAX the amount itself is refused (below)
        over = decide(asking(order_amount + 1, currency), snapshot)
        assert over.code is ResponseCode.AMOUNT_EXCEEDS_ORDER and not over.approved


@pytest.mark.parametrize(("currency", "order_amount"), edges([2, 7619, MAX]))
def test_one_unit_below_the_order_amount_is_a_partial_refund(currency, order_amount):
    partial = decide(asking(order_amount - 1, currency), snapshot_of(currency, order_amount, balance=MAX))
    assert (partial.code, partial.amount, partial.new_status) == \
        (ResponseCode.SUCCESS, order_amount - 1, "PARTIALLY_REFUNDED")


@pytest.mark.parametrize(("currency", "order_amount"), edges([2, 7619, MAX]))
def test_full_only_takes_exactly_the_order_amount(currency, order_amount):
    snapshot = snapshot_of(currency, order_amount, balance=MAX, capability="FULL_ONLY")
    assert decide(asking(order_amount, currency), snapshot).new_status == "REFUNDED"
    assert decide(asking(order_amount - 1, currency), snapshot).code is ResponseCode.PARTIAL_REFUND_NOT_SUPPORTED
    if order_amount < MAX:
        assert decide(asking(order_amount + 1, currency), snapshot).code is ResponseCode.AMOUNT_EXCEEDS_ORDER


@pytest.mark.parametrize("capability", ["FULL_ONLY", "FULL_AND_PARTIAL"])
def test_the_amount_is_checked_against_the_order_before_the_balance(capability):
    """One unit over the order with no balance at all: 4003, not 4004; one unit under
    with FULL_ONLY and no balance: 4002, not 4004."""
    snapshot = snapshot_of("HKD", 7619, balance=0, capability=capability)
    assert decide(asking(7620, "HKD"), snapshot).code is ResponseCode.AMOUNT_EXCEEDS_ORDER
    expected = ResponseCode.PARTIAL_REFUND_NOT_SUPPORTED if capability == "FULL_ONLY" else \
        ResponseCode.INSUFFICIENT_BALANCE
    assert decide(asking(7618, "HKD"), snapshot).code is expected


# --------------------------------------------------------------------------- amount against the balance


@pytest.mark.parametrize(("currency", "amount"), edges())
def test_a_balance_equal_to_the_amount_covers_it_and_one_unit_less_does_not(currency, amount):
    exact = decide(asking(amount, currency), snapshot_of(currency, amount, balance=amount))
    assert exact.approved and exact.amount == amount
    short = decide(asking(amount, currency), snapshot_of(currency, amount, balance=amount - 1))
    assert short == domain.Decision(ResponseCode.INSUFFICIENT_BALANCE, "unsettled balance does not cover the amount")


@pytest.mark.parametrize(("currency", "amount"), edges([2, 7619, MAX]))
def test_a_partial_refund_meets_the_balance_at_the_same_edge(currency, amount):
    asked = amount - 1
    assert decide(asking(asked, currency), snapshot_of(currency, amount, balance=asked)).approved
    short = decide(asking(asked, currency), snapshot_of(currency, amount, balance=asked - 1))
    assert short.code is ResponseCode.INSUFFICIENT_BALANCE


# --------------------------------------------------------------------------- the smallest and largest amounts


@pytest.mark.parametrize(("currency", "digits"), ONE_OF_EACH_PRECISION.items())
def test_one_minor_unit_is_the_smallest_amount_and_a_tenth_of_it_is_refused(currency, digits):
    one_unit = str(Decimal(1).scaleb(-digits))                     # 1, 0.01, 0.001, 0.0001
    assert to_minor(one_unit, currency) == 1
    assert decide(RefundCommand(MERCHANT, 1001, None, one_unit), snapshot_of(currency, 7619, MAX)).amount == 1
    with pytest.raises(InvalidAmount, match=f"more than {digits} decimals"):
        to_minor(str(Decimal(1).scaleb(-digits - 1)), currency)
    with pytest.raises(InvalidAmount, match="greater than zero"):
        to_minor(str(Decimal(0).scaleb(-digits)), currency)


@pytest.mark.parametrize(("currency", "digits"), ONE_OF_EACH_PRECISION.items())
def test_the_largest_amount_is_the_largest_stored_integer_and_one_unit_more_is_refused(currency, digits):
    assert to_minor(format_minor(MAX, currency), currency) == MAX
    with pytest.raises(InvalidAmount, match="too large"):
        to_minor(format_minor(MAX + 1, currency), currency)
    with pytest.raises(InvalidAmount, match="too large"):
        to_minor(Decimal(format_minor(MAX + 1, currency)), currency)
    assert minor_units_by_decimals(format_minor(MAX, currency))[digits] == MAX
    assert minor_units_by_decimals(format_minor(MAX + 1, currency))[digits] is None


# --------------------------------------------------------------------------- length and digit limits


def _digits(n: int) -> str:
    """An amount of exactly n significant digits worth 1 (1.000...)."""
    return "1." + "0" * (n - 1)


@pytest.mark.parametrize("currency", ONE_OF_EACH_PRECISION)
def test_forty_significant_digits_are_read_and_forty_one_are_refused(currency):
    assert len(Decimal(_digits(40)).as_tuple().digits) == 40
    expected = 10 ** ONE_OF_EACH_PRECISION[currency]
    assert to_minor(_digits(40), currency) == expected
    assert to_minor(Decimal(_digits(40)), currency) == expected
    with pytest.raises(InvalidAmount, match="too many digits"):
        to_minor(_digits(41), currency)
    with pytest.raises(InvalidAmount, match="too many digits"):
        to_minor(Decimal(_digits(41)), currency)


def test_the_digit_limit_counts_significant_digits_whatever_the_point():
    forty = "10000." + "0" * 35                                        # 40 digits, 5 before the point
    assert to_minor(forty, "JPY") == 10_000
    with pytest.raises(InvalidAmount, match="too many digits"):
        to_minor(forty + "0", "JPY")


def test_amount_text_is_judged_by_its_value_up_to_64_characters_and_refused_unread_at_65():
    """No amount text of 64 characters in the strict grammar is a valid amount (it has
    over 40 digits), so the edge shows in the reason: at 64 characters the amount is
    read and refused for its digits; at 65 it is refused before it is read."""
    sixty_four, sixty_five = "1." + "0" * 62, "1." + "0" * 63
    assert len(sixty_four) == 64
    with pytest.raises(InvalidAmount, match="too many digits"):
        to_minor(sixty_four, "HKD")
    with pytest.raises(InvalidAmount, match="decimal string"):
        to_minor(sixty_five, "HKD")
    assert minor_units_by_decimals(sixty_four) == minor_units_by_decimals(sixty_five) == [None] * 5


def test_the_magnitude_check_comes_before_the_maximum_at_20_digits():
    """Amounts of 20 or more digits before the point are refused before their digits are
    multiplied out; 19 digits are read and then held to the maximum."""
    with pytest.raises(InvalidAmount, match=r"^amount is too large: at most"):
        to_minor("1" + "0" * 19, "JPY")                               # adjusted exponent 19
    with pytest.raises(InvalidAmount, match=r"^amount is too large$"):
        to_minor("1" + "0" * 20, "JPY")                               # 20
    with pytest.raises(InvalidAmount, match=r"^amount is too large$"):
        to_minor(Decimal("1E+999999999"), "JPY")


@pytest.mark.parametrize("length", [12, 13, 18, 19])
def test_a_masked_pan_of_12_to_19_characters_is_accepted(length):
    pan = "411111" + "*" * (length - 10) + "1111"
    assert len(pan) == length and domain.check_masked_pan(pan) == pan


@pytest.mark.parametrize("length", [11, 20])
def test_a_masked_pan_of_11_or_20_characters_is_refused(length):
    pan = "411111" + "*" * (length - 10) + "1111"
    assert len(pan) == length
    with pytest.raises(InvalidRequest, match="maskedPan"):
        domain.check_masked_pan(pan)


def test_a_masked_pan_shows_at_most_15_masked_characters():
    assert domain.check_masked_pan("*" * 15) == "*" * 15
    with pytest.raises(InvalidRequest):
        domain.check_masked_pan("*" * 16)


def test_an_idempotency_key_is_1_to_64_printable_characters():
    assert formats.IDEMPOTENCY_KEY.match("k")
    assert formats.IDEMPOTENCY_KEY.match(" ~" * 32)
    assert not formats.IDEMPOTENCY_KEY.match("")
    assert not formats.IDEMPOTENCY_KEY.match("k" * 65)
    assert not formats.IDEMPOTENCY_KEY.match("k" * 63 + "\x7f")
    assert not formats.IDEMPOTENCY_KEY.match("k" * 64 + "\n")


def test_a_settlement_id_is_1_to_64_printable_characters_without_blanks():
    assert domain.check_settlement_id("s") == "s"
    assert domain.check_settlement_id("!~" * 32) == "!~" * 32
    for refused in ("", "s" * 65, "s" * 63 + " ", "s" * 64 + "\n"):
        with pytest.raises(InvalidRequest, match="settlement_id"):
            domain.check_settlement_id(refused)


def test_a_merchant_id_has_at_most_18_digits():
    assert domain.parse_merchant_id("1" * 18) == int("1" * 18)
    with pytest.raises(InvalidRequest, match="merchantId"):
        domain.parse_merchant_id("1" * 19)


@pytest.mark.parametrize(("order_id", "accepted"),
                         [(0, False), (1, True), (domain.MAX_ID, True), (domain.MAX_ID + 1, False)])
def test_an_order_id_is_1_to_the_largest_stored_integer(order_id, accepted):
    if accepted:
        domain.check_order_key(order_id, None)
    else:
        with pytest.raises(InvalidRequest, match="orderId"):
            domain.check_order_key(order_id, None)


def test_a_merchant_reference_has_at_most_128_characters():
    domain.check_order_key(None, "r" * 128)
    with pytest.raises(InvalidRequest, match="merchantReference"):
        domain.check_order_key(None, "r" * 129)


# --------------------------------------------------------------------------- minor_units_by_decimals


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("76", [76, 760, 7600, 76000, 760000]),
        ("76.19", [None, None, 7619, 76190, 761900]),
        ("76.190", [None, None, 7619, 76190, 761900]),
        ("0.1", [None, 1, 10, 100, 1000]),
        ("0.001", [None, None, None, 1, 10]),
        ("0.0001", [None, None, None, None, 1]),
        ("0.00001", [None] * 5),
        (Decimal("1E+2"), [100, 1000, 10000, 100000, 1000000]),       # a JSON number from the signed edge
        ("1E+2", [None] * 5),                                          # not amount text
        ("0", [None] * 5),
        ("-1", [None] * 5),
        ("NaN", [None] * 5),
        ("abc", [None] * 5),
        ("", [None] * 5),
        ("1e-999999999", [None] * 5),
        ("1e999999999", [None] * 5),
        (format_minor(MAX, "HKD"), [None, None, MAX, None, None]),
        (format_minor(MAX, "JPY"), [MAX, None, None, None, None]),
        (format_minor(MAX + 1, "JPY"), [None] * 5),
    ],
)
def test_minor_units_by_decimals_reads_the_amount_for_each_precision(text, expected):
    assert minor_units_by_decimals(text) == expected


def test_minor_units_by_decimals_has_one_entry_per_precision_a_currency_has():
    assert domain.MAX_DECIMALS == max(domain.minor_units(c) for c in domain.KNOWN_CURRENCIES) == 4
    assert len(minor_units_by_decimals("1")) == domain.MAX_DECIMALS + 1


@pytest.mark.parametrize("text", ["76.19", "76", "0.001", "0.0001", "1.5", "1e2", "0", "x", _digits(40), _digits(41),
                                  format_minor(MAX, "HKD"), format_minor(MAX, "CLF"), format_minor(MAX + 1, "JPY"),
                                  Decimal("76.19"), Decimal("1E+2"), Decimal("1E-4")])
def test_minor_units_by_decimals_agrees_with_to_minor_in_every_currency(text):
    by_decimals = minor_units_by_decimals(text)
    for currency in sorted(domain.KNOWN_CURRENCIES):
        try:
            expected = to_minor(text, currency)
        except InvalidAmount:
            expected = None
        assert by_decimals[domain.minor_units(currency)] == expected, currency


# --------------------------------------------------------------------------- a fraction of a unit, at once


def _refusal(amount: Decimal) -> str:
    try:
        to_minor(amount, "HKD")
    except InvalidAmount as exc:
        return exc.message
    return "accepted"


def test_a_fraction_of_a_unit_with_a_huge_exponent_is_refused_without_computing_it():
    """Decimal("1e-999999999") (a JSON number at the signed edge) is refused by counting
    digits; dividing by 10**999999997 would take hours. Tried in a forked child (killed
    after 30 s) so that a regression fails instead of hanging, and in this process at a
    size that stays cheap either way."""
    assert _refusal(Decimal("1e-99")) == _refusal(Decimal("123e-5")) == "amount has more than 2 decimals for HKD"
    with multiprocessing.get_context("fork").Pool(1) as pool:
        answer = pool.apply_async(_refusal, (Decimal("1e-999999999"),))
        try:
            assert answer.get(timeout=30) == "amount has more than 2 decimals for HKD"
        except multiprocessing.TimeoutError:
            pytest.fail("to_minor(Decimal('1e-999999999')) still running after 30 s")


# Amount text as a merchant or an internal caller might send it: digits, a point, an
# exponent, a sign, in any mix, and Decimals of any exponent.
_AMOUNT_TEXT = st.from_regex(r"\A[-+]?[0-9]{0,25}(\.[0-9]{0,8})?([eE][-+]?[0-9]{1,3})?\Z", fullmatch=True)
_AMOUNT_DECIMAL = st.builds(lambda coefficient, exponent: Decimal(coefficient).scaleb(exponent),
                            st.integers(0, 10**30), st.integers(-12, 25))


@given(st.one_of(_AMOUNT_TEXT, _AMOUNT_DECIMAL))
def test_minor_units_by_decimals_agrees_with_to_minor_for_any_amount(amount):
    by_decimals = minor_units_by_decimals(amount)
    for digits, currency in ((domain.minor_units(c), c) for c in ("JPY", "HKD", "BHD", "CLF")):
        try:
            expected = to_minor(amount, currency)
        except InvalidAmount:
            expected = None
        assert by_decimals[digits] == expected, currency
