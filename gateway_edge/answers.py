"""What the edge answers: one table from response codes to HTTP statuses, the
translation of a gRPC outcome into an answer, and the exact JSON rendering.

Amounts cross gRPC as decimal strings in the currency's precision ("76.19",
"500", "1.250"); they are written into the JSON verbatim, as numbers, and never
pass through a float. Nothing a backend says that is not ours (a message of a
gRPC error without our ErrorInfo, an exception text) reaches the merchant.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc

from refund.v1 import refund_pb2
from refund_wire import currencies
from refund_wire.codes import ResponseCode
from refund_wire.formats import ANSWER_AMOUNT
from refund_wire.status import RpcError

log = logging.getLogger("refund-edge")

# The one table from response codes to HTTP statuses (docs/api.md section 4): the
# status says whether the gateway could process the request, the code says
# the outcome.
HTTP_STATUS = {
    ResponseCode.SUCCESS: 200,
    ResponseCode.INVALID_REQUEST: 400,
    ResponseCode.INVALID_AMOUNT: 400,
    ResponseCode.IDEMPOTENCY_CONFLICT: 409,
    ResponseCode.AUTHENTICATION_FAILED: 401,
    ResponseCode.MERCHANT_INACTIVE: 403,
    ResponseCode.REQUEST_EXPIRED: 401,
    ResponseCode.ORDER_NOT_FOUND: 200,
    ResponseCode.ORDER_NOT_REFUNDABLE: 200,
    ResponseCode.ALREADY_REFUNDED: 200,
    ResponseCode.REFUND_NOT_SUPPORTED: 200,
    ResponseCode.PARTIAL_REFUND_NOT_SUPPORTED: 200,
    ResponseCode.AMOUNT_EXCEEDS_ORDER: 200,
    ResponseCode.INSUFFICIENT_BALANCE: 200,
    ResponseCode.SERVICE_UNAVAILABLE: 503,
    ResponseCode.RATE_LIMITED: 429,
    ResponseCode.SYSTEM_ERROR: 500,
}
assert set(HTTP_STATUS) == set(ResponseCode), "every response code needs an HTTP status"

# Gateway-side explanations that replace whatever a backend said.
UNAVAILABLE_DETAIL = ("the service is unavailable or did not answer in time; retrying is safe "
                      "(an order is never refunded twice)")
SYSTEM_ERROR_DETAIL = ("unexpected error; retrying is safe (an order is never refunded twice, "
                       "a retry after a refund that did happen is answered 3003 with it)")

_RETRYABLE_WITHOUT_INFO = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

_DIGITS = re.compile(r"[0-9]{1,19}\Z")
# Text that json.dumps writes as itself between quotes: printable ASCII but " and \.
_PLAIN_TEXT = re.compile(r'[ !#-\[\]-~]*\Z')
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LAST_SECOND = 253402300799  # 9999-12-31T23:59:59Z


class UnrenderableAnswer(Exception):
    """A backend answer that cannot be shown as documented (a bug behind the edge)."""


@dataclass(frozen=True)
class Answer:
    """One response of the edge: its code, an optional explanation, the order
    and transaction when they exist, and the HTTP status when it is not the
    code's usual one (413, 415, 405, 404 with code 1001)."""

    code: ResponseCode
    detail: str | None = None
    order: refund_pb2.Order | None = None
    transaction: refund_pb2.Transaction | None = None
    http_status: int | None = None
    # POST /direct/query: all the order's transactions (sale first).
    transactions: tuple[refund_pb2.Transaction, ...] | None = None

    @property
    def status(self) -> int:
        return self.http_status or HTTP_STATUS[self.code]


def invalid_request(detail: str, http_status: int | None = None) -> Answer:
    return Answer(ResponseCode.INVALID_REQUEST, detail, http_status=http_status)


def unavailable() -> Answer:
    return Answer(ResponseCode.SERVICE_UNAVAILABLE, UNAVAILABLE_DETAIL)


