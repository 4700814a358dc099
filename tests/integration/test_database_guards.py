"""The database itself refuses a second refund of an order and a negative
balance, whatever code writes to it; and a database that does not answer in
time gives UNAVAILABLE, never a partial write."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import grpc
import pytest
import sqlalchemy as sa

from refund.v1 import refund_pb2
from service import db, schema
from tests.support import data
from tests.support.in_process import InProcessService, error_info

MERCHANT = 3000001


@pytest.fixture
def loaded(database_url):
    data.load(database_url, [data.merchant(MERCHANT, balances={"HKD": "100.00"})],
              [data.order(1, MERCHANT, "10.00"), data.order(2, MERCHANT, "10.00")])
    engine = db.make_engine(database_url)
    yield engine
    engine.dispose()


def refund_row(order_id: int) -> dict:
    return dict(order_id=order_id, merchant_id=MERCHANT, type="REFUND", currency="HKD", amount=100,
                status="SUCCESS", masked_pan="", stan="000001", create_time=datetime.now(UTC))


def test_a_second_refund_transaction_for_one_order_is_refused_by_the_database(loaded):
    with loaded.begin() as connection:
        connection.execute(schema.transactions.insert(), [refund_row(1)])
    with pytest.raises(sa.exc.IntegrityError):
        with loaded.begin() as connection:
            connection.execute(schema.transactions.insert(), [refund_row(1)])
    with loaded.begin() as connection:  # another order may still be refunded
        connection.execute(schema.transactions.insert(), [refund_row(2)])


def test_a_negative_balance_is_refused_by_the_database(loaded):
    with pytest.raises(sa.exc.IntegrityError):
        with loaded.begin() as connection:
            connection.execute(schema.balances.update().values(unsettled=schema.balances.c.unsettled - 10001))
    with loaded.connect() as connection:
        assert connection.execute(sa.select(schema.balances.c.unsettled)).scalar_one() == 10000


def test_sqlite_write_lock_held_too_long_gives_unavailable_and_no_partial_write(sqlite_url):
    data.load(sqlite_url, [data.merchant(MERCHANT, balances={"HKD": "100.00"})], [data.order(1, MERCHANT, "10.00")])
    service = InProcessService(sqlite_url, db_timeout=1.0)
    blocker = sqlite3.connect(sa.make_url(sqlite_url).database, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database
        with pytest.raises(grpc.RpcError) as caught:
            service.stub.Refund(refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=1, amount="10.00"),
                                timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(caught.value)[0].metadata["responseCode"] == "9001"
        blocker.execute("ROLLBACK")
        # The attempt that timed out may still commit once the lock is free
        # (docs/api.md: 9001 means "retrying is safe"): the retry is then answered
        # 3003 with that refund. Either way the order is refunded once.
        try:
            retry = service.stub.Refund(refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=1, amount="10.00"),
                                        timeout=5)
            assert retry.response_code == "0000"
        except grpc.RpcError as error:
            info, decline = error_info(error)
            assert info.reason == "ALREADY_REFUNDED" and decline.transaction.amount == "10.00"
    finally:
        blocker.close()
        service.close()
    engine = db.make_engine(sqlite_url)
    with engine.connect() as connection:
        assert connection.execute(sa.select(schema.balances.c.unsettled)).scalar_one() == 9000
        assert connection.execute(sa.select(sa.func.count()).select_from(schema.transactions)
                                  .where(schema.transactions.c.type == "REFUND")).scalar() == 1
    engine.dispose()
