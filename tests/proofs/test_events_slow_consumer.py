"""Issue 14: a slow WatchEvents consumer cannot grow the service's memory.

A backlog of BACKLOG events (large ones: long request ids) is waiting when a
consumer starts reading at one event a second, while a storm of sales goes on
through the same service. If the service read ahead of the consumer (the
whole backlog, or without waiting for each write), its memory would grow by
the backlog's size, many times the bound asserted here. The service reads a
batch at a time and waits on gRPC's flow control, so its memory stays flat
and the other callers are served meanwhile.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import sqlalchemy as sa

from refund.v1 import refund_pb2, refund_pb2_grpc
from tests.support import data

pytestmark = pytest.mark.slow

MERCHANT = 3160001
BACKLOG = 150_000
READ_SECONDS = 20
BOUND_MB = 40


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def backlog(url: str) -> None:
    """BACKLOG credits of 0.01, each with a 128-character request id, in the journal."""
    if url.startswith("sqlite"):
        with sqlite3.connect(sa.make_url(url).database) as connection:
            connection.executemany(
                "INSERT INTO ledger_entries (merchant_id, currency, kind, amount, balance_after, adjustment_id, "
                "created_at, request_id) VALUES (?, 'HKD', 'ADJUSTMENT', 1, ?, ?, '2026-11-29 10:00:00.000000', ?)",
                ((MERCHANT, 100 + i, f"backlog-{i}", f"{i:0128d}") for i in range(1, BACKLOG + 1)))
            connection.execute("UPDATE balances SET unsettled = ? WHERE merchant_id = ?", (100 + BACKLOG, MERCHANT))
        return
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO ledger_entries (merchant_id, currency, kind, amount, balance_after, adjustment_id, "
            "created_at, request_id) SELECT :m, 'HKD', 'ADJUSTMENT', 1, 100 + i, 'backlog-' || i, now(), "
            "lpad(i::text, 128, '0') FROM generate_series(1, :n) i"), {"m": MERCHANT, "n": BACKLOG})
        connection.execute(sa.text("UPDATE balances SET unsettled = :b WHERE merchant_id = :m"),
                           {"b": 100 + BACKLOG, "m": MERCHANT})
    engine.dispose()


def test_a_slow_consumer_does_not_grow_the_services_memory(database_url, start_service):
    data.load(database_url, [data.merchant(MERCHANT, balances={"HKD": "1.00"})], [])
    backlog(database_url)
    service = start_service(database_url)
    pid = service.process.pid
    channel = grpc.insecure_channel(service.address)
    stub = refund_pb2_grpc.RefundServiceStub(channel)
    grpc.channel_ready_future(channel).result(10)
    baseline = rss_mb(pid)

    received, samples, stop = [], [], threading.Event()
    call = stub.WatchEvents(refund_pb2.WatchEventsRequest(), timeout=120)

    def slow_reader():
        for response in call:
            received.append(response.event.sequence)
            if stop.wait(1.0):
                break

    def storm(i: int):
        stub.RecordSale(refund_pb2.RecordSaleRequest(
            order_id=16000 + i, merchant_id=str(MERCHANT), merchant_reference=f"slow-{i}", currency="HKD",
            amount="1.00", payment_method="VISA", stan="000001"), timeout=30)

    reader = threading.Thread(target=slow_reader, daemon=True)
    reader.start()
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(storm, i) for i in range(300)]
        while time.monotonic() - started < READ_SECONDS:
            samples.append(rss_mb(pid))
            time.sleep(0.5)
        for future in futures:
            future.result()
    stop.set()
    call.cancel()
    reader.join(5)
    channel.close()

    growth = max(samples) - baseline
    print(f"service RSS: baseline {baseline:.1f} MB, peak {max(samples):.1f} MB (+{growth:.1f} MB) while a consumer "
          f"read {len(received)} of {BACKLOG + 301} events at 1/s")
    assert READ_SECONDS - 5 <= len(received) <= READ_SECONDS + 5
    assert received == list(range(1, len(received) + 1))
    assert growth < BOUND_MB, f"the service's memory grew by {growth:.1f} MB for a consumer reading 1 event/s"
