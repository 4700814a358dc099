"""a transaction's merchant is its order's merchant, and the database says so

Revision ID: 0006
Revises: 0005

`transactions` referred to `orders` (order_id) and to `merchants` (merchant_id)
separately, so the database would have kept a transaction whose merchant is not
its order's merchant: one merchant's refund of another's order. The rules never
write one, but the schema did not refuse it. Now a single foreign key
(order_id, merchant_id) refers to orders (id, merchant_id), backed by a new
unique index. The merchant still exists, because the order's own foreign key
says so.

It is also less work per refund and per sale. On PostgreSQL, checking
`merchant_id` locked the merchant's row (FOR KEY SHARE), which wrote to that
row's page each time; refunds of one merchant in several transactions at once
also made a multixact. The new check locks only the order's row, which the
refund already holds.

Upgrade, per database (one transaction: writes to orders and transactions wait
until it commits):
- PostgreSQL builds the index and adds the key, checking every existing
  transaction. A row whose merchant differs from its order's stops the upgrade
  with an error that names the key, and nothing changes.
- SQLite cannot change a table's keys. The table is rebuilt with the new key,
  its rows copied (and so checked), and its indexes and triggers recreated from
  their own definitions.
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

_ONE_KEY = ('CONSTRAINT fk_transactions_order_merchant FOREIGN KEY (order_id, merchant_id) '
            'REFERENCES orders (id, merchant_id)')
_TWO_KEYS = 'FOREIGN KEY (merchant_id) REFERENCES merchants (id), FOREIGN KEY (order_id) REFERENCES orders (id)'
_COLUMNS = 'id, order_id, merchant_id, type, currency, amount, status, masked_pan, stan, create_time'
# transactions as 0001 created it on SQLite, with `{keys}` for its foreign keys.
_SQLITE_TABLE = """CREATE TABLE transactions_rebuilt (
    id INTEGER NOT NULL,
    order_id BIGINT NOT NULL,
    merchant_id BIGINT NOT NULL,
    type VARCHAR(16) NOT NULL,
    currency VARCHAR(3) NOT NULL,
    amount BIGINT NOT NULL,
    status VARCHAR(16) NOT NULL,
    masked_pan VARCHAR(19) NOT NULL,
    stan VARCHAR(6) NOT NULL,
    create_time DATETIME NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT ck_transaction_type CHECK (type IN ('SALE', 'REFUND')),
    CONSTRAINT ck_transaction_amount_positive CHECK (amount > 0),
    {keys}
)"""


def upgrade() -> None:
    op.create_index('uq_orders_id_merchant', 'orders', ['id', 'merchant_id'], unique=True)
    if op.get_bind().dialect.name == 'sqlite':
        _rebuild_sqlite_transactions(_ONE_KEY)
        return
    op.execute(f'ALTER TABLE transactions ADD {_ONE_KEY}')
    op.drop_constraint('transactions_order_id_fkey', 'transactions', type_='foreignkey')
    op.drop_constraint('transactions_merchant_id_fkey', 'transactions', type_='foreignkey')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'sqlite':
        _rebuild_sqlite_transactions(_TWO_KEYS)
    else:
        op.create_foreign_key('transactions_merchant_id_fkey', 'transactions', 'merchants', ['merchant_id'], ['id'])
        op.create_foreign_key('transactions_order_id_fkey', 'transactions', 'orders', ['order_id'], ['id'])
        op.drop_constraint('fk_transactions_order_merchant', 'transactions', type_='foreignkey')
    op.drop_index('uq_orders_id_merchant', table_name='orders')


def _rebuild_sqlite_transactions(keys: str) -> None:
    """transactions with foreign keys `keys` and everything else as it was: rows,
    ids, indexes, triggers. Nothing refers to transactions, so it can be dropped
    with foreign keys on, and copying the rows checks each against the new keys."""
    bind = op.get_bind()
    dependents = [row[0] for row in bind.execute(sa.text(
        "SELECT sql FROM sqlite_master WHERE tbl_name = 'transactions' AND type IN ('index', 'trigger') "
        "AND sql IS NOT NULL"))]
    op.execute(_SQLITE_TABLE.format(keys=keys))
    op.execute(f'INSERT INTO transactions_rebuilt ({_COLUMNS}) SELECT {_COLUMNS} FROM transactions')
    op.execute('DROP TABLE transactions')
    op.execute('ALTER TABLE transactions_rebuilt RENAME TO transactions')
    for statement in dependents:
        op.execute(statement)
