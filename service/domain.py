"""The refund rules of docs/api.md section 3, in plain Python.

Nothing here imports grpc or sqlalchemy. The refund use case
(service/usecases/refunds.py) reads a snapshot of an order, asks `decide`
what to do, and has the store apply the decision with statements that the
database itself guards: the order is marked only in the status that was read,
the balance is debited only while it covers the amount, one refund per order.
Every rule constant lives here; the stores' SQL is built from them
(service/stores/sql.py).

Money is integer minor units of the currency (HKD 76.19 is 7619); decimal text
is accepted and produced only at the edges of this module.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal

from refund_wire import currencies
from refund_wire.codes import ResponseCode
from refund_wire.currencies import KNOWN_CURRENCIES, MAX_DECIMALS
from refund_wire.formats import AMOUNT_TEXT


class RefundCapability(enum.Enum):
    NONE = "NONE"
    FULL_ONLY = "FULL_ONLY"
    FULL_AND_PARTIAL = "FULL_AND_PARTIAL"


class OrderStatus(enum.Enum):
    OPEN = "OPEN"
    SUCCESS = "SUCCESS"
    SETTLED = "SETTLED"
    VOIDED = "VOIDED"
    CLOSED = "CLOSED"
    REFUNDED = "REFUNDED"
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"


REFUNDABLE_STATUSES = frozenset({OrderStatus.SUCCESS.value, OrderStatus.SETTLED.value})
REFUNDED_STATUSES = frozenset({OrderStatus.REFUNDED.value, OrderStatus.PARTIALLY_REFUNDED.value})
# An order's status after its refund: the whole amount, or a part of it.
FULLY_REFUNDED = OrderStatus.REFUNDED.value
PARTLY_REFUNDED = OrderStatus.PARTIALLY_REFUNDED.value

# What a payment method's refund capability allows.
REFUNDS_ALLOWED = frozenset({RefundCapability.FULL_ONLY.value, RefundCapability.FULL_AND_PARTIAL.value})
PARTIAL_REFUNDS_ALLOWED = frozenset({RefundCapability.FULL_AND_PARTIAL.value})

# Transactions: their types, and the status of every transaction the gateway makes.
SALE = "SALE"
REFUND = "REFUND"
TRANSACTION_SUCCEEDED = "SUCCESS"

# A settlement batch's id for Settle: 1 to 64 printable ASCII characters, no blank.
SETTLEMENT_ID = re.compile(r"[\x21-\x7e]{1,64}\Z")

# Ids (orders, transactions) are signed 64-bit integers.
MAX_ID = 2**63 - 1

# The largest amount, and the largest balance, in minor units of any currency:
# HKD 9,999,999,999,999.99, JPY 999,999,999,999,999. Well inside a signed
# 64-bit integer, so that no sum of two bounded values can overflow in SQL.
# Anything larger is INVALID_AMOUNT (1002), with nothing written.
MAX_MINOR_UNITS = 10**15 - 1


class DomainError(Exception):
    """A request the rules refuse before any order is looked at."""

    code = ResponseCode.INVALID_REQUEST

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidRequest(DomainError):
    code = ResponseCode.INVALID_REQUEST


class InvalidAmount(DomainError):
    code = ResponseCode.INVALID_AMOUNT


class OrderNotFound(DomainError):
    code = ResponseCode.ORDER_NOT_FOUND


class IdempotencyConflict(DomainError):
    """An Idempotency-Key or a settlement id used before for something else."""

    code = ResponseCode.IDEMPOTENCY_CONFLICT


class InsufficientBalance(DomainError):
    code = ResponseCode.INSUFFICIENT_BALANCE


def minor_units(currency: str) -> int:
    digits = currencies.decimals(currency)
    if digits is None:
        raise InvalidRequest(f"unknown currency {currency!r}")
    return digits


def currencies_by_minor_units() -> dict[int, tuple[str, ...]]:
    """The known currencies grouped by their minor units: {0: ("BIF", ...), 2: (...), ...}."""
    groups: dict[int, list[str]] = {}
    for currency in sorted(KNOWN_CURRENCIES):
        groups.setdefault(minor_units(currency), []).append(currency)
    return {digits: tuple(codes) for digits, codes in sorted(groups.items())}


def parse_decimal(amount: str | Decimal) -> Decimal:
    """A positive finite decimal, from text in AMOUNT_TEXT's grammar ("76.19")
    or a Decimal (a JSON number, already in JSON's own grammar)."""
    if isinstance(amount, Decimal):
        value = amount
    else:
        if not isinstance(amount, str) or len(amount) > 64 or not AMOUNT_TEXT.fullmatch(amount):
            raise InvalidAmount('amount must be a decimal string such as "76.19" '
                                "(digits, no sign, no exponent, no leading zeros)")
        value = Decimal(amount)
    if not value.is_finite():
        raise InvalidAmount("amount must be finite")
    if value <= 0:
        raise InvalidAmount("amount must be greater than zero")
    return value


def to_minor(amount: str | Decimal, currency: str) -> int:
    """Exact minor units of `amount` in `currency`; InvalidAmount if it has
    more decimals than the currency, or is not positive and finite."""
    return _units(parse_decimal(amount), minor_units(currency), currency)


def minor_units_by_decimals(amount: str | Decimal) -> list[int | None]:
    """to_minor(amount, c) for a currency c of 0, 1, 2, ... decimals (the list's
    index), None where to_minor would refuse the amount: what a refund can ask of
    the database before it knows the order's currency."""
    try:
        exact = _exact(parse_decimal(amount))
    except InvalidAmount:
        return [None] * (MAX_DECIMALS + 1)
    units = (_scaled(*exact, digits) for digits in range(MAX_DECIMALS + 1))
    return [u if u is not None and u <= MAX_MINOR_UNITS else None for u in units]


def _units(value: Decimal, digits: int, currency: str) -> int:
    units = _scaled(*_exact(value), digits)
    if units is None:
        raise InvalidAmount(f"amount has more than {digits} decimals for {currency}")
    if units > MAX_MINOR_UNITS:
        raise InvalidAmount(f"amount is too large: at most {MAX_MINOR_UNITS} minor units")
    return units


def _exact(value: Decimal) -> tuple[int, int, int]:
    """(coefficient, exponent, digits of the coefficient) of a non-negative `value`.
    Checks the magnitude first so that 1e999999 never builds a huge integer; the
    exact coefficient, because Decimal arithmetic would round to 28 digits and
    could hide a stray decimal."""
    if value.adjusted() > 19:
        raise InvalidAmount("amount is too large")
    _, coefficient_digits, exponent = value.as_tuple()
    if len(coefficient_digits) > 40:
        raise InvalidAmount("amount has too many digits")
    return int("".join(map(str, coefficient_digits))), exponent, len(coefficient_digits)


def _scaled(coefficient: int, exponent: int, length: int, digits: int) -> int | None:
    """coefficient x 10**exponent in units of 10**-digits; None when that leaves a fraction."""
    shift = exponent + digits
    if shift >= 0:
        return coefficient * 10**shift
    if -shift > length:  # e.g. 1e-999999999: a fraction of a minor unit (and no huge power of ten)
        return None
    units, remainder = divmod(coefficient, 10**-shift)
    return None if remainder else units


def format_minor(units: int, currency: str) -> str:
    """Decimal text of `units` with exactly the currency's decimals: 7619 HKD -> "76.19"."""
    digits = minor_units(currency)
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), 10**digits)
    return f"{sign}{whole}.{frac:0{digits}d}" if digits else f"{sign}{whole}"


