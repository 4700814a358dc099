"""Alembic revision 0005: the journal's settlement and adjustment indexes become
partial (same uniqueness, no NULL entries) and PostgreSQL's orders get
fillfactor 90; it upgrades a database holding a journal and steps back."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command

from service import db

PARTIAL = {"uq_ledger_entries_settlement": "settlement_id", "uq_ledger_entries_adjustment": "adjustment_id"}


def _entry(connection, settlement_id=None, adjustment_id=None) -> None:
    kind = "SETTLEMENT" if settlement_id else "ADJUSTMENT" if adjustment_id else "OPENING"
    connection.execute(sa.text(
        "INSERT INTO ledger_entries (merchant_id, currency, kind, amount, balance_after, settlement_id, adjustment_id, "
        "created_at) VALUES (3000001, 'HKD', :kind, 100, 100, :s, :a, :now)"),
        {"kind": kind, "s": settlement_id, "a": adjustment_id, "now": datetime.now(UTC)})


def _index_sql(engine, name: str) -> str:
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            return connection.execute(sa.text("SELECT sql FROM sqlite_master WHERE name = :n"), {"n": name}).scalar_one()
        return connection.execute(sa.text("SELECT indexdef FROM pg_indexes WHERE indexname = :n"),
                                  {"n": name}).scalar_one()


def _fillfactor(engine) -> list | None:
    with engine.connect() as connection:
        return connection.execute(sa.text("SELECT reloptions FROM pg_class WHERE relname = 'orders'")).scalar_one()


def test_0005_keeps_settlements_and_adjustments_unique_with_partial_indexes_and_steps_back(database_url):
    config = db.alembic_config(database_url)
    command.downgrade(config, "0004")
    engine = db.make_engine(database_url)
    try:
        with engine.begin() as connection:  # a journal as 0004 holds it: many NULL keys, one settlement
            for _ in range(3):
                _entry(connection)
            _entry(connection, settlement_id="s-1")
        command.upgrade(config, "head")
        for name, column in PARTIAL.items():
            assert f"{column} IS NOT NULL" in _index_sql(engine, name).replace("(", "").replace(")", "")
        with engine.begin() as connection:
            for _ in range(2):  # NULL keys still never collide
                _entry(connection)
            _entry(connection, adjustment_id="a-1")
        for duplicate in ({"settlement_id": "s-1"}, {"adjustment_id": "a-1"}):
            with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
                _entry(connection, **duplicate)
        if engine.dialect.name == "postgresql":
            assert _fillfactor(engine) == ["fillfactor=90"]

        command.downgrade(config, "0004")
        for name in PARTIAL:
            assert "WHERE" not in _index_sql(engine, name)
        if engine.dialect.name == "postgresql":
            assert _fillfactor(engine) is None
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT count(*) FROM ledger_entries")).scalar_one() == 7
    finally:
        engine.dispose()
    command.upgrade(config, "head")
