"""Unit tests of service/domain.py: the refund rules of docs/api.md sections 3 and 4.

Tests named `test_regression_` pin defects found in an earlier domain.py
(each docstring says which).

Long (about 730 lines) on purpose: one file per subject, a few lines per rule's case; split by rule it would scatter the table of codes it checks.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

from service import domain
from service.domain import (
    Decision,
    InvalidAmount,
    InvalidRequest,
    Order,
    OrderSnapshot,
    RefundCommand,
    ResponseCode,
    Transaction,
    check_masked_pan,
    check_stan,
    decide,
    format_minor,
    parse_decimal,
    parse_merchant_id,
    refunded_order,
    result_of,
    to_minor,
)

MERCHANT = 3000001
OTHER_MERCHANT = 3000002
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def make_order(**overrides) -> Order:
    fields = dict(
        id=1001,
        merchant_id=MERCHANT,
        merchant_reference="ref-1001",
        currency="HKD",
        amount=7619,
        status="SUCCESS",
        payment_method="VISA",
        create_time=T0,
        update_time=T0,
    )
    fields.update(overrides)
    return Order(**fields)


def make_refund(order: Order, amount: int | None = None) -> Transaction:
    return Transaction(
        id=9001,
        merchant_id=order.merchant_id,
        order_id=order.id,
        type="REFUND",
        currency=order.currency,
        amount=order.amount if amount is None else amount,
        status="SUCCESS",
        masked_pan="411111******1111",
        stan="123456",
        create_time=T0,
    )


def make_snapshot(order: Order | None = None, capability: str = "FULL_AND_PARTIAL", balance: int = 10**9,
                  refund: Transaction | None = None, **order_fields) -> OrderSnapshot:
    order = order or make_order(**order_fields)
    return OrderSnapshot(order=order, refund_capability=capability, unsettled_balance=balance, refund=refund)


def make_command(amount: str = "76.19", merchant_id: int = MERCHANT, order_id: int | None = 1001,
                 merchant_reference: str | None = None) -> RefundCommand:
    return RefundCommand(merchant_id=merchant_id, order_id=order_id, merchant_reference=merchant_reference,
                         amount=amount)


# --------------------------------------------------------------------------- order not found


def test_missing_order_is_answered_with_order_not_found():
    decision = decide(make_command(), None)
    assert decision.code is ResponseCode.ORDER_NOT_FOUND
    assert not decision.approved
    assert decision.amount == 0 and decision.new_status is None


def test_result_of_a_missing_order_shows_no_order_and_no_transaction():
    decision = decide(make_command(), None)
    result = result_of(decision, None)
    assert result.code is ResponseCode.ORDER_NOT_FOUND
    assert result.order is None and result.transaction is None


def test_another_merchants_order_gets_the_same_decision_as_a_missing_one():
    snapshot = make_snapshot(merchant_id=OTHER_MERCHANT)
    assert decide(make_command(), snapshot) == decide(make_command(), None)


def test_another_merchants_order_gets_the_same_result_as_a_missing_one():
    snapshot = make_snapshot(merchant_id=OTHER_MERCHANT, status="REFUNDED",
                             refund=make_refund(make_order(merchant_id=OTHER_MERCHANT)))
    decision = decide(make_command(), snapshot)
    result = result_of(decision, snapshot)
    assert result == result_of(decide(make_command(), None), None)
    assert result.order is None and result.transaction is None


@pytest.mark.parametrize(
    "command_kwargs",
    [
        dict(amount="0"),
        dict(amount="76.191"),
        dict(amount="NaN"),
        dict(amount="999999"),
        dict(order_id=1001, merchant_reference="ref-of-another-order"),
        dict(order_id=None, merchant_reference="ref-1001"),
    ],
    ids=["zero", "too-many-decimals", "nan", "over", "ids-disagree", "by-reference"],
)
def test_another_merchants_order_leaks_nothing_whatever_the_request_says(command_kwargs):
    """Nothing about another merchant's order (its status, amount, reference) shows through."""
    for status in ("SUCCESS", "REFUNDED", "OPEN"):
        snapshot = make_snapshot(merchant_id=OTHER_MERCHANT, status=status)
        command = make_command(**command_kwargs)
        assert decide(command, snapshot) == decide(command, None)
        assert result_of(decide(command, snapshot), snapshot).order is None


