"""The gRPC adapter: RefundService methods over a Store.

Each method turns the request into domain values, runs one store call within
the caller's deadline, and answers either the response message or a rich
error (status code + google.rpc.ErrorInfo whose reason is the response-code
name, plus a RefundDecline detail when the caller's order exists).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import datetime, timedelta, timezone

import grpc
from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from refund.v1 import refund_pb2, refund_pb2_grpc
from service import domain, events, freshness, metrics, signing
from service.domain import ResponseCode
from service.store import (
    ClaimState,
    InsufficientBalance,
    Sale,
    SaleConflict,
    Settlement,
    SettlementConflict,
    Store,
    StoreUnavailable,
    utc_now,
)

log = logging.getLogger(__name__)

ERROR_DOMAIN = "refund.gateway"

# The one table from response codes to gRPC status codes (docs/api.md section 5).
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
    ResponseCode.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,  # the edge's; the service never answers it
    ResponseCode.SYSTEM_ERROR: grpc.StatusCode.INTERNAL,
}

# How often a signed refund re-reads credentials that changed under it before giving up (9001).
MAX_CREDENTIAL_CHANGES = 3

# Margin left to answer UNAVAILABLE before the caller's deadline expires.
DEADLINE_MARGIN = 0.05

# Answers that say nothing was decided: not stored, the key is released and a retry runs again.
UNSTORED_ANSWERS = frozenset(code.value for code in (
    ResponseCode.SERVICE_UNAVAILABLE, ResponseCode.SYSTEM_ERROR, ResponseCode.REQUEST_EXPIRED,
    ResponseCode.AUTHENTICATION_FAILED))
# How often a call waits-and-looks while another call holds its key.
CLAIM_POLL_SECONDS = 0.02
# A claim this old without an answer belongs to a call that died or could not
# release it: it may be taken over. A call holds its claim at most its deadline,
# which is at most db_timeout (the lease is twice that, at least 2 s).
MIN_CLAIM_LEASE_SECONDS = 2.0
# Tries, and the first pause between them, to release a claim whose call decided nothing.
RELEASE_TRIES = 5
RELEASE_FIRST_PAUSE = 0.1


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

    def to_proto(self) -> status_pb2.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)
        if self.response_code:
            info.metadata["responseCode"] = self.response_code
        details = [_pack(info)]
        if self.decline is not None:
            details.append(_pack(self.decline))
        return status_pb2.Status(code=getattr(code_pb2, self.code.name), message=self.message, details=details)

    def to_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_proto())

    @classmethod
    def from_proto(cls, status: status_pb2.Status) -> "RpcError":
        """The error that to_proto() wrote (a stored Idempotency-Key answer)."""
        info, decline = error_details_pb2.ErrorInfo(), None
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(info)
            elif detail.Is(refund_pb2.RefundDecline.DESCRIPTOR):
                decline = refund_pb2.RefundDecline()
                detail.Unpack(decline)
        return cls(grpc.StatusCode[code_pb2.Code.Name(status.code)], info.reason, status.message,
                   info.metadata.get("responseCode", ""), decline)


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    """Timestamp.FromDatetime's result (a naive datetime is UTC), in a quarter of its time."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
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


def settlement_message(settlement: Settlement) -> refund_pb2.Settlement:
    return refund_pb2.Settlement(
        settlement_id=settlement.settlement_id, merchant_id=str(settlement.merchant_id),
        currency=settlement.currency, amount=domain.format_minor(settlement.amount, settlement.currency),
        unsettled_balance=domain.format_minor(settlement.balance_after, settlement.currency),
        create_time=_timestamp(settlement.created_at))


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


def stored_answer(answer: refund_pb2.RefundResponse | RpcError) -> bytes:
    """An answer as an Idempotency-Key keeps it: a serialized google.rpc.Status,
    code OK with the RefundResponse as its one detail, or the rich error."""
    if isinstance(answer, RpcError):
        return answer.to_proto().SerializeToString()
    return status_pb2.Status(code=code_pb2.OK, details=[_pack(answer)]).SerializeToString()


