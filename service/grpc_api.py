"""The gRPC adapter: RefundService's methods, translated to the use cases.

Each method turns the request into plain values, runs one use case
(service/usecases/) within the caller's deadline, and answers the response
message or a rich error (refund_wire.status.RpcError: the status code, an
ErrorInfo whose reason is the response code's name and, when the caller's
order exists, a RefundDecline).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError

from refund.v1 import refund_pb2, refund_pb2_grpc
from refund_wire.status import RpcError, replayed_answer, stored_answer
from service import domain, events, metrics
from service.domain import ResponseCode
from service.stores.port import SaleConflict, Settlement, Store, StoreUnavailable
from service.usecases import money, orders, refunds
from service.usecases.idempotency import IdempotencyKeys, Replayed

log = logging.getLogger(__name__)

# Margin left to answer UNAVAILABLE before the caller's deadline expires.
DEADLINE_MARGIN = 0.05


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """Timestamp.FromDatetime's result (a naive datetime is UTC), in a quarter of its time."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - _EPOCH
    return timestamp_pb2.Timestamp(seconds=delta.days * 86400 + delta.seconds, nanos=delta.microseconds * 1000)


# The range of a sale's create_time: from the Unix epoch to the last instant of
# year 9999, what both databases store and read back as a datetime.
MAX_TIMESTAMP_SECONDS = 253402300799  # 9999-12-31T23:59:59Z


