"""The database schema, as SQLAlchemy Core tables.

Alembic migrations (service/migrations) create it; the admin commands use these
tables with SQLAlchemy Core. The refund path does not build SQLAlchemy objects
per request: the stores run a few fixed statements over the raw driver.

The database enforces what must never happen, whatever the code above it does:
- one REFUND transaction per order (unique partial index `uq_one_refund_per_order`);
- no negative balance (`ck_balance_not_negative`);
- money as integer minor units (BIGINT), positive amounts.
"""

import sqlalchemy as sa

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
    # Signed requests without a `timestamp` are refused (API.md section 7).
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
)

transactions = sa.Table(
    "transactions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("order_id", sa.BigInteger, sa.ForeignKey("orders.id"), nullable=False),
    sa.Column("merchant_id", sa.BigInteger, sa.ForeignKey("merchants.id"), nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("masked_pan", sa.String(19), nullable=False),
    sa.Column("stan", sa.String(6), nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("type IN ('SALE', 'REFUND')", name="ck_transaction_type"),
    sa.CheckConstraint("amount > 0", name="ck_transaction_amount_positive"),
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

# Idempotency-Key of a merchant (API.md section 7): the hash of the request
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
