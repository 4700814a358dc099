"""the ledger: journal of balance entries, settlements, adjustments; money guards

Revision ID: 0003
Revises: 0002

A database that already holds balances and refunds gets an opening entry per
balance (its value before the refunds already made) and one REFUND entry per
refund already made, so that from the start every balance is the sum of its
entries and each entry's balance_after follows from the one before.
"""
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from service.domain import MAX_MINOR_UNITS
from service.schema import POSTGRES_APPEND_ONLY, SQLITE_APPEND_ONLY, sqlite_integer_guards

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

_OPENING = """
INSERT INTO ledger_entries (merchant_id, currency, kind, amount, balance_after, created_at)
SELECT b.merchant_id, b.currency, 'OPENING', b.unsettled + COALESCE(r.total, 0), b.unsettled + COALESCE(r.total, 0),
       :now
FROM balances b
LEFT JOIN (SELECT merchant_id, currency, SUM(amount) AS total FROM transactions WHERE type = 'REFUND'
           GROUP BY merchant_id, currency) r ON r.merchant_id = b.merchant_id AND r.currency = b.currency
WHERE b.unsettled + COALESCE(r.total, 0) > 0
ORDER BY b.merchant_id, b.currency"""

_REFUNDS_MADE = """
INSERT INTO ledger_entries (merchant_id, currency, kind, amount, balance_after, order_id, transaction_id, created_at)
SELECT t.merchant_id, t.currency, 'REFUND', -t.amount,
       e.amount - SUM(t.amount) OVER (PARTITION BY t.merchant_id, t.currency ORDER BY t.id),
       t.order_id, t.id, t.create_time
FROM transactions t
JOIN ledger_entries e ON e.kind = 'OPENING' AND e.merchant_id = t.merchant_id AND e.currency = t.currency
WHERE t.type = 'REFUND'
ORDER BY t.id"""


def upgrade() -> None:
    op.create_table('ledger_entries',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('merchant_id', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('balance_after', sa.BigInteger(), nullable=False),
    sa.Column('order_id', sa.BigInteger(), nullable=True),
    sa.Column('transaction_id', sa.BigInteger(), nullable=True),
    sa.Column('settlement_id', sa.String(length=64), nullable=True),
    sa.Column('adjustment_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('OPENING', 'SALE', 'REFUND', 'SETTLEMENT', 'ADJUSTMENT')", name='ck_entry_kind'),
    sa.CheckConstraint('amount <> 0', name='ck_entry_amount_not_zero'),
    sa.CheckConstraint(f'amount BETWEEN -{MAX_MINOR_UNITS} AND {MAX_MINOR_UNITS}', name='ck_entry_amount_bound'),
    sa.CheckConstraint(f'balance_after BETWEEN 0 AND {MAX_MINOR_UNITS}', name='ck_entry_balance_bound'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_ledger_entries_balance', 'ledger_entries', ['merchant_id', 'currency', 'id'])
    op.create_index('uq_ledger_entries_transaction', 'ledger_entries', ['transaction_id'], unique=True)
    op.create_index('uq_ledger_entries_settlement', 'ledger_entries', ['settlement_id'], unique=True)
    op.create_index('uq_ledger_entries_adjustment', 'ledger_entries', ['adjustment_id'], unique=True)

    op.create_table('settlements',
    sa.Column('settlement_id', sa.String(length=64), nullable=False),
    sa.Column('merchant_id', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('balance_after', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint(f'amount BETWEEN 1 AND {MAX_MINOR_UNITS}', name='ck_settlement_amount'),
    sa.PrimaryKeyConstraint('settlement_id')
    )
    op.create_index('ix_settlements_merchant', 'settlements', ['merchant_id', 'created_at'])

    op.create_table('balance_adjustments',
    sa.Column('adjustment_id', sa.String(length=64), nullable=False),
    sa.Column('merchant_id', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('balance_after', sa.BigInteger(), nullable=False),
    sa.Column('reason', sa.String(length=500), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('amount <> 0', name='ck_adjustment_amount_not_zero'),
    sa.PrimaryKeyConstraint('adjustment_id')
    )

    now = sa.bindparam("now", datetime.now(UTC), type_=sa.DateTime(timezone=True))
    op.execute(sa.text(_OPENING).bindparams(now))
    op.execute(_REFUNDS_MADE)

    if op.get_bind().dialect.name == "sqlite":
        for statement in sqlite_integer_guards() + SQLITE_APPEND_ONLY:
            op.execute(statement)
    else:
        op.create_check_constraint('ck_balance_within_bound', 'balances', f'unsettled <= {MAX_MINOR_UNITS}')
        for statement in POSTGRES_APPEND_ONLY:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for statement in sqlite_integer_guards() + SQLITE_APPEND_ONLY:
            op.execute("DROP TRIGGER IF EXISTS " + statement.split()[2])
    else:
        op.drop_constraint('ck_balance_within_bound', 'balances')
        op.execute("DROP TRIGGER IF EXISTS tg_ledger_entries_append_only ON ledger_entries")
        op.execute("DROP FUNCTION IF EXISTS ledger_entries_append_only()")
    op.drop_table('balance_adjustments')
    op.drop_index('ix_settlements_merchant', table_name='settlements')
    op.drop_table('settlements')
    for index in ('uq_ledger_entries_adjustment', 'uq_ledger_entries_settlement', 'uq_ledger_entries_transaction',
                  'ix_ledger_entries_balance'):
        op.drop_index(index, table_name='ledger_entries')
    op.drop_table('ledger_entries')
