"""A refund's STAN (system trace audit number) is the last six digits of its
transaction id, zero-padded, on both stores: each writes it its own way
(PostgreSQL with `lpad` in the refund statement, SQLite with `port.stan_for`),
so the edges of the rule are checked on both."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from service import db, domain
from service.usecases import refunds
from tests.support import data
from tests.support.in_process import with_store

MERCHANT = 3700001


@pytest.mark.parametrize("refund_id, stan", [(999_999, "999999"), (1_000_000, "000000"), (1_234_567, "234567"),
                                             (10**12 + 42, "000042")])
def test_the_stan_is_the_transaction_ids_last_six_digits(database_url, refund_id, stan):
    data.load(database_url, [data.merchant(MERCHANT, balances={"HKD": "100.00"})],
              [data.order(1, MERCHANT, "10.00")])
    engine = db.make_engine(database_url)
    with engine.begin() as connection:  # the next transaction id is refund_id
        if engine.dialect.name == "sqlite":
            connection.execute(sa.text("UPDATE transactions SET id = :id WHERE order_id = 1"), {"id": refund_id - 1})
        else:
            connection.execute(sa.text("SELECT setval(pg_get_serial_sequence('transactions', 'id'), :id)"),
                               {"id": refund_id - 1})
    engine.dispose()

    result = with_store(database_url, lambda store: refunds.refund(store, domain.RefundCommand(MERCHANT, 1, None, "10.00")))
    assert result.code is domain.ResponseCode.SUCCESS
    assert (result.transaction.id, result.transaction.stan) == (refund_id, stan)
    assert result.transaction.masked_pan == data.order(1, MERCHANT, "10.00")["maskedPan"]
