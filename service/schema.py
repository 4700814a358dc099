"""The database schema, as SQLAlchemy Core tables.

Alembic migrations (service/migrations) create it; the admin commands use these
tables with SQLAlchemy Core. The refund path does not build SQLAlchemy objects
per request: the stores run a few fixed statements over the raw driver.

The database enforces what must never happen, whatever the code above it does:
- one REFUND transaction per order (unique partial index `uq_one_refund_per_order`);
- no negative balance (`ck_balance_not_negative`), none above domain.MAX_MINOR_UNITS;
- money as integer minor units (BIGINT; on SQLite, triggers refuse any value
  that is not an integer, which SQLite would otherwise store as REAL or TEXT);
- the journal is append-only (triggers refuse UPDATE and DELETE), with one
  entry per transaction, settlement and adjustment (unique indexes).
"""

import sqlalchemy as sa

from service.domain import MAX_MINOR_UNITS

metadata = sa.MetaData()

payment_methods = sa.Table(
    "payment_methods",
    metadata,
    sa.Column("code", sa.String(32), primary_key=True),
    sa.Column("refund_capability", sa.String(20), nullable=False),
    sa.CheckConstraint(
        "refund_capability IN ('NONE', 'FULL_ONLY', 'FULL_AND_PARTIAL')", name="ck_refund_capability"
    ),
)

