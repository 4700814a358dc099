"""Issue 14: an event storm. Refunds, sales (each sent twice) and settlements
over gRPC, all at once, while refund-service processes are killed with
SIGKILL and restarted and, on PostgreSQL, so are the relay that holds the
lock and a private nats-server. A WatchEvents consumer reconnects after every
end or error with its last sequence. Afterwards:

- the set of events equals the set of journal entries, one each, numbered
  1..N without gaps;
- the consumer saw every event, in sequence order, none missing, none twice;
- (PostgreSQL) the broker's stream holds every event; whatever it holds or
  delivers twice carries the same id, and a consumer that dedupes on the id
  applies each movement once: its sum of amounts is every balance;
- `refund-admin verify` holds.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from refund.v1 import refund_pb2
from service import db, domain, ledger, relay
from tests.support import data
from tests.support.events import NatsServer, WatchConsumer, consume_with_redelivery, proto_events
from tests.support.processes import Process, restartable_service
from tests.support.storm_clients import Clients

pytestmark = pytest.mark.slow

MERCHANTS = (7400001, 7400002)
INITIAL = 1_000_000
ORDERS_PER_MERCHANT = 50
SALES_PER_MERCHANT = 20
SETTLEMENTS_PER_MERCHANT = 10
WAVES = 5


def _read(url: str, sql: str) -> list:
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text(sql)).all()
    finally:
        engine.dispose()


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _storm(url: str, service_count: int, broker: bool) -> None:
    data.load(url, [data.merchant(m, balances={"HKD": domain.format_minor(INITIAL, "HKD")}) for m in MERCHANTS],
              [data.order(m * 1000 + i, m, f"{10 + i % 7}.{i % 100:02d}", reference=f"ev-storm-{m}-{i}")
               for m in MERCHANTS for i in range(ORDERS_PER_MERCHANT)])
    services = [restartable_service(url) for _ in range(service_count)]
    addresses = [address for _, address in services]
    nats_server = NatsServer() if broker else None
    relays = [Process.relay(url, nats_server.url) for _ in range(2)] if broker else []
    consumer = WatchConsumer(addresses)
    clients = Clients(addresses, [])

    operations = []
    for m in MERCHANTS:
        for i in range(ORDERS_PER_MERCHANT):
            operations.append((clients.refund, m, m * 1000 + i, f"{1 + i % 9}.{i % 100:02d}"))
        for i in range(SALES_PER_MERCHANT):
            operations.append((clients.sale, m, m * 100_000 + i, f"{20 + i}.50"))
        for i in range(SETTLEMENTS_PER_MERCHANT):
            operations.append((clients.settle, m, f"ev-storm-{m}-batch-{i}", f"{5 + i}.25"))
    random.Random(14).shuffle(operations)

    # What is killed in each wave after the first: the service the consumer
    # reads from, the relay that holds the lock, the broker.
    victims = ["service", "relay", "broker", "service"] if broker else ["service"] * (WAVES - 1)
    kills, restarts = [], []

    def kill(victim: str, wave: int) -> None:
        if victim == "service":  # the one the consumer reads from
            process = next(p for p, address in services if address == consumer.current)
            process.kill()
            restarts.append(threading.Thread(target=process.restart))
        elif victim == "relay":
            leader = next((r for r in relays if r.metric("refund_relay_leader") == 1), relays[0])
            leader.kill()
            restarts.append(threading.Thread(target=leader.restart))
        else:
            nats_server.kill()
            restarts.append(threading.Thread(target=lambda: (time.sleep(1), nats_server.start())))
        restarts[-1].start()
        kills.append(victim)

    try:
        with ThreadPoolExecutor(10) as pool:
            for n in range(WAVES):
                futures = [pool.submit(operation, *args) for operation, *args in operations[n::WAVES]]
                if n:
                    while sum(f.done() for f in futures) < len(futures) // 3:
                        time.sleep(0.01)
                    kill(victims[n - 1], n)
                for future in futures:
                    future.result()
                for restart in restarts:
                    restart.join()

        entries = [row[0] for row in _read(url, "SELECT id FROM ledger_entries ORDER BY id")]
        _wait_until(lambda: len(consumer.events) >= len(entries), 120, "the consumer to see every event")
        time.sleep(0.5)  # anything more (a duplicate) would arrive now
        if broker:
            _wait_until(lambda: _read(url, "SELECT MAX(last_sequence) FROM event_relays")[0][0] == len(entries),
                        120, "the relay to publish every event")
    finally:
        consumer.close()
        for process, _ in services:
            process.close()
        for relay_process in relays:
            relay_process.close()

    try:
        assert sum(clients.retries.values()) > 0, "nothing was ever retried: the chaos did not bite"
        assert kills.count("service") >= 1 and consumer.reconnects >= kills.count("service"), \
            (kills, consumer.reconnects)
        assert consumer.errors == []

        # The set of events is the set of journal entries, one each, numbered 1..N.
        numbered = _read(url, "SELECT seq, entry_id FROM events ORDER BY seq")
        assert [seq for seq, _ in numbered] == list(range(1, len(entries) + 1))
        assert sorted(entry for _, entry in numbered) == entries
        expected_ids = [f"evt-{entry}" for _, entry in numbered]

        # The consumer that reconnected after every kill saw each, in order, once.
        assert [e.sequence for e in consumer.events] == list(range(1, len(entries) + 1))
        assert [e.event_id for e in consumer.events] == expected_ids

        result = ledger.verify(url)
        assert result.holds, result.discrepancies
        balances = dict(_read(url, "SELECT merchant_id, unsettled FROM balances WHERE currency = 'HKD'"))

        def effect(events) -> dict:
            totals = defaultdict(int)
            for event in events:
                totals[int(event.merchant_id)] += domain.to_minor(event.amount.lstrip("-"), event.currency) * (
                    -1 if event.amount.startswith("-") else 1)
            return dict(totals)

        assert effect(consumer.events) == balances

        if broker:
            stored = proto_events(nats_server.url)
            first_seen, duplicates = {}, 0
            for msg_id, event in stored:
                assert msg_id == event.event_id
                if msg_id in first_seen:
                    duplicates += 1
                    assert first_seen[msg_id] == event, "a duplicate is the same event"
                else:
                    first_seen[msg_id] = event
            assert list(first_seen) == expected_ids, "the broker holds every event, in sequence order"
            deliveries = consume_with_redelivery(nats_server.url, relay.stream_names(relay.DEFAULT_PREFIX)[0],
                                                 len(entries))
            applied = {}
            for msg_id, payload, _ in deliveries:
                event = refund_pb2.Event.FromString(payload)
                assert event.event_id == msg_id
                applied.setdefault(msg_id, event)  # the consumer's dedupe: the first delivery of an id only
            assert len(deliveries) > len(applied) == len(entries)
            assert effect(applied.values()) == balances
            print(f"broker: {len(stored)} stored for {len(entries)} events ({duplicates} duplicates), "
                  f"{len(deliveries)} deliveries")
        print(f"events: {len(entries)}, kills: {kills}, consumer reconnects: {consumer.reconnects}, "
              f"client retries: {dict(clients.retries)}")
    finally:
        if nats_server is not None:
            nats_server.close()


@pytest.mark.postgres
def test_event_storm_on_postgres_with_relays_and_a_broker_killed(postgres_url):
    _storm(postgres_url, service_count=2, broker=True)


def test_event_storm_on_sqlite(sqlite_url):
    _storm(sqlite_url, service_count=1, broker=False)
