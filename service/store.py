"""The service's storage port, and the pieces both stores share.

A store runs each refund as one database transaction: it locks the order row,
reads what the rules need, asks `domain.decide`, applies the decision with
statements the database guards, and records the attempt for audit. Two
adapters implement it: `store_pg` (asyncpg) and `store_sqlite` (sqlite3 on a
single writer thread).
"""

from __future__ import annotations

import enum
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


class SettlementConflict(Exception):
    """A settlement id already used for another merchant, currency or amount."""


BALANCE_TOO_LARGE = f"the unsettled balance would exceed its maximum of {domain.MAX_MINOR_UNITS} minor units"


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
class Settlement:
    """A settlement paid out of a merchant's unsettled balance, by the caller's
    id; balance_after is the balance it left (0 until it is made)."""

    settlement_id: str
    merchant_id: int
    currency: str
    amount: int
    balance_after: int
    created_at: datetime


SETTLEMENT_COLUMNS = "settlement_id, merchant_id, currency, amount, balance_after, created_at"


def same_settlement(stored: Settlement, asked: Settlement) -> Settlement:
    """The stored settlement, when `asked` is the same one again; SettlementConflict if not."""
    if (stored.merchant_id, stored.currency, stored.amount) != (asked.merchant_id, asked.currency, asked.amount):
        raise SettlementConflict(f"settlement id {asked.settlement_id!r} was used for another merchant, "
                                 "currency or amount")
    return stored


@dataclass(frozen=True)
class MerchantCredentials:
    status: str
    public_keys_pem: tuple[str, ...]
    require_timestamp: bool = False
    key_ids: tuple[str, ...] = ()  # the key_id of each of public_keys_pem, in the same order


class ClaimState(enum.Enum):
    CLAIMED = "claimed"          # the key is ours: run the request, then store or release its answer
    STORED = "stored"            # the key holds the answer of this same request
    CONFLICT = "conflict"        # the key was first used with other request bytes
    IN_PROGRESS = "in_progress"  # another call with the key and these bytes is running


@dataclass(frozen=True)
class Claim:
    """What claiming an Idempotency-Key found. `claimed_at` identifies our
    claim (finish_idempotency changes the row only while it is still ours)."""

    state: ClaimState
    response: bytes | None = None
    claimed_at: datetime | None = None


def judge_claim(row_hash: str, response: bytes | None, created_at: datetime, request_hash: str,
                stale_before: datetime) -> Claim | None:
    """The claim for an existing key row; None when a stale claim (its process
    died or gave up) may be taken over."""
    if row_hash != request_hash:
        return Claim(ClaimState.CONFLICT)
    if response is not None:
        return Claim(ClaimState.STORED, bytes(response))
    if created_at >= stale_before:
        return Claim(ClaimState.IN_PROGRESS)
    return None


class Store(Protocol):
    async def refund(self, command: domain.RefundCommand, *, signed_with: str | None = None,
                     timestamped: bool = False) -> domain.RefundResult | None:
        """Decide and apply one refund attempt (docs/api.md section 3).

        `signed_with`: the key_id that verified a signed request, from
        credentials read earlier. The store then refunds only while that key
        is active and its merchant ACTIVE and, unless the request is
        `timestamped`, not requiring a timestamp: checked in the refund's own
        transaction or statement, so a key deactivated or a merchant suspended
        before the refund commits is refused. For anything it does not answer
        that way it may return None (nothing written); the caller then
        authenticates afresh. Without `signed_with` the answer is never None."""

    async def get_order(
        self, merchant_id: int, order_id: int | None, merchant_reference: str | None
    ) -> tuple[domain.Order, list[domain.Transaction]] | None: ...

    async def record_sale(self, sale: Sale) -> tuple[domain.Order, domain.Transaction, int]: ...

    async def settle(self, settlement: Settlement) -> tuple[Settlement, bool]:
        """Pay a settlement out of the unsettled balance, with its journal entry,
        once per settlement id: (the settlement as made, True); for an id
        already used, (the stored settlement, False) and nothing moves.
        InsufficientBalance (nothing written) or SettlementConflict."""

    async def merchant_credentials(self, merchant_id: int) -> MerchantCredentials | None: ...

    # Idempotency-Key and replay window (docs/api.md section 7): used only by
    # requests that carry a key or a timestamp.

    async def claim_idempotency(self, merchant_id: int, key: str, request_hash: str, now: datetime,
                                stale_before: datetime) -> Claim:
        """Insert the key as in progress, or report what it holds. A claim
        older than `stale_before` that never got an answer is taken over."""

    async def finish_idempotency(self, merchant_id: int, key: str, claimed_at: datetime,
                                 response: bytes | None) -> None:
        """Store the answer of our claim, or (response None) release the key."""

    async def remember_request(self, request_hash: str, merchant_id: int, expires_at: datetime) -> bool:
        """Record a signed request's hash; False when it was seen before."""

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


# The columns both stores read, in the order of domain.Order and
# domain.Transaction (aliases o for orders, t for transactions).
ORDER_COLUMNS = ("o.id, o.merchant_id, o.merchant_reference, o.currency, o.amount, o.status, "
                 "o.payment_method, o.create_time, o.update_time")
TRANSACTION_COLUMNS = ("t.id, t.merchant_id, t.order_id, t.type, t.currency, t.amount, t.status, t.masked_pan, "
                       "t.stan, t.create_time")


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