def test_another_merchant_is_never_approved_even_when_every_other_rule_passes():
    snapshot = make_snapshot(merchant_id=OTHER_MERCHANT, status="SUCCESS", balance=10**9)
    assert not decide(make_command(merchant_id=MERCHANT), snapshot).approved
    # ...while the owner of the same order would be approved.
    assert decide(make_command(merchant_id=OTHER_MERCHANT), snapshot).approved


# --------------------------------------------------------------------------- ids that disagree


def test_order_id_and_reference_naming_different_orders_is_an_invalid_request():
    command = make_command(order_id=1001, merchant_reference="ref-2002")
    decision = decide(command, make_snapshot())
    assert decision.code is ResponseCode.INVALID_REQUEST


def test_reference_matching_but_order_id_different_is_an_invalid_request():
    # The store found the order by its reference; the order id names another one.
    command = make_command(order_id=2002, merchant_reference="ref-1001")
    assert decide(command, make_snapshot()).code is ResponseCode.INVALID_REQUEST


def test_order_id_and_reference_naming_the_same_order_are_accepted():
    command = make_command(order_id=1001, merchant_reference="ref-1001")
    assert decide(command, make_snapshot()).approved


def test_order_named_by_reference_alone_is_accepted():
    command = make_command(order_id=None, merchant_reference="ref-1001")
    assert decide(command, make_snapshot()).approved


def test_order_named_by_id_alone_is_accepted():
    assert decide(make_command(order_id=1001), make_snapshot()).approved


# --------------------------------------------------------------------------- invalid amounts


@pytest.mark.parametrize(
    ("amount", "currency"),
    [
        ("0", "HKD"),
        ("0.00", "HKD"),
        ("-0", "HKD"),
        ("-76.19", "HKD"),
        ("-1", "JPY"),
        ("NaN", "HKD"),
        ("-NaN", "HKD"),
        ("sNaN", "HKD"),
        ("Infinity", "HKD"),
        ("-Infinity", "HKD"),
        ("inf", "HKD"),
        ("76.191", "HKD"),
        ("0.001", "HKD"),
        ("1.5", "JPY"),
        ("0.1", "JPY"),
        ("1.0001", "BHD"),
        ("1e400", "HKD"),
        ("1e-400", "HKD"),
        ("9" * 5000, "HKD"),
        ("0." + "0" * 4998 + "1", "HKD"),
        ("1.00000000000000000000000000001", "HKD"),
        ("1.0000000000000000000000000000000000001", "JPY"),
        ("92233720368547758.08", "HKD"),
        ("9223372036854775808", "JPY"),
        ("", "HKD"),
        ("   ", "HKD"),
        ("abc", "HKD"),
        ("76,19", "HKD"),
        ("76.19.1", "HKD"),
        ("0x10", "HKD"),
    ],
)
def test_invalid_amount_is_declined_with_invalid_amount(amount, currency):
    snapshot = make_snapshot(currency=currency, amount=10**18)
    decision = decide(make_command(amount=amount), snapshot)
    assert decision.code is ResponseCode.INVALID_AMOUNT
    assert not decision.approved
    with pytest.raises(InvalidAmount):
        to_minor(amount, currency)


def test_more_than_28_significant_digits_are_not_rounded_away_for_hkd():
    """Decimal's default context keeps 28 digits: 1.00000000000000000000000000001 must not become 1.00."""
    text = "1.00000000000000000000000000001"
    assert len(Decimal(text).as_tuple().digits) > 28
    with pytest.raises(InvalidAmount):
        to_minor(text, "HKD")
    with pytest.raises(InvalidAmount):
        to_minor(Decimal(text), "HKD")


