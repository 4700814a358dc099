"""Issue 4, item 3: database faults under a steady load through the edge.

PostgreSQL: a cluster of this test's own (never the machine's shared one) is
stopped in immediate mode (every backend killed, no checkpoint: a crash) and
started again, repeatedly, while signed refunds keep coming. Every call must
answer 0000, 3003, 4004 or 9001 within the edge's deadline plus one second;
afterwards no order is refunded twice, nothing is half written (an order is
marked refunded exactly when it has its REFUND transaction and its approved
audit row, and the balance is debited by exactly those refunds), every 0000
that was answered is in the database, and the same service process serves
again without a restart.

SQLite: the service is killed with SIGKILL in the middle of the load and
started again: `PRAGMA integrity_check` is ok after every kill, and the same
invariants hold.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import threading
import time
from collections import Counter

import pytest
import sqlalchemy as sa

from tests.support import data
from tests.support.cards import assert_no_card_data
from tests.support.data import refund_text
from tests.support.http import Reply, latency_summary, post, post_many
from tests.support.keys import generated_key, public_pem, signed_body
from tests.support.ledger import check_ledger
from tests.support.processes import free_port

MERCHANT = 7200001
ORDERS = 1500
FIRST_ORDER = 720_000
BALANCE = 700_000  # 7,000.00 HKD: covers about 2/3 of what the orders could take
DEADLINE = 2.0     # the edge's deadline; the service's database timeout is 1 s
WORKERS = 6
PACE = 0.025     # seconds each client waits between calls: approvals go on through the whole run
ALLOWED = {"0000", "3003", "4004", "9001"}


def _amount(order_id: int) -> str:
    """Even orders are refunded in full (10.00), odd ones in part (4.00)."""
    return "10.00" if order_id % 2 == 0 else "4.00"


def _seed(url: str):
    key = generated_key("fault-merchant")
    data.load(url, [data.merchant(MERCHANT, public_pem(key), balances={"HKD": "7000.00"})],
              [data.order(FIRST_ORDER + i, MERCHANT, "10.00") for i in range(ORDERS)])
    return {o: signed_body(key, refund_text(MERCHANT, _amount(o), order_id=o))
            for o in range(FIRST_ORDER, FIRST_ORDER + ORDERS)}


async def _steady_load(edge_address: str, bodies: dict, stop: threading.Event, seed: int) -> list[Reply]:
    """WORKERS clients, each sending one refund after another until `stop`."""
    answers: list[Reply] = []
    order_ids = list(bodies)

    async def worker(n: int):
        rng = random.Random(seed * 100 + n)
        while not stop.is_set():
            order_id = rng.choice(order_ids)
            answers.append(await post(edge_address, bodies[order_id], timeout=DEADLINE + 5, tag=order_id))
            await asyncio.sleep(PACE)

    await asyncio.gather(*(worker(n) for n in range(WORKERS)))
    return answers


def _check_answers(answers: list[Reply]) -> Counter:
    codes = Counter(a.code for a in answers)
    assert set(codes) <= ALLOWED, codes
    for answer in answers:
        assert answer.status == (503 if answer.code == "9001" else 200), (answer.status, answer.body)
        assert answer.elapsed <= DEADLINE + 1.0, (answer.elapsed, answer.code)
    return codes


def _check_answers_against_database(url: str, answers: list[Reply], initial: int) -> None:
    ledger = check_ledger(url, {(MERCHANT, "HKD"): initial})
    for answer in answers:
        if answer.code in ("0000", "3003"):  # what was said happened did happen, and happened once
            txn = answer.json["transaction"]
            assert ledger.refunds.get(answer.tag) == [(int(txn["id"]), int(txn["amount"] * 100))], \
                (answer.tag, txn, ledger.refunds.get(answer.tag))
    said = Counter(a.code for a in answers if a.code != "9001")
    for code, count in said.items():  # every answer given was first written to the audit trail
        assert ledger.codes[code] >= count, (code, ledger.codes[code], count)
    return ledger


def _retry_every_unanswered(edge_address: str, bodies: dict, answers: list[Reply]) -> Counter:
    """The orders that got 9001, asked again once the database is back: never
    9001 now, and never a second refund."""
    unanswered = sorted({a.tag for a in answers if a.code == "9001"})
    retries = post_many([edge_address], [bodies[o] for o in unanswered], timeout=30, tags=unanswered, concurrency=4)
    codes = Counter(a.code for a in retries)
    assert set(codes) <= {"0000", "3003", "4004"}, codes
    answers.extend(retries)
    return codes


def _wait_until_answering(edge_address: str, bodies: dict, limit: float = 20.0) -> float:
    """Seconds until the edge answers something other than 9001 again."""
    began = time.monotonic()
    order_ids = list(bodies)
    while time.monotonic() - began < limit:
        answer = asyncio.run(post(edge_address, bodies[random.choice(order_ids)], timeout=DEADLINE + 5))
        if answer.code in ("0000", "3003", "4004"):
            return time.monotonic() - began
        time.sleep(0.1)
    raise AssertionError(f"the service did not recover within {limit} s of the database coming back")


@pytest.mark.postgres
@pytest.mark.slow
def test_postgresql_crashing_and_restarting_under_load_loses_nothing_and_refunds_nothing_twice(
        private_postgres, start_service, start_edge):
    pg = private_postgres
    url = pg.create_database()
    bodies = _seed(url)
    service = start_service(url, "--db-timeout", "1")
    edge = start_edge(service.address, deadline=DEADLINE)

    stop = threading.Event()
    downtime = []

    def crash_and_restart_repeatedly():
        try:
            time.sleep(1.5)
            for _ in range(4):
                pg.crash()
                down = time.monotonic()
                time.sleep(1.0)
                pg.start()
                downtime.append(time.monotonic() - down)
                time.sleep(2.0)
        finally:
            stop.set()

    faults = threading.Thread(target=crash_and_restart_repeatedly)
    faults.start()
    answers = asyncio.run(_steady_load(edge.address, bodies, stop, seed=1))
    faults.join()

    codes = _check_answers(answers)
    print(f"\nPostgreSQL fault run: {dict(codes)}")
    assert codes["9001"] > 0, "the database faults were not seen: the test proved nothing"
    assert codes["0000"] > 0
    recovery = _wait_until_answering(edge.address, bodies)
    sample = random.Random(2).sample(list(bodies), 60)
    after = post_many([edge.address], [bodies[o] for o in sample], tags=sample, concurrency=4)
    assert all(a.code in ("0000", "3003", "4004") for a in after), Counter(a.code for a in after)
    assert service.process.poll() is None, "the service was not supposed to need a restart"
    retry_codes = _retry_every_unanswered(edge.address, bodies, answers)

    ledger = _check_answers_against_database(url, answers + after, BALANCE)
    assert_no_card_data(url, [a.body for a in answers + after], [service.output(), edge.output()])
    print(f"\nPostgreSQL crashed {pg.stops} times (down {', '.join(f'{d:.1f}' for d in downtime)} s) "
          f"under load: {len(answers)} calls {dict(codes)}; {latency_summary(answers)} (deadline {DEADLINE} s); "
          f"recovered in {recovery:.2f} s without a restart; retries of the 9001s {dict(retry_codes)}; "
          f"refunds {len(ledger.refunds)}, balance {ledger.balances[(MERCHANT, 'HKD')]}")


def _integrity(path: str) -> str:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        connection.close()


@pytest.mark.slow
def test_sqlite_service_killed_mid_load_leaves_an_intact_database_and_no_double_refund(
        sqlite_url, start_service, start_edge):
    bodies = _seed(sqlite_url)
    path = sa.make_url(sqlite_url).database
    listen = f"127.0.0.1:{free_port()}"
    service = start_service(sqlite_url, "--listen", listen, "--db-timeout", "1")
    edge = start_edge(service.address, deadline=DEADLINE)

    stop = threading.Event()
    kills, checks, logs = [], [], []

    def kill_and_restart_repeatedly():
        nonlocal service
        try:
            for _ in range(3):
                time.sleep(1.5)
                service.process.send_signal(signal.SIGKILL)
                service.process.wait(10)
                kills.append(time.monotonic())
                logs.append(service.output())
                checks.append(_integrity(path))
                check_ledger(sqlite_url, {(MERCHANT, "HKD"): BALANCE})  # consistent at every kill
                service = start_service(sqlite_url, "--listen", listen, "--db-timeout", "1")
            time.sleep(1.5)
        finally:
            stop.set()

    killer = threading.Thread(target=kill_and_restart_repeatedly)
    killer.start()
    answers = asyncio.run(_steady_load(edge.address, bodies, stop, seed=3))
    killer.join()

    assert checks == ["ok"] * 3, checks
    codes = _check_answers(answers)
    assert codes["9001"] > 0 and codes["0000"] > 0, codes
    retry_codes = _retry_every_unanswered(edge.address, bodies, answers)
    assert _integrity(path) == "ok"
    ledger = _check_answers_against_database(sqlite_url, answers, BALANCE)
    assert_no_card_data(sqlite_url, [a.body for a in answers], logs + [service.output(), edge.output()])
    print(f"\nSQLite service SIGKILLed 3 times under load: {len(answers)} calls {dict(codes)}; "
          f"{latency_summary(answers)} (deadline {DEADLINE} s); integrity_check {checks}; "
          f"retries of the 9001s {dict(retry_codes)}; refunds {len(ledger.refunds)}, "
          f"balance {ledger.balances[(MERCHANT, 'HKD')]}")
