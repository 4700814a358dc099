"""SQLite store: the embedded default.

SQLite allows one writer at a time, so the service runs every statement on one
dedicated thread with one connection (WAL journal, `synchronous=NORMAL`), and
each write transaction starts with BEGIN IMMEDIATE: it takes the write lock
before reading, and other processes on the same file (refund-admin) wait on
`busy_timeout` instead of failing with "database is locked". A refund is read
in one call and applied in another, guarded like PostgreSQL's: the order is
marked only in the status that was read, the balance debited only while it
covers the amount; behind them stand the unique refund index and the balance check.
Reads and applies that arrive while one runs go to the thread together
(group_commit.py): reads in one trip, applies in one trip and one BEGIN
IMMEDIATE, each under a savepoint of its own.

One adapter, every method of the port (refund steps,
queries, idempotency, sales, settlements) in one place, as in postgres.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import sqlite3
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, replace
from datetime import UTC, datetime

from sqlalchemy.engine import make_url

from service import domain, telemetry, tracing
from service.clock import utc_now
from service.stores import sql
from service.stores.group_commit import GroupCommit
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
    stan_for,
)
from service.stores.sql import ORDER_COLUMNS, SETTLEMENT_COLUMNS, TRANSACTION_COLUMNS

# The order, its payment method's capability, the balance and the order's
# refund if it has one (at most one: uq_one_refund_per_order), in one read.
SNAPSHOT = f"""
SELECT {ORDER_COLUMNS}, pm.refund_capability, COALESCE(b.unsettled, 0), {TRANSACTION_COLUMNS}
FROM orders o
JOIN payment_methods pm ON pm.code = o.payment_method
LEFT JOIN balances b ON b.merchant_id = o.merchant_id AND b.currency = o.currency
LEFT JOIN transactions t ON t.order_id = o.id AND t.type = {sql.REFUND}
WHERE o.merchant_id = ? AND """

# The credentials a signed request was verified with still hold: its key is
# active, its merchant ACTIVE and, unless the request is timestamped, not
# requiring a timestamp.
CREDENTIALS_HOLD = """
SELECT 1 FROM merchants m JOIN merchant_keys k ON k.merchant_id = m.id
WHERE m.id = ? AND m.status = 'ACTIVE' AND (NOT m.require_timestamp OR ?) AND k.key_id = ? AND k.active"""

# Marks the order only in the status the decision read, and only a refundable one.
MARK_REFUNDED = ("UPDATE orders SET status = ?, update_time = ? WHERE id = ? AND merchant_id = ? AND status = ? "
                 f"AND {sql.refundable('status')}")

DEBIT = """
UPDATE balances SET unsettled = unsettled - ? WHERE merchant_id = ? AND currency = ? AND unsettled >= ?
RETURNING unsettled"""

JOURNAL = """
INSERT INTO ledger_entries (merchant_id, currency, kind, amount, balance_after, order_id, transaction_id,
                            settlement_id, created_at, request_id)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""

# A new refund's id (one writer: the next after the largest) and its sale's
# masked card number ('' when the sale has none), in one read.
NEW_REFUND = f"""
SELECT (SELECT COALESCE(MAX(id), 0) + 1 FROM transactions),
       COALESCE((SELECT masked_pan FROM transactions WHERE order_id = ? AND type = {sql.SALE} LIMIT 1), '')"""

AUDIT = """
INSERT INTO refund_attempts (merchant_id, order_id, merchant_reference, amount, response_code, transaction_id,
    created_at)
VALUES (?, ?, ?, ?, ?, ?, ?)"""


