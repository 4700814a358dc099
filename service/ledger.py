"""The ledger, as operators and auditors use it: journaled balance adjustments,
the settlements paid out, and `verify`, which proves every balance from the
journal.

The journal (`ledger_entries`, see service/schema.py) is written by the
stores in the same transaction as every balance change; this module only
reads it, except for an adjustment, which it writes the same way: balance,
adjustment row and entry in one transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa

from service import db, domain, schema


class LedgerRefused(Exception):
    """An adjustment the ledger refuses; nothing was written."""


@dataclass(frozen=True)
class Adjustment:
    adjustment_id: str
    merchant_id: int
    currency: str
    amount: int  # signed minor units: a credit is positive
    balance_after: int
    reason: str
    created_at: datetime


def parse_signed_amount(text: str, currency: str) -> int:
    """Minor units of "-12.50" or "12.50" (a leading "+" allowed): the amount
    grammar of domain.AMOUNT_TEXT with a sign; zero is refused."""
    sign = -1 if text.startswith("-") else 1
    return sign * domain.to_minor(text[1:] if text[:1] in "+-" else text, currency)


def adjust_balance(engine: sa.Engine, merchant_id: int, currency: str, amount: int, reason: str,
                   adjustment_id: str | None = None) -> tuple[Adjustment, bool]:
    """Credit (amount > 0) or debit a merchant's unsettled balance, with its
    adjustment row and journal entry, in one transaction. Idempotent by
    `adjustment_id` (a new one when None): the same adjustment again returns
    the stored one and moves nothing; (adjustment, whether this call made it).
    LedgerRefused for another adjustment under the same id, an unknown
    merchant, or a balance that would leave [0, domain.MAX_MINOR_UNITS]."""
    adjustment_id = adjustment_id or f"adj-{uuid.uuid4()}"
    try:
        return _adjust(engine, merchant_id, currency, amount, reason, adjustment_id)
    except sa.exc.IntegrityError:  # the same id, made by a concurrent command that committed first
        return _adjust(engine, merchant_id, currency, amount, reason, adjustment_id)


def _adjust(engine: sa.Engine, merchant_id: int, currency: str, amount: int, reason: str,
            adjustment_id: str) -> tuple[Adjustment, bool]:
    adjustments, balances = schema.balance_adjustments, schema.balances
    now = datetime.now(UTC)
    with engine.begin() as conn:
        stored = conn.execute(sa.select(adjustments).where(adjustments.c.adjustment_id == adjustment_id)).first()
        if stored is not None:
            if (stored.merchant_id, stored.currency, stored.amount) != (merchant_id, currency, amount):
                raise LedgerRefused(f"adjustment {adjustment_id} was made before for another merchant, currency "
                                    "or amount; nothing changed")
            return Adjustment(*stored[:6], _utc(stored.created_at)), False
        if conn.execute(sa.select(schema.merchants.c.id).where(schema.merchants.c.id == merchant_id)).first() is None:
            raise LedgerRefused(f"no merchant {merchant_id}")
        where = (balances.c.merchant_id == merchant_id, balances.c.currency == currency)
        after = conn.execute(
            balances.update().where(*where, balances.c.unsettled + amount >= 0,
                                    balances.c.unsettled + amount <= domain.MAX_MINOR_UNITS)
            .values(unsettled=balances.c.unsettled + amount).returning(balances.c.unsettled)).scalar()
        if after is None:
            current = conn.execute(sa.select(balances.c.unsettled).where(*where)).scalar()
            if current is not None or amount < 0:
                shown = domain.format_minor(current or 0, currency)
                raise LedgerRefused(f"the {currency} balance of merchant {merchant_id} is {shown}: adjusting it by "
                                    f"{domain.format_minor(amount, currency)} would take it below zero or above "
                                    f"{domain.format_minor(domain.MAX_MINOR_UNITS, currency)}; nothing changed")
            conn.execute(balances.insert().values(merchant_id=merchant_id, currency=currency, unsettled=amount))
            after = amount
        made = Adjustment(adjustment_id, merchant_id, currency, amount, after, reason, now)
        conn.execute(adjustments.insert().values(**made.__dict__))
        conn.execute(schema.ledger_entries.insert().values(
            merchant_id=merchant_id, currency=currency, kind="ADJUSTMENT", amount=amount, balance_after=after,
            adjustment_id=adjustment_id, created_at=now))
    return made, True


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def settlements(engine: sa.Engine, merchant_id: int | None = None, limit: int = 100) -> list:
    """The newest settlements, of one merchant or all."""
    table = schema.settlements
    query = sa.select(table).order_by(table.c.created_at.desc(), table.c.settlement_id).limit(limit)
    if merchant_id is not None:
        query = query.where(table.c.merchant_id == merchant_id)
    with engine.connect() as conn:
        return conn.execute(query).all()


# -- verify --------------------------------------------------------------------
#
# Each check is one query that the database runs over whole tables and that
# returns only discrepancies (at most EXAMPLES of each), so verify streams
# through any number of orders in the database's memory, not ours.

EXAMPLES = 20

_CHECKS = {
    "every balance equals the sum of its journal entries": """
        SELECT 'merchant ' || b.merchant_id || ' ' || b.currency || ': balance ' || b.unsettled
               || ', journal sums to ' || COALESCE(s.total, 0)
        FROM balances b
        LEFT JOIN (SELECT merchant_id, currency, SUM(amount) AS total FROM ledger_entries
                   GROUP BY merchant_id, currency) s ON s.merchant_id = b.merchant_id AND s.currency = b.currency
        WHERE COALESCE(s.total, 0) <> b.unsettled
        UNION ALL
        SELECT 'merchant ' || e.merchant_id || ' ' || e.currency || ': journal entries but no balance'
        FROM ledger_entries e
        WHERE NOT EXISTS (SELECT 1 FROM balances b WHERE b.merchant_id = e.merchant_id AND b.currency = e.currency)
        GROUP BY e.merchant_id, e.currency""",
    "every entry's balance_after is the previous one's plus its amount": """
        SELECT 'entry ' || id || ' (merchant ' || merchant_id || ' ' || currency || '): ' || COALESCE(previous, 0)
               || ' + ' || amount || ' is not its balance_after ' || balance_after
        FROM (SELECT e.*, LAG(balance_after) OVER (PARTITION BY merchant_id, currency ORDER BY id) AS previous
              FROM ledger_entries e) chained
        WHERE COALESCE(previous, 0) + amount <> balance_after""",
    "every entry matches its cause": """
        SELECT 'entry ' || e.id || ' (' || e.kind || ', ' || e.amount || '): its '
               || CASE WHEN e.kind IN ('SALE', 'REFUND') THEN 'transaction ' || COALESCE(e.transaction_id, 0)
                       WHEN e.kind = 'SETTLEMENT' THEN 'settlement ' || COALESCE(e.settlement_id, '?')
                       WHEN e.kind = 'ADJUSTMENT' THEN 'adjustment ' || COALESCE(e.adjustment_id, '?')
                       ELSE 'cause' END || ' is missing or differs'
        FROM ledger_entries e
        LEFT JOIN transactions t ON t.id = e.transaction_id
        LEFT JOIN settlements s ON s.settlement_id = e.settlement_id
        LEFT JOIN balance_adjustments j ON j.adjustment_id = e.adjustment_id
        WHERE CASE e.kind
            WHEN 'SALE' THEN t.id IS NULL OR t.type <> 'SALE' OR e.amount <> t.amount
                OR t.merchant_id <> e.merchant_id OR t.currency <> e.currency OR t.order_id <> e.order_id
            WHEN 'REFUND' THEN t.id IS NULL OR t.type <> 'REFUND' OR e.amount <> -t.amount
                OR t.merchant_id <> e.merchant_id OR t.currency <> e.currency OR t.order_id <> e.order_id
            WHEN 'SETTLEMENT' THEN s.settlement_id IS NULL OR e.amount <> -s.amount
                                 OR e.balance_after <> s.balance_after
                OR s.merchant_id <> e.merchant_id OR s.currency <> e.currency
            WHEN 'ADJUSTMENT' THEN j.adjustment_id IS NULL OR e.amount <> j.amount
                OR e.balance_after <> j.balance_after OR j.merchant_id <> e.merchant_id OR j.currency <> e.currency
            ELSE e.transaction_id IS NOT NULL OR e.settlement_id IS NOT NULL OR e.adjustment_id IS NOT NULL
        END""",
    "every refund, settlement and adjustment has its journal entry": """
        SELECT 'refund transaction ' || t.id || ' (order ' || t.order_id || ') has no journal entry'
        FROM transactions t
        WHERE t.type = 'REFUND' AND NOT EXISTS (SELECT 1 FROM ledger_entries e WHERE e.transaction_id = t.id)
        UNION ALL
        SELECT 'settlement ' || s.settlement_id || ' has no journal entry' FROM settlements s
        WHERE NOT EXISTS (SELECT 1 FROM ledger_entries e WHERE e.settlement_id = s.settlement_id)
        UNION ALL
        SELECT 'adjustment ' || j.adjustment_id || ' has no journal entry' FROM balance_adjustments j
        WHERE NOT EXISTS (SELECT 1 FROM ledger_entries e WHERE e.adjustment_id = j.adjustment_id)""",
    "every order's status agrees with its refund": """
        SELECT 'order ' || o.id || ' (' || o.status || ', amount ' || o.amount || '): '
               || COALESCE(r.refunds, 0) || ' refund(s) of ' || COALESCE(r.total, 0) || ' in all'
        FROM orders o
        LEFT JOIN (SELECT order_id, COUNT(*) AS refunds, SUM(amount) AS total, MIN(merchant_id) AS merchant_id,
                          MAX(merchant_id) AS other_merchant, MIN(currency) AS currency, MAX(currency) AS other_currency
                   FROM transactions WHERE type = 'REFUND' GROUP BY order_id) r ON r.order_id = o.id
        WHERE (r.refunds IS NOT NULL AND (
                  r.refunds > 1 OR r.total > o.amount
               OR r.merchant_id <> o.merchant_id OR r.other_merchant <> o.merchant_id
               OR r.currency <> o.currency OR r.other_currency <> o.currency
               OR (r.total = o.amount AND o.status <> 'REFUNDED')
               OR (r.total < o.amount AND o.status <> 'PARTIALLY_REFUNDED')))
           OR (r.refunds IS NULL AND o.status IN ('REFUNDED', 'PARTIALLY_REFUNDED') AND EXISTS (
                  SELECT 1 FROM ledger_entries e WHERE e.order_id = o.id AND e.kind = 'SALE'))""",
    "every approved attempt names its refund, and every refund has one": """
        SELECT 'approved attempt ' || a.id || ' (order ' || COALESCE(a.order_id, 0) || ') names transaction '
               || COALESCE(a.transaction_id, 0) || ', which is not a refund of that order'
        FROM refund_attempts a LEFT JOIN transactions t ON t.id = a.transaction_id
        WHERE a.response_code = '0000'
          AND (t.id IS NULL OR t.type <> 'REFUND' OR t.order_id IS DISTINCT FROM a.order_id)
        UNION ALL
        SELECT 'refund transaction ' || t.id || ' has ' || COALESCE(a.approvals, 0) || ' approved attempts, not 1'
        FROM transactions t
        LEFT JOIN (SELECT transaction_id, COUNT(*) AS approvals FROM refund_attempts WHERE response_code = '0000'
                   GROUP BY transaction_id) a ON a.transaction_id = t.id
        WHERE t.type = 'REFUND' AND COALESCE(a.approvals, 0) <> 1""",
}

_COUNTS = {
    "balances": "SELECT COUNT(*) FROM balances",
    "journal entries": "SELECT COUNT(*) FROM ledger_entries",
    "orders": "SELECT COUNT(*) FROM orders",
    "transactions": "SELECT COUNT(*) FROM transactions",
    "settlements": "SELECT COUNT(*) FROM settlements",
    "adjustments": "SELECT COUNT(*) FROM balance_adjustments",
    "refund attempts": "SELECT COUNT(*) FROM refund_attempts",
}


@dataclass
class Verification:
    counts: dict[str, int] = field(default_factory=dict)
    discrepancies: dict[str, list[str]] = field(default_factory=dict)  # check -> examples (at most EXAMPLES)

    @property
    def holds(self) -> bool:
        return not any(self.discrepancies.values())


def _snapshot_engine(url: str) -> sa.Engine:
    """An engine whose transactions read one snapshot and take no write lock:
    REPEATABLE READ, READ ONLY on PostgreSQL; a deferred BEGIN on SQLite (whose
    WAL gives the reader a snapshot while the service goes on writing)."""
    if url.startswith("sqlite"):
        return db.make_engine(url, sqlite_begin="BEGIN")
    return sa.create_engine(url, isolation_level="REPEATABLE READ", execution_options={"postgresql_readonly": True})


def verify(url: str) -> Verification:
    """Run every check in one read-only snapshot of the database at `url`."""
    result = Verification()
    engine = _snapshot_engine(url)
    try:
        with engine.connect() as conn:
            _run_checks(conn, result)
    finally:
        engine.dispose()
    return result


def _run_checks(conn, result: Verification) -> None:
    for name, query in _COUNTS.items():
        result.counts[name] = conn.execute(sa.text(query)).scalar_one()
    for check, query in _CHECKS.items():
        rows = conn.execute(sa.text(f"SELECT * FROM ({query}) found LIMIT {EXAMPLES + 1}")).scalars().all()
        result.discrepancies[check] = list(rows)
