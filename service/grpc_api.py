"""The gRPC adapter: RefundService methods over a Store.

Each method turns the request into domain values, runs one store call within
the caller's deadline, and answers either the response message or a rich
error (status code + google.rpc.ErrorInfo whose reason is the response-code
name, plus a RefundDecline detail when the caller's order exists).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

import grpc
from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from refund.v1 import refund_pb2, refund_pb2_grpc
from service import domain, signing
from service.domain import ResponseCode
from service.store import InsufficientBalance, Sale, SaleConflict, Store, StoreUnavailable, utc_now

log = logging.getLogger(__name__)

ERROR_DOMAIN = "refund.gateway"

# The one table from response codes to gRPC status codes (API.md section 5).
GRPC_CODES = {
    ResponseCode.INVALID_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ResponseCode.INVALID_AMOUNT: grpc.StatusCode.INVALID_ARGUMENT,
    ResponseCode.IDEMPOTENCY_CONFLICT: grpc.StatusCode.ABORTED,
    ResponseCode.AUTHENTICATION_FAILED: grpc.StatusCode.UNAUTHENTICATED,
    ResponseCode.MERCHANT_INACTIVE: grpc.StatusCode.PERMISSION_DENIED,
    ResponseCode.REQUEST_EXPIRED: grpc.StatusCode.UNAUTHENTICATED,
    ResponseCode.ORDER_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ResponseCode.ORDER_NOT_REFUNDABLE: grpc.StatusCode.FAILED_PRECONDITION,
    ResponseCode.ALREADY_REFUNDED: grpc.StatusCode.ALREADY_EXISTS,
    ResponseCode.REFUND_NOT_SUPPORTED: grpc.StatusCode.FAILED_PRECONDITION,
    ResponseCode.PARTIAL_REFUND_NOT_SUPPORTED: grpc.StatusCode.FAILED_PRECONDITION,
    ResponseCode.AMOUNT_EXCEEDS_ORDER: grpc.StatusCode.OUT_OF_RANGE,
    ResponseCode.INSUFFICIENT_BALANCE: grpc.StatusCode.FAILED_PRECONDITION,
    ResponseCode.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ResponseCode.SYSTEM_ERROR: grpc.StatusCode.INTERNAL,
}

# Margin left to answer UNAVAILABLE before the caller's deadline expires.
DEADLINE_MARGIN = 0.05


class RpcError(Exception):
    """An error answer: grpc code, reason, message and optional detail."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, response_code: str = "",
                 decline: refund_pb2.RefundDecline | None = None):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.response_code, self.decline = response_code, decline

    @classmethod
    def of(cls, response: ResponseCode, message: str, decline: refund_pb2.RefundDecline | None = None) -> "RpcError":
        return cls(GRPC_CODES[response], response.name, message, response.value, decline)

    def to_status(self) -> grpc.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)
        if self.response_code:
            info.metadata["responseCode"] = self.response_code
        details = [_pack(info)]
        if self.decline is not None:
            details.append(_pack(self.decline))
        status = status_pb2.Status(code=getattr(code_pb2, self.code.name), message=self.message, details=details)
        return rpc_status.to_status(status)


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def order_message(order: domain.Order) -> refund_pb2.Order:
    return refund_pb2.Order(
        id=order.id, merchant_id=str(order.merchant_id), merchant_reference=order.merchant_reference,
        currency=order.currency, amount=domain.format_minor(order.amount, order.currency), status=order.status,
        payment_method=order.payment_method, create_time=_timestamp(order.create_time),
        update_time=_timestamp(order.update_time))


def transaction_message(txn: domain.Transaction) -> refund_pb2.Transaction:
    return refund_pb2.Transaction(
        id=txn.id, merchant_id=str(txn.merchant_id), order_id=txn.order_id, type=txn.type, currency=txn.currency,
        amount=domain.format_minor(txn.amount, txn.currency), status=txn.status, masked_pan=txn.masked_pan,
        stan=txn.stan, create_time=_timestamp(txn.create_time))


def refund_answer(result: domain.RefundResult) -> refund_pb2.RefundResponse:
    """The response for an approved refund; raises RpcError for any other outcome."""
    order = order_message(result.order) if result.order else None
    transaction = transaction_message(result.transaction) if result.transaction else None
    if result.code is ResponseCode.SUCCESS:
        return refund_pb2.RefundResponse(response_code=result.code.value, order=order, transaction=transaction)
    decline = None
    if order is not None:
        decline = refund_pb2.RefundDecline(response_code=result.code.value, order=order, transaction=transaction)
    raise RpcError.of(result.code, result.message, decline)


