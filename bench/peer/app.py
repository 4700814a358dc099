"""The conventional peer of issue 16: POST /direct/refund written the usual FastAPI
way, one process, no gRPC hop.

pydantic parses the envelope and the signed request; the signature is checked with
RSA-2048 PKCS#1 v1.5 over the `request` bytes (the merchant's key read through the
ORM once, then kept); then, in one transaction of an AsyncSession, the order is
loaded `with_for_update`, the rules are checked in Python (the order is the
merchant's; not refunded before; refundable status; amount positive, in cents and
at most the order's; the balance covers it), the balance row is loaded
`with_for_update`, the objects are changed, the refund transaction is added, and
the session commits. Answers are the project's response codes.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint's annotations, which name
# create_app's local dependency.
import base64
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import URL, make_url, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from bench.bare_chain.workload import HUNDRED
from bench.peer.models import REFUNDABLE, REFUNDED, Balance, Merchant, Order, Transaction


class Envelope(BaseModel):
    request: str
    signature: str


class RefundRequest(BaseModel):
    merchantId: str = Field(pattern=r"^[0-9]{1,18}$")
    orderId: int = Field(gt=0)
    amount: Decimal = Field(gt=0)


class OrderOut(BaseModel):
    orderId: int
    status: str
    amount: Decimal


class TransactionOut(BaseModel):
    transactionId: int
    type: str
    amount: Decimal


class RefundAnswer(BaseModel):
    responseCode: str
    message: str
    order: OrderOut | None = None
    transaction: TransactionOut | None = None


def asyncpg_url(database_url: str) -> URL:
    """Any PostgreSQL URL of SQLAlchemy's, with the asyncpg driver."""
    return make_url(database_url).set(drivername="postgresql+asyncpg")


def declined(code: str, message: str, status: int = 200) -> JSONResponse:
    return JSONResponse(RefundAnswer(responseCode=code, message=message).model_dump(exclude_none=True),
                        status_code=status)


def create_app(database_url: str) -> FastAPI:
    # As many connections as the project's service pool (20), and no overflow: overflow connections
    # are closed when returned, and opening one per request would make the peer slower than it is.
    engine = create_async_engine(asyncpg_url(database_url), pool_size=20, max_overflow=0)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    keys: dict[int, object] = {}  # merchant id -> public key, read once

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)

    async def session():
        async with sessions() as s:
            yield s

    async def public_key(s: AsyncSession, merchant_id: int):
        if merchant_id not in keys:
            merchant = await s.get(Merchant, merchant_id)
            if merchant is None:
                return None
            keys[merchant_id] = serialization.load_pem_public_key(merchant.public_key_pem.encode())
        return keys[merchant_id]

    @app.post("/direct/refund", response_model=RefundAnswer, response_model_exclude_none=True)
    async def refund(envelope: Envelope, s: Annotated[AsyncSession, Depends(session)]):
        try:
            request = RefundRequest.model_validate_json(envelope.request)
        except ValidationError:
            return declined("1001", "invalid request", 400)
        merchant_id = int(request.merchantId)
        key = await public_key(s, merchant_id)
        try:
            if key is None:
                raise InvalidSignature
            key.verify(base64.b64decode(envelope.signature), envelope.request.encode(), padding.PKCS1v15(),
                       hashes.SHA256())
        except (InvalidSignature, ValueError):
            return declined("2001", "authentication failed", 401)
        cents = request.amount * HUNDRED
        if cents != cents.to_integral_value():
            return declined("1002", "amount has more than 2 decimals", 400)
        amount = int(cents)

        order = await s.get(Order, request.orderId, with_for_update=True)
        if order is None or order.merchant_id != merchant_id:
            return declined("3001", "order not found")
        if order.status in REFUNDED:
            return declined("3003", "the order was refunded before")
        if order.status not in REFUNDABLE:
            return declined("3002", f"order status {order.status} cannot be refunded")
        if amount > order.amount:
            return declined("4003", "amount is greater than the order amount")
        balance = await s.scalar(select(Balance).where(Balance.merchant_id == merchant_id,
                                                       Balance.currency == order.currency).with_for_update())
        if balance is None or balance.unsettled < amount:
            return declined("4004", "unsettled balance does not cover the amount")
        balance.unsettled -= amount
        order.status = "REFUNDED" if amount == order.amount else "PARTIALLY_REFUNDED"
        order.update_time = datetime.now(UTC)
        transaction = Transaction(merchant_id=merchant_id, order_id=order.id, type="REFUND",
                                  currency=order.currency, amount=amount, status="SUCCESS")
        s.add(transaction)
        await s.commit()
        return RefundAnswer(responseCode="0000", message="SUCCESS",
                            order=OrderOut(orderId=order.id, status=order.status,
                                           amount=Decimal(order.amount).scaleb(-2)),
                            transaction=TransactionOut(transactionId=transaction.id, type=transaction.type,
                                                       amount=Decimal(amount).scaleb(-2)))

    return app