def test_five_thousand_digit_amounts_are_refused_as_text_and_as_decimal():
    with pytest.raises(InvalidAmount):
        to_minor("1" * 5000, "HKD")
    with pytest.raises(InvalidAmount):
        to_minor(Decimal("1" * 5000), "HKD")
    with pytest.raises(InvalidAmount):
        to_minor(Decimal("0." + "0" * 4998 + "1"), "HKD")


def test_huge_exponent_is_refused_without_building_a_huge_integer():
    with pytest.raises(InvalidAmount):
        to_minor("1e999999999", "HKD")
    with pytest.raises(InvalidAmount):
        to_minor(Decimal("1e400"), "JPY")


def test_three_decimals_are_fine_for_bhd_but_four_are_not():
    assert to_minor("1.001", "BHD") == 1001
    with pytest.raises(InvalidAmount):
        to_minor("1.0001", "BHD")
    snapshot = make_snapshot(currency="BHD", amount=5000)
    assert decide(make_command(amount="1.001"), snapshot).amount == 1001
    assert decide(make_command(amount="1.0001"), snapshot).code is ResponseCode.INVALID_AMOUNT


def test_whole_yen_is_fine_but_half_a_yen_is_not():
    snapshot = make_snapshot(currency="JPY", amount=500)
    assert decide(make_command(amount="1"), snapshot).amount == 1
    assert decide(make_command(amount="1.5"), snapshot).code is ResponseCode.INVALID_AMOUNT


def test_invalid_amount_is_reported_before_the_order_status_is_looked_at():
    snapshot = make_snapshot(status="REFUNDED")
    assert decide(make_command(amount="0"), snapshot).code is ResponseCode.INVALID_AMOUNT


def test_order_in_an_unknown_currency_is_an_invalid_request_not_a_crash():
    snapshot = make_snapshot(currency="XXX")
    assert decide(make_command(amount="1"), snapshot).code is ResponseCode.INVALID_REQUEST


# --------------------------------------------------------------------------- already refunded


@pytest.mark.parametrize("status", ["REFUNDED", "PARTIALLY_REFUNDED"])
def test_refunded_order_with_its_refund_transaction_is_already_refunded(status):
    order = make_order(status=status)
    refund = make_refund(order, amount=100)
    snapshot = make_snapshot(order, refund=refund)
    decision = decide(make_command(), snapshot)
    assert decision.code is ResponseCode.ALREADY_REFUNDED
    result = result_of(decision, snapshot)
    assert result.transaction == refund
    assert result.order == order


@pytest.mark.parametrize("status", ["REFUNDED", "PARTIALLY_REFUNDED"])
def test_refunded_order_without_a_refund_transaction_is_still_already_refunded(status):
    snapshot = make_snapshot(status=status, refund=None)
    decision = decide(make_command(), snapshot)
    assert decision.code is ResponseCode.ALREADY_REFUNDED
    assert result_of(decision, snapshot).transaction is None


@pytest.mark.parametrize("status", ["SUCCESS", "SETTLED"])
def test_paid_order_that_already_has_a_refund_transaction_is_already_refunded(status):
    order = make_order(status=status)
    snapshot = make_snapshot(order, refund=make_refund(order))
    assert decide(make_command(), snapshot).code is ResponseCode.ALREADY_REFUNDED


@pytest.mark.parametrize("amount", ["76.19", "1.00", "0.01", "999.99"])
def test_partially_refunded_order_is_already_refunded_whatever_the_amount(amount):
    snapshot = make_snapshot(status="PARTIALLY_REFUNDED")
    assert decide(make_command(amount=amount), snapshot).code is ResponseCode.ALREADY_REFUNDED


def test_already_refunded_is_answered_even_when_balance_is_empty_or_capability_is_none():
    snapshot = make_snapshot(status="REFUNDED", capability="NONE", balance=0)
    assert decide(make_command(), snapshot).code is ResponseCode.ALREADY_REFUNDED


# --------------------------------------------------------------------------- not refundable statuses