def rate_limited(retry_after: int) -> Answer:
    return Answer(ResponseCode.RATE_LIMITED, f"too many requests for this merchant; retry after {retry_after} "
                                             "seconds (an order is never refunded twice)")


def overloaded() -> Answer:
    return Answer(ResponseCode.SERVICE_UNAVAILABLE, "the gateway is busy; retry shortly (an order is never "
                                                    "refunded twice)")


def system_error() -> Answer:
    return Answer(ResponseCode.SYSTEM_ERROR, SYSTEM_ERROR_DETAIL)


# -- gRPC outcome -> answer ---------------------------------------------------


def from_reply(reply: refund_pb2.MerchantRefundResponse) -> Answer:
    """The answer for a MerchantRefundResponse (an approved refund)."""
    if reply.response_code != ResponseCode.SUCCESS.value:
        log.error("MerchantRefundResponse with response code %r", reply.response_code)
        return system_error()
    return Answer(ResponseCode.SUCCESS, None, reply.order if reply.HasField("order") else None,
                  reply.transaction if reply.HasField("transaction") else None)


def from_order_reply(reply: refund_pb2.MerchantGetOrderResponse) -> Answer:
    """The answer for a MerchantGetOrderResponse (POST /direct/query)."""
    if not reply.HasField("order"):
        log.error("MerchantGetOrderResponse without an order")
        return system_error()
    return Answer(ResponseCode.SUCCESS, order=reply.order, transactions=tuple(reply.transactions))


def from_rpc_error(error: grpc.RpcError) -> Answer:
    """The answer for a gRPC error: ours (ErrorInfo of our domain) by its reason;
    any other by its status code: UNAVAILABLE / DEADLINE_EXCEEDED -> 9001, else 9999."""
    rich = RpcError.from_call(error)
    if rich is None or not rich.reason:
        if error.code() in _RETRYABLE_WITHOUT_INFO:
            log.warning("back end %s: %s", error.code().name, error.details())
            return unavailable()
        log.error("back end error without ErrorInfo: %s %s", error.code().name, error.details())
        return system_error()
    code = ResponseCode.__members__.get(rich.reason)
    if code is None or code is ResponseCode.SUCCESS:
        log.error("back end error with unknown reason %r: %s", rich.reason, error.details())
        return system_error()
    if code is ResponseCode.SERVICE_UNAVAILABLE:
        log.warning("back end SERVICE_UNAVAILABLE: %s", error.details())
        return unavailable()
    if code is ResponseCode.SYSTEM_ERROR:
        log.error("back end SYSTEM_ERROR: %s", error.details())
        return system_error()
    decline = rich.decline
    order = decline.order if decline is not None and decline.HasField("order") else None
    transaction = decline.transaction if decline is not None and decline.HasField("transaction") else None
    # Our service's messages are written for the caller ("order not found",
    # "amount has more than 2 decimals for HKD"); they carry no internals.
    return Answer(code, error.details() or None, order, transaction)


# -- rendering ----------------------------------------------------------------


def render(answer: Answer) -> bytes:
    """The response body: compact JSON, amounts and ids as exact JSON numbers.

    Raises UnrenderableAnswer when the order or transaction is not what the
    service documents (the caller answers 9999 instead)."""
    parts = ['{"responseCode":"', answer.code.value, '","message":"', answer.code.name, '"']
    if answer.detail:
        parts += [',"detail":', json.dumps(answer.detail)]
    if answer.order is not None:
        parts += [',"order":', _order(answer.order)]
    if answer.transaction is not None:
        parts += [',"transaction":', _transaction(answer.transaction)]
    if answer.transactions is not None:
        parts += [',"transactions":[', ",".join(_transaction(t) for t in answer.transactions), "]"]
    parts.append("}")
    return "".join(parts).encode("ascii")


def _texts(enum, prefix: str) -> dict[int, str]:
    """{ORDER_STATUS_REFUNDED: "REFUNDED", ...}: the docs/api.md text of each value of a proto enum."""
    return {number: name.removeprefix(prefix) for name, number in enum.items() if number}


