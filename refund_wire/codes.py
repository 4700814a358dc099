"""The response codes of docs/api.md section 4: the value is the 4-digit code,
the name is the message and, over gRPC, the ErrorInfo reason."""

from __future__ import annotations

import enum

# google.rpc.ErrorInfo.domain of the refund service's errors.
ERROR_DOMAIN = "refund.gateway"


class ResponseCode(enum.Enum):
    SUCCESS = "0000"
    INVALID_REQUEST = "1001"
    INVALID_AMOUNT = "1002"
    IDEMPOTENCY_CONFLICT = "1003"
    AUTHENTICATION_FAILED = "2001"
    MERCHANT_INACTIVE = "2002"
    REQUEST_EXPIRED = "2003"
    ORDER_NOT_FOUND = "3001"
    ORDER_NOT_REFUNDABLE = "3002"
    ALREADY_REFUNDED = "3003"
    REFUND_NOT_SUPPORTED = "4001"
    PARTIAL_REFUND_NOT_SUPPORTED = "4002"
    AMOUNT_EXCEEDS_ORDER = "4003"
    INSUFFICIENT_BALANCE = "4004"
    SERVICE_UNAVAILABLE = "9001"
    RATE_LIMITED = "9002"  # the edge's own; the service never answers it
    SYSTEM_ERROR = "9999"

    @classmethod
    def by_name(cls, name: str) -> ResponseCode:
        return cls[name]


# Reasons of the gRPC API that have no response code: they belong to internal
# RPCs that merchants never reach, so the edge never renders them.
# ORDER_EXISTS: RecordSale with an order id or merchant reference that another
# order already holds (ALREADY_EXISTS).
ORDER_EXISTS = "ORDER_EXISTS"