@pytest.mark.parametrize("status", ["OPEN", "VOIDED", "CLOSED"])
def test_order_that_is_not_paid_is_not_refundable(status):
    decision = decide(make_command(), make_snapshot(status=status))
    assert decision.code is ResponseCode.ORDER_NOT_REFUNDABLE
    assert not decision.approved


def test_unknown_order_status_is_not_refundable():
    assert decide(make_command(), make_snapshot(status="PENDING")).code is ResponseCode.ORDER_NOT_REFUNDABLE


@pytest.mark.parametrize("status", ["SUCCESS", "SETTLED"])
def test_paid_and_settled_orders_are_refundable(status):
    decision = decide(make_command(), make_snapshot(status=status))
    assert decision.approved
    assert decision.new_status == "REFUNDED"


# --------------------------------------------------------------------------- payment method capability


@pytest.mark.parametrize("amount", ["76.19", "10.00"])
def test_payment_method_without_refunds_gives_refund_not_supported(amount):
    decision = decide(make_command(amount=amount), make_snapshot(capability="NONE"))
    assert decision.code is ResponseCode.REFUND_NOT_SUPPORTED


def test_partial_refund_is_declined_when_method_allows_full_only():
    decision = decide(make_command(amount="10.00"), make_snapshot(capability="FULL_ONLY"))
    assert decision.code is ResponseCode.PARTIAL_REFUND_NOT_SUPPORTED


def test_full_refund_is_approved_when_method_allows_full_only():
    decision = decide(make_command(amount="76.19"), make_snapshot(capability="FULL_ONLY"))
    assert decision.approved
    assert decision.amount == 7619
    assert decision.new_status == "REFUNDED"


def test_full_refund_written_with_trailing_zero_decimals_is_full():
    decision = decide(make_command(amount="76.1900"), make_snapshot(capability="FULL_ONLY"))
    assert decision.approved and decision.amount == 7619


def test_partial_refund_is_approved_when_method_allows_full_and_partial():
    decision = decide(make_command(amount="10.00"), make_snapshot(capability="FULL_AND_PARTIAL"))
    assert decision.approved
    assert decision.new_status == "PARTIALLY_REFUNDED"


def test_unknown_capability_is_not_silently_approved():
    with pytest.raises(ValueError):
        decide(make_command(), make_snapshot(capability="SOMETIMES"))


# --------------------------------------------------------------------------- amount and balance


@pytest.mark.parametrize("capability", ["FULL_ONLY", "FULL_AND_PARTIAL"])
def test_amount_greater_than_the_order_is_declined(capability):
    decision = decide(make_command(amount="76.20"), make_snapshot(capability=capability))
    assert decision.code is ResponseCode.AMOUNT_EXCEEDS_ORDER


def test_amount_one_minor_unit_over_the_order_exceeds_it_in_bhd():
    snapshot = make_snapshot(currency="BHD", amount=1000)
    assert decide(make_command(amount="1.001"), snapshot).code is ResponseCode.AMOUNT_EXCEEDS_ORDER
    assert decide(make_command(amount="1.000"), snapshot).approved


def test_balance_short_by_one_minor_unit_gives_insufficient_balance():
    decision = decide(make_command(amount="76.19"), make_snapshot(balance=7618))
    assert decision.code is ResponseCode.INSUFFICIENT_BALANCE
    assert decision == domain.Decision(ResponseCode.INSUFFICIENT_BALANCE, "unsettled balance does not cover the amount")


def test_zero_balance_gives_insufficient_balance_for_a_partial_refund():
    decision = decide(make_command(amount="0.01"), make_snapshot(balance=0))
    assert decision.code is ResponseCode.INSUFFICIENT_BALANCE


def test_balance_exactly_covering_the_amount_is_enough():
    decision = decide(make_command(amount="76.19"), make_snapshot(balance=7619))
    assert decision.approved and decision.amount == 7619


# --------------------------------------------------------------------------- approval


