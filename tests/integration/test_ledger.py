"""Issue 10: every movement of money is idempotent, journaled and provable.

The findings this file reproduces (each failed on 643d3c9):
1. a retried Settle debited twice (no settlement id, no settlement record);
3. SQLite stored an overflowing balance as floating point; amounts beyond
   int64 answered 9999 (PostgreSQL) or OK (SQLite), not 1002;
4. a lost database connection (terminated backend) answered 9999, not 9001;
5. on the Idempotency-Key path a deactivated key could still refund;
6. amount text over gRPC was lenient ("1e1", " 5.00", "+5.00", ".5", ...).
Finding 2 (load overwrote live balances) is in tests/integration/test_admin.py.

Long (about 540 lines) on purpose: one section per finding of issue 10, each with its own scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC

import grpc
import pytest
import sqlalchemy as sa

from refund.v1 import refund_pb2
from service import admin, db, domain, ledger, schema
from service.grpc_api import encode_answer
from service.usecases.idempotency import IdempotencyKeys
from tests.support import data
from tests.support.data import refund_text
from tests.support.in_process import InProcessService, error_info
from tests.support.keys import generated_key, public_pem, sign

MERCHANT, OTHER = 3100001, 3100002


@pytest.fixture
def service(database_url):
    key = generated_key("ledger-merchant")
    data.load(database_url,
              [data.merchant(MERCHANT, public_pem(key), balances={"HKD": "100.00", "JPY": "5000"}),
               data.merchant(OTHER, balances={"HKD": "100.00"})],
              [data.order(1000 + i, MERCHANT, "10.00") for i in range(5)])
    running = InProcessService(database_url)
    running.url = database_url
    running.key = key
    yield running
    running.close()


def run_admin(url: str, *args: str) -> tuple[int, str]:
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = admin.main(["--database-url", url, *args])
    return code, output.getvalue()


def scalar(url: str, sql: str, **params):
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text(sql), params).scalar()
    finally:
        engine.dispose()


def execute(url: str, *sql: str) -> None:
    engine = db.make_engine(url)
    try:
        with engine.begin() as connection:
            for statement in sql:
                connection.execute(sa.text(statement))
    finally:
        engine.dispose()


def hkd_balance(url: str, merchant: int = MERCHANT) -> int:
    return scalar(url, "SELECT unsettled FROM balances WHERE merchant_id = :m AND currency = 'HKD'", m=merchant)


def settle(service, amount: str, settlement_id: str, merchant: int = MERCHANT, currency: str = "HKD"):
    return service.stub.Settle(refund_pb2.SettleRequest(merchant_id=str(merchant), currency=currency, amount=amount,
                                                        settlement_id=settlement_id), timeout=10)


def rpc_error(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)
    return caught.value.code(), error_info(caught.value)[0].reason


def sale(order_id: int, amount: str, currency: str = "HKD", merchant: int = MERCHANT):
    return refund_pb2.RecordSaleRequest(order_id=order_id, merchant_id=str(merchant),
                                        merchant_reference=f"sale-{order_id}", currency=currency, amount=amount,
                                        payment_method="VISA", masked_pan="400000******0002", stan="123456")


def assert_ledger_holds(url: str) -> None:
    result = ledger.verify(url)
    assert result.holds, result.discrepancies


# -- 1: Settle is idempotent by the caller's settlement id -------------------------


def test_a_retried_settlement_returns_the_stored_one_and_debits_once(service):
    first = settle(service, "10.00", "batch-2026-11-29")
    again = settle(service, "10.00", "batch-2026-11-29")

    assert first == again
    assert (first.unsettled_balance, first.settlement.amount, first.settlement.settlement_id) == \
        ("90.00", "10.00", "batch-2026-11-29")
    assert hkd_balance(service.url) == 9000
    assert scalar(service.url, "SELECT COUNT(*) FROM settlements") == 1
    assert scalar(service.url, "SELECT COUNT(*) FROM ledger_entries WHERE kind = 'SETTLEMENT'") == 1
    assert_ledger_holds(service.url)


@pytest.mark.parametrize("change", [dict(amount="10.01"), dict(merchant=OTHER), dict(currency="JPY", amount="10")])
def test_a_settlement_id_reused_for_another_payout_is_a_conflict_and_moves_nothing(service, change):
    settle(service, "10.00", "batch-1")
    asked = {"amount": "10.00", "settlement_id": "batch-1", **change}
    code, reason = rpc_error(settle, service, **asked)
    assert (code, reason) == (grpc.StatusCode.ABORTED, "IDEMPOTENCY_CONFLICT")
    assert hkd_balance(service.url) == 9000 and hkd_balance(service.url, OTHER) == 10000
    assert_ledger_holds(service.url)


def test_a_settlement_refused_for_the_balance_stores_nothing_and_can_be_sent_again(service):
    assert rpc_error(settle, service, "100.01", "batch-x") == (grpc.StatusCode.FAILED_PRECONDITION,
                                                               "INSUFFICIENT_BALANCE")
    service.stub.RecordSale(sale(5000, "0.01"))
    assert settle(service, "100.01", "batch-x").unsettled_balance == "0.00"
    assert_ledger_holds(service.url)


@pytest.mark.parametrize("settlement_id", ["", " ", "a b", "x" * 65, "caf\u00e9"])
def test_a_settlement_needs_a_well_formed_id(service, settlement_id):
    assert rpc_error(settle, service, "1.00", settlement_id) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert hkd_balance(service.url) == 10000


def test_concurrent_settlements_with_one_id_debit_once(service):
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: settle(service, "7.00", "batch-concurrent"), range(32)))
    assert len({reply.SerializeToString() for reply in replies}) == 1
    assert hkd_balance(service.url) == 9300
    assert_ledger_holds(service.url)


@pytest.mark.postgres
def test_a_settlement_killed_while_waiting_for_the_balance_row_is_retried_safely(postgres_url, start_service):
    """Finding 1 as found: Settle answered UNAVAILABLE (the service was killed
    while its UPDATE waited on the row lock), the UPDATE still committed, and
    the retry debited again. Now the debit commits only with its settlement
    record, and the retry finds that record."""
    data.load(postgres_url, [data.merchant(MERCHANT, balances={"HKD": "100.00"})], [])
    first = start_service(postgres_url)
    engine = db.make_engine(postgres_url)
    locker = engine.connect()
    locker.execute(sa.text(f"SELECT 1 FROM balances WHERE merchant_id = {MERCHANT} FOR UPDATE"))

    def call(address):
        channel = grpc.insecure_channel(address)
        try:
            from refund.v1 import refund_pb2_grpc
            return refund_pb2_grpc.RefundServiceStub(channel).Settle(refund_pb2.SettleRequest(
                merchant_id=str(MERCHANT), currency="HKD", amount="10.00", settlement_id="batch-killed"), timeout=30)
        finally:
            channel.close()

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(call, first.address)
        deadline = time.monotonic() + 10
        while scalar(postgres_url, "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'") == 0:
            assert time.monotonic() < deadline, "Settle never waited on the row lock"
            time.sleep(0.05)
        first.process.kill()
        with pytest.raises(grpc.RpcError) as caught:
            pending.result(30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    locker.rollback()  # the row lock goes; the killed call's UPDATE may now run
    locker.close()
    engine.dispose()
    time.sleep(0.5)

    second = start_service(postgres_url)
    reply = call(second.address)
    again = call(second.address)
    assert reply == again and reply.unsettled_balance == "90.00"
    assert hkd_balance(postgres_url) == 9000
    assert_ledger_holds(postgres_url)


# -- 3: one maximum for amounts and balances; SQLite stores integers only ---------


@pytest.mark.parametrize(("currency", "amount"), [("HKD", "92233720368547758.07"), ("JPY", "9223372036854775807"),
                                                  ("HKD", "10000000000000.00"), ("JPY", "1000000000000000")])
def test_a_sale_beyond_the_maximum_is_invalid_amount_and_writes_nothing(service, currency, amount):
    before = scalar(service.url, "SELECT COUNT(*) FROM orders")
    assert rpc_error(service.stub.RecordSale, sale(5001, amount, currency)) == \
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT")
    assert scalar(service.url, "SELECT COUNT(*) FROM orders") == before
    assert scalar(service.url, "SELECT COUNT(*) FROM ledger_entries WHERE kind = 'SALE'") == 0
    assert settle(service, "50.00", "after-overflow").unsettled_balance == "50.00"  # still exact integers
    assert_ledger_holds(service.url)


def test_a_sale_that_would_take_the_balance_past_the_maximum_writes_nothing(service):
    top = domain.format_minor(domain.MAX_MINOR_UNITS - 10000, "HKD")
    assert service.stub.RecordSale(sale(5002, top)).unsettled_balance == "9999999999999.99"
    assert rpc_error(service.stub.RecordSale, sale(5003, "0.01")) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                      "INVALID_AMOUNT")
    assert scalar(service.url, "SELECT COUNT(*) FROM orders WHERE id = 5003") == 0
    assert hkd_balance(service.url) == domain.MAX_MINOR_UNITS
    assert_ledger_holds(service.url)


def test_sqlite_refuses_to_store_money_that_is_not_an_integer(sqlite_url):
    data.load(sqlite_url, [data.merchant(MERCHANT, balances={"HKD": "100.00"})], [])
    for statement in (f"UPDATE balances SET unsettled = unsettled + {2**63 - 1}",
                      "UPDATE balances SET unsettled = 1.5",
                      "UPDATE balances SET unsettled = 'twelve'",
                      f"UPDATE balances SET unsettled = {domain.MAX_MINOR_UNITS + 1}"):
        with pytest.raises(sa.exc.IntegrityError, match="money must be an integer"):
            execute(sqlite_url, statement)
    assert (hkd_balance(sqlite_url), scalar(sqlite_url, "SELECT typeof(unsettled) FROM balances")) == (10000, "integer")


# -- 4: a lost database connection is UNAVAILABLE, never INTERNAL -----------------


@pytest.mark.postgres
def test_terminated_backends_are_answered_unavailable_and_retries_complete(postgres_url):
    data.load(postgres_url, [data.merchant(MERCHANT, balances={"HKD": "100.00"})],
              [data.order(1000 + i, MERCHANT, "1.00") for i in range(60)])
    running = InProcessService(postgres_url)
    stop = threading.Event()

    def terminate_backends():  # for 3 s (or until the calls are done), every 10 ms
        engine = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
        until = time.monotonic() + 3
        with engine.connect() as connection:
            while not stop.is_set() and time.monotonic() < until:
                connection.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                           "WHERE application_name = 'refund-service' AND datname = current_database()"))
                time.sleep(0.01)
        engine.dispose()

    calls = [("sale", i) for i in range(60)] + [("refund", i) for i in range(60)] + [("settle", i) for i in range(30)]

    def until_answered(call):
        kind, i = call
        codes = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # retry UNAVAILABLE, as the proto says is safe
            try:
                if kind == "sale":
                    running.stub.RecordSale(sale(9000 + i, "2.00"), timeout=10)
                elif kind == "refund":
                    running.stub.Refund(refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=1000 + i,
                                                                 amount="1.00"), timeout=10)
                else:
                    settle(running, "0.50", f"batch-{i}")
                return codes + ["OK"]
            except grpc.RpcError as error:
                codes.append(error_info(error)[0].reason)
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    return codes
                time.sleep(0.02)
        return codes

    killer = threading.Thread(target=terminate_backends)
    killer.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(until_answered, calls))
    finally:
        stop.set()
        killer.join()
    try:
        reasons = [reason for codes in outcomes for reason in codes]
        assert "SYSTEM_ERROR" not in reasons, reasons
        assert reasons.count("SERVICE_UNAVAILABLE") > 0, "no backend was ever terminated during a call"
        assert all(codes[-1] in ("OK", "ALREADY_REFUNDED") for codes in outcomes), outcomes
        # Every call completed exactly once: 60 sales of 2.00, 60 refunds of 1.00, 30 settlements of 0.50.
        assert hkd_balance(postgres_url) == 10000 + 60 * 200 - 60 * 100 - 30 * 50
        assert scalar(postgres_url, "SELECT COUNT(*) FROM orders WHERE id >= 9000") == 60
        assert_ledger_holds(postgres_url)
    finally:
        running.close()


def test_a_claim_whose_release_fails_is_released_by_a_later_try():
    class FlakyStore:
        def __init__(self):
            self.tries = 0

        async def finish_idempotency(self, merchant_id, key, claimed_at, response):
            self.tries += 1
            if self.tries < 3:
                raise ConnectionResetError("connection lost")

    async def scenario():
        store = FlakyStore()
        keys = IdempotencyKeys(store, db_timeout=5.0, encode=encode_answer)
        keys._release_later(MERCHANT, "key-1", None)
        for _ in range(100):
            if store.tries >= 3:
                break
            await asyncio.sleep(0.05)
        return store.tries, keys.lease.total_seconds()

    tries, lease = asyncio.run(scenario())
    assert tries == 3
    assert lease <= 10.0  # an unreleased claim frees itself within twice the database timeout


# -- 5: credentials are re-checked in the refund's own transaction, on every path --


def change_after_authentication(monkeypatch, url: str, statement: str) -> None:
    """Run `statement` on the database right after the service's first
    authentication of a signed request, before it refunds."""
    from service import signing

    real_authenticate = signing.authenticate
    done = []

    async def authenticate_then_change(store, request, signature, **kwargs):
        signed = await real_authenticate(store, request, signature, **kwargs)
        if not done:
            execute(url, statement)
            done.append(True)
        return signed

    monkeypatch.setattr(signing, "authenticate", authenticate_then_change)


def test_a_key_deactivated_after_authentication_refuses_the_idempotent_refund(service, monkeypatch):
    """Finding 5: with an Idempotency-Key the keys were read in one statement and
    the refund made in another, unchecked. Here the key is deactivated right
    after the service read it: the refund must not be made."""
    change_after_authentication(monkeypatch, service.url,
                                f"UPDATE merchant_keys SET active = false WHERE merchant_id = {MERCHANT}")
    request = refund_text(MERCHANT, "10.00", order_id=1000)
    code, reason = rpc_error(service.stub.MerchantRefund, refund_pb2.MerchantRefundRequest(
        request=request.encode(), signature=sign(service.key, request), idempotency_key="idem-1"), timeout=10)
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "AUTHENTICATION_FAILED")
    assert scalar(service.url, "SELECT COUNT(*) FROM transactions WHERE type = 'REFUND'") == 0
    assert hkd_balance(service.url) == 10000


def test_a_merchant_suspended_after_authentication_refuses_the_timestamped_refund(service, monkeypatch):
    from datetime import datetime

    change_after_authentication(monkeypatch, service.url,
                                f"UPDATE merchants SET status = 'SUSPENDED' WHERE id = {MERCHANT}")
    now = datetime.now(UTC).isoformat(timespec="seconds")
    request = refund_text(MERCHANT, "10.00", order_id=1001)[:-1] + f', "timestamp": "{now}"}}'
    code, reason = rpc_error(service.stub.MerchantRefund, refund_pb2.MerchantRefundRequest(
        request=request.encode(), signature=sign(service.key, request)), timeout=10)
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "MERCHANT_INACTIVE")
    assert hkd_balance(service.url) == 10000


# -- 6: one strict amount grammar over gRPC ---------------------------------------


@pytest.mark.parametrize("amount", ["1e1", " 5.00", "5.00\n", "+5.00", ".5", "5.", "00005.00", "-5.00", "5,00"])
def test_lenient_amount_text_is_refused_by_every_money_rpc(service, amount):
    refund = refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=1000, amount=amount)
    assert rpc_error(service.stub.Refund, refund, timeout=10) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT")
    assert rpc_error(service.stub.RecordSale, sale(5004, amount)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                      "INVALID_AMOUNT")
    assert rpc_error(settle, service, amount, "batch-lenient") == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                   "INVALID_AMOUNT")
    assert hkd_balance(service.url) == 10000
    assert scalar(service.url, "SELECT COUNT(*) FROM transactions WHERE type = 'REFUND'") == 0


# -- the journal -------------------------------------------------------------------


def test_every_money_movement_is_one_journal_entry_and_the_balance_is_their_sum(service):
    service.stub.RecordSale(sale(5005, "20.00"))
    service.stub.RecordSale(sale(5005, "20.00"))  # the same sale again credits nothing
    service.stub.Refund(refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=1000, amount="10.00"))
    service.stub.Refund(refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=5005, amount="5.00"))
    settle(service, "30.00", "batch-j")
    assert run_admin(service.url, "balance", "adjust", str(MERCHANT), "HKD", "-0.50", "--reason", "fee")[0] == 0

    engine = db.make_engine(service.url)
    with engine.connect() as connection:
        entries = connection.execute(sa.select(
            schema.ledger_entries.c.kind, schema.ledger_entries.c.amount, schema.ledger_entries.c.balance_after)
            .where(schema.ledger_entries.c.currency == "HKD", schema.ledger_entries.c.merchant_id == MERCHANT)
            .order_by(schema.ledger_entries.c.id)).all()
    engine.dispose()
    assert [tuple(e) for e in entries] == [("OPENING", 10000, 10000), ("SALE", 2000, 12000), ("REFUND", -1000, 11000),
                                           ("REFUND", -500, 10500), ("SETTLEMENT", -3000, 7500),
                                           ("ADJUSTMENT", -50, 7450)]
    assert hkd_balance(service.url) == 7450
    assert_ledger_holds(service.url)


def test_journal_entries_cannot_be_updated_or_deleted(database_url):
    data.load(database_url, [data.merchant(MERCHANT, balances={"HKD": "100.00"})], [])
    for statement in ("UPDATE ledger_entries SET amount = 1", "DELETE FROM ledger_entries"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            execute(database_url, statement)
    assert scalar(database_url, "SELECT SUM(amount) FROM ledger_entries") == 10000


# -- balance adjust and verify -------------------------------------------------------


def test_balance_adjust_is_journaled_idempotent_and_never_overdraws(service):
    assert run_admin(service.url, "balance", "adjust", str(MERCHANT), "HKD", "25.00", "--reason", "goodwill",
                     "--id", "adj-1")[0] == 0
    code, out = run_admin(service.url, "balance", "adjust", str(MERCHANT), "HKD", "25.00", "--reason", "goodwill",
                          "--id", "adj-1")
    assert code == 0 and "nothing changed" in out
    code, out = run_admin(service.url, "balance", "adjust", str(MERCHANT), "HKD", "-1.00", "--reason", "x",
                          "--id", "adj-1")
    assert code == 1 and "another merchant, currency or amount" in out
    code, out = run_admin(service.url, "balance", "adjust", str(MERCHANT), "HKD", "-125.01", "--reason", "too much")
    assert code == 1 and "below zero" in out
    for bad in (["HKD", "1.001"], ["HKD", "0"], ["XXX", "1.00"], ["HKD", "1e2"]):
        assert run_admin(service.url, "balance", "adjust", str(MERCHANT), *bad, "--reason", "r")[0] == 2
    assert hkd_balance(service.url) == 12500
    assert run_admin(service.url, "balance", str(MERCHANT))[1].count("HKD 125.00") == 1
    assert_ledger_holds(service.url)


def test_concurrent_adjustments_with_one_id_move_the_balance_once(database_url):
    data.load(database_url, [data.merchant(MERCHANT, balances={"HKD": "100.00"})], [])
    engine = db.make_engine(database_url)
    try:
        with ThreadPoolExecutor(8) as pool:
            made = list(pool.map(lambda _: ledger.adjust_balance(engine, MERCHANT, "HKD", -250, "fee", "adj-race"),
                                 range(16)))
    finally:
        engine.dispose()
    assert sum(new for _, new in made) == 1
    assert {adjustment.balance_after for adjustment, _ in made} == {9750}
    assert hkd_balance(database_url) == 9750
    assert_ledger_holds(database_url)


def test_settlements_can_be_listed(service):
    settle(service, "1.00", "batch-list-1")
    settle(service, "2.00", "batch-list-2", merchant=OTHER)
    code, out = run_admin(service.url, "settlements", str(MERCHANT))
    assert code == 0 and "batch-list-1" in out and "batch-list-2" not in out
    assert "batch-list-2" in run_admin(service.url, "settlements")[1]


@pytest.fixture
def busy_ledger(service):
    service.stub.RecordSale(sale(5006, "20.00"))
    service.stub.Refund(refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=1000, amount="10.00"))
    service.stub.Refund(refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=1001, amount="4.00"))
    settle(service, "30.00", "batch-v")
    assert run_admin(service.url, "verify") == (0, run_admin(service.url, "verify")[1])
    return service.url


def _without_append_only(url: str, statement: str) -> None:
    if url.startswith("sqlite"):
        execute(url, "DROP TRIGGER tg_ledger_entries_no_update", statement)
    else:
        execute(url, "ALTER TABLE ledger_entries DISABLE TRIGGER tg_ledger_entries_append_only", statement)


@pytest.mark.parametrize(("tamper", "named"), [
    (lambda url: execute(url, f"UPDATE balances SET unsettled = unsettled + 1 WHERE merchant_id = {MERCHANT} "
                              "AND currency = 'HKD'"),
     "journal sums to"),
    (lambda url: _without_append_only(url, "UPDATE ledger_entries SET amount = amount - 100 WHERE kind = 'SALE'"),
     "is not its balance_after"),
    (lambda url: _without_append_only(url, "UPDATE ledger_entries SET balance_after = balance_after + 1 "
                                           "WHERE kind = 'SETTLEMENT'"),
     "is not its balance_after"),
    (lambda url: execute(url, "UPDATE orders SET status = 'SUCCESS' WHERE id = 1000"), "order 1000 (SUCCESS"),
    (lambda url: execute(url, "UPDATE orders SET status = 'REFUNDED' WHERE id = 1001"), "order 1001 (REFUNDED"),
    (lambda url: execute(url, "UPDATE transactions SET amount = 900 WHERE order_id = 1000 AND type = 'REFUND'"),
     "missing or differs"),
    (lambda url: execute(url, "UPDATE settlements SET amount = 2000"), "settlement batch-v is missing or differs"),
    (lambda url: execute(url, "DELETE FROM refund_attempts WHERE response_code = '0000' AND order_id = 1001"),
     "has 0 approved attempts"),
])
def test_verify_names_every_discrepancy_made_by_hand(busy_ledger, tamper, named):
    tamper(busy_ledger)
    code, out = run_admin(busy_ledger, "verify")
    assert code == admin.EXIT_DISCREPANCIES, out
    assert named in out and "FAIL" in out and "the ledger does not hold" in out


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def unmigrated_url(request, tmp_path):
    """An empty database of each kind, with no schema yet."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    from tests.support.postgres import fresh_postgres_database

    with fresh_postgres_database() as url:
        yield url