_MASKED_PAN = re.compile(r"[0-9]{0,6}[*X]{1,15}[0-9]{0,4}")
_STAN = re.compile(r"[0-9]{6}")


def check_masked_pan(masked_pan: str) -> str:
    """An empty string or a PAN that shows at most its first six and last four digits."""
    if masked_pan and not (_MASKED_PAN.fullmatch(masked_pan) and 12 <= len(masked_pan) <= 19):
        raise InvalidRequest("maskedPan must show at most the first six and last four digits")
    return masked_pan


def check_stan(stan: str) -> str:
    if not _STAN.fullmatch(stan):
        raise InvalidRequest("stan must be 6 digits")
    return stan


def check_settlement_id(settlement_id: str) -> str:
    if not SETTLEMENT_ID.match(settlement_id):
        raise InvalidRequest("settlement_id must be 1 to 64 printable ASCII characters without blanks")
    return settlement_id


def parse_merchant_id(merchant_id: str | int) -> int:
    text = str(merchant_id)
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise InvalidRequest("merchantId must be a string of digits")
    return int(text)


@dataclass(frozen=True)
class Order:
    id: int
    merchant_id: int
    merchant_reference: str
    currency: str
    amount: int
    status: str
    payment_method: str
    create_time: datetime
    update_time: datetime


@dataclass(frozen=True)
class Transaction:
    id: int
    merchant_id: int
    order_id: int
    type: str
    currency: str
    amount: int
    status: str
    masked_pan: str
    stan: str
    create_time: datetime


@dataclass(frozen=True)
class RefundCommand:
    """A refund asked for: merchant, one or both order identifiers, and the
    amount as text (gRPC) or as the Decimal of a signed request's JSON number."""

    merchant_id: int
    order_id: int | None
    merchant_reference: str | None
    amount: str | Decimal

    @property
    def amount_text(self) -> str:
        """The amount as asked for, for the audit row (at most 64 characters)."""
        return str(self.amount)[:64]

    def __post_init__(self):
        if self.order_id is None and not self.merchant_reference:
            raise InvalidRequest("orderId or merchantReference is required")
        check_order_key(self.order_id, self.merchant_reference)