@pytest.mark.parametrize(
    ("currency", "order_amount", "text", "minor", "new_status"),
    [
        ("HKD", 7619, "76.19", 7619, "REFUNDED"),
        ("HKD", 7619, "76.18", 7618, "PARTIALLY_REFUNDED"),
        ("HKD", 7619, "0.01", 1, "PARTIALLY_REFUNDED"),
        ("HKD", 7619, "76.1", 7610, "PARTIALLY_REFUNDED"),
        ("JPY", 500, "500", 500, "REFUNDED"),
        ("JPY", 500, "499", 499, "PARTIALLY_REFUNDED"),
        ("BHD", 12345, "12.345", 12345, "REFUNDED"),
        ("BHD", 12345, "0.001", 1, "PARTIALLY_REFUNDED"),
        ("HKD", 10**15 - 1, "9999999999999.99", 10**15 - 1, "REFUNDED"),
    ],
)
def test_approval_carries_the_exact_minor_amount_and_the_new_status(currency, order_amount, text, minor, new_status):
    snapshot = make_snapshot(currency=currency, amount=order_amount, balance=2**63 - 1)
    decision = decide(make_command(amount=text), snapshot)
    assert decision.code is ResponseCode.SUCCESS and decision.approved
    assert decision.amount == minor and type(decision.amount) is int
    assert decision.new_status == new_status


def test_approved_order_becomes_refunded_with_the_new_update_time():
    snapshot = make_snapshot()
    decision = decide(make_command(amount="76.19"), snapshot)
    later = T0 + timedelta(minutes=5)
    order = refunded_order(snapshot.order, decision, later)
    assert order.status == "REFUNDED"
    assert order.update_time == later
    assert order.create_time == T0 and order.amount == 7619 and order.id == snapshot.order.id


def test_partially_approved_order_becomes_partially_refunded():
    snapshot = make_snapshot()
    decision = decide(make_command(amount="1.00"), snapshot)
    assert refunded_order(snapshot.order, decision, T0).status == "PARTIALLY_REFUNDED"


def test_a_refunded_order_cannot_be_refunded_again():
    snapshot = make_snapshot()
    decision = decide(make_command(amount="1.00"), snapshot)
    order = refunded_order(snapshot.order, decision, T0)
    again = decide(make_command(amount="1.00"), make_snapshot(order, refund=make_refund(order, 100)))
    assert again.code is ResponseCode.ALREADY_REFUNDED


def test_result_of_an_approval_shows_the_updated_order_and_the_new_refund():
    snapshot = make_snapshot()
    decision = decide(make_command(), snapshot)
    order = refunded_order(snapshot.order, decision, T0)
    refund = make_refund(order)
    result = result_of(decision, snapshot, refund, order)
    assert result.code is ResponseCode.SUCCESS
    assert result.order == order and result.transaction == refund


def test_result_of_a_decline_shows_the_order_without_a_transaction():
    snapshot = make_snapshot(status="OPEN")
    result = result_of(decide(make_command(), snapshot), snapshot)
    assert result.code is ResponseCode.ORDER_NOT_REFUNDABLE
    assert result.order == snapshot.order and result.transaction is None


def test_decide_is_pure_and_answers_the_same_twice():
    snapshot, command = make_snapshot(), make_command()
    assert decide(command, snapshot) == decide(command, snapshot)


def test_decision_approved_is_true_only_for_success():
    for code in ResponseCode:
        assert Decision(code).approved is (code is ResponseCode.SUCCESS)


