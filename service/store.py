"""The service's storage port, and the pieces both stores share.

A store runs each refund as one database transaction: it locks the order row,
reads what the rules need, asks `domain.decide`, applies the decision with
statements the database guards, and records the attempt for audit. Two
adapters implement it: `store_pg` (asyncpg) and `store_sqlite` (sqlite3 on a
single writer thread).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from service import domain


class StoreUnavailable(Exception):
    """The database could not be reached or did not answer in time."""


class SaleConflict(Exception):
    """A different order already holds this id or merchant reference."""


class InsufficientBalance(Exception):
    """A settlement larger than the unsettled balance."""


@dataclass(frozen=True)
class Sale:
    order_id: int
    merchant_id: int
    merchant_reference: str
    currency: str
    amount: int
    payment_method: str
    masked_pan: str
    stan: str
    create_time: datetime


@dataclass(frozen=True)
class MerchantCredentials:
    status: str
    public_keys_pem: tuple[str, ...]


class Store(Protocol):
    async def refund(self, command: domain.RefundCommand) -> domain.RefundResult: ...

    async def get_order(
        self, merchant_id: int, order_id: int | None, merchant_reference: str | None
    ) -> tuple[domain.Order, list[domain.Transaction]] | None: ...

    async def record_sale(self, sale: Sale) -> tuple[domain.Order, domain.Transaction, int]: ...

    async def settle(self, merchant_id: int, currency: str, amount: int) -> int: ...

    async def merchant_credentials(self, merchant_id: int) -> MerchantCredentials | None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def stan_for(transaction_id: int) -> str:
    """The refund's 6-digit system trace audit number, from its transaction id."""
    return f"{transaction_id % 1_000_000:06d}"


def same_sale(order: domain.Order, sale: Sale) -> bool:
    return (order.id, order.merchant_id, order.merchant_reference, order.currency, order.amount,
            order.payment_method) == (sale.order_id, sale.merchant_id, sale.merchant_reference,
                                      sale.currency, sale.amount, sale.payment_method)


async def open_store(url: str, **options) -> Store:
    """The store for a SQLAlchemy-style database URL."""
    if url.startswith("sqlite"):
        from service.store_sqlite import SqliteStore

        return SqliteStore.open(url, **options)
    if url.startswith("postgresql"):
        from service.store_pg import PostgresStore

        return await PostgresStore.open(url, **options)
    raise ValueError("REFUND_DATABASE_URL must be a sqlite:// or postgresql+psycopg:// URL")