def check_order_key(order_id: int | None, merchant_reference: str | None) -> None:
    """Each order identifier that is given is in range (a positive 64-bit id, a
    reference of at most 128 characters that the databases can store)."""
    if order_id is not None and not 0 < order_id <= MAX_ID:
        raise InvalidRequest("orderId must be a positive integer")
    if merchant_reference is not None:
        check_text(merchant_reference, "merchantReference", MAX_REFERENCE_LENGTH)


# Text that SQLite and PostgreSQL both store as given: PostgreSQL refuses NUL in
# text, and neither driver can encode a lone surrogate (what JSON's "\ud800" decodes to).
_UNSTORABLE_TEXT = re.compile("[\x00\ud800-\udfff]")
MAX_REFERENCE_LENGTH = 128


def check_text(value: str, name: str, max_length: int) -> str:
    """`value` when it has at most `max_length` characters and none that a database cannot store."""
    if len(value) > max_length:
        raise InvalidRequest(f"{name} is longer than {max_length} characters")
    if _UNSTORABLE_TEXT.search(value):
        raise InvalidRequest(f"{name} holds a NUL character or a lone surrogate")
    return value


@dataclass(frozen=True)
class OrderSnapshot:
    """What the rules need to know about an order, as one statement read it.

    `refund` is the order's refund transaction, if it has one (an order loaded
    as REFUNDED may have none)."""

    order: Order
    refund_capability: str
    unsettled_balance: int
    refund: Transaction | None = None


@dataclass(frozen=True)
class Decision:
    code: ResponseCode
    message: str = ""
    amount: int = 0
    new_status: str | None = None

    @property
    def approved(self) -> bool:
        return self.code is ResponseCode.SUCCESS


def decide(command: RefundCommand, snapshot: OrderSnapshot | None) -> Decision:
    """Apply docs/api.md section 3 to one attempt. Pure: no I/O, no clock."""
    if snapshot is None or snapshot.order.merchant_id != command.merchant_id:
        return Decision(ResponseCode.ORDER_NOT_FOUND, "order not found")
    order = snapshot.order
    if command.merchant_reference and command.merchant_reference != order.merchant_reference:
        return Decision(ResponseCode.INVALID_REQUEST, "orderId and merchantReference name different orders")
    if command.order_id is not None and command.order_id != order.id:
        return Decision(ResponseCode.INVALID_REQUEST, "orderId and merchantReference name different orders")
    try:
        amount = to_minor(command.amount, order.currency)
    except DomainError as exc:
        return Decision(exc.code, exc.message)
    if order.status in REFUNDED_STATUSES or snapshot.refund is not None:
        return Decision(ResponseCode.ALREADY_REFUNDED, "the order was refunded before")
    if order.status not in REFUNDABLE_STATUSES:
        return Decision(ResponseCode.ORDER_NOT_REFUNDABLE, f"order status {order.status} cannot be refunded")
    capability = RefundCapability(snapshot.refund_capability).value  # an unknown capability is a bug: raise
    if capability not in REFUNDS_ALLOWED:
        return Decision(ResponseCode.REFUND_NOT_SUPPORTED, "the payment method allows no refund")
    if amount > order.amount:
        return Decision(ResponseCode.AMOUNT_EXCEEDS_ORDER, "amount is greater than the order amount")
    full = amount == order.amount
    if not full and capability not in PARTIAL_REFUNDS_ALLOWED:
        return Decision(ResponseCode.PARTIAL_REFUND_NOT_SUPPORTED, "the payment method allows full refunds only")
    if snapshot.unsettled_balance < amount:
        return Decision(ResponseCode.INSUFFICIENT_BALANCE, "unsettled balance does not cover the amount")
    return Decision(ResponseCode.SUCCESS, "SUCCESS", amount=amount,
                    new_status=FULLY_REFUNDED if full else PARTLY_REFUNDED)


@dataclass(frozen=True)
class RefundResult:
    """The answer to an attempt: its code, and the order and transaction when they exist."""

    code: ResponseCode
    message: str
    order: Order | None = None
    transaction: Transaction | None = None


def result_of(decision: Decision, snapshot: OrderSnapshot | None, transaction: Transaction | None = None,
              order: Order | None = None) -> RefundResult:
    """The result shown to the caller: no order for ORDER_NOT_FOUND (another
    merchant's order looks exactly like a missing one), the earlier refund
    for ALREADY_REFUNDED, the new refund for SUCCESS."""
    if decision.code is ResponseCode.ORDER_NOT_FOUND or snapshot is None:
        return RefundResult(decision.code, decision.message)
    if decision.code is ResponseCode.ALREADY_REFUNDED:
        transaction = snapshot.refund
    return RefundResult(decision.code, decision.message, order or snapshot.order, transaction)


def refunded_order(order: Order, decision: Decision, now: datetime) -> Order:
    return replace(order, status=decision.new_status, update_time=now)