def test_response_codes_match_the_table_of_api_md_section_4_and_the_edges_rate_limit():
    assert {c.name: c.value for c in ResponseCode} == {
        "SUCCESS": "0000", "INVALID_REQUEST": "1001", "INVALID_AMOUNT": "1002", "IDEMPOTENCY_CONFLICT": "1003",
        "AUTHENTICATION_FAILED": "2001", "MERCHANT_INACTIVE": "2002", "REQUEST_EXPIRED": "2003",
        "ORDER_NOT_FOUND": "3001", "ORDER_NOT_REFUNDABLE": "3002", "ALREADY_REFUNDED": "3003",
        "REFUND_NOT_SUPPORTED": "4001", "PARTIAL_REFUND_NOT_SUPPORTED": "4002", "AMOUNT_EXCEEDS_ORDER": "4003",
        "INSUFFICIENT_BALANCE": "4004", "SERVICE_UNAVAILABLE": "9001", "RATE_LIMITED": "9002",
        "SYSTEM_ERROR": "9999",
    }
    assert ResponseCode.by_name("ALREADY_REFUNDED") is ResponseCode.ALREADY_REFUNDED


# --------------------------------------------------------------------------- to_minor / format_minor


@pytest.mark.parametrize(
    ("units", "currency", "text"),
    [
        (7619, "HKD", "76.19"),
        (1, "HKD", "0.01"),
        (100, "HKD", "1.00"),
        (0, "HKD", "0.00"),
        (500, "JPY", "500"),
        (1, "JPY", "1"),
        (12345, "BHD", "12.345"),
        (1, "BHD", "0.001"),
        (1000, "BHD", "1.000"),
        (10**15 - 1, "HKD", "9999999999999.99"),
        (-7619, "HKD", "-76.19"),
    ],
)
def test_format_minor_writes_exactly_the_currency_decimals(units, currency, text):
    assert format_minor(units, currency) == text


@pytest.mark.parametrize(
    ("currency", "units"),
    [(c, u) for c in ("HKD", "JPY", "BHD") for u in (1, 9, 10, 99, 100, 101, 7619, 10**12 + 7, 10**15 - 1)],
)
def test_minor_units_survive_a_round_trip_through_text(currency, units):
    assert to_minor(format_minor(units, currency), currency) == units
    assert to_minor(Decimal(format_minor(units, currency)), currency) == units


@pytest.mark.parametrize(
    ("text", "currency", "units"),
    [
        ("76.19", "HKD", 7619),
        ("76.1", "HKD", 7610),
        ("76", "HKD", 7600),
        ("500", "JPY", 500),
        ("1.001", "BHD", 1001),
        ("0.5", "BHD", 500),
        ("0.50", "HKD", 50),
        ("9999999999999.99", "HKD", 10**15 - 1),
        ("999999999999999", "JPY", 10**15 - 1),
    ],
)
def test_to_minor_reads_decimal_text_exactly(text, currency, units):
    assert to_minor(text, currency) == units


@pytest.mark.parametrize("text", ["1e1", "1E+2", "7.619E1", " 5.00", "5.00\n", " 76.19 ", "+5.00", "-5.00", ".5", "5.",
                                  "00005.00", "05", "5..0", "5,00", "0x10", "1 000", "\u0665"])
def test_amount_text_follows_one_strict_grammar(text):
    """Was a finding (issue 10): gRPC amounts in exponent, signed, blank-padded,
    leading-zero or bare-point form were accepted; the proto documents "76.19"."""
    with pytest.raises(InvalidAmount):
        to_minor(text, "HKD")


@pytest.mark.parametrize(("text", "currency"), [("10000000000000.00", "HKD"), ("1000000000000000", "JPY"),
                                                ("92233720368547758.07", "HKD"), ("9223372036854775807", "JPY"),
                                                ("1000000000000.000", "BHD")])
def test_amounts_above_the_documented_maximum_are_invalid(text, currency):
    """Was a finding (issue 10): an amount of 2**63 - 1 minor units was accepted
    and overflowed SQLite's balance into floating point."""
    with pytest.raises(InvalidAmount) as raised:
        to_minor(text, currency)
    assert "at most 999999999999999 minor units" in raised.value.message


@pytest.mark.parametrize("currency", ["XXX", "hkd", "", "HKDD", "EURO"])
def test_unknown_currency_is_an_invalid_request(currency):
    with pytest.raises(InvalidRequest) as raised:
        to_minor("1", currency)
    assert raised.value.code is ResponseCode.INVALID_REQUEST
    with pytest.raises(InvalidRequest):
        format_minor(100, currency)


