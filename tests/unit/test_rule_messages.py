"""The message of every refusal of service/domain.py, word for word (issue 17).

The message is what the caller reads beside the code (the gRPC status message,
the edge's `message`), so it is part of the answer: a refusal that says the
wrong thing, or nothing, must fail a test. Written out here in one table so
that a change of wording is one deliberate edit.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from service import domain
from service.domain import InvalidAmount, InvalidRequest, Order, OrderSnapshot, RefundCommand, ResponseCode, decide

MERCHANT = 3000001
GRAMMAR = 'amount must be a decimal string such as "76.19" (digits, no sign, no exponent, no leading zeros)'
TOO_LARGE = f"amount is too large: at most {domain.MAX_MINOR_UNITS} minor units"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def snapshot(status="SUCCESS", capability="FULL_AND_PARTIAL", balance=10**9, currency="HKD", merchant=MERCHANT):
    order = Order(id=1001, merchant_id=merchant, merchant_reference="ref-1001", currency=currency, amount=7619,
                  status=status, payment_method="VISA", create_time=T0, update_time=T0)
    return OrderSnapshot(order=order, refund_capability=capability, unsettled_balance=balance)


def command(amount="76.19", order_id=1001, reference=None):
    return RefundCommand(MERCHANT, order_id, reference, amount)


@pytest.mark.parametrize(("attempt", "found", "code", "message"), [
    (command(), None, ResponseCode.ORDER_NOT_FOUND, "order not found"),
    (command(), snapshot(merchant=MERCHANT + 1), ResponseCode.ORDER_NOT_FOUND, "order not found"),
    (command(reference="ref-2002"), snapshot(), ResponseCode.INVALID_REQUEST,
     "orderId and merchantReference name different orders"),
    (command(order_id=2002, reference="ref-1001"), snapshot(), ResponseCode.INVALID_REQUEST,
     "orderId and merchantReference name different orders"),
    (command("0"), snapshot(), ResponseCode.INVALID_AMOUNT, "amount must be greater than zero"),
    (command("NaN"), snapshot(), ResponseCode.INVALID_AMOUNT, GRAMMAR),
    (command("-1"), snapshot(), ResponseCode.INVALID_AMOUNT, GRAMMAR),
    (command(Decimal("-1")), snapshot(), ResponseCode.INVALID_AMOUNT, "amount must be greater than zero"),
    (command("76.191"), snapshot(), ResponseCode.INVALID_AMOUNT, "amount has more than 2 decimals for HKD"),
    (command(Decimal("1e-999999999")), snapshot(), ResponseCode.INVALID_AMOUNT,
     "amount has more than 2 decimals for HKD"),
    (command("1.5"), snapshot(currency="JPY"), ResponseCode.INVALID_AMOUNT, "amount has more than 0 decimals for JPY"),
    (command("1" + "0" * 20), snapshot(), ResponseCode.INVALID_AMOUNT, "amount is too large"),
    (command("10000000000000"), snapshot(), ResponseCode.INVALID_AMOUNT, TOO_LARGE),
    (command("1." + "0" * 40), snapshot(), ResponseCode.INVALID_AMOUNT, "amount has too many digits"),
    (command(), snapshot(currency="XXX"), ResponseCode.INVALID_REQUEST, "unknown currency 'XXX'"),
    (command(), snapshot(status="REFUNDED"), ResponseCode.ALREADY_REFUNDED, "the order was refunded before"),
    (command(), snapshot(status="VOIDED"), ResponseCode.ORDER_NOT_REFUNDABLE, "order status VOIDED cannot be refunded"),
    (command(), snapshot(capability="NONE"), ResponseCode.REFUND_NOT_SUPPORTED, "the payment method allows no refund"),
    (command("76.20"), snapshot(), ResponseCode.AMOUNT_EXCEEDS_ORDER, "amount is greater than the order amount"),
    (command("1.00"), snapshot(capability="FULL_ONLY"), ResponseCode.PARTIAL_REFUND_NOT_SUPPORTED,
     "the payment method allows full refunds only"),
    (command(), snapshot(balance=7618), ResponseCode.INSUFFICIENT_BALANCE,
     "unsettled balance does not cover the amount"),
    (command(), snapshot(), ResponseCode.SUCCESS, "SUCCESS"),
])
def test_each_decision_says_why(attempt, found, code, message):
    decision = decide(attempt, found)
    assert (decision.code, decision.message) == (code, message)
    result = domain.result_of(decision, found)
    assert (result.code, result.message) == (code, message)


@pytest.mark.parametrize(("check", "value", "error", "message"), [
    (domain.parse_decimal, "1" * 65, InvalidAmount, GRAMMAR),
    (domain.parse_decimal, "0.00", InvalidAmount, "amount must be greater than zero"),
    (domain.parse_decimal, Decimal("-1"), InvalidAmount, "amount must be greater than zero"),
    (domain.parse_decimal, Decimal("NaN"), InvalidAmount, "amount must be finite"),
    (domain.parse_decimal, Decimal("-Infinity"), InvalidAmount, "amount must be finite"),
    (domain.check_masked_pan, "4111111111111111", InvalidRequest,
     "maskedPan must show at most the first six and last four digits"),
    (domain.check_stan, "12345", InvalidRequest, "stan must be 6 digits"),
    (domain.parse_merchant_id, "12a", InvalidRequest, "merchantId must be a string of digits"),
    (domain.check_settlement_id, "", InvalidRequest,
     "settlement_id must be 1 to 64 printable ASCII characters without blanks"),
    (domain.minor_units, "XXX", InvalidRequest, "unknown currency 'XXX'"),
    (lambda order_id: domain.check_order_key(order_id, None), 0, InvalidRequest, "orderId must be a positive integer"),
    (lambda reference: domain.check_order_key(None, reference), "r" * 129, InvalidRequest,
     "merchantReference is longer than 128 characters"),
    (lambda reference: domain.check_order_key(None, reference), "r\x00", InvalidRequest,
     "merchantReference holds a NUL character or a lone surrogate"),
    (lambda _: RefundCommand(MERCHANT, None, None, "1"), None, InvalidRequest,
     "orderId or merchantReference is required"),
])
def test_each_refused_field_says_which_and_why(check, value, error, message):
    with pytest.raises(error) as raised:
        check(value)
    assert raised.value.message == message and str(raised.value) == message
    assert raised.value.code is error.code