def sale_time(stamp: timestamp_pb2.Timestamp) -> datetime:
    """The aware UTC datetime of a caller's Timestamp (microseconds), or 1001 when out of range."""
    if not (0 <= stamp.seconds <= MAX_TIMESTAMP_SECONDS and 0 <= stamp.nanos < 1_000_000_000):
        raise domain.InvalidRequest("create_time must be from 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z "
                                    "(nanos 0 to 999,999,999)")
    return _EPOCH + timedelta(seconds=stamp.seconds, microseconds=stamp.nanos // 1000)


def _enum_numbers(enum, prefix: str) -> dict[str, int]:
    """{"REFUNDED": ORDER_STATUS_REFUNDED, ...}: a proto enum by the docs/api.md text of its values."""
    return {name.removeprefix(prefix): number for name, number in enum.items() if number}


_ORDER_STATUS = _enum_numbers(refund_pb2.OrderStatus, "ORDER_STATUS_")
_TRANSACTION_TYPE = _enum_numbers(refund_pb2.TransactionType, "TRANSACTION_TYPE_")
_TRANSACTION_STATUS = _enum_numbers(refund_pb2.TransactionStatus, "TRANSACTION_STATUS_")


def order_message(order: domain.Order) -> refund_pb2.Order:
    # `status` (text, deprecated) stays filled beside `order_status` for callers built from the 0.1.0 protos.
    return refund_pb2.Order(
        id=order.id, merchant_id=str(order.merchant_id), merchant_reference=order.merchant_reference,
        currency=order.currency, amount=domain.format_minor(order.amount, order.currency), status=order.status,
        payment_method=order.payment_method, create_time=_timestamp(order.create_time),
        update_time=_timestamp(order.update_time), order_status=_ORDER_STATUS[order.status])


def transaction_message(txn: domain.Transaction) -> refund_pb2.Transaction:
    # `type` and `status` (text, deprecated) stay filled beside the enums for callers built from the 0.1.0 protos.
    return refund_pb2.Transaction(
        id=txn.id, merchant_id=str(txn.merchant_id), order_id=txn.order_id, type=txn.type, currency=txn.currency,
        amount=domain.format_minor(txn.amount, txn.currency), status=txn.status, masked_pan=txn.masked_pan,
        stan=txn.stan, create_time=_timestamp(txn.create_time), transaction_type=_TRANSACTION_TYPE[txn.type],
        transaction_status=_TRANSACTION_STATUS[txn.status])


def settlement_message(settlement: Settlement) -> refund_pb2.Settlement:
    return refund_pb2.Settlement(
        settlement_id=settlement.settlement_id, merchant_id=str(settlement.merchant_id),
        currency=settlement.currency, amount=domain.format_minor(settlement.amount, settlement.currency),
        unsettled_balance=domain.format_minor(settlement.balance_after, settlement.currency),
        create_time=_timestamp(settlement.created_at))


def refund_answer(result: domain.RefundResult, response=refund_pb2.RefundResponse):
    """The response for an approved refund (a RefundResponse, or the `response`
    message class: MerchantRefundResponse); raises RpcError for any other outcome."""
    order = order_message(result.order) if result.order else None
    transaction = transaction_message(result.transaction) if result.transaction else None
    if result.code is ResponseCode.SUCCESS:
        return response(response_code=result.code.value, order=order, transaction=transaction)
    decline = None
    if order is not None:
        decline = refund_pb2.RefundDecline(response_code=result.code.value, order=order, transaction=transaction)
    raise RpcError.of(result.code, result.message, decline)


def _order_key(order_id: int, merchant_reference: str) -> tuple[int | None, str | None]:
    return (order_id or None), (merchant_reference or None)


def encode_answer(answer: domain.RefundResult | domain.DomainError) -> bytes:
    """A refund's answer as an Idempotency-Key stores it (refund_wire.status.stored_answer). An
    approval is stored as a RefundResponse, as release 0.1.0 stored it (the same fields and bytes
    as MerchantRefundResponse), so that a 0.1.0 process replays it and the other way round."""
    if isinstance(answer, domain.DomainError):
        return stored_answer(RpcError.of(answer.code, answer.message))
    try:
        return stored_answer(refund_answer(answer))
    except RpcError as error:
        return stored_answer(error)


def _reply(answer: domain.RefundResult | Replayed) -> refund_pb2.MerchantRefundResponse:
    if isinstance(answer, Replayed):
        return replayed_answer(answer.answer)
    return refund_answer(answer, refund_pb2.MerchantRefundResponse)


def order_reply(found: tuple[domain.Order, list[domain.Transaction]], response=refund_pb2.GetOrderResponse):
    """A GetOrderResponse, or the `response` message class (MerchantGetOrderResponse)."""
    order, transactions = found
    return response(order=order_message(order), transactions=[transaction_message(t) for t in transactions])


class _Undecodable:
    """What a request that protobuf cannot parse (a string field that is not UTF-8) deserializes to."""


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    """A unary request that does not parse (a string field with bytes that are
    not UTF-8, which any client but Python's can send) is answered
    INVALID_ARGUMENT / INVALID_REQUEST like any other bad input, instead of
    the UNKNOWN that grpc answers when a deserializer raises."""

    def __init__(self):
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        cached = self._wrapped.get(handler_call_details.method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(handler))
            self._wrapped[handler_call_details.method] = cached
        return cached[1]

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        parse, inner = handler.request_deserializer, handler.unary_unary

        def deserialize(raw: bytes):
            try:
                return parse(raw)
            except DecodeError:
                return _Undecodable()

        async def behaviour(request, context):
            if isinstance(request, _Undecodable):
                metrics.note_outcome(ResponseCode.INVALID_REQUEST.value, grpc.StatusCode.INVALID_ARGUMENT)
                status = RpcError.of(ResponseCode.INVALID_REQUEST, "the request is not a valid protobuf message "
                                     "(a string field that is not UTF-8?)").to_status()
                await context.abort(status.code, status.details, status.trailing_metadata)
            return await inner(request, context)

        return handler._replace(request_deserializer=deserialize, unary_unary=behaviour)


class RefundServicer(refund_pb2_grpc.RefundServiceServicer):
    def __init__(self, store: Store, db_timeout: float = 5.0):
        self._store = store
        self._db_timeout = db_timeout
        self.refunds = refunds.Refunds(store, IdempotencyKeys(store, db_timeout, encode_answer))
        self.events = events.EventFeed(store)

    async def _call(self, context: grpc.aio.ServicerContext, operation):
        """Run one use case within the caller's deadline; answer rich errors."""
        remaining = context.time_remaining()
        timeout = self._db_timeout if remaining is None \
            else max(0.0, min(self._db_timeout, remaining - DEADLINE_MARGIN))
        try:
            async with asyncio.timeout(timeout):  # in this task: wait_for would start a task per call
                reply = await operation()
            metrics.note_outcome(ResponseCode.SUCCESS.value)
            return reply
        except RpcError as exc:
            error = exc
        except domain.DomainError as exc:
            error = RpcError.of(exc.code, exc.message)
        except SaleConflict as exc:
            error = RpcError.order_exists(str(exc))
        except (TimeoutError, StoreUnavailable) as exc:
            metrics.database_error("timeout" if isinstance(exc, asyncio.TimeoutError) else "unavailable")
            log.warning("database unavailable: %s", type(exc).__name__ if not str(exc) else exc)
            error = RpcError.of(ResponseCode.SERVICE_UNAVAILABLE, "the service is unavailable, retry later")
        except Exception:
            log.exception("unexpected error")
            error = RpcError.of(ResponseCode.SYSTEM_ERROR, "system error")
        metrics.note_outcome(error.response_code or error.reason, error.code)
        status = error.to_status()
        await context.abort(status.code, status.details, status.trailing_metadata)

    async def Refund(self, request, context):
        async def operation():
            command = domain.RefundCommand(
                domain.parse_merchant_id(request.merchant_id),
                *_order_key(request.order_id, request.merchant_reference),
                request.amount)
            return refund_answer(await refunds.refund(self._store, command))

        return await self._call(context, operation)

    async def MerchantRefund(self, request, context):
        async def operation():
            return _reply(await self.refunds.merchant_refund(request.request, request.signature,
                                                             request.idempotency_key))

        return await self._call(context, operation)

    async def MerchantGetOrder(self, request, context):
        async def operation():
            return order_reply(await orders.merchant_order(self._store, request.request, request.signature),
                               refund_pb2.MerchantGetOrderResponse)

        return await self._call(context, operation)

    async def GetOrder(self, request, context):
        async def operation():
            merchant_id = domain.parse_merchant_id(request.merchant_id)
            return order_reply(await orders.order_with_transactions(
                self._store, merchant_id, *_order_key(request.order_id, request.merchant_reference)))

        return await self._call(context, operation)

    async def RecordSale(self, request, context):
        async def operation():
            sale = money.sale_of(request.order_id, request.merchant_id, request.merchant_reference, request.currency,
                                 request.amount, request.payment_method, request.masked_pan, request.stan,
                                 sale_time(request.create_time) if request.HasField("create_time") else None)
            order, txn, balance = await money.record_sale(self._store, sale)
            return refund_pb2.RecordSaleResponse(
                order=order_message(order), transaction=transaction_message(txn),
                unsettled_balance=domain.format_minor(balance, order.currency))

        return await self._call(context, operation)

    async def Settle(self, request, context):
        async def operation():
            made = await money.settle(self._store, request.settlement_id, request.merchant_id, request.currency,
                                      request.amount)
            balance = domain.format_minor(made.balance_after, made.currency)
            return refund_pb2.SettleResponse(currency=made.currency, unsettled_balance=balance,
                                             settlement=settlement_message(made))

        return await self._call(context, operation)

    async def WatchEvents(self, request, context):
        """Server-streaming: service/events.py."""
        try:
            await self.events.watch(request, context)
            return
        except domain.DomainError as exc:
            error = RpcError.of(exc.code, exc.message)
        except (TimeoutError, StoreUnavailable) as exc:
            metrics.database_error("timeout" if isinstance(exc, asyncio.TimeoutError) else "unavailable")
            error = RpcError.of(ResponseCode.SERVICE_UNAVAILABLE, "the service is unavailable; resume from the "
                                                                  "last sequence received")
        status = error.to_status()
        await context.abort(status.code, status.details, status.trailing_metadata)