def to_text(moment: datetime) -> str:
    """SQLAlchemy's SQLite datetime format, in UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def from_text(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _order(row) -> domain.Order:
    return domain.Order(*row[:7], from_text(row[7]), from_text(row[8]))


def _transaction(row) -> domain.Transaction:
    return domain.Transaction(*row[:9], from_text(row[9]))


def connect(path: str, timeout: float = 5.0) -> sqlite3.Connection:
    """A connection to the existing database file `path` (never creating one: that is
    `refund-admin migrate`'s job; a missing file is sqlite3.OperationalError)."""
    connection = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=rw", uri=True, timeout=timeout,
                                 isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    return connection


class _WriteTransaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""

    def __init__(self, connection: sqlite3.Connection):
        self.connection = connection

    def __enter__(self) -> sqlite3.Connection:
        self.connection.execute("BEGIN IMMEDIATE")
        return self.connection

    def __exit__(self, exc_type, exc, tb):
        self.connection.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


_APPLY, _READ = "apply", "read"  # the kinds of work batched here (group_commit)


class SqliteStore:
    def __init__(self, path: str, timeout: float):
        self._path = path
        self._timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._connection: sqlite3.Connection | None = None
        # One writer: one lane. The applies that arrive while one runs go in one
        # trip to the thread and one write transaction (_apply_many).
        self.group_commit = GroupCommit(self._apply_alone, self._apply_together, lanes=1,
                                        stopped=lambda: StoreUnavailable("closing"))
        # The refunds' reads likewise: those that arrive while one runs go in one trip.
        self.reads = GroupCommit(self._read_alone, self._read_together, lanes=1,
                                 stopped=lambda: StoreUnavailable("closing"))

    @classmethod
    def open(cls, url: str, *, command_timeout: float = 5.0, **_ignored) -> SqliteStore:
        database = make_url(url).database
        if not database or database == ":memory:":
            raise ValueError("the SQLite URL must name a file, e.g. sqlite:///refund.db")
        return cls(database, command_timeout)

    async def _run(self, function, *args):
        """Run `function(connection, *args)` on the SQLite thread."""
        loop = asyncio.get_running_loop()
        call = self._call
        if tracing.ENABLED:  # the statements' spans belong to the caller's trace: its context goes along
            call = functools.partial(contextvars.copy_context().run, self._call)
        try:
            return await loop.run_in_executor(self._executor, call, function, args)
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(str(exc)) from None

    def _call(self, function, args):
        if self._connection is None:
            self._connection = tracing.traced_sqlite(connect(self._path, self._timeout))
        return function(self._connection, *args)

    # -- refunds: the steps of service/usecases/refunds.py --------------------

    async def try_refund(self, command: domain.RefundCommand, signed_by: SignedBy | None) -> Attempt:
        """SQLite has no one-statement refund: check the credentials and read the
        snapshot (with the reads that arrive meanwhile, in one trip to the thread)."""
        return await self.reads.run(command.merchant_id, _READ, (command, signed_by))

    async def _read_alone(self, _statement, args) -> Attempt:
        return await self._run(self._try_refund, *args)

    async def _read_together(self, _statement, many: list[tuple]) -> list[Attempt]:
        return await self._run(self._try_many, many)

    @classmethod
    def _try_many(cls, db: sqlite3.Connection, many: list[tuple]) -> list[Attempt]:
        return [cls._try_refund(db, command, signed_by) for command, signed_by in many]

    @classmethod
    def _try_refund(cls, db: sqlite3.Connection, command: domain.RefundCommand, signed_by: SignedBy | None) -> Attempt:
        if signed_by is not None and not _credentials_hold(db, command.merchant_id, signed_by):
            return Attempt(interrupted=Interrupted.CREDENTIALS_CHANGED)
        return Attempt(snapshot=cls._read_snapshot(db, command))

    async def read_snapshot(self, command: domain.RefundCommand) -> domain.OrderSnapshot | None:
        return await self._run(self._read_snapshot, command)

    @staticmethod
    def _read_snapshot(db: sqlite3.Connection, command: domain.RefundCommand) -> domain.OrderSnapshot | None:
        if command.order_id is not None:
            row = db.execute(SNAPSHOT + "o.id = ?", (command.merchant_id, command.order_id)).fetchone()
        else:
            row = db.execute(SNAPSHOT + "o.merchant_reference = ?",
                             (command.merchant_id, command.merchant_reference)).fetchone()
        if row is None:
            return None
        refund = _transaction(row[11:]) if row[11] is not None else None
        return domain.OrderSnapshot(_order(row), row[9], row[10], refund)

    async def apply_refund(self, command: domain.RefundCommand, decision: domain.Decision,
                           snapshot: domain.OrderSnapshot, signed_by: SignedBy | None) \
            -> domain.Transaction | Interrupted:
        return await self.group_commit.run(command.merchant_id, _APPLY,
                                           (command, decision, snapshot, signed_by, telemetry.REQUEST_ID.get()))

    async def _apply_alone(self, _statement, args) -> domain.Transaction | Interrupted:
        [result] = await self._run(self._apply_many, [args])
        return result

    async def _apply_together(self, _statement, many: list[tuple]) -> list | None:
        """Each apply's result, in one write transaction; None when it was rolled
        back as a whole (then each runs again alone)."""
        try:
            return await self._run(self._apply_many, many)
        except sqlite3.IntegrityError:
            return None

    @staticmethod
    def _apply_many(connection: sqlite3.Connection, many: list[tuple]) -> list:
        """Apply each of `many` in one write transaction: one whose credentials no
        longer hold writes nothing, one whose order or balance moved since its read
        is rolled back to its own savepoint."""
        results = []
        with _WriteTransaction(connection) as db:
            for command, decision, snapshot, signed_by, request_id in many:
                if signed_by is not None and not _credentials_hold(db, command.merchant_id, signed_by):
                    results.append(Interrupted.CREDENTIALS_CHANGED)
                    continue
                db.execute("SAVEPOINT one_refund")
                try:
                    results.append(_insert_refund(db, command, decision, snapshot.order, utc_now(), request_id))
                except _StateMoved:
                    db.execute("ROLLBACK TO one_refund")
                    results.append(Interrupted.STATE_MOVED)
                db.execute("RELEASE one_refund")
        return results

    async def record_decline(self, command: domain.RefundCommand, decision: domain.Decision,
                             snapshot: domain.OrderSnapshot | None) -> None:
        order_id = snapshot.order.id if snapshot else command.order_id
        await self._run(self._record_decline, (command.merchant_id, order_id, command.merchant_reference,
                                               command.amount_text, decision.code.value, None, to_text(utc_now())))

    @staticmethod
    def _record_decline(db: sqlite3.Connection, values: tuple) -> None:
        db.execute(AUDIT, values)

    # -- reads ---------------------------------------------------------------

    async def get_order(self, merchant_id, order_id, merchant_reference):
        return await self._run(self._get_order, merchant_id, order_id, merchant_reference)

    @staticmethod
    def _get_order(db, merchant_id, order_id, merchant_reference):
        if order_id is not None:
            row = db.execute(f"SELECT {ORDER_COLUMNS} FROM orders o WHERE o.merchant_id = ? AND o.id = ?",
                             (merchant_id, order_id)).fetchone()
        else:
            row = db.execute(f"SELECT {ORDER_COLUMNS} FROM orders o "
                             "WHERE o.merchant_id = ? AND o.merchant_reference = ?",
                             (merchant_id, merchant_reference)).fetchone()
        if row is None:
            return None
        order = _order(row)
        rows = db.execute(f"SELECT {TRANSACTION_COLUMNS} FROM transactions t WHERE t.order_id = ? ORDER BY t.id",
                          (order.id,)).fetchall()
        return order, [_transaction(r) for r in rows]

    async def merchant_credentials(self, merchant_id: int) -> MerchantCredentials | None:
        return await self._run(self._merchant_credentials, merchant_id)

    @staticmethod
    def _merchant_credentials(db, merchant_id):
        rows = db.execute(
            """SELECT m.status, k.public_key_pem, m.require_timestamp, k.key_id FROM merchants m
               LEFT JOIN merchant_keys k ON k.merchant_id = m.id AND k.active
               WHERE m.id = ? ORDER BY k.created_at DESC""", (merchant_id,)).fetchall()
        if not rows:
            return None
        keys = [r for r in rows if r[1]]
        return MerchantCredentials(rows[0][0], tuple(r[1] for r in keys), bool(rows[0][2]), tuple(r[3] for r in keys))

    # -- Idempotency-Key and replay window (only for requests that carry them) --

    async def claim_idempotency(self, merchant_id, key, request_hash, now, stale_before) -> Claim:
        return await self._run(self._claim_idempotency, merchant_id, key, request_hash, now, stale_before)

    @staticmethod
    def _claim_idempotency(connection, merchant_id, key, request_hash, now, stale_before):
        with _WriteTransaction(connection) as db:  # the write lock: one claimer at a time
            row = db.execute("SELECT request_hash, response, created_at FROM idempotency_keys "
                             "WHERE merchant_id = ? AND idempotency_key = ?", (merchant_id, key)).fetchone()
            if row is None:
                db.execute("INSERT INTO idempotency_keys (merchant_id, idempotency_key, request_hash, response, "
                           "created_at) VALUES (?, ?, ?, NULL, ?)", (merchant_id, key, request_hash, to_text(now)))
                return Claim(ClaimState.CLAIMED, claimed_at=now)
            claim = judge_claim(row[0], row[1], from_text(row[2]), request_hash, stale_before)
            if claim is not None:
                return claim
            db.execute("UPDATE idempotency_keys SET created_at = ? WHERE merchant_id = ? AND idempotency_key = ?",
                       (to_text(now), merchant_id, key))
            return Claim(ClaimState.CLAIMED, claimed_at=now)

    async def finish_idempotency(self, merchant_id, key, claimed_at, response) -> None:
        await self._run(self._finish_idempotency, merchant_id, key, claimed_at, response)

    @staticmethod
    def _finish_idempotency(connection, merchant_id, key, claimed_at, response):
        mine = "merchant_id = ? AND idempotency_key = ? AND created_at = ? AND response IS NULL"
        with _WriteTransaction(connection) as db:
            if response is None:
                db.execute(f"DELETE FROM idempotency_keys WHERE {mine}", (merchant_id, key, to_text(claimed_at)))
            else:
                db.execute(f"UPDATE idempotency_keys SET response = ? WHERE {mine}",
                           (response, merchant_id, key, to_text(claimed_at)))

    async def remember_request(self, request_hash, merchant_id, expires_at) -> bool:
        return await self._run(self._remember_request, request_hash, merchant_id, expires_at)

    @staticmethod
    def _remember_request(connection, request_hash, merchant_id, expires_at):
        with _WriteTransaction(connection) as db:
            return db.execute("INSERT INTO request_replays (request_hash, merchant_id, expires_at) VALUES (?, ?, ?) "
                              "ON CONFLICT DO NOTHING", (request_hash, merchant_id, to_text(expires_at))).rowcount == 1

    # -- sales and settlements -----------------------------------------------

    async def record_sale(self, sale: Sale):
        return await self._run(self._record_sale, sale, telemetry.REQUEST_ID.get())

    @staticmethod
    def _record_sale(connection, sale: Sale, request_id: str | None = None):
        now = utc_now()
        with _WriteTransaction(connection) as db:
            known = db.execute(
                "SELECT (SELECT 1 FROM merchants WHERE id = ?), (SELECT 1 FROM payment_methods WHERE code = ?)",
                (sale.merchant_id, sale.payment_method)).fetchone()
            if known != (1, 1):
                raise domain.InvalidRequest("unknown merchant or payment method")
            existing = db.execute(
                f"SELECT {ORDER_COLUMNS} FROM orders o "
                "WHERE o.id = ? OR (o.merchant_id = ? AND o.merchant_reference = ?)",
                (sale.order_id, sale.merchant_id, sale.merchant_reference)).fetchone()
            if existing is not None:
                order = _order(existing)
                if not same_sale(order, sale):
                    raise SaleConflict("order id or merchant reference already used by another order")
                txn = db.execute(f"SELECT {TRANSACTION_COLUMNS} FROM transactions t "
                                 "WHERE t.order_id = ? AND t.type = 'SALE'",
                                 (order.id,)).fetchone()
                balance = db.execute("SELECT unsettled FROM balances WHERE merchant_id = ? AND currency = ?",
                                     (order.merchant_id, order.currency)).fetchone()
                return order, _transaction(txn), balance[0] if balance else 0
            created = to_text(sale.create_time)
            db.execute(
                "INSERT INTO orders (id, merchant_id, merchant_reference, currency, amount, status, payment_method,"
                " create_time, update_time) VALUES (?, ?, ?, ?, ?, 'SUCCESS', ?, ?, ?)",
                (sale.order_id, sale.merchant_id, sale.merchant_reference, sale.currency, sale.amount,
                 sale.payment_method, created, created))
            txn_id = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM transactions").fetchone()[0]
            txn = domain.Transaction(txn_id, sale.merchant_id, sale.order_id, "SALE", sale.currency, sale.amount,
                                     "SUCCESS", sale.masked_pan, sale.stan, now)
            db.execute("INSERT INTO transactions (id, order_id, merchant_id, type, currency, amount, status, "
                       "masked_pan, stan, create_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _transaction_values(txn))
            before = db.execute("SELECT unsettled FROM balances WHERE merchant_id = ? AND currency = ?",
                                (sale.merchant_id, sale.currency)).fetchone()
            balance = (before[0] if before else 0) + sale.amount
            if balance > domain.MAX_MINOR_UNITS:  # leaving the block rolls the sale back
                raise domain.InvalidAmount(BALANCE_TOO_LARGE)
            db.execute(
                "INSERT INTO balances (merchant_id, currency, unsettled) VALUES (?, ?, ?) ON CONFLICT (merchant_id, "
                "currency) DO UPDATE SET unsettled = unsettled + excluded.unsettled",
                (sale.merchant_id, sale.currency, sale.amount))
            db.execute(JOURNAL, (sale.merchant_id, sale.currency, "SALE", sale.amount, balance, sale.order_id, txn_id,
                                 None, to_text(now), request_id))
            order = domain.Order(sale.order_id, sale.merchant_id, sale.merchant_reference, sale.currency, sale.amount,
                                 "SUCCESS", sale.payment_method, from_text(created), from_text(created))
            return order, txn, balance

    async def settle(self, settlement: Settlement) -> tuple[Settlement, bool]:
        return await self._run(self._settle, settlement, telemetry.REQUEST_ID.get())

    @staticmethod
    def _settle(connection, settlement: Settlement, request_id: str | None = None) -> tuple[Settlement, bool]:
        with _WriteTransaction(connection) as db:
            stored = db.execute(f"SELECT {SETTLEMENT_COLUMNS} FROM settlements WHERE settlement_id = ?",
                                (settlement.settlement_id,)).fetchone()
            if stored is not None:
                return same_settlement(Settlement(*stored[:5], from_text(stored[5])), settlement), False
            debited = db.execute(DEBIT, (settlement.amount, settlement.merchant_id, settlement.currency,
                                         settlement.amount)).fetchone()
            if debited is None:
                raise InsufficientBalance("the unsettled balance is lower than the amount")
            made = replace(settlement, balance_after=debited[0])
            db.execute(f"INSERT INTO settlements ({SETTLEMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                       (*astuple(made)[:5], to_text(made.created_at)))
            db.execute(JOURNAL, (made.merchant_id, made.currency, "SETTLEMENT", -made.amount, made.balance_after,
                                 None, None, made.settlement_id, to_text(made.created_at), request_id))
            return made, True

    async def ping(self) -> None:
        await self._run(lambda db: db.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        def _close(db):
            db.close()

        await self.group_commit.close()
        await self.reads.close()
        if self._connection is not None:
            await self._run(_close)
            self._connection = None
        self._executor.shutdown(wait=True)


def _transaction_values(txn: domain.Transaction, create_time: str | None = None) -> tuple:
    """The columns of `txn`; `create_time`, when given, is its time already as text."""
    return (txn.id, txn.order_id, txn.merchant_id, txn.type, txn.currency, txn.amount, txn.status, txn.masked_pan,
            txn.stan, create_time or to_text(txn.create_time))


class _StateMoved(Exception):
    """The order or the balance is no longer what the decision read."""


def _credentials_hold(db: sqlite3.Connection, merchant_id: int, signed_by: SignedBy) -> bool:
    return db.execute(CREDENTIALS_HOLD, (merchant_id, signed_by.timestamped, signed_by.key_id)).fetchone() is not None


def _insert_refund(db: sqlite3.Connection, command: domain.RefundCommand, decision: domain.Decision,
                   order: domain.Order, now: datetime, request_id: str | None) -> domain.Transaction:
    """Mark the order (only in the status read), debit the balance (only while it
    covers the amount), insert the refund, its audit row and journal entry;
    _StateMoved when the order or the balance moved since the read."""
    at = to_text(now)
    marked = db.execute(MARK_REFUNDED, (decision.new_status, at, order.id, order.merchant_id,
                                        order.status)).rowcount
    debited = db.execute(DEBIT, (decision.amount, order.merchant_id, order.currency, decision.amount)).fetchone() \
        if marked else None
    if debited is None:
        raise _StateMoved()
    refund_id, sale_pan = db.execute(NEW_REFUND, (order.id,)).fetchone()
    refund = domain.Transaction(refund_id, order.merchant_id, order.id, domain.REFUND, order.currency,
                                decision.amount, domain.TRANSACTION_SUCCEEDED, sale_pan, stan_for(refund_id), now)
    db.execute(
        "INSERT INTO transactions (id, order_id, merchant_id, type, currency, amount, status, masked_pan, stan,"
        " create_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _transaction_values(refund, at))
    db.execute(AUDIT, (command.merchant_id, order.id, command.merchant_reference, command.amount_text,
                       decision.code.value, refund_id, at))
    db.execute(JOURNAL, (order.merchant_id, order.currency, domain.REFUND, -decision.amount, debited[0], order.id,
                         refund_id, None, at, request_id))
    return refund

