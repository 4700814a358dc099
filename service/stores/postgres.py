"""PostgreSQL store on asyncpg: fixed, prepared statements, no ORM objects.

The refund statements, written from the domain's rules, are in
service/stores/postgres_refund.py; this module runs them and everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from dataclasses import astuple, dataclass, replace

import asyncpg
from sqlalchemy.engine import make_url

from service import domain, outbox, telemetry
from service.clock import utc_now
from service.stores import group_commit
from service.stores import postgres_refund as refund_sql
from service.stores.port import (
    BALANCE_TOO_LARGE,
    Attempt,
    Claim,
    ClaimState,
    InsufficientBalance,
    Interrupted,
    MerchantCredentials,
    Sale,
    SaleConflict,
    Settlement,
    SignedBy,
    StoreUnavailable,
    judge_claim,
    same_sale,
    same_settlement,
)
from service.stores.sql import ORDER_COLUMNS, SETTLEMENT_COLUMNS, TRANSACTION_COLUMNS

BALANCE = "SELECT unsettled FROM balances WHERE merchant_id = $1 AND currency = $2"

# Money moved by a sale or a settlement, and its journal entry (same transaction).
CREDIT_SALE = """
INSERT INTO balances (merchant_id, currency, unsettled) VALUES ($1, $2, $3)
ON CONFLICT (merchant_id, currency) DO UPDATE SET unsettled = balances.unsettled + EXCLUDED.unsettled
RETURNING unsettled"""
DEBIT_SETTLEMENT = """
UPDATE balances SET unsettled = unsettled - $3
WHERE merchant_id = $1 AND currency = $2 AND unsettled >= $3 RETURNING unsettled"""
JOURNAL = """
INSERT INTO ledger_entries (merchant_id, currency, kind, amount, balance_after, order_id, transaction_id,
                            settlement_id, created_at, request_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"""
READ_SETTLEMENT = f"SELECT {SETTLEMENT_COLUMNS} FROM settlements WHERE settlement_id = $1"
INSERT_SETTLEMENT = f"INSERT INTO settlements ({SETTLEMENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"



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

# Every way a connection can be lost, refused or given up on: the outcome of
# the statement in flight is unknown or nothing was done, and a retry is safe
# (UNAVAILABLE, 9001). InternalClientError is what asyncpg raises for a
# connection that broke under an operation (e.g. its backend terminated);
# TransactionRollbackError (serialization failure, deadlock) rolled back.
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
)


# Times a refund statement alone runs when PostgreSQL keeps rolling it back.
ROLLED_BACK_RETRIES = 3

# How long a lane's refund statement waits for a lock (PostgreSQL's lock_timeout,
# for that statement's transaction only). Refunds of this service wait for one
# another only as long as a batch takes (milliseconds; MERCHANT_LOCK); longer
# means another client holds the row (an operator's open transaction on a
# balance), and the lane moves the refund aside (group_commit.py) instead of
# holding up every refund behind it. Aside, statements wait with no lock_timeout,
# until --db-timeout.
LANE_LOCK_TIMEOUT = "250ms"
NO_LOCK_TIMEOUT = "0"


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


@dataclass(frozen=True)
class _RefundStatements:
    apply: str
    in_one_statement_by_id: str
    in_one_statement_by_reference: str


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool, command_timeout: float, sequencer: outbox.Sequencer | None = None,
                 lanes: int = group_commit.LANES):
        self._pool = pool
        self._timeout = command_timeout
        self._statements: _RefundStatements | None = None  # with the sequence resolved, on first use
        # Refund statements go through `lanes` lanes, one transaction each at a
        # time; refunds arriving meanwhile go together in the next (group_commit.py).
        # A lane's statements wait for a lock at most LANE_LOCK_TIMEOUT; past it their
        # refunds run aside, waiting as long as --db-timeout allows, in side lanes of
        # one connection each: at most half of those the lanes leave in the pool (the
        # rest serve reads, declines and probes).
        bounded = functools.partial(self._refund_alone, lock_timeout=LANE_LOCK_TIMEOUT), \
            functools.partial(self._refunds_together, lock_timeout=LANE_LOCK_TIMEOUT)
        self.group_commit = group_commit.GroupCommit(*bounded, stopped=lambda: StoreUnavailable("closing"),
                                                     lanes=lanes, aside=(self._refund_alone, self._refunds_together),
                                                     side_lanes=max(1, (pool.get_max_size() - lanes) // 2))
        # Numbers the journal's entries as events while this process holds the
        # sequencer's lock (service/outbox.py); stopped by close().
        self.sequencer = sequencer

    @classmethod
    async def open(cls, url: str, *, min_size: int = 2, max_size: int = 20, command_timeout: float = 5.0,
                   connect: bool = True, lanes: int = group_commit.LANES) -> PostgresStore:
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
        sequencer = outbox.Sequencer(outbox.connector(url, command_timeout))
        sequencer.start()
        return cls(pool, command_timeout, sequencer, lanes)

    @contextlib.asynccontextmanager
    async def _connection(self):
        try:
            async with self._pool.acquire(timeout=self._timeout) as connection:
                yield connection
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    # -- refunds: the steps of service/usecases/refunds.py --

    async def try_refund(self, command: domain.RefundCommand, signed_by: SignedBy | None) -> Attempt:
        """IN_ONE_STATEMENT: applied, or the snapshot it read to decide on."""
        now = utc_now()
        key_id, timestamped = (signed_by.key_id, signed_by.timestamped) if signed_by else (None, False)
        statements = self._statements or await self._resolve_statements()
        statement = statements.in_one_statement_by_id if command.order_id is not None \
            else statements.in_one_statement_by_reference
        try:
            row = await self.group_commit.run(
                command.merchant_id, statement,
                (command.merchant_id, command.order_id, command.merchant_reference,
                 domain.minor_units_by_decimals(command.amount), now, command.amount_text, key_id, timestamped,
                 telemetry.REQUEST_ID.get()))
        except asyncpg.NotNullViolationError:  # the balance fell below the amount during the statement
            return Attempt(interrupted=Interrupted.STATE_MOVED)
        values = tuple(row)
        if not values[0]:
            return Attempt(interrupted=Interrupted.CREDENTIALS_CHANGED)
        snapshot, applied = values[1:1 + refund_sql.SNAPSHOT_COLUMNS], values[1 + refund_sql.SNAPSHOT_COLUMNS:]
        if applied[0] is None:
            return Attempt(snapshot=_snapshot_of(snapshot) if snapshot[0] is not None else None)
        order, amount, refund_id, masked_pan, stan = _order(applied), *applied[9:]
        refund = domain.Transaction(refund_id, order.merchant_id, order.id, domain.REFUND, order.currency, amount,
                                    domain.TRANSACTION_SUCCEEDED, masked_pan, stan, now)
        return Attempt(applied=domain.RefundResult(domain.ResponseCode.SUCCESS, "SUCCESS", order, refund))

    async def _refund_alone(self, statement: str, args: tuple, lock_timeout: str = NO_LOCK_TIMEOUT):
        """The statement's row. PostgreSQL may roll it back as a deadlock victim:
        another client's transaction (not a refund of this service: see
        MERCHANT_LOCK) holds the balance row and waits for this statement's
        order. Rolled back, it wrote nothing, so it runs again (at most
        ROLLED_BACK_RETRIES times). LockWaitTooLong: it waited `lock_timeout`
        for a lock and gave up, writing nothing."""
        async with self._connection() as conn:
            for attempt in range(1, ROLLED_BACK_RETRIES + 1):
                try:
                    return await conn.fetchrow(statement, *args, lock_timeout)
                except asyncpg.TransactionRollbackError:
                    self.group_commit.alone_rolled_back += 1
                    if attempt == ROLLED_BACK_RETRIES:
                        raise
                except asyncpg.LockNotAvailableError:
                    raise group_commit.LockWaitTooLong("lock_timeout") from None

    async def _refunds_together(self, statement: str, many: list[tuple], lock_timeout: str = NO_LOCK_TIMEOUT):
        """The rows of `statement` run once per args, in one transaction and one
        round trip; None when PostgreSQL rolled that transaction back as a whole;
        LockWaitTooLong when one of them waited `lock_timeout` for a lock (nothing
        of the batch written)."""
        async with self._connection() as conn:
            try:
                return await conn.fetchmany(statement, [(*args, lock_timeout) for args in many])
            except (asyncpg.IntegrityConstraintViolationError, asyncpg.TransactionRollbackError):
                return None
            except asyncpg.LockNotAvailableError:
                raise group_commit.LockWaitTooLong("lock_timeout") from None

    async def read_snapshot(self, command: domain.RefundCommand) -> domain.OrderSnapshot | None:
        async with self._connection() as conn:
            if command.order_id is not None:
                row = await conn.fetchrow(refund_sql.SNAPSHOT_BY_ID, command.merchant_id, command.order_id)
            else:
                row = await conn.fetchrow(refund_sql.SNAPSHOT_BY_REFERENCE, command.merchant_id,
                                          command.merchant_reference)
        return None if row is None else _snapshot_of(tuple(row))

    async def apply_refund(self, command: domain.RefundCommand, decision: domain.Decision,
                           snapshot: domain.OrderSnapshot, signed_by: SignedBy | None) \
            -> domain.Transaction | Interrupted:
        """APPLY; when it changes nothing, whether the credentials or the state moved."""
        order, now = snapshot.order, utc_now()
        key_id, timestamped = (signed_by.key_id, signed_by.timestamped) if signed_by else (None, False)
        statements = self._statements or await self._resolve_statements()
        async with self._connection() as conn:
            try:
                applied = await conn.fetchrow(
                    statements.apply, command.merchant_id, order.id, order.currency, decision.amount,
                    decision.new_status, now, command.merchant_reference, command.amount_text, order.status,
                    key_id, timestamped, telemetry.REQUEST_ID.get())
            except asyncpg.NotNullViolationError:
                applied = None  # the balance fell below the amount since the read
            if applied is None:
                if key_id is not None and not await conn.fetchval(
                        refund_sql.CREDENTIALS_STILL_HOLD, command.merchant_id, key_id, timestamped):
                    return Interrupted.CREDENTIALS_CHANGED
                return Interrupted.STATE_MOVED
        return domain.Transaction(applied["id"], order.merchant_id, order.id, domain.REFUND, order.currency,
                                  decision.amount, domain.TRANSACTION_SUCCEEDED, applied["masked_pan"],
                                  applied["stan"], now)

    async def record_decline(self, command: domain.RefundCommand, decision: domain.Decision,
                             snapshot: domain.OrderSnapshot | None) -> None:
        order_id = snapshot.order.id if snapshot else command.order_id
        async with self._connection() as conn:
            await conn.execute(refund_sql.AUDIT, command.merchant_id, order_id, command.merchant_reference,
                               command.amount_text, decision.code.value, None, utc_now())

    async def _resolve_statements(self) -> _RefundStatements:
        async with self._connection() as conn:
            sequence = refund_sql.sequence_constant(await conn.fetchval(f"SELECT {refund_sql.SEQUENCE_LOOKUP}"))
        self._statements = _RefundStatements(refund_sql.apply_statement(sequence),
                                             *refund_sql.in_one_statement(sequence))
        return self._statements

    # -- queries, sales and settlements --

    async def get_order(self, merchant_id, order_id, merchant_reference):
        async with self._connection() as conn:
            if order_id is not None:
                row = await conn.fetchrow(f"SELECT {ORDER_COLUMNS} FROM orders o "
                                          f"WHERE o.merchant_id = $1 AND o.id = $2",
                                          merchant_id, order_id)
            else:
                row = await conn.fetchrow(
                    f"SELECT {ORDER_COLUMNS} FROM orders o WHERE o.merchant_id = $1 AND o.merchant_reference = $2",
                    merchant_id, merchant_reference)
            if row is None:
                return None
            order = _order(row)
            rows = await conn.fetch(f"SELECT {TRANSACTION_COLUMNS} FROM transactions t "
                                    "WHERE t.order_id = $1 ORDER BY t.id",
                                    order.id)
            return order, [_transaction(r) for r in rows]

    async def record_sale(self, sale: Sale):
        try:
            return await self._record_sale(sale)
        except asyncpg.ForeignKeyViolationError:
            raise domain.InvalidRequest("unknown merchant or payment method") from None
        except asyncpg.CheckViolationError:  # ck_balance_within_bound: the credit would pass the maximum
            raise domain.InvalidAmount(BALANCE_TOO_LARGE) from None

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
                    f"SELECT {ORDER_COLUMNS} FROM orders o "
                    "WHERE o.id = $1 OR (o.merchant_id = $2 AND o.merchant_reference = $3)",
                    sale.order_id, sale.merchant_id, sale.merchant_reference)
                if existing is None or not same_sale(_order(existing), sale):
                    raise SaleConflict("order id or merchant reference already used by another order")
                order = _order(existing)
                txn = await conn.fetchrow(
                    f"SELECT {TRANSACTION_COLUMNS} FROM transactions t WHERE t.order_id = $1 AND t.type = 'SALE'",
                    order.id)
                balance = await conn.fetchval(BALANCE, order.merchant_id, order.currency)
                return order, _transaction(txn), balance or 0
            txn = await conn.fetchrow(
                f"""INSERT INTO transactions AS t (order_id, merchant_id, type, currency, amount, status,
                                                 masked_pan, stan, create_time)
                    VALUES ($1, $2, 'SALE', $3, $4, 'SUCCESS', $5, $6, $7) RETURNING {TRANSACTION_COLUMNS}""",
                sale.order_id, sale.merchant_id, sale.currency, sale.amount, sale.masked_pan, sale.stan, now)
            balance = await conn.fetchval(CREDIT_SALE, sale.merchant_id, sale.currency, sale.amount)
            if balance > domain.MAX_MINOR_UNITS:  # leaving the block rolls the sale back
                raise domain.InvalidAmount(BALANCE_TOO_LARGE)
            await conn.execute(JOURNAL, sale.merchant_id, sale.currency, domain.SALE, sale.amount, balance,
                               sale.order_id, txn["id"], None, now, telemetry.REQUEST_ID.get())
            return _order(inserted), _transaction(txn), balance

    async def settle(self, settlement: Settlement) -> tuple[Settlement, bool]:
        """Debit the balance and record the settlement and its journal entry, in
        one transaction; or, when its id is taken, the stored settlement
        (SettlementConflict if it differs). The second value: whether this call
        made it. A concurrent call with the same id waits on the balance row,
        then finds the id taken and rolls its debit back."""
        async with self._connection() as conn:
            stored = await conn.fetchrow(READ_SETTLEMENT, settlement.settlement_id)
            if stored is not None:
                return same_settlement(Settlement(*stored), settlement), False
            try:
                async with conn.transaction():
                    balance = await conn.fetchval(DEBIT_SETTLEMENT, settlement.merchant_id, settlement.currency,
                                                  settlement.amount)
                    if balance is None:
                        raise InsufficientBalance("the unsettled balance is lower than the amount")
                    made = replace(settlement, balance_after=balance)
                    await conn.execute(INSERT_SETTLEMENT, *astuple(made))
                    await conn.execute(JOURNAL, made.merchant_id, made.currency, "SETTLEMENT", -made.amount, balance,
                                       None, None, made.settlement_id, made.created_at, telemetry.REQUEST_ID.get())
                    return made, True
            except asyncpg.UniqueViolationError:  # the same id, made by a call that committed first
                stored = await conn.fetchrow(READ_SETTLEMENT, settlement.settlement_id)
                return same_settlement(Settlement(*stored), settlement), False

    async def merchant_credentials(self, merchant_id: int) -> MerchantCredentials | None:
        async with self._connection() as conn:
            rows = await conn.fetch(
                """SELECT m.status, k.public_key_pem, m.require_timestamp, k.key_id FROM merchants m
                   LEFT JOIN merchant_keys k ON k.merchant_id = m.id AND k.active
                   WHERE m.id = $1 ORDER BY k.created_at DESC""", merchant_id)
        if not rows:
            return None
        keys = [r for r in rows if r["public_key_pem"]]
        return MerchantCredentials(rows[0]["status"], tuple(r["public_key_pem"] for r in keys),
                                   rows[0]["require_timestamp"], tuple(r["key_id"] for r in keys))

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

    def connection(self):
        """A pooled connection (async context manager); StoreUnavailable when there is none."""
        return self._connection()

    async def close(self) -> None:
        await self.group_commit.close()
        if self.sequencer is not None:
            await self.sequencer.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._pool.close(), 5)