# The JSON shows the enum fields' text. When an enum is unset or a value this
# edge does not know (an answer of a 0.1.0 service, or one it stored for an
# Idempotency-Key), the deprecated string field beside it says the same.
_ORDER_STATUS = _texts(refund_pb2.OrderStatus, "ORDER_STATUS_")
_TRANSACTION_TYPE = _texts(refund_pb2.TransactionType, "TRANSACTION_TYPE_")
_TRANSACTION_STATUS = _texts(refund_pb2.TransactionStatus, "TRANSACTION_STATUS_")


def _order(order: refund_pb2.Order) -> str:
    fields = [
        f'"id":{_id(order.id)}',
        f'"merchantReference":{_string(order.merchant_reference)}',
        f'"currency":{_string(order.currency)}',
        f'"amount":{_amount(order.amount, order.currency)}',
        f'"status":{_string(_ORDER_STATUS.get(order.order_status, order.status))}',
    ]
    if order.HasField("create_time"):
        fields.append(f'"createTime":"{_time(order.create_time)}"')
    if order.HasField("update_time"):
        fields.append(f'"updateTime":"{_time(order.update_time)}"')
    return "{" + ",".join(fields) + "}"


def _transaction(txn: refund_pb2.Transaction) -> str:
    fields = [
        f'"id":{_id(txn.id)}',
        f'"merchantId":{_digits(txn.merchant_id)}',
        f'"type":{_string(_TRANSACTION_TYPE.get(txn.transaction_type, txn.type))}',
        f'"currency":{_string(txn.currency)}',
        f'"amount":{_amount(txn.amount, txn.currency)}',
        f'"status":{_string(_TRANSACTION_STATUS.get(txn.transaction_status, txn.status))}',
        f'"maskedPan":{_string(txn.masked_pan)}',
        f'"stan":{_string(txn.stan)}',
    ]
    if txn.HasField("create_time"):
        fields.append(f'"createTime":"{_time(txn.create_time)}"')
    return "{" + ",".join(fields) + "}"


def _id(value: int) -> str:
    if value <= 0:
        raise UnrenderableAnswer(f"id {value}")
    return str(value)


def _digits(text: str) -> str:
    if not _DIGITS.match(text):
        raise UnrenderableAnswer(f"merchant id {text!r}")
    return str(int(text))


def _amount(text: str, currency: str) -> str:
    """The decimal string itself, once checked to be a plain JSON number with
    exactly the currency's decimals ("76.19" HKD, "500" JPY, "1.250" BHD)."""
    match = ANSWER_AMOUNT.match(text)
    digits = currencies.decimals(currency)
    if digits is None:
        raise UnrenderableAnswer(f"currency {currency!r}")
    if match is None or len(match.group(1) or "") != digits:
        raise UnrenderableAnswer(f"amount {text!r} {currency}")
    return text


def _string(text: str) -> str:
    """json.dumps(text), the same characters, without json's machinery for plain text
    (rendering is a measurable part of the edge's CPU: docs/performance.md)."""
    return f'"{text}"' if _PLAIN_TEXT.match(text) else json.dumps(text)


def _time(stamp) -> str:
    """ISO 8601 with an explicit offset, to the second: 2026-11-20T08:15:00+00:00.
    Timestamp.ToDatetime's result, computed directly for the times the service sends
    (ToDatetime's checks cost more than the rest); anything else goes through it."""
    seconds = stamp.seconds
    if 0 <= seconds <= _LAST_SECOND and 0 <= stamp.nanos < 1_000_000_000:  # the sub-second part is not shown
        return _second(seconds)
    return stamp.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")


@functools.lru_cache(maxsize=1024)  # an answer's update and refund times are one second, shared by its neighbours
def _second(seconds: int) -> str:
    return (_EPOCH + timedelta(seconds=seconds)).isoformat(timespec="seconds")
