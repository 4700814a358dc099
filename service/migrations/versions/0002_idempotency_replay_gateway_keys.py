"""idempotency keys, replay guard, timestamp setting, gateway keys (docs/api.md section 7)

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per (merchant, Idempotency-Key): `response` is NULL while the
    # first request with the key is being processed, then holds its answer.
    op.create_table('idempotency_keys',
    sa.Column('merchant_id', sa.BigInteger(), nullable=False),
    sa.Column('idempotency_key', sa.String(length=64), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('response', sa.LargeBinary(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('merchant_id', 'idempotency_key')
    )
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.create_index('ix_idempotency_keys_created_at', ['created_at'], unique=False)

    # SHA-256 of each signed request that carried a timestamp, until the
    # timestamp leaves the window: the same signed bytes are accepted once.
    op.create_table('request_replays',
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('merchant_id', sa.BigInteger(), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('request_hash')
    )
    with op.batch_alter_table('request_replays', schema=None) as batch_op:
        batch_op.create_index('ix_request_replays_expires_at', ['expires_at'], unique=False)

    # Public halves of the keys the edge signs its responses with.
    op.create_table('gateway_keys',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('public_key_pem', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )

    # A plain ALTER TABLE ... ADD COLUMN with a constant default, on SQLite too:
    # batch mode would copy `merchants`, which the foreign keys of other tables'
    # rows refuse to drop.
    op.add_column('merchants', sa.Column('require_timestamp', sa.Boolean(), server_default=sa.false(),
                                         nullable=False))


def downgrade() -> None:
    # A plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+), for the same reason.
    op.drop_column('merchants', 'require_timestamp')
    op.drop_table('gateway_keys')
    with op.batch_alter_table('request_replays', schema=None) as batch_op:
        batch_op.drop_index('ix_request_replays_expires_at')
    op.drop_table('request_replays')
    with op.batch_alter_table('idempotency_keys', schema=None) as batch_op:
        batch_op.drop_index('ix_idempotency_keys_created_at')
    op.drop_table('idempotency_keys')
