"""The gRPC error model: a google.rpc.Status whose details hold an ErrorInfo of
our domain (reason: the response code's name, metadata responseCode: its
value) and, for a declined refund of an order that exists, a RefundDecline.

`RpcError` is written by the service and read back by everyone: the edge, the
internal client, and the service itself for a stored Idempotency-Key answer.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from refund.v1 import refund_pb2
from refund_wire.codes import ERROR_DOMAIN, ORDER_EXISTS, ResponseCode

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
assert set(GRPC_CODES) == set(ResponseCode) - {ResponseCode.SUCCESS}, "every error code needs a gRPC code"


class RpcError(Exception):
    """An error answer: gRPC code, reason, message, the response code (empty
    for a reason without one, e.g. ORDER_EXISTS) and the optional decline."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, response_code: str = "",
                 decline: refund_pb2.RefundDecline | None = None):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.response_code, self.decline = response_code, decline

    @classmethod
    def of(cls, response: ResponseCode, message: str, decline: refund_pb2.RefundDecline | None = None) -> RpcError:
        return cls(GRPC_CODES[response], response.name, message, response.value, decline)

    @classmethod
    def order_exists(cls, message: str) -> RpcError:
        return cls(grpc.StatusCode.ALREADY_EXISTS, ORDER_EXISTS, message)

    def to_proto(self) -> status_pb2.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)
        if self.response_code:
            info.metadata["responseCode"] = self.response_code
        details = [pack(info)]
        if self.decline is not None:
            details.append(pack(self.decline))
        return status_pb2.Status(code=getattr(code_pb2, self.code.name), message=self.message, details=details)

    def to_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_proto())

    @classmethod
    def from_proto(cls, status: status_pb2.Status) -> RpcError:
        """The error that to_proto() wrote; its reason is empty when no ErrorInfo
        of our domain is among the details (an error that is not ours)."""
        info, decline = unpack(status)
        info = info or error_details_pb2.ErrorInfo()
        return cls(grpc.StatusCode[code_pb2.Code.Name(status.code)], info.reason, status.message,
                   info.metadata.get("responseCode", ""), decline)

    @classmethod
    def from_call(cls, error: grpc.RpcError) -> RpcError | None:
        """The rich error of a failed call; None when it carries no status
        details, or a status that contradicts the call or does not decode."""
        try:
            status = rpc_status.from_call(error)
        except Exception:
            return None
        return None if status is None else cls.from_proto(status)


def pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def unpack(status: status_pb2.Status) -> tuple[error_details_pb2.ErrorInfo | None, refund_pb2.RefundDecline | None]:
    """The first ErrorInfo of our domain and the RefundDecline among a status's details."""
    info = decline = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            candidate = error_details_pb2.ErrorInfo()
            if detail.Unpack(candidate) and candidate.domain == ERROR_DOMAIN and info is None:
                info = candidate
        elif detail.Is(refund_pb2.RefundDecline.DESCRIPTOR):
            candidate = refund_pb2.RefundDecline()
            if detail.Unpack(candidate):
                decline = candidate
    return info, decline


def stored_answer(answer: refund_pb2.RefundResponse | RpcError) -> bytes:
    """An answer as an Idempotency-Key keeps it: a serialized google.rpc.Status,
    code OK with the RefundResponse as its one detail (typed as release 0.1.0
    stored it), or the rich error."""
    if isinstance(answer, RpcError):
        return answer.to_proto().SerializeToString()
    return status_pb2.Status(code=code_pb2.OK, details=[pack(answer)]).SerializeToString()


def replayed_answer(stored: bytes) -> refund_pb2.MerchantRefundResponse:
    """The stored answer again, as MerchantRefund answers it, or raises the
    stored RpcError. The detail is a RefundResponse (0.1.0's name for the same
    fields): its bytes are read as they are, whatever the type it names."""
    status = status_pb2.Status.FromString(stored)
    if status.code != code_pb2.OK:
        raise RpcError.from_proto(status)
    return refund_pb2.MerchantRefundResponse.FromString(status.details[0].value)
