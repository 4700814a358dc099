"""the event outbox: request ids on journal entries, the event sequence, relay positions

Revision ID: 0004
Revises: 0003

Every journal entry is an event (docs/events.md). An event's sequence must
never let a reader that resumes with `sequence > cursor` skip an event that
commits late:
- on SQLite one writer at a time holds the write lock from before its first
  insert until its commit, so `ledger_entries.id` is assigned in commit order
  and is the sequence itself;
- on PostgreSQL ids from a sequence commit out of order, so each entry keeps
  the id of the transaction that wrote it (`xact_id`) and one sequencer at a
  time (service/outbox.py) numbers, in `event_sequence`, the entries as they
  commit.
The view `events` gives both the same shape: the sequence and the entry.
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

_ENTRY_COLUMNS = ("e.id AS entry_id, e.merchant_id, e.currency, e.kind, e.amount, e.balance_after, e.order_id, "
                  "e.transaction_id, e.settlement_id, e.adjustment_id, e.request_id, e.created_at")


def upgrade() -> None:
    # The request that made the movement (the x-request-id of the call), when known.
    op.add_column('ledger_entries', sa.Column('request_id', sa.String(length=128), nullable=True))
    # The relays' positions: the sequence of the last event each has published
    # and the broker confirmed.
    op.create_table('event_relays',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('last_sequence', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    if op.get_bind().dialect.name == "sqlite":
        op.execute(f"CREATE VIEW events AS SELECT e.id AS seq, {_ENTRY_COLUMNS} FROM ledger_entries e")
        return
    # The id of the writing transaction; a volatile default gives the rows
    # already there the migration's own, which has finished once they are read.
    op.execute("ALTER TABLE ledger_entries ADD COLUMN xact_id xid8 NOT NULL DEFAULT pg_current_xact_id()")
    op.execute("CREATE INDEX ix_ledger_entries_xact_id ON ledger_entries (xact_id)")
    op.execute("""CREATE TABLE event_sequence (
                    seq bigint PRIMARY KEY CHECK (seq > 0),
                    entry_id bigint NOT NULL UNIQUE)""")  # no foreign key: its check would lock every entry it names
    # The snapshot of the sequencer's last numbering: every entry visible in it is numbered.
    op.execute("""CREATE TABLE event_sequencer (
                    id smallint PRIMARY KEY CHECK (id = 1),
                    last pg_snapshot NOT NULL)""")
    op.execute("INSERT INTO event_sequencer (id, last) VALUES (1, '1:1:'::pg_snapshot)")
    op.execute(f"CREATE VIEW events AS SELECT s.seq, {_ENTRY_COLUMNS} "
               "FROM event_sequence s JOIN ledger_entries e ON e.id = s.entry_id")


def downgrade() -> None:
    op.execute("DROP VIEW events")
    if op.get_bind().dialect.name != "sqlite":
        op.execute("DROP TABLE event_sequencer")
        op.execute("DROP TABLE event_sequence")
        op.execute("DROP INDEX ix_ledger_entries_xact_id")
        op.execute("ALTER TABLE ledger_entries DROP COLUMN xact_id")
    op.drop_table('event_relays')
    op.drop_column('ledger_entries', 'request_id')
