"""The checkers the proofs rely on catch what they are meant to catch: a
ledger with a partial write, a double refund or a wrong balance fails
`check_ledger`; card numbers are found in text, grouped or not, and hex ids
are not mistaken for them."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from service import db, domain
from service.usecases import refunds
from tests.support import data
from tests.support.cards import card_numbers, database_card_numbers
from tests.support.in_process import with_store
from tests.support.ledger import check_ledger

MERCHANT = 7900001


@pytest.fixture
def refunded(sqlite_url):
    """Two orders of 100.00, the first refunded in full; the balance was 500.00."""
    data.load(sqlite_url, [data.merchant(MERCHANT, balances={"HKD": "500.00"})],
              [data.order(1, MERCHANT, "100.00"), data.order(2, MERCHANT, "100.00")])

    result = with_store(sqlite_url, lambda store: refunds.refund(store, domain.RefundCommand(MERCHANT, 1, None, "100.00")))
    assert result.code is domain.ResponseCode.SUCCESS
    check_ledger(sqlite_url, {(MERCHANT, "HKD"): 50000})
    return sqlite_url


def _corrupt(url: str, *statements: str) -> None:
    engine = db.make_engine(url)
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP INDEX IF EXISTS uq_one_refund_per_order")
        for statement in statements:
            connection.exec_driver_sql(statement)
    engine.dispose()


@pytest.mark.parametrize("statements", [
    ["UPDATE orders SET status = 'REFUNDED' WHERE id = 2"],                              # marked, no refund
    ["INSERT INTO transactions (order_id, merchant_id, type, currency, amount, status, masked_pan, stan, "
     "create_time) VALUES (2, 7900001, 'REFUND', 'HKD', 10000, 'SUCCESS', '', '000009', '2026-11-26 00:00:00')"],
    ["INSERT INTO transactions (order_id, merchant_id, type, currency, amount, status, masked_pan, stan, "
     "create_time) VALUES (1, 7900001, 'REFUND', 'HKD', 10000, 'SUCCESS', '', '000009', '2026-11-26 00:00:00')"],
    ["UPDATE balances SET unsettled = unsettled - 1"],                                   # debited twice
    ["UPDATE balances SET unsettled = unsettled + 10000"],                               # never debited
    ["DELETE FROM refund_attempts WHERE response_code = '0000'"],                        # approval not audited
    ["UPDATE refund_attempts SET amount = '50.00' WHERE response_code = '0000'"],        # audit disagrees
], ids=["marked-without-refund", "refund-without-mark", "second-refund", "extra-debit", "missing-debit",
        "approval-not-audited", "audit-amount-differs"])
def test_the_ledger_check_catches_every_kind_of_broken_ledger(refunded, statements):
    _corrupt(refunded, *statements)
    with pytest.raises(AssertionError):
        check_ledger(refunded, {(MERCHANT, "HKD"): 50000})


def test_card_numbers_are_found_wherever_they_are_written(sqlite_url):
    assert card_numbers("pan=4111111111111111;") == ["4111111111111111"]
    assert card_numbers("card 5555 5555 5555 4444 and 3782-822463-10005") == ["5555555555554444"]
    assert card_numbers("378282246310005 30569309025904 4000000000000000006") == [
        "378282246310005", "30569309025904", "4000000000000000006"]
    assert card_numbers("4111111111111112 411111******1111 request id 73129b11b0370468844755 1700000000000") == []
    data.load(sqlite_url, [data.merchant(MERCHANT, balances={"HKD": "1.00"})], [data.order(1, MERCHANT, "1.00")])
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE orders SET merchant_reference = 'x 4111111111111111'")
    engine.dispose()
    assert database_card_numbers(sqlite_url) == [("orders", "merchant_reference", "4111111111111111")]