merchants = sa.Table(
    "merchants",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    # Signed requests without a `timestamp` are refused (docs/api.md section 7).
    sa.Column("require_timestamp", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.CheckConstraint("status IN ('ACTIVE', 'SUSPENDED')", name="ck_merchant_status"),
)

merchant_keys = sa.Table(
    "merchant_keys",
    metadata,
    sa.Column("merchant_id", sa.BigInteger, sa.ForeignKey("merchants.id"), primary_key=True),
    sa.Column("key_id", sa.String(64), primary_key=True),
    sa.Column("public_key_pem", sa.Text, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

balances = sa.Table(
    "balances",
    metadata,
    sa.Column("merchant_id", sa.BigInteger, sa.ForeignKey("merchants.id"), primary_key=True),
    sa.Column("currency", sa.String(3), primary_key=True),
    sa.Column("unsettled", sa.BigInteger, nullable=False),
    sa.CheckConstraint("unsettled >= 0", name="ck_balance_not_negative"),
    sa.CheckConstraint(f"unsettled <= {MAX_MINOR_UNITS}", name="ck_balance_within_bound"),
)

orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("merchant_id", sa.BigInteger, sa.ForeignKey("merchants.id"), nullable=False),
    sa.Column("merchant_reference", sa.String(128), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("payment_method", sa.String(32), sa.ForeignKey("payment_methods.code"), nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("merchant_id", "merchant_reference", name="uq_order_reference"),
    sa.CheckConstraint("amount > 0", name="ck_order_amount_positive"),
    sa.CheckConstraint(
        "status IN ('OPEN', 'SUCCESS', 'SETTLED', 'VOIDED', 'CLOSED', 'REFUNDED', 'PARTIALLY_REFUNDED')",
        name="ck_order_status",
    ),
    # What a transaction's foreign key refers to (migration 0006).
    sa.Index("uq_orders_id_merchant", "id", "merchant_id", unique=True),
    # Room on each page for the refund's status update to stay HOT (migration 0005).
    postgresql_with={"fillfactor": 90},
)

transactions = sa.Table(
    "transactions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("order_id", sa.BigInteger, nullable=False),
    sa.Column("merchant_id", sa.BigInteger, nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("masked_pan", sa.String(19), nullable=False),
    sa.Column("stan", sa.String(6), nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("type IN ('SALE', 'REFUND')", name="ck_transaction_type"),
    sa.CheckConstraint("amount > 0", name="ck_transaction_amount_positive"),
    # A transaction's merchant is its order's merchant (migration 0006): the database
    # refuses one merchant's refund of another's order.
    sa.ForeignKeyConstraint(["order_id", "merchant_id"], ["orders.id", "orders.merchant_id"],
                            name="fk_transactions_order_merchant"),
    sa.Index(
        "uq_one_refund_per_order",
        "order_id",
        unique=True,
        postgresql_where=sa.text("type = 'REFUND'"),
        sqlite_where=sa.text("type = 'REFUND'"),
    ),
    sa.Index("ix_transactions_order", "order_id"),
)

# Every decided refund attempt, approved or declined, with its response code.
refund_attempts = sa.Table(
    "refund_attempts",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("merchant_id", sa.BigInteger, nullable=False),
    sa.Column("order_id", sa.BigInteger, nullable=True),
    sa.Column("merchant_reference", sa.String(128), nullable=True),
    sa.Column("amount", sa.String(64), nullable=False),
    sa.Column("response_code", sa.String(4), nullable=False),
    sa.Column("transaction_id", sa.BigInteger, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

# Idempotency-Key of a merchant (docs/api.md section 7): the hash of the request
# first sent with it and, once decided, its answer (a serialized
# google.rpc.Status). `response` is NULL while that request is in progress.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("merchant_id", sa.BigInteger, primary_key=True),
    sa.Column("idempotency_key", sa.String(64), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("response", sa.LargeBinary, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_idempotency_keys_created_at", "created_at"),
)

# SHA-256 of every signed request that carried a `timestamp`, kept until the
# timestamp is outside the window: the same signed bytes are accepted once.
request_replays = sa.Table(
    "request_replays",
    metadata,
    sa.Column("request_hash", sa.String(64), primary_key=True),
    sa.Column("merchant_id", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_request_replays_expires_at", "expires_at"),
)

# Public keys of the gateway's response-signing keys (`refund-admin gateway-key`);
# the private key is a file given to refund-edge, never stored here.
gateway_keys = sa.Table(
    "gateway_keys",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("public_key_pem", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

# The ledger's journal: every change of an unsettled balance, written in the
# same transaction as the change. A balance is the sum of its entries; each
# entry's balance_after is the previous entry's plus its amount (in id order
# per merchant and currency). Kinds and their causes:
#   OPENING     a balance created by `refund-admin load` (or present when the journal began)
#   SALE        +amount, RecordSale: order_id, transaction_id (the SALE)
#   REFUND      -amount, an approved refund: order_id, transaction_id (the REFUND)
#   SETTLEMENT  -amount, Settle: settlement_id
#   ADJUSTMENT  +/-amount, `refund-admin balance adjust`: adjustment_id
JOURNAL_KINDS = ("OPENING", "SALE", "REFUND", "SETTLEMENT", "ADJUSTMENT")

ledger_entries = sa.Table(
    "ledger_entries",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("merchant_id", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("balance_after", sa.BigInteger, nullable=False),
    sa.Column("order_id", sa.BigInteger, nullable=True),
    sa.Column("transaction_id", sa.BigInteger, nullable=True),
    sa.Column("settlement_id", sa.String(64), nullable=True),
    sa.Column("adjustment_id", sa.String(64), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # The x-request-id of the call that made the movement, when there was one.
    sa.Column("request_id", sa.String(128), nullable=True),
    sa.CheckConstraint("kind IN ('OPENING', 'SALE', 'REFUND', 'SETTLEMENT', 'ADJUSTMENT')", name="ck_entry_kind"),
    sa.CheckConstraint("amount <> 0", name="ck_entry_amount_not_zero"),
    sa.CheckConstraint(f"amount BETWEEN -{MAX_MINOR_UNITS} AND {MAX_MINOR_UNITS}", name="ck_entry_amount_bound"),
    sa.CheckConstraint(f"balance_after BETWEEN 0 AND {MAX_MINOR_UNITS}", name="ck_entry_balance_bound"),
    sa.Index("ix_ledger_entries_balance", "merchant_id", "currency", "id"),
    sa.Index("uq_ledger_entries_transaction", "transaction_id", unique=True),
    # Partial (migration 0005): a refund's or a sale's entry takes no entry in them.
    sa.Index("uq_ledger_entries_settlement", "settlement_id", unique=True,
             postgresql_where=sa.text("settlement_id IS NOT NULL"), sqlite_where=sa.text("settlement_id IS NOT NULL")),
    sa.Index("uq_ledger_entries_adjustment", "adjustment_id", unique=True,
             postgresql_where=sa.text("adjustment_id IS NOT NULL"), sqlite_where=sa.text("adjustment_id IS NOT NULL")),
)

# Every journal entry is an event (docs/events.md, migration 0004). The view
# `events` numbers them: on SQLite its `seq` is the entry's id (one writer at a
# time: ids are assigned in commit order); on PostgreSQL it is the number
# `event_sequence` gave it (service/outbox.py), and each entry also keeps the
# id of the transaction that wrote it (`xact_id`, xid8, by default).
events = sa.Table(
    "events",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("entry_id", sa.BigInteger, nullable=False),
    *(sa.Column(c.name, c.type, nullable=c.nullable) for c in ledger_entries.columns if c.name != "id"),
    info={"is_view": True},
)

# The relays' positions: the last sequence each published and the broker confirmed.
event_relays = sa.Table(
    "event_relays",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("last_sequence", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

# Settlements paid out (Settle), by the settlement batch's own id: the same id
# again returns this row and moves nothing.
settlements = sa.Table(
    "settlements",
    metadata,
    sa.Column("settlement_id", sa.String(64), primary_key=True),
    sa.Column("merchant_id", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("balance_after", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint(f"amount BETWEEN 1 AND {MAX_MINOR_UNITS}", name="ck_settlement_amount"),
    sa.Index("ix_settlements_merchant", "merchant_id", "created_at"),
)

# Operators' balance adjustments (`refund-admin balance adjust`), with their reason.
balance_adjustments = sa.Table(
    "balance_adjustments",
    metadata,
    sa.Column("adjustment_id", sa.String(64), primary_key=True),
    sa.Column("merchant_id", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("balance_after", sa.BigInteger, nullable=False),
    sa.Column("reason", sa.String(500), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("amount <> 0", name="ck_adjustment_amount_not_zero"),
)

# Money columns SQLite must hold as integers (see sqlite_integer_guards).
MONEY_COLUMNS = {
    "balances": ("unsettled",),
    "orders": ("amount",),
    "transactions": ("amount",),
    "ledger_entries": ("amount", "balance_after"),
    "settlements": ("amount", "balance_after"),
    "balance_adjustments": ("amount", "balance_after"),
}


def sqlite_integer_guards() -> list[str]:
    """SQLite triggers that refuse a money value that is not an integer within
    the bound: what STRICT tables and CHECKs would do, without rebuilding the
    tables. Without them SQLite stores an overflowing sum as REAL."""
    statements = []
    for table, columns in MONEY_COLUMNS.items():
        bad = " OR ".join(f"typeof(NEW.{c}) != 'integer' OR abs(NEW.{c}) > {MAX_MINOR_UNITS}" for c in columns)
        for event in ("INSERT", f"UPDATE OF {', '.join(columns)}"):
            name = f"tg_{table}_integer_money_{event.split()[0].lower()}"
            statements.append(f"CREATE TRIGGER {name} BEFORE {event} ON {table} WHEN {bad} "
                              f"BEGIN SELECT RAISE(ABORT, 'money must be an integer of at most "
                              f"{MAX_MINOR_UNITS} minor units'); END")
    return statements


# The journal is append-only: these refuse any UPDATE or DELETE of an entry.
SQLITE_APPEND_ONLY = [
    f"CREATE TRIGGER tg_ledger_entries_no_{event.lower()} BEFORE {event} ON ledger_entries "
    "BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END"
    for event in ("UPDATE", "DELETE")
]
POSTGRES_APPEND_ONLY = [
    """CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN RAISE EXCEPTION 'ledger entries are append-only'; END $$""",
    """CREATE TRIGGER tg_ledger_entries_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON ledger_entries
       FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_append_only()""",
]
