"""The storage port: what the use cases (service/usecases/) ask of a store.

A store knows no rule. For a refund it offers steps that the refund use case
puts together: try the refund in one statement (PostgreSQL applies what the
SQL built from the domain's rules approves; SQLite only reads), read an
order's snapshot, apply an approved decision with statements the database
guards, record a declined attempt. Two adapters implement it:
service/stores/postgres.py (asyncpg) and service/stores/sqlite.py (sqlite3 on
one writer thread).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
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


@dataclass(frozen=True)
class SignedBy:
    """The key that verified a signed request (from credentials read earlier),
    and whether the request carried a timestamp. A refund guarded by it
    applies only while, in its own statement or transaction, that key is
    active and its merchant ACTIVE and, unless `timestamped`, not requiring a
    timestamp."""

    key_id: str
    timestamped: bool = False


class Interrupted(enum.Enum):
    """Why a refund step applied nothing."""

    CREDENTIALS_CHANGED = "the key that verified the request is no longer active, or its merchant no longer ACTIVE"
    STATE_MOVED = "the order or the balance changed since it was read"


@dataclass(frozen=True)
class Attempt:
    """What trying a refund in one statement did: `applied` when it refunded;
    else the order's `snapshot` as the statement read it (None: no such
    order), or why it could read nothing usable (`interrupted`)."""

    applied: domain.RefundResult | None = None
    snapshot: domain.OrderSnapshot | None = None
    interrupted: Interrupted | None = None


class Store(Protocol):
    # -- refunds: the steps of service/usecases/refunds.py --

    async def try_refund(self, command: domain.RefundCommand, signed_by: SignedBy | None) -> Attempt:
        """Refund in one statement when it is approved as things stand; otherwise
        read the order's snapshot for the rules to decide on."""

    async def read_snapshot(self, command: domain.RefundCommand) -> domain.OrderSnapshot | None: ...

    async def apply_refund(self, command: domain.RefundCommand, decision: domain.Decision,
                           snapshot: domain.OrderSnapshot, signed_by: SignedBy | None) \
            -> domain.Transaction | Interrupted:
        """Apply an approved decision in one transaction: mark the order (only
        in the status `snapshot` read), debit the balance (only while it covers
        the amount), insert the refund, its audit row and its journal entry.
        The refund transaction; or nothing written and why."""

    async def record_decline(self, command: domain.RefundCommand, decision: domain.Decision,
                             snapshot: domain.OrderSnapshot | None) -> None:
        """The audit row of a declined attempt."""

    # -- queries, sales and settlements --

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

    async def ping(self) -> None:
        """One round trip to the database (the readiness probe); StoreUnavailable if it fails."""

    async def close(self) -> None: ...


def stan_for(transaction_id: int) -> str:
    """The refund's 6-digit system trace audit number, from its transaction id."""
    return f"{transaction_id % 1_000_000:06d}"


def same_sale(order: domain.Order, sale: Sale) -> bool:
    return (order.id, order.merchant_id, order.merchant_reference, order.currency, order.amount,
            order.payment_method) == (sale.order_id, sale.merchant_id, sale.merchant_reference,
                                      sale.currency, sale.amount, sale.payment_method)
