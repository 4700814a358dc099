"""The conventional peer's tables, as SQLAlchemy 2 declarative models: merchants
(with their public key), balances, orders, transactions; amounts in minor units."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Identity, String, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

REFUNDABLE = frozenset({"SUCCESS", "SETTLED"})
REFUNDED = frozenset({"REFUNDED", "PARTIALLY_REFUNDED"})


class Base(DeclarativeBase):
    pass


class Merchant(Base):
    __tablename__ = "merchants"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    public_key_pem: Mapped[str]


class Balance(Base):
    __tablename__ = "balances"

    merchant_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("merchants.id"), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), primary_key=True)
    unsettled: Mapped[int] = mapped_column(BigInteger)


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    merchant_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("merchants.id"), index=True)
    currency: Mapped[str] = mapped_column(String(3))
    amount: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(32))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Transaction(Base):
    __tablename__ = "transactions"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    merchant_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("merchants.id"))
    order_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("orders.id"), index=True)
    type: Mapped[str] = mapped_column(String(16))
    currency: Mapped[str] = mapped_column(String(3))
    amount: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
