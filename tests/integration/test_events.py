"""Issue 14: every money movement is an event, streamed by WatchEvents.

Each test failed on 643d3c9 (there was no WatchEvents). The outbox gap test
also fails on a naive numbering (the journal's id as the sequence on
PostgreSQL): see test_a_late_commit_is_not_skipped_on_postgres.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import sqlalchemy as sa

from refund.v1 import refund_pb2, refund_pb2_grpc
from service import db, events
from tests.support import data
from tests.support.in_process import InProcessService, error_info

MERCHANT, OTHER = 3140001, 3140002


@pytest.fixture
def service(database_url):
    data.load(database_url,
              [data.merchant(MERCHANT, balances={"HKD": "100.00"}), data.merchant(OTHER, balances={"HKD": "50.00"})],
              [data.order(14000 + i, MERCHANT, "10.00") for i in range(5)])
    running = InProcessService(database_url)
    running.url = database_url
    yield running
    running.close()


def journal(url: str) -> list:
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text(
                "SELECT id, merchant_id, currency, kind, amount, balance_after, order_id, transaction_id, "
                "settlement_id, adjustment_id, request_id FROM ledger_entries ORDER BY id")).all()
    finally:
        engine.dispose()


def watch(stub, count: int, timeout: float = 30.0, **request) -> list[refund_pb2.Event]:
    """The first `count` events of a WatchEvents stream (then cancels it)."""
    call = stub.WatchEvents(refund_pb2.WatchEventsRequest(**request), timeout=timeout)
    received = []
    try:
        for response in call:
            received.append(response.event)
            if len(received) == count:
                break
    finally:
        call.cancel()
    return received


def wait_for_events(stub, count: int, timeout: float = 30.0, **request) -> list[refund_pb2.Event]:
    return watch(stub, count, timeout, **request)


def movements(service) -> None:
    """A sale, a refund, a settlement: with request ids."""
    stub = service.stub
    stub.RecordSale(refund_pb2.RecordSaleRequest(
        order_id=14100, merchant_id=str(MERCHANT), merchant_reference="sale-14100", currency="HKD", amount="25.00",
        payment_method="VISA", masked_pan="411111******1111", stan="000001"), metadata=[("x-request-id", "req-sale")])
    stub.Refund(refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=14000, amount="4.50"),
                metadata=[("x-request-id", "req-refund")])
    stub.Settle(refund_pb2.SettleRequest(merchant_id=str(MERCHANT), currency="HKD", amount="20.00",
                                         settlement_id="batch-1"), metadata=[("x-request-id", "req-settle")])


def test_every_journal_entry_is_one_event_with_its_fields(service):
    movements(service)
    entries = journal(service.url)
    assert [e.kind for e in entries] == ["OPENING", "OPENING", "SALE", "REFUND", "SETTLEMENT"]
    got = wait_for_events(service.stub, len(entries))
    assert [e.sequence for e in got] == list(range(1, len(entries) + 1))
    assert [e.event_id for e in got] == [f"evt-{e.id}" for e in entries]
    by_type = {e.type: e for e in got}
    sale, refund, settlement = by_type["SALE"], by_type["REFUND"], by_type["SETTLEMENT"]
    assert (sale.merchant_id, sale.order_id, sale.amount, sale.currency, sale.balance_after, sale.request_id) == (
        str(MERCHANT), 14100, "25.00", "HKD", "125.00", "req-sale")
    assert sale.transaction_id == entries[2].transaction_id
    assert (refund.order_id, refund.amount, refund.balance_after, refund.request_id) == (
        14000, "-4.50", "120.50", "req-refund")
    assert refund.transaction_id == entries[3].transaction_id > 0
    assert (settlement.settlement_id, settlement.amount, settlement.balance_after, settlement.request_id) == (
        "batch-1", "-20.00", "100.50", "req-settle")
    assert all(e.time.seconds > 0 for e in got)
    assert "411111" not in str(got), "an event never carries a card number (not even masked)"


@pytest.mark.parametrize("scan", [events.SCAN, 2])
def test_replay_from_a_cursor_and_the_filters(service, scan, monkeypatch):
    """Also with reads that scan 2 sequence numbers at a time: a filtered
    stream moves past the events that do not match, a window at a time."""
    monkeypatch.setattr(events, "SCAN", scan)
    movements(service)
    everything = wait_for_events(service.stub, 5)
    after_two = wait_for_events(service.stub, 3, after_sequence=2)
    assert after_two == everything[2:]
    mine = wait_for_events(service.stub, 4, merchant_id=str(MERCHANT))
    assert [e.sequence for e in mine] == [e.sequence for e in everything if e.merchant_id == str(MERCHANT)]
    refunds_and_settlements = wait_for_events(service.stub, 2, types=["REFUND", "SETTLEMENT"])
    assert [e.type for e in refunds_and_settlements] == ["REFUND", "SETTLEMENT"]
    others = wait_for_events(service.stub, 1, merchant_id=str(OTHER), types=["OPENING"])
    assert others[0].merchant_id == str(OTHER)


def test_the_stream_follows_new_movements_live(service):
    received, done = [], threading.Event()
    call = service.stub.WatchEvents(refund_pb2.WatchEventsRequest(after_sequence=2, types=["SALE", "REFUND"]),
                                    timeout=60)

    def read():
        for response in call:
            received.append((time.monotonic(), response.event))
            if len(received) == 2:
                break
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.5)
    assert received == []
    sent = time.monotonic()
    movements(service)
    assert done.wait(30), "the live events did not arrive"
    call.cancel()
    assert [e.type for _, e in received] == ["SALE", "REFUND"]
    assert received[0][0] - sent < 10


@pytest.mark.parametrize("request_fields, text", [
    ({"after_sequence": -1}, "after_sequence"),
    ({"merchant_id": "12x"}, "merchant"),
    ({"types": ["REFUND", "CHARGEBACK"]}, "CHARGEBACK"),
])
def test_a_malformed_request_is_invalid_argument(service, request_fields, text):
    with pytest.raises(grpc.RpcError) as raised:
        watch(service.stub, 1, timeout=10, **request_fields)
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert text in raised.value.details()
    info, _ = error_info(raised.value)
    assert info.reason == "INVALID_REQUEST"


class Reader:
    """A WatchEvents consumer on its own thread, from a cursor."""

    def __init__(self, stub, after: int = 0, **request):
        self.events: list[refund_pb2.Event] = []
        self.arrived: list[float] = []
        self.error = None
        self.call = stub.WatchEvents(refund_pb2.WatchEventsRequest(after_sequence=after, **request), timeout=120)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for response in self.call:
                self.events.append(response.event)
                self.arrived.append(time.monotonic())
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                self.error = exc

    def wait_for(self, count: int, timeout: float = 30.0) -> list[refund_pb2.Event]:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline and self.error is None:
            time.sleep(0.02)
        assert self.error is None, self.error
        assert len(self.events) >= count, f"{len(self.events)} events of {count} arrived"
        return self.events

    def close(self):
        self.call.cancel()
        self.thread.join(5)


@pytest.mark.postgres
def test_a_late_commit_is_not_skipped_on_postgres(postgres_url):
    """The classic outbox gap: a transaction takes journal id N and commits
    after transactions that took N+1, N+2, ... and whose events a consumer has
    already received. A consumer trusting `id > cursor` would never see N.
    Ours receives it, with the next sequence, and every event exactly once."""
    import psycopg

    data.load(postgres_url, [data.merchant(MERCHANT, balances={"HKD": "100.00"}),
                             data.merchant(OTHER, balances={"HKD": "50.00"})], [])
    service = InProcessService(postgres_url)
    reader = Reader(service.stub)
    late = psycopg.connect(sa.make_url(postgres_url).set(drivername="postgresql").render_as_string(False))
    try:
        reader.wait_for(2)
        with late.cursor() as cursor:  # an adjustment, its transaction held open
            cursor.execute("UPDATE balances SET unsettled = unsettled + 100 WHERE merchant_id = %s", (OTHER,))
            cursor.execute("INSERT INTO balance_adjustments VALUES ('late-1', %s, 'HKD', 100, 5100, 'test', now())",
                           (OTHER,))
            cursor.execute("INSERT INTO ledger_entries (merchant_id, currency, kind, amount, balance_after, "
                           "adjustment_id, created_at) VALUES (%s, 'HKD', 'ADJUSTMENT', 100, 5100, 'late-1', now()) "
                           "RETURNING id", (OTHER,))
            late_id = cursor.fetchone()[0]
        sent = []
        for i in range(3):
            sent.append(time.monotonic())
            service.stub.RecordSale(refund_pb2.RecordSaleRequest(
                order_id=14200 + i, merchant_id=str(MERCHANT), merchant_reference=f"late-{i}", currency="HKD",
                amount="1.00", payment_method="VISA", stan="000001"))
        before = reader.wait_for(5)
        latencies = [arrived - start for arrived, start in zip(reader.arrived[2:5], sent, strict=False)]
        assert all(int(e.event_id.split("-")[1]) > late_id for e in before[2:5]), \
            "the later sales took higher journal ids: a reader trusting id > cursor would skip the late one"
        time.sleep(0.5)
        assert len(reader.events) == 5, "the open transaction's entry is not an event before it commits"
        late.commit()
        after = reader.wait_for(6)
        assert after[5].event_id == f"evt-{late_id}" and after[5].type == "ADJUSTMENT"
        assert [e.sequence for e in after] == [1, 2, 3, 4, 5, 6]
        resumed = Reader(service.stub, after=4)
        assert [e.sequence for e in resumed.wait_for(2)] == [5, 6]
        resumed.close()
        entries = journal(postgres_url)
        assert sorted(e.event_id for e in after) == sorted(f"evt-{e.id}" for e in entries)
        print(f"commit to consumer, idle: {[round(x * 1000, 1) for x in latencies]} ms")
    finally:
        late.close()
        reader.close()
        service.close()


def test_refund_admin_events_lists_the_events_and_the_relay_positions(service):
    import contextlib
    import io

    from service import admin

    movements(service)
    wait_for_events(service.stub, 5)

    def run(*args):
        output = io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            code = admin.main(["--database-url", service.url, "events", *args])
        return code, output.getvalue()

    code, text = run()
    assert code == 0, text
    assert "events: 5 (last sequence 5)" in text and "relays: none has run" in text
    assert "REFUND" in text and "-4.50" in text and "request req-refund" in text and "settlement batch-1" in text
    code, text = run("--after", "3", "--type", "SETTLEMENT", "--merchant", str(MERCHANT))
    assert code == 0 and text.count("evt-") == 1 and "SETTLEMENT" in text
    engine = db.make_engine(service.url)
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO event_relays VALUES ('nats', 3, CURRENT_TIMESTAMP)"))
    engine.dispose()
    code, text = run("--limit", "1")
    assert "relay nats: published through 3 (2 unpublished, oldest unpublished" in text
    code, text = run("--type", "CHARGEBACK")
    assert code == 2 and "unknown event type" in text and "Traceback" not in text


def test_streams_end_cleanly_when_the_service_drains(sqlite_url, start_service):
    """SIGTERM: an open stream (caught up, waiting for events) ends with OK at
    once rather than holding the drain for its grace period."""
    data.load(sqlite_url, [data.merchant(MERCHANT, balances={"HKD": "100.00"})], [])
    process = start_service(sqlite_url, "--grace", "30")
    with grpc.insecure_channel(process.address) as channel:
        call = refund_pb2_grpc.RefundServiceStub(channel).WatchEvents(refund_pb2.WatchEventsRequest(), timeout=60)
        assert next(call).event.type == "OPENING"
        started = time.monotonic()
        process.process.send_signal(__import__("signal").SIGTERM)
        assert list(call) == [], "the stream ends after the event it was writing"
        assert call.code() is grpc.StatusCode.OK
        assert process.process.wait(30) == 0
        assert time.monotonic() - started < 15, "the drain did not wait for the stream's grace period"


def test_the_outbox_alert_rules_pass_their_promtool_unit_tests():
    import shutil
    import subprocess

    from tests.support import ROOT

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    done = subprocess.run([promtool, "test", "rules", "events_alerts_test.yml"], cwd=ROOT / "ops" / "prometheus",
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_migration_0004_makes_the_journal_already_there_events(database_url):
    """A database with journal entries from before 0004: after the upgrade each
    is an event, numbered in id order, and new entries follow them."""
    from alembic import command

    config = db.alembic_config(database_url)
    command.downgrade(config, "0003")
    engine = db.make_engine(database_url)
    with engine.begin() as connection:
        for i, amount in enumerate((500, 200, -100), start=1):
            connection.execute(sa.text(
                "INSERT INTO ledger_entries (merchant_id, currency, kind, amount, balance_after, adjustment_id, "
                "created_at) VALUES (:m, 'HKD', :kind, :amount, :after, :adjustment, CURRENT_TIMESTAMP)"),
                {"m": MERCHANT, "kind": "OPENING" if i == 1 else "ADJUSTMENT", "amount": amount,
                 "after": (500, 700, 600)[i - 1], "adjustment": None if i == 1 else f"old-{i}"})
    engine.dispose()
    command.upgrade(config, "head")
    data.load(database_url, [data.merchant(MERCHANT)], [])
    service = InProcessService(database_url)
    try:
        service.stub.RecordSale(refund_pb2.RecordSaleRequest(
            order_id=14300, merchant_id=str(MERCHANT), merchant_reference="after-0004", currency="HKD",
            amount="1.00", payment_method="VISA", stan="000001"))
        got = wait_for_events(service.stub, 4)
    finally:
        service.close()
    assert [(e.sequence, e.type, e.amount) for e in got] == [
        (1, "OPENING", "5.00"), (2, "ADJUSTMENT", "2.00"), (3, "ADJUSTMENT", "-1.00"), (4, "SALE", "1.00")]


def test_the_outbox_alerts_use_only_what_the_relay_exports():
    import yaml

    from service import relay  # noqa: F401  (registers the relay's metrics)
    from tests.support import ROOT
    from tests.support.prometheus import exported, names_and_labels

    rules = yaml.safe_load((ROOT / "ops" / "prometheus" / "events_alerts.yml").read_text())
    known_names, known_labels = exported()
    for rule in (rule for group in rules["groups"] for rule in group["rules"]):
        names, labels = names_and_labels(rule["expr"])
        assert names and names <= known_names, (names - known_names, rule["expr"])
        assert labels <= known_labels, (labels - known_labels, rule["expr"])