def _order_key(order_id: int, merchant_reference: str) -> tuple[int | None, str | None]:
    return (order_id or None), (merchant_reference or None)


class RefundServicer(refund_pb2_grpc.RefundServiceServicer):
    def __init__(self, store: Store, db_timeout: float = 5.0):
        self._store = store
        self._db_timeout = db_timeout

    async def _call(self, context: grpc.aio.ServicerContext, operation):
        """Run one store operation within the caller's deadline; answer rich errors."""
        remaining = context.time_remaining()
        timeout = self._db_timeout if remaining is None else max(0.0, min(self._db_timeout, remaining - DEADLINE_MARGIN))
        try:
            return await asyncio.wait_for(operation(), timeout)
        except RpcError as exc:
            error = exc
        except domain.DomainError as exc:
            error = RpcError.of(exc.code, exc.message)
        except (StoreUnavailable, asyncio.TimeoutError) as exc:
            log.warning("database unavailable: %s", type(exc).__name__ if not str(exc) else exc)
            error = RpcError.of(ResponseCode.SERVICE_UNAVAILABLE, "the service is unavailable, retry later")
        except Exception:
            log.exception("unexpected error")
            error = RpcError.of(ResponseCode.SYSTEM_ERROR, "system error")
        status = error.to_status()
        await context.abort(status.code, status.details, status.trailing_metadata)

    async def Refund(self, request, context):
        async def operation():
            command = domain.RefundCommand(
                domain.parse_merchant_id(request.merchant_id), *_order_key(request.order_id, request.merchant_reference),
                request.amount)
            return refund_answer(await self._store.refund(command))

        return await self._call(context, operation)

    async def MerchantRefund(self, request, context):
        async def operation():
            command = await signing.authenticated_command(self._store, request.request, request.signature)
            return refund_answer(await self._store.refund(command))

        return await self._call(context, operation)

    async def GetOrder(self, request, context):
        async def operation():
            merchant_id = domain.parse_merchant_id(request.merchant_id)
            order_id, reference = _order_key(request.order_id, request.merchant_reference)
            if order_id is None and reference is None:
                raise domain.InvalidRequest("order_id or merchant_reference is required")
            found = await self._store.get_order(merchant_id, order_id, reference)
            if found is None or (reference and order_id and found[0].merchant_reference != reference):
                raise RpcError.of(ResponseCode.ORDER_NOT_FOUND, "order not found")
            order, transactions = found
            return refund_pb2.GetOrderResponse(
                order=order_message(order), transactions=[transaction_message(t) for t in transactions])

        return await self._call(context, operation)

    async def RecordSale(self, request, context):
        async def operation():
            if request.order_id <= 0 or not request.merchant_reference or len(request.merchant_reference) > 128:
                raise domain.InvalidRequest("order_id and merchant_reference (at most 128 characters) are required")
            if not request.payment_method:
                raise domain.InvalidRequest("payment_method is required")
            sale = Sale(
                order_id=request.order_id,
                merchant_id=domain.parse_merchant_id(request.merchant_id),
                merchant_reference=request.merchant_reference,
                currency=request.currency,
                amount=domain.to_minor(request.amount, request.currency),
                payment_method=request.payment_method,
                masked_pan=domain.check_masked_pan(request.masked_pan),
                stan=domain.check_stan(request.stan),
                create_time=request.create_time.ToDatetime(tzinfo=utc_now().tzinfo)
                if request.HasField("create_time") else utc_now(),
            )
            try:
                order, txn, balance = await self._store.record_sale(sale)
            except SaleConflict as exc:
                raise RpcError(grpc.StatusCode.ALREADY_EXISTS, "ORDER_EXISTS", str(exc)) from None
            return refund_pb2.RecordSaleResponse(
                order=order_message(order), transaction=transaction_message(txn),
                unsettled_balance=domain.format_minor(balance, order.currency))

        return await self._call(context, operation)

    async def Settle(self, request, context):
        async def operation():
            merchant_id = domain.parse_merchant_id(request.merchant_id)
            amount = domain.to_minor(request.amount, request.currency)
            try:
                balance = await self._store.settle(merchant_id, request.currency, amount)
            except InsufficientBalance as exc:
                raise RpcError.of(ResponseCode.INSUFFICIENT_BALANCE, str(exc)) from None
            return refund_pb2.SettleResponse(currency=request.currency,
                                             unsettled_balance=domain.format_minor(balance, request.currency))

        return await self._call(context, operation)
