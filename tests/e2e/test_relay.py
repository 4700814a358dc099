"""Issue 14: refund-relay publishes the outbox to NATS JetStream (a private
nats-server per test), marks an event published only after the broker's
acknowledgement, and several relays neither publish twice nor out of order.
Each test failed on 643d3c9 (there was no relay)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from refund.v1 import refund_pb2
from service import db, relay
from tests.support import ROOT, data
from tests.support.events import cloud_events, consume_with_redelivery, proto_events
from tests.support.in_process import InProcessService
from tests.support.processes import Process

pytestmark = pytest.mark.postgres

MERCHANT = 3150001


@pytest.fixture
def service(postgres_url):
    data.load(postgres_url, [data.merchant(MERCHANT, balances={"HKD": "1000.00"})],
              [data.order(15000 + i, MERCHANT, "10.00") for i in range(20)])
    running = InProcessService(postgres_url)
    running.url = postgres_url
    yield running
    running.close()


def scalar(url: str, sql: str):
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text(sql)).scalar()
    finally:
        engine.dispose()


def entry_ids(url: str) -> list[str]:
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            return [f"evt-{i}" for i in connection.execute(sa.text("SELECT id FROM ledger_entries")).scalars()]
    finally:
        engine.dispose()


def position(url: str) -> int:
    return scalar(url, "SELECT COALESCE(MAX(last_sequence), 0) FROM event_relays") or 0


def wait_until(condition, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def all_published(url: str) -> bool:
    head = scalar(url, "SELECT COUNT(*) FROM ledger_entries")
    return position(url) == head and scalar(url, "SELECT COUNT(*) FROM event_sequence") == head


def refunds(service, orders: range) -> None:
    for order in orders:
        service.stub.Refund(refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=order, amount="1.00"))


def test_every_event_is_published_once_in_order_in_both_forms(service, nats_server):
    refunds(service, range(15000, 15005))
    relay_process = Process.relay(service.url, nats_server.url)
    try:
        wait_until(lambda: all_published(service.url), what="the relay to publish everything")
        refunds(service, range(15005, 15008))
        wait_until(lambda: all_published(service.url), what="the relay to publish the new events")
        published = proto_events(nats_server.url)
        assert [e.sequence for _, e in published] == list(range(1, 10)), "the stream holds the sequence in order"
        assert [msg_id for msg_id, _ in published] == [e.event_id for _, e in published]
        assert sorted(e.event_id for _, e in published) == sorted(entry_ids(service.url))
        assert [e.type for _, e in published].count("REFUND") == 8
        documents = cloud_events(nats_server.url)
        assert [d["id"] for d in documents] == [e.event_id for _, e in published]
        refund = documents[-1]
        assert (refund["specversion"], refund["type"], refund["subject"], refund["datacontenttype"]) == (
            "1.0", "refund.v1.refund", f"merchants/{MERCHANT}", "application/json")
        assert refund["data"]["amount"] == "-1.00" and refund["data"]["sequence"] == "9"
        assert relay_process.metric("refund_relay_leader") == 1
    finally:
        assert relay_process.close() == 0, "the relay stops cleanly on SIGTERM"


def test_the_position_moves_only_after_the_broker_acknowledged(service, nats_server):
    relay_process = Process.relay(service.url, nats_server.url)
    try:
        wait_until(lambda: all_published(service.url), what="the opening event")
        nats_server.kill()
        before = position(service.url)
        refunds(service, range(15000, 15004))
        time.sleep(3)
        assert position(service.url) == before, "no acknowledgement, no progress"
        wait_until(lambda: (relay_process.metric("refund_outbox_oldest_unpublished_age_seconds") or 0) > 1,
                   what="the outbox lag metric to show the unpublished events")
        assert relay_process.metric("refund_outbox_unpublished_events") == 4
        nats_server.start()
        wait_until(lambda: all_published(service.url), what="the relay to catch up after the broker came back")
        published = proto_events(nats_server.url)
        assert [e.sequence for _, e in published] == [1, 2, 3, 4, 5]
        wait_until(lambda: relay_process.metric("refund_outbox_oldest_unpublished_age_seconds") == 0,
                   what="the lag to return to 0")
    finally:
        relay_process.close()


def test_two_relays_one_publishes_and_the_other_takes_over_without_duplicates(service, nats_server):
    first = Process.relay(service.url, nats_server.url)
    second = Process.relay(service.url, nats_server.url)
    try:
        wait_until(lambda: all_published(service.url), what="the opening event")
        wait_until(lambda: (first.metric("refund_relay_leader"), second.metric("refund_relay_leader")) in (
            (1, 0), (0, 1)), what="exactly one leader")
        leader, standby = (first, second) if first.metric("refund_relay_leader") == 1 else (second, first)
        refunds(service, range(15000, 15006))
        leader.kill()
        refunds(service, range(15006, 15012))
        wait_until(lambda: all_published(service.url), what="the standby to take over")
        assert standby.metric("refund_relay_leader") == 1
        published = proto_events(nats_server.url)
        assert [e.sequence for _, e in published] == list(range(1, 14)), "each event once, in order"
    finally:
        first.close()
        second.close()


def test_broker_redeliveries_carry_the_same_id_and_dedupe_leaves_one_effect(service, nats_server):
    refunds(service, range(15000, 15010))
    relay_process = Process.relay(service.url, nats_server.url)
    try:
        wait_until(lambda: all_published(service.url), what="the relay to publish everything")
    finally:
        relay_process.close()
    deliveries = consume_with_redelivery(nats_server.url, relay.stream_names(relay.DEFAULT_PREFIX)[0], 11)
    redelivered = [d for d in deliveries if d[2] > 1]
    assert redelivered, "the broker redelivered the unacknowledged messages"
    for msg_id, payload, _ in redelivered:
        assert refund_pb2.Event.FromString(payload).event_id == msg_id, "a redelivery carries the same id"
    applied, balance = set(), 0  # the consumer's effect: the sum of the amounts of the events it applied
    for msg_id, payload, _ in deliveries:
        if msg_id not in applied:
            applied.add(msg_id)
            balance += int(refund_pb2.Event.FromString(payload).amount.replace(".", ""))
    assert len(deliveries) > len(applied) == 11
    assert balance == scalar(service.url, f"SELECT unsettled FROM balances WHERE merchant_id = {MERCHANT}")


def test_the_relay_refuses_sqlite_with_a_clear_message(sqlite_url):
    done = subprocess.run([sys.executable, "-m", "service.relay", "--database-url", sqlite_url], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "needs PostgreSQL" in done.stderr and "Traceback" not in done.stderr
