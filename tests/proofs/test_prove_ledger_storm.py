"""Issue 10: a ledger storm. Signed refunds through the edges, unsigned refunds,
sales (each sent twice) and settlements over gRPC, all at once, while services
and edges are killed with SIGKILL and restarted and (on PostgreSQL) database
backends are terminated. Every client retries what was not answered, as the
proto says is safe (UNAVAILABLE, 9001, no answer), until it gets a final
answer; it records what it was told. Afterwards:

- `refund-admin verify` holds (every balance is the sum of its journal, every
  entry matches its cause, every order its refund);
- from the clients' own record of confirmed answers alone,
  initial + sales - settlements - refunds equals every final balance exactly.

PostgreSQL: two services, each with an edge in front. SQLite: one of each.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from service import db, domain, ledger
from tests.support import data
from tests.support.keys import generated_key, public_pem
from tests.support.processes import Process, restartable_edge, restartable_service
from tests.support.storm_clients import Clients

pytestmark = pytest.mark.slow

MERCHANTS = (7300001, 7300002)
INITIAL = 1_000_000  # HKD 10,000.00 per merchant: every refund and settlement is covered
ORDERS_PER_MERCHANT = 60
SALES_PER_MERCHANT = 25
SETTLEMENTS_PER_MERCHANT = 15


def _terminate_backends(url: str, stop: threading.Event, kills: list) -> None:
    """On PostgreSQL: terminate the services' database backends every 0.3 s."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        while not stop.wait(0.3):
            with engine.connect() as connection:
                terminated = connection.execute(sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = 'refund-service' AND datname = current_database()")).scalar()
            kills.extend(["backend"] * terminated)
    finally:
        engine.dispose()


WAVES = 6


def _run_with_kills(pool, operations: list, processes: list[Process], kills: list) -> None:
    """The operations in WAVES waves; in each wave after the first, once a third
    of it is answered, a random service or edge is killed with SIGKILL (calls
    in flight on it are lost) and restarted while the wave goes on."""
    chance = random.Random(10)
    restarts = []
    for n in range(WAVES):
        futures = [pool.submit(operation, *args) for operation, *args in operations[n::WAVES]]
        if n:
            while sum(f.done() for f in futures) < len(futures) // 3:
                time.sleep(0.01)
            victim = chance.choice(processes)
            victim.kill()
            kills.append(victim.name)
            restarts.append(threading.Thread(target=victim.restart))
            restarts[-1].start()
        for future in futures:
            future.result()
        for restart in restarts:
            restart.join()


def _storm(url: str, pairs: int) -> None:
    key = generated_key("ledger-storm")
    data.load(url, [data.merchant(m, public_pem(key), balances={"HKD": domain.format_minor(INITIAL, "HKD")})
                    for m in MERCHANTS],
              [data.order(m * 1000 + i, m, f"{10 + i % 7}.{i % 100:02d}", reference=f"storm-{m}-{i}")
               for m in MERCHANTS for i in range(ORDERS_PER_MERCHANT)])
    services, edges = [], []
    for _ in range(pairs):
        service, service_address = restartable_service(url)
        edge, edge_address = restartable_edge(service_address)
        services.append((service, service_address))
        edges.append((edge, edge_address))
    processes = [p for p, _ in services + edges]
    clients = Clients([a for _, a in services], [a for _, a in edges])

    operations = []
    for m in MERCHANTS:
        for i in range(ORDERS_PER_MERCHANT):
            amount = f"{1 + i % 9}.{i % 100:02d}"  # partial refunds of every order
            operations.append((clients.refund, m, m * 1000 + i, amount, key if i % 2 else None))
        for i in range(SALES_PER_MERCHANT):
            operations.append((clients.sale, m, m * 100_000 + i, f"{20 + i}.50"))
        for i in range(SETTLEMENTS_PER_MERCHANT):
            operations.append((clients.settle, m, f"storm-{m}-batch-{i}", f"{5 + i}.25"))
    random.Random(3).shuffle(operations)

    stop, kills = threading.Event(), []
    terminator = threading.Thread(target=_terminate_backends, args=(url, stop, kills))
    if url.startswith("postgresql"):
        terminator.start()
    try:
        with ThreadPoolExecutor(12) as pool:
            _run_with_kills(pool, operations, processes, kills)
    finally:
        stop.set()
        if terminator.is_alive():
            terminator.join()
        for process in processes:
            process.close()

    assert kills.count("refund-service") + kills.count("refund-edge") == WAVES - 1, kills
    assert sum(clients.retries.values()) > 0, "nothing was ever retried: the chaos did not bite"

    result = ledger.verify(url)
    assert result.holds, result.discrepancies
    engine = db.make_engine(url)
    with engine.connect() as connection:
        balances = dict(connection.execute(sa.text(
            "SELECT merchant_id, unsettled FROM balances WHERE currency = 'HKD'")).all())
    engine.dispose()
    for m in MERCHANTS:
        c = clients.confirmed
        expected = INITIAL + c[(m, "sales")] - c[(m, "settlements")] - c[(m, "refunds")]
        assert balances[m] == expected, (m, balances[m], expected, dict(c))
    print(f"kills: { {k: kills.count(k) for k in set(kills)} }, retries: {dict(clients.retries)}")


@pytest.mark.postgres
def test_ledger_storm_on_postgres_with_two_services_and_two_edges(postgres_url):
    _storm(postgres_url, pairs=2)


def test_ledger_storm_on_sqlite(sqlite_url):
    _storm(sqlite_url, pairs=1)