def test_currencies_have_their_iso_4217_minor_units():
    assert domain.minor_units("HKD") == 2
    assert domain.minor_units("JPY") == 0
    assert domain.minor_units("BHD") == 3
    assert domain.minor_units("CLF") == 4


def test_invalid_amount_errors_carry_the_invalid_amount_code():
    with pytest.raises(InvalidAmount) as raised:
        to_minor("0", "HKD")
    assert raised.value.code is ResponseCode.INVALID_AMOUNT
    assert raised.value.message


@pytest.mark.parametrize("amount", ["76.19", Decimal("76.19"), Decimal("1E+1")])
def test_parse_decimal_accepts_positive_finite_decimals(amount):
    assert parse_decimal(amount) > 0


@pytest.mark.parametrize("amount", ["0", "-1", "NaN", "Infinity", "", "x", None, 76.19, 7619, Decimal("-0"),
                                    Decimal("NaN"), Decimal("Infinity"), "1" * 65, " 1 "])
def test_parse_decimal_refuses_anything_else(amount):
    with pytest.raises(InvalidAmount):
        parse_decimal(amount)


def test_parse_decimal_never_goes_through_float():
    assert parse_decimal("0.1") == Decimal("0.1")
    assert parse_decimal("1.00000000000000000000000000001") == Decimal("1.00000000000000000000000000001")


# --------------------------------------------------------------------------- masked PAN, STAN, merchant id


@pytest.mark.parametrize("pan", ["411111******1111", "", "************1111", "411111**********", "4111********",
                                 "411111XXXXXX1111", "550000*********0004", "411111******111"])
def test_masked_pan_showing_at_most_six_first_and_four_last_digits_is_accepted(pan):
    assert check_masked_pan(pan) == pan


@pytest.mark.parametrize(
    "pan",
    [
        "4111111111111111",               # full PAN
        "4111111*****1111",               # 7 leading digits
        "411111*****11111",               # 5 trailing digits
        "41111*1111111111",               # digits in the middle
        "411111**1**11111",
        "411111******1111 ",
        "4111**1111",                     # too short
        "411111" + "*" * 16 + "1111",     # too long
        "411111------1111",
        "abcdef******1111",
    ],
)
def test_masked_pan_that_shows_too_much_or_is_malformed_is_refused(pan):
    with pytest.raises(InvalidRequest):
        check_masked_pan(pan)


@pytest.mark.parametrize("stan", ["123456", "000000", "999999"])
def test_six_digit_stan_is_accepted(stan):
    assert check_stan(stan) == stan


@pytest.mark.parametrize("stan", ["", "12345", "1234567", "12345a", " 12345", "12 456", "-12345"])
def test_stan_that_is_not_six_digits_is_refused(stan):
    with pytest.raises(InvalidRequest):
        check_stan(stan)


@pytest.mark.parametrize(("raw", "value"), [("3000001", 3000001), (3000001, 3000001), ("0", 0),
                                            ("9" * 18, int("9" * 18))])
def test_merchant_id_of_digits_is_parsed(raw, value):
    assert parse_merchant_id(raw) == value


@pytest.mark.parametrize("raw", ["", "abc", "-1", -1, "3000001 ", " 3000001", "3e6", "1.0", "9" * 19,
                                 "\u0663\u0660\u0660", "\uff13\uff10\uff10", "+3000001"])
def test_merchant_id_that_is_not_ascii_digits_is_refused(raw):
    with pytest.raises(InvalidRequest):
        parse_merchant_id(raw)


# --------------------------------------------------------------------------- RefundCommand


def test_refund_command_without_order_id_or_reference_is_an_invalid_request():
    with pytest.raises(InvalidRequest):
        RefundCommand(merchant_id=MERCHANT, order_id=None, merchant_reference=None, amount="1")
    with pytest.raises(InvalidRequest):
        RefundCommand(merchant_id=MERCHANT, order_id=None, merchant_reference="", amount="1")


