"""PostgreSQL store on asyncpg: fixed, prepared statements, no ORM objects.

Every statement runs on its own (so each is atomic, with no BEGIN/COMMIT).
A refund is first _REFUND_AT_ONCE: one statement that reads the order, its
payment method's capability, the balance and any earlier refund, and applies
the refund when each of domain.decide's conditions for approval holds. What it
does not apply, `domain.decide` decides on the snapshot that statement read:
1. a declined attempt inserts its audit row (the second statement);
2. an approval it did not apply (the state moved during the statement) runs
   APPLY_REFUND, which re-checks in the database what the decision assumed:
   the order is marked only if its status is still the one read (so two
   attempts on one order cannot both pass), the balance is debited only
   `WHERE unsettled >= amount`, and if the order was marked but the balance no
   longer covers the amount the statement fails as a whole (the refund row's
   amount is then NULL, which NOT NULL refuses), so an order is never marked
   without its debit nor debited without its refund row. When the statement
   changes nothing or fails that way, the state moved since the read: read
   (SNAPSHOT) and decide again (the answer is then 3003 or 4004).
_REFUND_AT_ONCE guards itself the same way.
Behind both rules stand the unique index `uq_one_refund_per_order` and the
check `unsettled >= 0`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import astuple, dataclass, replace

import asyncpg
from sqlalchemy.engine import make_url

from service import domain, outbox, telemetry
from service.store import (
    BALANCE_TOO_LARGE,
    ORDER_COLUMNS,
    SETTLEMENT_COLUMNS,
    TRANSACTION_COLUMNS,
    Claim,
    ClaimState,
    InsufficientBalance,
    MerchantCredentials,
    Sale,
    SaleConflict,
    Settlement,
    StoreUnavailable,
    judge_claim,
    same_sale,
    same_settlement,
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

# What _refund_at_once returns when its statement failed because the balance fell
# during it: nothing was read that may be decided on.
NOT_READ = object()

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



def credentials_hold(key: str, timestamped: str) -> str:
    """SQL: the key `key` (a parameter) of merchant $1 is active, the merchant
    ACTIVE and, unless `timestamped`, not requiring a timestamp."""
    return f"""EXISTS (
        SELECT 1 FROM merchants m JOIN merchant_keys k ON k.merchant_id = m.id
        WHERE m.id = $1 AND m.status = 'ACTIVE' AND (NOT m.require_timestamp OR {timestamped}::boolean)
          AND k.key_id = {key}::text AND k.active)"""


# $1 merchant, $2 order, $3 currency, $4 amount, $5 new status, $6 now,
# $7 requested reference, $8 requested amount text, $9 status the decision read,
# $10 key id of a signed request (NULL: unsigned), $11 whether it is timestamped,
# $12 the request id (for the journal entry, i.e. the event)
_APPLY_REFUND = """
WITH marked AS (
    UPDATE orders SET status = $5, update_time = $6
    WHERE id = $2 AND merchant_id = $1 AND status = $9 AND ($10::text IS NULL OR {credentials_hold})
    RETURNING id
), debit AS (
    UPDATE balances SET unsettled = unsettled - $4
    WHERE merchant_id = $1 AND currency = $3 AND unsettled >= $4 AND EXISTS (SELECT 1 FROM marked)
    RETURNING unsettled
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
    RETURNING id, masked_pan, stan, amount
), audit AS (
    INSERT INTO refund_attempts (merchant_id, order_id, merchant_reference, amount, response_code, transaction_id, created_at)
    SELECT $1, $2, $7, $8, '0000', refund.id, $6 FROM refund
), entry AS (
    INSERT INTO ledger_entries (merchant_id, currency, kind, amount, balance_after, order_id, transaction_id, created_at,
                                request_id)
    SELECT $1, $3, 'REFUND', -refund.amount, debit.unsettled, $2, refund.id, $6, $12::text FROM refund, debit
)
SELECT id, masked_pan, stan FROM refund"""
# The transactions' id sequence, looked up per statement; a store resolves it
# once (sequence_constant) and runs the statements with the regclass constant.
SEQUENCE_LOOKUP = "pg_get_serial_sequence('transactions', 'id')"
def apply_refund(sequence: str) -> str:
    """_APPLY_REFUND naming the sequence with `sequence`."""
    return _APPLY_REFUND.format(sequence=sequence, credentials_hold=credentials_hold(key="$10", timestamped="$11"))


APPLY_REFUND = apply_refund(SEQUENCE_LOOKUP)


def sequence_constant(sequence: str | None) -> str:
    """The sequence, e.g. 'public.transactions_id_seq', as a regclass constant; the lookup if unknown."""
    return "'" + sequence.replace("'", "''") + "'::regclass" if sequence else SEQUENCE_LOOKUP

# The common refund in one statement: read, decide and apply, for an attempt
# that is approved as things stand (refundable status, no refund yet, a
# payment method that allows it, the amount exact in the order's currency and
# within the order's amount, a balance that covers it; with $7, the key that
# verified a signed request still active and its merchant ACTIVE, not
# requiring timestamps). Each condition is one of domain.decide's approvals,
# so the statement approves only what decide would. It guards itself like
# APPLY_REFUND: the order is marked only in the status read, the balance
# debited only `WHERE unsettled >= amount`, marked-but-not-debited aborts the
# statement. Its one row: whether the credentials hold, the order's snapshot
# as SNAPSHOT reads it (NULLs: no such order; read before any change), and the
# refunded order and the refund when it applied (NULLs when not). What it does
# not apply, domain.decide decides on that snapshot: a decline then costs one
# more statement (its audit row), as on the full path.
# $1 merchant, $2 order id (NULL: by reference), $3 requested reference,
# $4 the amount in minor units for 0, 1, 2, ... decimals, $5 now,
# $6 requested amount text, $7 key id or NULL, $8 whether the request is timestamped,
# $9 the request id (for the journal entry, i.e. the event)
_REFUND_AT_ONCE = """
WITH credentials AS (
    SELECT $7::text IS NULL OR {credentials_hold} AS hold
), target AS (
    SELECT o.id, o.amount, o.currency, o.status, pm.refund_capability,
           ($4::bigint[])[({decimals}) + 1] AS units
    FROM orders o
    JOIN payment_methods pm ON pm.code = o.payment_method
    WHERE o.merchant_id = $1 AND {order}
      AND o.status IN ('SUCCESS', 'SETTLED')
      AND NOT EXISTS (SELECT 1 FROM transactions x WHERE x.order_id = o.id AND x.type = 'REFUND')
      AND (SELECT hold FROM credentials)
), approvable AS (
    SELECT t.* FROM target t
    WHERE t.units > 0 AND t.units <= t.amount
      AND (t.refund_capability = 'FULL_AND_PARTIAL' OR (t.refund_capability = 'FULL_ONLY' AND t.units = t.amount))
      AND EXISTS (SELECT 1 FROM balances b WHERE b.merchant_id = $1 AND b.currency = t.currency
                  AND b.unsettled >= t.units)
), marked AS (
    UPDATE orders o SET status = CASE WHEN a.units = a.amount THEN 'REFUNDED' ELSE 'PARTIALLY_REFUNDED' END,
                        update_time = $5
    FROM approvable a
    WHERE o.id = a.id AND o.status = a.status
    RETURNING {order_columns}, a.units
), debit AS (
    UPDATE balances b SET unsettled = b.unsettled - m.units
    FROM marked m
    WHERE b.merchant_id = $1 AND b.currency = m.currency AND b.unsettled >= m.units
    RETURNING b.unsettled
), new_id AS (
    SELECT nextval({sequence}) AS id FROM marked
), refund AS (
    INSERT INTO transactions (id, order_id, merchant_id, type, currency, amount, status, masked_pan, stan, create_time)
    SELECT new_id.id, m.id, $1, 'REFUND', m.currency,
           CASE WHEN EXISTS (SELECT 1 FROM debit) THEN m.units END,  -- NULL: marked but not debited, abort all
           'SUCCESS',
           COALESCE((SELECT s.masked_pan FROM transactions s WHERE s.order_id = m.id AND s.type = 'SALE' LIMIT 1), ''),
           lpad((new_id.id % 1000000)::text, 6, '0'), $5
    FROM marked m, new_id
    RETURNING id, order_id, masked_pan, stan, currency, amount
), audit AS (
    INSERT INTO refund_attempts (merchant_id, order_id, merchant_reference, amount, response_code, transaction_id, created_at)
    SELECT $1, refund.order_id, $3, $6, '0000', refund.id, $5 FROM refund
), entry AS (
    INSERT INTO ledger_entries (merchant_id, currency, kind, amount, balance_after, order_id, transaction_id, created_at,
                                request_id)
    SELECT $1, refund.currency, 'REFUND', -refund.amount, debit.unsettled, refund.order_id, refund.id, $5, $9::text
    FROM refund, debit
)
SELECT credentials.hold, snapshot.*, applied.*
FROM credentials
LEFT JOIN ({snapshot}) snapshot ON true
LEFT JOIN (SELECT marked.*, refund.id, refund.masked_pan, refund.stan FROM marked, refund) applied ON true"""
_BY_ID = "o.id = $2 AND (COALESCE($3, '') = '' OR o.merchant_reference = $3)"
_BY_REFERENCE = "$2::bigint IS NULL AND o.merchant_reference = $3"
_SNAPSHOT_COLUMNS = 21  # _SNAPSHOT: order (9), capability, balance, refund transaction (10)


def _decimals_of_currency() -> str:
    """CASE o.currency ... END: the order currency's decimals (NULL when unknown), from domain's table."""
    cases = " ".join(f"WHEN o.currency IN ({', '.join(repr(c) for c in codes)}) THEN {digits}"
                     for digits, codes in domain.currencies_by_minor_units().items())
    return f"CASE {cases} END"


def refund_at_once(sequence: str) -> tuple[str, str]:
    """_REFUND_AT_ONCE (by order id, by merchant reference) naming the sequence with `sequence`."""
    return tuple(_REFUND_AT_ONCE.format(decimals=_decimals_of_currency(), order=order, order_columns=ORDER_COLUMNS,
                                        sequence=sequence, snapshot=snapshot,
                                        credentials_hold=credentials_hold(key="$7", timestamped="$8"))
                 for order, snapshot in ((_BY_ID, SNAPSHOT_BY_ID),
                                         (_BY_REFERENCE, _SNAPSHOT + "o.merchant_reference = $3")))


# What _refund_at_once found when the credentials no longer hold.
CREDENTIALS_CHANGED = object()
CREDENTIALS_STILL_HOLD = "SELECT " + credentials_hold(key="$2", timestamped="$3")


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
    at_once_by_id: str
    at_once_by_reference: str


class PostgresStore:
    def __init__(self, pool: asyncpg.Pool, command_timeout: float, sequencer: outbox.Sequencer | None = None):
        self._pool = pool
        self._timeout = command_timeout
        self._statements: _RefundStatements | None = None  # with the sequence resolved, on first use
        # Numbers the journal's entries as events while this process holds the
        # sequencer's lock (service/outbox.py); stopped by close().
        self.sequencer = sequencer

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
        sequencer = outbox.Sequencer(outbox.connector(url, command_timeout))
        sequencer.start()
        return cls(pool, command_timeout, sequencer)

    @contextlib.asynccontextmanager
    async def _connection(self):
        try:
            async with self._pool.acquire(timeout=self._timeout) as connection:
                yield connection
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(type(exc).__name__) from None

    async def refund(self, command: domain.RefundCommand, *, signed_with: str | None = None,
                     timestamped: bool = False) -> domain.RefundResult | None:
        """Decide and apply one refund attempt: the one statement of the common
        case (_REFUND_AT_ONCE); when it does not apply, decide on what it read.
        `signed_with`: the key_id that verified a signed request, from
        credentials read earlier; when that key is no longer active or its
        merchant no longer ACTIVE without a required timestamp (or the balance
        moved during the statement), None: nothing written, and the caller
        authenticates afresh."""
        async with self._connection() as conn:
            statements = self._statements or await self._resolve_statements(conn)
            found = await self._refund_at_once(conn, statements, command, signed_with, timestamped)
            if isinstance(found, domain.RefundResult):
                return found
            if found is CREDENTIALS_CHANGED or (found is NOT_READ and signed_with is not None):
                return None
            if found is NOT_READ:
                found = await self._snapshot(conn, command)
            return await self._decide_and_apply(conn, statements, command, found, signed_with, timestamped)

    async def _decide_and_apply(self, conn, statements: "_RefundStatements", command: domain.RefundCommand,
                                snapshot: domain.OrderSnapshot | None, signed_with: str | None = None,
                                timestamped: bool = False) -> domain.RefundResult | None:
        """Decide on `snapshot`: a decline inserts its audit row; an approval runs
        APPLY_REFUND, which re-checks the read (and a signed request's
        credentials); when the state moved since (it changes nothing), read
        and decide again. None when the credentials no longer hold."""
        for _ in range(MAX_DECISIONS):
            decision = domain.decide(command, snapshot)
            now = utc_now()
            if not decision.approved:
                order_id = snapshot.order.id if snapshot else command.order_id
                await conn.execute(AUDIT, command.merchant_id, order_id, command.merchant_reference,
                                   command.amount_text, decision.code.value, None, now)
                return domain.result_of(decision, snapshot)
            order = snapshot.order
            try:
                applied = await conn.fetchrow(
                    statements.apply, command.merchant_id, order.id, order.currency, decision.amount,
                    decision.new_status, now, command.merchant_reference, command.amount_text, order.status,
                    signed_with, timestamped, telemetry.REQUEST_ID.get())
            except asyncpg.NotNullViolationError:
                applied = None  # the balance fell below the amount since the read
            if applied is None and signed_with is not None and not await conn.fetchval(
                    CREDENTIALS_STILL_HOLD, command.merchant_id, signed_with, timestamped):
                return None
            if applied is not None:
                refund = domain.Transaction(applied["id"], order.merchant_id, order.id, "REFUND", order.currency,
                                            decision.amount, "SUCCESS", applied["masked_pan"], applied["stan"], now)
                return domain.result_of(decision, snapshot, refund, domain.refunded_order(order, decision, now))
            snapshot = await self._snapshot(conn, command)
        raise StoreUnavailable("the order kept changing; retry")

    async def _resolve_statements(self, conn) -> "_RefundStatements":
        sequence = sequence_constant(await conn.fetchval(f"SELECT {SEQUENCE_LOOKUP}"))
        self._statements = _RefundStatements(apply_refund(sequence), *refund_at_once(sequence))
        return self._statements

    @staticmethod
    async def _refund_at_once(conn, statements: "_RefundStatements", command: domain.RefundCommand,
                              signed_with: str | None, timestamped: bool = False):
        """_REFUND_AT_ONCE: the RefundResult when it applied; else the order's snapshot as it
        read it (None: no such order) to decide on, CREDENTIALS_CHANGED, or NOT_READ when it
        failed because the balance fell during the statement."""
        now = utc_now()
        statement = statements.at_once_by_id if command.order_id is not None else statements.at_once_by_reference
        try:
            row = await conn.fetchrow(statement, command.merchant_id, command.order_id, command.merchant_reference,
                                      domain.minor_units_by_decimals(command.amount), now, command.amount_text,
                                      signed_with, timestamped, telemetry.REQUEST_ID.get())
        except asyncpg.NotNullViolationError:
            return NOT_READ  # the balance fell below the amount during the statement
        values = tuple(row)
        if not values[0]:
            return CREDENTIALS_CHANGED
        snapshot, applied = values[1:1 + _SNAPSHOT_COLUMNS], values[1 + _SNAPSHOT_COLUMNS:]
        if applied[0] is None:
            return _snapshot_of(snapshot) if snapshot[0] is not None else None
        order, amount, refund_id, masked_pan, stan = _order(applied), *applied[9:]
        refund = domain.Transaction(refund_id, order.merchant_id, order.id, "REFUND", order.currency, amount,
                                    "SUCCESS", masked_pan, stan, now)
        return domain.RefundResult(domain.ResponseCode.SUCCESS, "SUCCESS", order, refund)

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
            balance = await conn.fetchval(CREDIT_SALE, sale.merchant_id, sale.currency, sale.amount)
            if balance > domain.MAX_MINOR_UNITS:  # leaving the block rolls the sale back
                raise domain.InvalidAmount(BALANCE_TOO_LARGE)
            await conn.execute(JOURNAL, sale.merchant_id, sale.currency, "SALE", sale.amount, balance, sale.order_id,
                               txn["id"], None, now, telemetry.REQUEST_ID.get())
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
        if self.sequencer is not None:
            await self.sequencer.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._pool.close(), 5)
