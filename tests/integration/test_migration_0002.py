"""Alembic revision 0002 (idempotency keys, replay hashes, gateway keys,
merchants.require_timestamp) upgrades a database holding data, and steps back."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import command

from service import db


def test_0002_upgrades_a_loaded_database_and_downgrades_without_touching_refund_data(database_url):
    config = db.alembic_config(database_url)
    command.downgrade(config, "0001")
    engine = db.make_engine(database_url)
    with engine.begin() as connection:  # rows as the 0001 schema holds them (refund-admin now needs 0002)
        connection.execute(sa.text("INSERT INTO payment_methods VALUES ('VISA', 'FULL_AND_PARTIAL')"))
        connection.execute(sa.text("INSERT INTO merchants (id, name, status) VALUES (3000001, 'Shop', 'ACTIVE')"))
        connection.execute(sa.text(
            "INSERT INTO orders (id, merchant_id, merchant_reference, currency, amount, status, payment_method, "
            "create_time, update_time) VALUES (1, 3000001, 'r-1', 'HKD', 1000, 'SUCCESS', 'VISA', :now, :now)"),
            {"now": datetime.now(UTC)})

    command.upgrade(config, "head")
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT require_timestamp FROM merchants")).scalars().all() == [False]
            for table in ("idempotency_keys", "request_replays", "gateway_keys"):
                assert connection.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one() == 0
        command.downgrade(config, "0001")
        inspector = sa.inspect(engine)
        assert not {"idempotency_keys", "request_replays", "gateway_keys"} & set(inspector.get_table_names())
        assert "require_timestamp" not in {c["name"] for c in inspector.get_columns("merchants")}
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT count(*) FROM orders")).scalar_one() == 1
    finally:
        engine.dispose()
    command.upgrade(config, "head")