def replayed_answer(stored: bytes) -> refund_pb2.RefundResponse:
    """The stored answer again: the RefundResponse, or raises the stored RpcError."""
    status = status_pb2.Status.FromString(stored)
    if status.code != code_pb2.OK:
        raise RpcError.from_proto(status)
    reply = refund_pb2.RefundResponse()
    status.details[0].Unpack(reply)
    return reply


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
        self._claim_lease = timedelta(seconds=max(MIN_CLAIM_LEASE_SECONDS, 2 * db_timeout))
        self._background: set[asyncio.Task] = set()
        self._known = signing.KnownCredentials()
        self.events = events.EventFeed(store)

    async def _call(self, context: grpc.aio.ServicerContext, operation):
        """Run one store operation within the caller's deadline; answer rich errors."""
        remaining = context.time_remaining()
        timeout = self._db_timeout if remaining is None else max(0.0, min(self._db_timeout, remaining - DEADLINE_MARGIN))
        try:
            async with asyncio.timeout(timeout):  # in this task: wait_for would start a task per call
                reply = await operation()
            metrics.note_outcome(ResponseCode.SUCCESS.value)
            return reply
        except RpcError as exc:
            error = exc
        except domain.DomainError as exc:
            error = RpcError.of(exc.code, exc.message)
        except (StoreUnavailable, asyncio.TimeoutError) as exc:
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
                domain.parse_merchant_id(request.merchant_id), *_order_key(request.order_id, request.merchant_reference),
                request.amount)
            return refund_answer(await self._store.refund(command))

        return await self._call(context, operation)

    async def MerchantRefund(self, request, context):
        async def operation():
            key = request.idempotency_key
            if key and not domain.IDEMPOTENCY_KEY.match(key):
                raise domain.InvalidRequest("Idempotency-Key must be 1 to 64 printable ASCII characters")
            verified = None
            if not key:
                reply, verified = await self._refund_with_known_keys(request.request, request.signature)
                if reply is not None:
                    return reply
            signed = await signing.authenticate(self._store, request.request, request.signature, known=self._known,
                                                verified=verified)
            if key:
                return await self._idempotent(signed, key, lambda: self._signed_refund(signed, request.signature))
            return await self._signed_refund(signed, request.signature)

        return await self._call(context, operation)

    async def _refund_with_known_keys(self, request: bytes, signature: str) \
            -> tuple[refund_pb2.RefundResponse | None, tuple[str, str] | None]:
        """The common signed refund in one store call: the merchant's keys, as read
        for an earlier request, verify the signature, and the store refunds only
        while that key is still active (Store.refund's `signed_with`). The reply
        is None when this path does not answer (merchant not seen yet, a key it
        does not know or the store finds no longer active, a timestamp, an
        invalid request): the full path then authenticates afresh and answers,
        with the same codes. With it, (key_id, PEM) of the key that verified, if
        one did, so that the full path does not verify again.

        The signature is checked before anything about the merchant is looked
        at, with dummy keys for a merchant not seen (signing): this path costs
        the same for an unknown merchant as for a known one."""
        try:
            fields = signing.parse_request(request)
            merchant_id = domain.parse_merchant_id(fields["merchantId"])
        except domain.DomainError:
            return None, None
        credentials = self._known.get(merchant_id)
        key_id = signing.verifying_key_id(request, signature, credentials)
        if key_id is None:
            return None, None
        verified = (key_id, credentials.public_keys_pem[credentials.key_ids.index(key_id)])
        if credentials.status != "ACTIVE" or credentials.require_timestamp or "timestamp" in fields:
            return None, verified
        try:
            command = signing.command_from(fields)
        except domain.DomainError:
            return None, verified
        result = await self._store.refund(command, signed_with=key_id)
        return (None if result is None else refund_answer(result)), verified

    async def _signed_refund(self, signed: signing.Authenticated, signature: str) -> refund_pb2.RefundResponse:
        """Refund a verified request; the store re-checks, in the refund's own
        transaction, that the key that verified it is still active and the
        merchant ACTIVE. When not, authenticate afresh (2001 or 2002 then)."""
        signing.check_active(signed)
        await freshness.check(self._store, signed, utc_now)
        command = signing.command_from(signed.fields)
        timestamped = "timestamp" in signed.fields
        for _ in range(MAX_CREDENTIAL_CHANGES):
            result = await self._store.refund(command, signed_with=signed.key_id, timestamped=timestamped)
            if result is not None:
                return refund_answer(result)
            signed = await signing.authenticate(self._store, signed.request, signature, known=self._known)
            signing.check_active(signed)
        raise StoreUnavailable("the merchant's keys kept changing; retry")

    async def _idempotent(self, signed: signing.Authenticated, key: str, execute) -> refund_pb2.RefundResponse:
        """Run `execute` at most once for (merchant, key): the first call claims the
        key (a row the primary key keeps unique across processes), runs, and
        stores its answer; a later call with the same request bytes gets that
        answer again, one with other bytes 1003. A call that finds the key
        claimed by a call still running waits for that call's answer (within
        its own deadline)."""
        request_hash = hashlib.sha256(signed.request).hexdigest()
        while True:
            now = utc_now()
            claim = await self._store.claim_idempotency(signed.merchant_id, key, request_hash, now,
                                                        now - self._claim_lease)
            if claim.state is ClaimState.CLAIMED:
                break
            if claim.state is ClaimState.STORED:
                return replayed_answer(claim.response)
            if claim.state is ClaimState.CONFLICT:
                raise RpcError.of(ResponseCode.IDEMPOTENCY_CONFLICT,
                                  "this Idempotency-Key was used with a different request")
            await asyncio.sleep(CLAIM_POLL_SECONDS)
        try:
            reply = await execute()
        except (RpcError, domain.DomainError) as exc:
            error = exc if isinstance(exc, RpcError) else RpcError.of(exc.code, exc.message)
            if error.response_code in UNSTORED_ANSWERS:
                self._release_later(signed.merchant_id, key, claim.claimed_at)
            else:
                await self._store.finish_idempotency(signed.merchant_id, key, claim.claimed_at, stored_answer(error))
            raise error from None
        except BaseException:  # unavailable, timed out, cancelled, a bug: nothing to store
            self._release_later(signed.merchant_id, key, claim.claimed_at)
            raise
        await self._store.finish_idempotency(signed.merchant_id, key, claim.claimed_at, stored_answer(reply))
        return reply

    def _release_later(self, merchant_id: int, key: str, claimed_at: datetime) -> None:
        """Free a key whose call decided nothing, in the background (this call
        may be cancelled by its deadline). If it fails, the claim goes stale
        after the lease and the next call with the key takes it over."""
        async def release():
            pause = RELEASE_FIRST_PAUSE
            for attempt in range(RELEASE_TRIES):
                try:
                    await self._store.finish_idempotency(merchant_id, key, claimed_at, None)
                    return
                except Exception as exc:
                    if attempt + 1 == RELEASE_TRIES:
                        log.warning("could not release an Idempotency-Key (it frees itself after %ss): %s",
                                    int(self._claim_lease.total_seconds()), type(exc).__name__)
                        return
                await asyncio.sleep(pause)
                pause *= 2

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def MerchantGetOrder(self, request, context):
        async def operation():
            signed = await signing.authenticate(self._store, request.request, request.signature)
            signing.check_active(signed)
            await freshness.check(self._store, signed, utc_now)
            order_id, reference = signing.order_key(signed.fields)
            if order_id is None and reference is None:
                raise domain.InvalidRequest("orderId or merchantReference is required")
            return await self._order_with_transactions(signed.merchant_id, order_id, reference)

        return await self._call(context, operation)

    async def GetOrder(self, request, context):
        async def operation():
            merchant_id = domain.parse_merchant_id(request.merchant_id)
            return await self._order_with_transactions(
                merchant_id, *_order_key(request.order_id, request.merchant_reference))

        return await self._call(context, operation)

    async def _order_with_transactions(self, merchant_id: int, order_id: int | None,
                                       reference: str | None) -> refund_pb2.GetOrderResponse:
        if order_id is None and reference is None:
            raise domain.InvalidRequest("order_id or merchant_reference is required")
        domain.check_order_key(order_id, reference)
        found = await self._store.get_order(merchant_id, order_id, reference)
        if found is None or (reference and order_id and found[0].merchant_reference != reference):
            raise RpcError.of(ResponseCode.ORDER_NOT_FOUND, "order not found")
        order, transactions = found
        return refund_pb2.GetOrderResponse(
            order=order_message(order), transactions=[transaction_message(t) for t in transactions])

    async def RecordSale(self, request, context):
        async def operation():
            if request.order_id <= 0 or not request.merchant_reference:
                raise domain.InvalidRequest("order_id and merchant_reference (at most 128 characters) are required")
            domain.check_text(request.merchant_reference, "merchant_reference", domain.MAX_REFERENCE_LENGTH)
            if not request.payment_method:
                raise domain.InvalidRequest("payment_method is required")
            domain.check_text(request.payment_method, "payment_method", 32)
            sale = Sale(
                order_id=request.order_id,
                merchant_id=domain.parse_merchant_id(request.merchant_id),
                merchant_reference=request.merchant_reference,
                currency=request.currency,
                amount=domain.to_minor(request.amount, request.currency),
                payment_method=request.payment_method,
                masked_pan=domain.check_masked_pan(request.masked_pan),
                stan=domain.check_stan(request.stan),
                create_time=sale_time(request.create_time) if request.HasField("create_time") else utc_now(),
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
            asked = Settlement(domain.check_settlement_id(request.settlement_id),
                               domain.parse_merchant_id(request.merchant_id), request.currency,
                               domain.to_minor(request.amount, request.currency), 0, utc_now())
            try:
                made, _ = await self._store.settle(asked)
            except InsufficientBalance as exc:
                raise RpcError.of(ResponseCode.INSUFFICIENT_BALANCE, str(exc)) from None
            except SettlementConflict as exc:
                raise RpcError.of(ResponseCode.IDEMPOTENCY_CONFLICT, str(exc)) from None
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
        except (StoreUnavailable, asyncio.TimeoutError) as exc:
            metrics.database_error("timeout" if isinstance(exc, asyncio.TimeoutError) else "unavailable")
            error = RpcError.of(ResponseCode.SERVICE_UNAVAILABLE, "the service is unavailable; resume from the "
                                                                  "last sequence received")
        status = error.to_status()
        await context.abort(status.code, status.details, status.trailing_metadata)
