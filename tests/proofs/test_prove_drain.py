"""Issue 4, item 5: drain. SIGTERM with refunds in flight through the edge:
every call in flight finishes with its real answer, new calls are refused,
and the process exits 0 within its grace period. Both for `refund-edge`
(new connections refused) and for `refund-service` behind a running edge
(new calls answered 9001 by the edge). The calls are kept in flight by a
lock the test holds on the database (a row lock on PostgreSQL, the write lock
on SQLite), released after the signal.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa

from tests.support import data
from tests.support.data import refund_text
from tests.support.http import post, post_all
from tests.support.keys import example_key, public_pem, signed_body
from tests.support.ledger import check_ledger

MERCHANT = 7400001
FIRST_ORDER = 740_000
IN_FLIGHT = 10
EDGE_DEADLINE = 15.0
EDGE_GRACE = int(10 + EDGE_DEADLINE) + 2  # refund-edge: body timeout + deadline + 2 s
SERVICE_GRACE = 20.0


def _hold(url: str):
    """Lock what the refunds need; returns the function that releases it."""
    if url.startswith("sqlite"):
        connection = sqlite3.connect(sa.make_url(url).database, isolation_level=None)
        connection.execute("BEGIN IMMEDIATE")
        return lambda: (connection.execute("ROLLBACK"), connection.close())
    engine = sa.create_engine(url)
    connection = engine.connect()
    connection.execute(sa.text("SELECT id FROM orders WHERE merchant_id = :m FOR UPDATE"), {"m": MERCHANT})
    return lambda: (connection.rollback(), connection.close(), engine.dispose())


def _setup(url, start_service, start_edge):
    key = example_key()
    data.load(url, [data.merchant(MERCHANT, public_pem(key), balances={"HKD": "1000.00"})],
              [data.order(FIRST_ORDER + i, MERCHANT, "10.00") for i in range(IN_FLIGHT + 1)])
    service = start_service(url, "--db-timeout", "20", "--grace", str(SERVICE_GRACE))
    edge = start_edge(service.address, deadline=EDGE_DEADLINE)
    bodies = [signed_body(key, refund_text(MERCHANT, "10.00", order_id=FIRST_ORDER + i)) for i in range(IN_FLIGHT + 1)]
    return service, edge, bodies


def _in_flight(edge_address: str, bodies: list[bytes]):
    """Send the bodies from a thread; returns (thread, answers list)."""
    answers = []
    thread = threading.Thread(target=lambda: answers.extend(asyncio.run(post_all([edge_address], bodies))))
    thread.start()
    return thread, answers


def test_sigterm_to_the_edge_finishes_the_refunds_in_flight_refuses_new_ones_and_exits_in_grace(
        database_url, start_service, start_edge):
    _, edge, bodies = _setup(database_url, start_service, start_edge)
    release = _hold(database_url)
    try:
        thread, answers = _in_flight(edge.address, bodies[:IN_FLIGHT])
        time.sleep(1.0)
        assert thread.is_alive() and not answers, "the calls were supposed to be waiting on the lock"
        signalled = time.monotonic()
        edge.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # new connections are refused at once
            socket.create_connection((edge.host, edge.port), timeout=1).close()
        assert edge.process.poll() is None, "the edge left before its calls in flight finished"
    finally:
        time.sleep(0.5)
        release()
    thread.join(EDGE_GRACE)
    assert edge.process.wait(EDGE_GRACE) == 0
    took = time.monotonic() - signalled
    assert took < EDGE_GRACE
    assert [a.code for a in answers] == ["0000"] * IN_FLIGHT, [a.body for a in answers]
    check_ledger(database_url, {(MERCHANT, "HKD"): 100000})
    print(f"\nedge drain ({database_url.split(':')[0]}): {IN_FLIGHT} in flight all 0000, new connections "
          f"refused, exit 0 after {took:.2f} s (grace {EDGE_GRACE} s)")


def test_sigterm_to_the_service_behind_the_edge_finishes_the_refunds_in_flight_and_refuses_new_ones(
        database_url, start_service, start_edge):
    service, edge, bodies = _setup(database_url, start_service, start_edge)
    release = _hold(database_url)
    try:
        thread, answers = _in_flight(edge.address, bodies[:IN_FLIGHT])
        time.sleep(1.0)
        assert thread.is_alive() and not answers
        signalled = time.monotonic()
        service.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = asyncio.run(post(edge.address, bodies[IN_FLIGHT], timeout=EDGE_DEADLINE + 5))
        assert (refused.status, refused.code) == (503, "9001"), refused
        assert refused.elapsed < 2.0, refused.elapsed
        assert service.process.poll() is None, "the service left before its calls in flight finished"
    finally:
        time.sleep(0.5)
        release()
    thread.join(SERVICE_GRACE)
    assert service.process.wait(SERVICE_GRACE) == 0
    took = time.monotonic() - signalled
    assert took < SERVICE_GRACE
    assert [a.code for a in answers] == ["0000"] * IN_FLIGHT, [a.body for a in answers]
    ledger = check_ledger(database_url, {(MERCHANT, "HKD"): 100000})
    assert FIRST_ORDER + IN_FLIGHT not in ledger.refunds  # the refused call refunded nothing
    print(f"\nservice drain ({database_url.split(':')[0]}): {IN_FLIGHT} in flight all 0000, a new call got 9001 "
          f"in {refused.elapsed:.2f} s, exit 0 after {took:.2f} s (grace {SERVICE_GRACE:g} s)")