def test_migration_0003_journals_the_balances_and_refunds_made_before_it(unmigrated_url):
    """A database that ran before the journal existed: after the migration every
    balance is the sum of its entries and verify holds."""
    url = unmigrated_url
    db.migrate(url, "0002")
    execute(url,
            "INSERT INTO payment_methods VALUES ('VISA', 'FULL_AND_PARTIAL')",
            f"INSERT INTO merchants (id, name, status) VALUES ({MERCHANT}, 'm', 'ACTIVE')",
            f"INSERT INTO balances VALUES ({MERCHANT}, 'HKD', 7000)",
            *(f"INSERT INTO orders VALUES ({o}, {MERCHANT}, 'r{o}', 'HKD', 2000, '{status}', 'VISA', "
              "'2026-11-20 08:00:00.000000', '2026-11-20 08:00:00.000000')"
              for o, status in ((1, "REFUNDED"), (2, "PARTIALLY_REFUNDED"), (3, "SUCCESS"))),
            f"INSERT INTO transactions VALUES (1, 1, {MERCHANT}, 'REFUND', 'HKD', 2000, 'SUCCESS', '', '000001', "
            "'2026-11-21 08:00:00.000000')",
            f"INSERT INTO transactions VALUES (2, 2, {MERCHANT}, 'REFUND', 'HKD', 1000, 'SUCCESS', '', '000002', "
            "'2026-11-21 09:00:00.000000')",
            *(f"INSERT INTO refund_attempts (merchant_id, order_id, merchant_reference, amount, response_code, "
              f"transaction_id, created_at) VALUES ({MERCHANT}, {o}, NULL, 'x', '0000', {o}, "
              "'2026-11-21 08:00:00.000000')" for o in (1, 2)))
    db.migrate(url)
    engine = db.make_engine(url)
    with engine.connect() as connection:
        entries = connection.execute(sa.text("SELECT kind, amount, balance_after FROM ledger_entries ORDER BY id")).all()
    engine.dispose()
    assert [tuple(e) for e in entries] == [("OPENING", 10000, 10000), ("REFUND", -2000, 8000), ("REFUND", -1000, 7000)]
    assert_ledger_holds(url)
