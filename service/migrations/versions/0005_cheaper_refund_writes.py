"""cheaper refund writes: partial unique indexes on the journal, room for HOT updates of orders

Revision ID: 0005
Revises: 0004

Every refund's journal entry has no settlement and no adjustment, yet the unique
indexes on `settlement_id` and `adjustment_id` took an entry (a NULL key) for
each one. Unique indexes `WHERE ... IS NOT NULL` enforce exactly the same (NULLs
never collide) and skip those two index inserts per refund and per sale.

On PostgreSQL `orders` gets fillfactor 90: pages keep room, so the refund's
update of an order's status (no indexed column) can stay on its page as a HOT
update instead of adding entries to both of the order's indexes. It applies to
pages written from now on (new orders); existing pages fill up as they are.
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_PARTIAL = (('uq_ledger_entries_settlement', 'settlement_id'), ('uq_ledger_entries_adjustment', 'adjustment_id'))


def upgrade() -> None:
    for name, column in _PARTIAL:
        op.drop_index(name, table_name='ledger_entries')
        where = sa.text(f'{column} IS NOT NULL')
        op.create_index(name, 'ledger_entries', [column], unique=True, postgresql_where=where, sqlite_where=where)
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE orders SET (fillfactor = 90)')


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE orders RESET (fillfactor)')
    for name, column in _PARTIAL:
        op.drop_index(name, table_name='ledger_entries')
        op.create_index(name, 'ledger_entries', [column], unique=True)
