"""Alembic revision 0006: one foreign key (order_id, merchant_id) -> orders
(id, merchant_id) replaces transactions' two, so the database refuses a
transaction whose merchant is not its order's; it upgrades a database holding
sales and refunds, keeps their rows, indexes and triggers, and steps back."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command

from service import db

MERCHANTS = (3000001, 3000002)


def _seed(connection) -> None:
    now = datetime.now(UTC)
    for merchant in MERCHANTS:
        connection.execute(sa.text("INSERT INTO merchants (id, name, status, require_timestamp) "
                                   "VALUES (:m, 'shop', 'ACTIVE', false)"), {"m": merchant})
    connection.execute(sa.text("INSERT INTO payment_methods (code, refund_capability) "
                               "VALUES ('CARD', 'FULL_AND_PARTIAL')"))
    connection.execute(sa.text(
        "INSERT INTO orders (id, merchant_id, merchant_reference, currency, amount, status, payment_method, "
        "create_time, update_time) VALUES (1, :m, 'r-1', 'HKD', 1000, 'PARTIALLY_REFUNDED', 'CARD', :now, :now)"),
        {"m": MERCHANTS[0], "now": now})
    for kind, amount in (("SALE", 1000), ("REFUND", 400)):
        _transaction(connection, MERCHANTS[0], kind, amount)


def _transaction(connection, merchant: int, kind: str = "SALE", amount=100) -> None:
    connection.execute(sa.text(
        "INSERT INTO transactions (order_id, merchant_id, type, currency, amount, status, masked_pan, stan, "
        "create_time) VALUES (1, :m, :kind, 'HKD', :amount, 'SUCCESS', '411111******1111', '000001', :now)"),
        {"m": merchant, "kind": kind, "amount": amount, "now": datetime.now(UTC)})


def _rows(engine) -> list[tuple]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(sa.text(
            "SELECT id, order_id, merchant_id, type, amount FROM transactions ORDER BY id"))]


def test_0006_refuses_a_transaction_of_another_merchants_order_keeps_the_rows_and_steps_back(database_url):
    config = db.alembic_config(database_url)
    command.downgrade(config, "0005")
    engine = db.make_engine(database_url)
    try:
        with engine.begin() as connection:
            _seed(connection)
        with engine.begin() as connection:  # 0005 let another merchant's transaction on order 1 in
            _transaction(connection, MERCHANTS[1])
            connection.execute(sa.text("DELETE FROM transactions WHERE merchant_id = :m"), {"m": MERCHANTS[1]})
        before = _rows(engine)

        command.upgrade(config, "head")
        assert _rows(engine) == before  # same rows, same ids
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
            _transaction(connection, MERCHANTS[1])  # another merchant's transaction on order 1
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
            _transaction(connection, 9999999)  # a merchant that does not exist
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
            _transaction(connection, MERCHANTS[0], "REFUND")  # still one refund per order (the partial index)
        with engine.begin() as connection:  # ... and any number of sales
            _transaction(connection, MERCHANTS[0])
        if engine.dialect.name == "sqlite":  # the rebuilt table kept its triggers: money is an integer
            with pytest.raises(sa.exc.DatabaseError, match="money must be an integer"), \
                    engine.begin() as connection:
                _transaction(connection, MERCHANTS[0], amount=1.5)
        after = _rows(engine)

        command.downgrade(config, "0005")
        assert _rows(engine) == after
        with engine.begin() as connection:  # the two keys of before: the other merchant is accepted again
            _transaction(connection, MERCHANTS[1])
        with pytest.raises(sa.exc.IntegrityError, match="fk_transactions_order_merchant|FOREIGN KEY"):
            command.upgrade(config, "head")  # ... and stops the upgrade, which changes nothing
        assert len(_rows(engine)) == len(after) + 1
        with engine.begin() as connection:
            _transaction(connection, MERCHANTS[1])  # still at 0005
    finally:
        engine.dispose()
