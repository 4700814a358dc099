"""PostgreSQL store on asyncpg: fixed, prepared statements, no ORM objects.

A refund takes two round trips, each one statement (so each is atomic on
its own, with no BEGIN/COMMIT):
1. SNAPSHOT reads the order, its payment method's capability, the balance and
   the earlier refund in one consistent read; `domain.decide` applies the rules;
2. a declined attempt inserts its audit row. An approved one runs
   APPLY_REFUND, which re-checks in the database what the decision assumed:
   the order is marked only if its status is still the one read (so two
   attempts on one order cannot both pass), the balance is debited only
   `WHERE unsettled >= amount`, and if the order was marked but the balance no
   longer covers the amount the statement fails as a whole (the refund row's
   amount is then NULL, which NOT NULL refuses), so an order is never marked
   without its debit nor debited without its refund row. When the statement
   changes nothing or fails that way, the state moved since the read: read and
   decide again (the second answer is then 3003 or 4004).
Behind both rules stand the unique index `uq_one_refund_per_order` and the
check `unsettled >= 0`.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
from sqlalchemy.engine import make_url

from service import domain
from service.store import (
    ORDER_COLUMNS,
    TRANSACTION_COLUMNS,
    Claim,
    ClaimState,
    InsufficientBalance,
    MerchantCredentials,
    Sale,
    SaleConflict,
    StoreUnavailable,
    judge_claim,
    same_sale,
    utc_now,
)


_SNAPSHOT = f"""
SELECT {ORDER_COLUMNS}, pm.refund_capability, COALESCE(b.unsettled, 0) AS unsettled, {TRANSACTION_COLUMNS}
FROM orders o
JOIN payment_methods pm ON pm.code = o.payment_method
LEFT JOIN balances b ON b.merchant_id = o.merchant_id AND b.currency = o.currency
LEFT JOIN transactions t ON t.order_id = o.id AND t.type = 'REFUND'
WHERE o.merchant_id = $1 AND """
SNAPSHOT_BY_ID = _SNAPSHOT + "o.id = $2"
SNAPSHOT_BY_REFERENCE = _SNAPSHOT + "o.merchant_reference = $2"

# MerchantRefund's first read, one statement instead of two: the merchant's
# status and active keys (newest first) with the order's snapshot, NULL columns
# when there is no such order. The snapshot is looked at only once the
# signature has verified.
_CREDENTIALS_AND_SNAPSHOT = f"""
SELECT m.status, m.require_timestamp,
       ARRAY(SELECT k.public_key_pem FROM merchant_keys k WHERE k.merchant_id = m.id AND k.active
             ORDER BY k.created_at DESC) AS public_keys,
       s.*