@pytest.mark.parametrize("order_id", [0, -1, 2**63])
def test_refund_command_with_an_order_id_out_of_range_is_an_invalid_request(order_id):
    with pytest.raises(InvalidRequest):
        RefundCommand(merchant_id=MERCHANT, order_id=order_id, merchant_reference=None, amount="1")


def test_refund_command_with_a_reference_over_128_characters_is_an_invalid_request():
    RefundCommand(merchant_id=MERCHANT, order_id=None, merchant_reference="r" * 128, amount="1")
    with pytest.raises(InvalidRequest):
        RefundCommand(merchant_id=MERCHANT, order_id=None, merchant_reference="r" * 129, amount="1")


def test_refund_command_with_either_or_both_ids_is_accepted():
    RefundCommand(merchant_id=MERCHANT, order_id=1, merchant_reference=None, amount="1")
    RefundCommand(merchant_id=MERCHANT, order_id=None, merchant_reference="r", amount="1")
    RefundCommand(merchant_id=MERCHANT, order_id=2**63 - 1, merchant_reference="r", amount="1")


# --------------------------------------------------------------------------- bugs found in domain.py
#
# These tests fail against the current domain.py on purpose. They are the
# evidence for the defects reported; do not mark them xfail without a fix.


def test_regression_tiny_exponent_amount_is_refused_quickly():
    """Was a bug: to_minor guards only large magnitudes (value.adjusted() > 19). For a
    tiny one such as "1e-999999999" (12 characters, a valid JSON number) it
    computes divmod(coefficient, 10**999999997): a ~415 MB integer that takes
    minutes to hours to build. 1e-10000000 already takes ~6 s. decide() calls
    to_minor while the store holds the order's row lock."""
    code = (
        "from service.domain import to_minor, InvalidAmount\n"
        "try:\n"
        "    to_minor('1e-999999999', 'HKD')\n"
        "except InvalidAmount:\n"
        "    print('InvalidAmount')\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("to_minor('1e-999999999', 'HKD') still running after 5 s (expected an immediate InvalidAmount)")
    assert done.stdout.strip() == "InvalidAmount", done.stderr


@pytest.mark.parametrize("stan", ["123456\n", "\u0661\u0662\u0663\u0664\u0665\u0666", "\uff11\uff12\uff13\uff14\uff15\uff16"])
def test_regression_stan_with_a_trailing_newline_or_non_ascii_digits_is_refused(stan):
    """Was a bug: _STAN is ^\\d{6}$ used with .match: `$` also matches before a final
    newline, and \\d matches any Unicode digit (Arabic-Indic, full-width). So
    check_stan accepts "123456\\n" and "١٢٣٤٥٦" (RecordSale stores them)."""
    with pytest.raises(InvalidRequest):
        check_stan(stan)


@pytest.mark.parametrize("pan", ["411111******1111\n", "\u0664\u0661\u0661\u0661\u0661\u0661******\u0661\u0661\u0661\u0661"])
def test_regression_masked_pan_with_a_trailing_newline_or_non_ascii_digits_is_refused(pan):
    """Was a bug: same pattern problem in _MASKED_PAN (^...$ with .match, \\d Unicode)."""
    with pytest.raises(InvalidRequest):
        check_masked_pan(pan)


@pytest.mark.parametrize(("amount", "read_as"), [("1_000", 100000), ("\u0661\u0662", 1200), ("\uff11\uff12", 1200)])
def test_regression_amount_text_in_python_only_syntax_is_refused(amount, read_as):
    """BUG (minor, lenient parse): parse_decimal hands the text to Decimal(),
    which also takes Python's digit-group underscores and any Unicode digits:
    via gRPC, amount "1_000" is refunded as HKD 1000.00 and "١٢" as HKD 12.00.
    The API says a decimal string such as "76.19". Today to_minor(amount, "HKD") == read_as."""
    with pytest.raises(InvalidAmount):
        to_minor(amount, "HKD")