FROM merchants m
LEFT JOIN LATERAL ({_SNAPSHOT}"""
CREDENTIALS_AND_SNAPSHOT_BY_ID = _CREDENTIALS_AND_SNAPSHOT + "o.id = $2) s ON true WHERE m.id = $1"
CREDENTIALS_AND_SNAPSHOT_BY_REFERENCE = _CREDENTIALS_AND_SNAPSHOT + "o.merchant_reference = $2) s ON true WHERE m.id = $1"

# refund()'s `prefetched` when the caller has not read the snapshot.
NOT_READ = object()

BALANCE = "SELECT unsettled FROM balances WHERE merchant_id = $1 AND currency = $2"

# $1 merchant, $2 order, $3 currency, $4 amount, $5 new status, $6 now,
# $7 requested reference, $8 requested amount text, $9 status the decision read
_APPLY_REFUND = """
WITH marked AS (
    UPDATE orders SET status = $5, update_time = $6
    WHERE id = $2 AND merchant_id = $1 AND status = $9
    RETURNING id
), debit AS (
    UPDATE balances SET unsettled = unsettled - $4
    WHERE merchant_id = $1 AND currency = $3 AND unsettled >= $4 AND EXISTS (SELECT 1 FROM marked)
    RETURNING 1
), new_id AS (
    SELECT nextval({sequence}) AS id FROM marked
), refund AS (
    INSERT INTO transactions (id, order_id, merchant_id, type, currency, amount, status, masked_pan, stan, create_time)
    SELECT new_id.id, $2, $1, 'REFUND', $3,
           CASE WHEN EXISTS (SELECT 1 FROM debit) THEN $4::bigint END,  -- NULL: marked but not debited, abort all
           'SUCCESS',
           COALESCE((SELECT masked_pan FROM transactions WHERE order_id = $2 AND type = 'SALE' LIMIT 1), ''),
           lpad((new_id.id % 1000000)::text, 6, '0'), $6
    FROM new_id
    RETURNING id, masked_pan, stan
), audit AS (
    INSERT INTO refund_attempts (merchant_id, order_id, merchant_reference, amount, response_code, transaction_id, created_at)
    SELECT $1, $2, $7, $8, '0000', refund.id, $6 FROM refund
)
SELECT id, masked_pan, stan FROM refund"""
# The transactions' id sequence, looked up per statement; a store resolves it
# once (resolved_apply_refund) and runs APPLY_REFUND with the regclass constant.
APPLY_REFUND = _APPLY_REFUND.format(sequence="pg_get_serial_sequence('transactions', 'id')")


def resolved_apply_refund(sequence: str) -> str:
    """APPLY_REFUND naming the sequence, e.g. 'public.transactions_id_seq', as a constant."""
    return _APPLY_REFUND.format(sequence="'" + sequence.replace("'", "''") + "'::regclass")

# Attempts to decide one refund when the state keeps moving between read and write.
MAX_DECISIONS = 5

AUDIT = """
INSERT INTO refund_attempts (merchant_id, order_id, merchant_reference, amount, response_code, transaction_id, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)"""

# Idempotency keys: the primary key (merchant_id, idempotency_key) lets one
# call at a time hold a key; `created_at` identifies the claim that holds it.
CLAIM_KEY = """
INSERT INTO idempotency_keys (merchant_id, idempotency_key, request_hash, response, created_at)
VALUES ($1, $2, $3, NULL, $4) ON CONFLICT DO NOTHING RETURNING 1"""
READ_KEY = """
SELECT request_hash, response, created_at FROM idempotency_keys WHERE merchant_id = $1 AND idempotency_key = $2"""
TAKE_OVER_KEY = """
UPDATE idempotency_keys SET created_at = $3
WHERE merchant_id = $1 AND idempotency_key = $2 AND created_at = $4 AND response IS NULL RETURNING 1"""
STORE_ANSWER = """
UPDATE idempotency_keys SET response = $4
WHERE merchant_id = $1 AND idempotency_key = $2 AND created_at = $3 AND response IS NULL"""
RELEASE_KEY = """
DELETE FROM idempotency_keys WHERE merchant_id = $1 AND idempotency_key = $2 AND created_at = $3 AND response IS NULL"""
REMEMBER_REQUEST = """
INSERT INTO request_replays (request_hash, merchant_id, expires_at) VALUES ($1, $2, $3)
ON CONFLICT DO NOTHING RETURNING 1"""

_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)


def _order(row) -> domain.Order:
    return domain.Order(*row[:9])


def _transaction(row) -> domain.Transaction:
    return domain.Transaction(*row[:10])


def _snapshot_of(values: tuple) -> domain.OrderSnapshot:
    """From the columns of _SNAPSHOT: order (9), capability, balance, refund transaction (10, NULL if none)."""
    refund = _transaction(values[11:]) if values[11] is not None else None
    return domain.OrderSnapshot(_order(values), values[9], values[10], refund)


async def _keep_session(_connection) -> None:
    """Connections go back to the pool as they are: the service sets no session
    state (asyncpg still rolls back a transaction left open), which saves the
    default reset's round trip on every release."""


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool, command_timeout: float):
        self._pool = pool
        self._timeout = command_timeout
        self._apply_refund: str | None = None  # APPLY_REFUND with the sequence resolved, on first use

    @classmethod
    async def open(cls, url: str, *, min_size: int = 2, max_size: int = 20, command_timeout: float = 5.0,
                   connect: bool = True) -> "PostgresStore":
        parsed = make_url(url)
        kwargs = dict(
            host=parsed.host or "127.0.0.1",
            port=parsed.port or 5432,
            user=parsed.username,
            password=parsed.password,
            database=parsed.database,
            min_size=min_size if connect else 0,
            max_size=max_size,
            command_timeout=command_timeout,
            timeout=command_timeout,
            server_settings={"application_name": "refund-service"},
            reset=_keep_session,
        )
        try:
            pool = await asyncpg.create_pool(**kwargs)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(type(exc).__name__) from None
        return cls(pool, command_timeout)

    @contextlib.asynccontextmanager
    async def _connection(self):
        try:
            async with self._pool.acquire(timeout=self._timeout) as connection:
                yield connection
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    async def refund(self, command: domain.RefundCommand, prefetched=NOT_READ) -> domain.RefundResult:
        """`prefetched`: the snapshot of the command's order from credentials_and_snapshot(),
        decided on instead of a first read (APPLY_REFUND re-checks it like any read)."""
        async with self._connection() as conn:
            for _ in range(MAX_DECISIONS):
                if prefetched is NOT_READ:
                    snapshot = await self._snapshot(conn, command)
                else:
                    snapshot, prefetched = prefetched, NOT_READ
                decision = domain.decide(command, snapshot)
                now = utc_now()
                if not decision.approved:
                    order_id = snapshot.order.id if snapshot else command.order_id
                    await conn.execute(AUDIT, command.merchant_id, order_id, command.merchant_reference,
                                       command.amount[:64], decision.code.value, None, now)
                    return domain.result_of(decision, snapshot)
                order = snapshot.order
                if self._apply_refund is None:
                    sequence = await conn.fetchval("SELECT pg_get_serial_sequence('transactions', 'id')")
                    self._apply_refund = resolved_apply_refund(sequence) if sequence else APPLY_REFUND
                try:
                    applied = await conn.fetchrow(
                        self._apply_refund, command.merchant_id, order.id, order.currency, decision.amount,
                        decision.new_status, now, command.merchant_reference, command.amount[:64], order.status)
                except asyncpg.NotNullViolationError:
                    applied = None  # the balance fell below the amount since the read
                if applied is not None:
                    refund = domain.Transaction(applied["id"], order.merchant_id, order.id, "REFUND", order.currency,
                                                decision.amount, "SUCCESS", applied["masked_pan"], applied["stan"], now)
                    return domain.result_of(decision, snapshot, refund, domain.refunded_order(order, decision, now))
        raise StoreUnavailable("the order kept changing; retry")

    @staticmethod
    async def _snapshot(conn, command: domain.RefundCommand) -> domain.OrderSnapshot | None:
        if command.order_id is not None:
            row = await conn.fetchrow(SNAPSHOT_BY_ID, command.merchant_id, command.order_id)
        else:
            row = await conn.fetchrow(SNAPSHOT_BY_REFERENCE, command.merchant_id, command.merchant_reference)
        return None if row is None else _snapshot_of(tuple(row))

    async def get_order(self, merchant_id, order_id, merchant_reference):
        async with self._connection() as conn:
            if order_id is not None:
                row = await conn.fetchrow(f"SELECT {ORDER_COLUMNS} FROM orders o WHERE o.merchant_id = $1 AND o.id = $2",
                                          merchant_id, order_id)
            else:
                row = await conn.fetchrow(
                    f"SELECT {ORDER_COLUMNS} FROM orders o WHERE o.merchant_id = $1 AND o.merchant_reference = $2",
                    merchant_id, merchant_reference)
            if row is None:
                return None
            order = _order(row)
            rows = await conn.fetch(f"SELECT {TRANSACTION_COLUMNS} FROM transactions t WHERE t.order_id = $1 ORDER BY t.id",
                                    order.id)
            return order, [_transaction(r) for r in rows]

    async def record_sale(self, sale: Sale):
        try:
            return await self._record_sale(sale)
        except asyncpg.ForeignKeyViolationError:
            raise domain.InvalidRequest("unknown merchant or payment method") from None

    async def _record_sale(self, sale: Sale):
        now = utc_now()
        async with self._connection() as conn, conn.transaction():
            inserted = await conn.fetchrow(
                f"""INSERT INTO orders AS o (id, merchant_id, merchant_reference, currency, amount, status,
                                           payment_method, create_time, update_time)
                    VALUES ($1, $2, $3, $4, $5, 'SUCCESS', $6, $7, $7)
                    ON CONFLICT DO NOTHING RETURNING {ORDER_COLUMNS}""",
                sale.order_id, sale.merchant_id, sale.merchant_reference, sale.currency, sale.amount,
                sale.payment_method, sale.create_time)
            if inserted is None:
                existing = await conn.fetchrow(
                    f"SELECT {ORDER_COLUMNS} FROM orders o WHERE o.id = $1 OR (o.merchant_id = $2 AND o.merchant_reference = $3)",
                    sale.order_id, sale.merchant_id, sale.merchant_reference)
                if existing is None or not same_sale(_order(existing), sale):
                    raise SaleConflict("order id or merchant reference already used by another order")
                order = _order(existing)
                txn = await conn.fetchrow(
                    f"SELECT {TRANSACTION_COLUMNS} FROM transactions t WHERE t.order_id = $1 AND t.type = 'SALE'", order.id)
                balance = await conn.fetchval(BALANCE, order.merchant_id, order.currency)
                return order, _transaction(txn), balance or 0
            txn = await conn.fetchrow(
                f"""INSERT INTO transactions AS t (order_id, merchant_id, type, currency, amount, status, masked_pan, stan, create_time)
                    VALUES ($1, $2, 'SALE', $3, $4, 'SUCCESS', $5, $6, $7) RETURNING {TRANSACTION_COLUMNS}""",
                sale.order_id, sale.merchant_id, sale.currency, sale.amount, sale.masked_pan, sale.stan, now)
            balance = await conn.fetchval(
                """INSERT INTO balances (merchant_id, currency, unsettled) VALUES ($1, $2, $3)
                   ON CONFLICT (merchant_id, currency) DO UPDATE SET unsettled = balances.unsettled + EXCLUDED.unsettled
                   RETURNING unsettled""",
                sale.merchant_id, sale.currency, sale.amount)
            return _order(inserted), _transaction(txn), balance

    async def settle(self, merchant_id: int, currency: str, amount: int) -> int:
        async with self._connection() as conn:
            balance = await conn.fetchval(
                """UPDATE balances SET unsettled = unsettled - $3
                   WHERE merchant_id = $1 AND currency = $2 AND unsettled >= $3 RETURNING unsettled""",
                merchant_id, currency, amount)
        if balance is None:
            raise InsufficientBalance("the unsettled balance is lower than the amount")
        return balance

    async def merchant_credentials(self, merchant_id: int) -> MerchantCredentials | None:
        async with self._connection() as conn:
            rows = await conn.fetch(
                """SELECT m.status, k.public_key_pem, m.require_timestamp FROM merchants m
                   LEFT JOIN merchant_keys k ON k.merchant_id = m.id AND k.active
                   WHERE m.id = $1 ORDER BY k.created_at DESC""", merchant_id)
        if not rows:
            return None
        return MerchantCredentials(rows[0]["status"], tuple(r["public_key_pem"] for r in rows if r["public_key_pem"]),
                                   rows[0]["require_timestamp"])

    async def credentials_and_snapshot(self, merchant_id: int, order_id: int | None, reference: str | None):
        """(merchant_credentials(merchant_id), the snapshot of the merchant's order) in one round trip;
        the snapshot is None when there is no such order."""
        async with self._connection() as conn:
            if order_id is not None:
                row = await conn.fetchrow(CREDENTIALS_AND_SNAPSHOT_BY_ID, merchant_id, order_id)
            else:
                row = await conn.fetchrow(CREDENTIALS_AND_SNAPSHOT_BY_REFERENCE, merchant_id, reference)
        if row is None:
            return None, None
        values = tuple(row)
        credentials = MerchantCredentials(values[0], tuple(k for k in values[2] if k), values[1])
        return credentials, (_snapshot_of(values[3:]) if values[3] is not None else None)

    # -- Idempotency-Key and replay window (only for requests that carry them) --

    async def claim_idempotency(self, merchant_id, key, request_hash, now, stale_before) -> Claim:
        async with self._connection() as conn:
            for _ in range(3):  # a key released between our insert and our read: try again
                if await conn.fetchval(CLAIM_KEY, merchant_id, key, request_hash, now) is not None:
                    return Claim(ClaimState.CLAIMED, claimed_at=now)
                row = await conn.fetchrow(READ_KEY, merchant_id, key)
                if row is None:
                    continue
                claim = judge_claim(row["request_hash"], row["response"], row["created_at"], request_hash,
                                    stale_before)
                if claim is not None:
                    return claim
                if await conn.fetchval(TAKE_OVER_KEY, merchant_id, key, now, row["created_at"]) is not None:
                    return Claim(ClaimState.CLAIMED, claimed_at=now)
        return Claim(ClaimState.IN_PROGRESS)

    async def finish_idempotency(self, merchant_id, key, claimed_at, response) -> None:
        async with self._connection() as conn:
            if response is None:
                await conn.execute(RELEASE_KEY, merchant_id, key, claimed_at)
            else:
                await conn.execute(STORE_ANSWER, merchant_id, key, claimed_at, response)

    async def remember_request(self, request_hash, merchant_id, expires_at) -> bool:
        async with self._connection() as conn:
            return await conn.fetchval(REMEMBER_REQUEST, request_hash, merchant_id, expires_at) is not None

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._pool.close(), 5)
