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

import http.client
import json
import os
import random
import signal
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import grpc
import pytest
import sqlalchemy as sa

pytest.register_assert_rewrite("tests.edge_fixtures", "tests.prove_helpers")

from refund.v1 import refund_pb2, refund_pb2_grpc
from service import db, domain, ledger
from tests import data
from tests.conftest import LoggedProcess, free_port
from tests.edge_fixtures import generated_key, http_request, public_pem, signed_body
from tests.grpc_harness import error_info
from tests.prove_helpers import refund_text

pytestmark = pytest.mark.slow

MERCHANTS = (7300001, 7300002)
INITIAL = 1_000_000  # HKD 10,000.00 per merchant: every refund and settlement is covered
ORDERS_PER_MERCHANT = 60
SALES_PER_MERCHANT = 25
SETTLEMENTS_PER_MERCHANT = 15
GIVE_UP_AFTER = 120.0  # seconds a client keeps retrying one operation


class Restartable:
    """A service or edge on a fixed port, so that clients keep one address
    across SIGKILL and restart."""

    def __init__(self, name: str, module: str, environment: dict):
        self.name, self.module, self.environment = name, module, environment
        self.process = self._start()

    def _start(self) -> LoggedProcess:
        return LoggedProcess(self.name, self.module, [], self.environment)

    def kill(self) -> None:
        self.process.process.send_signal(signal.SIGKILL)
        self.process.process.wait()
        self.process.log_path.unlink(missing_ok=True)

    def restart(self) -> None:
        self.process = self._start()

    def stop(self) -> None:
        self.process.stop()
        self.process.log_path.unlink(missing_ok=True)


def start_service(url: str) -> tuple[Restartable, str]:
    address = f"127.0.0.1:{free_port()}"
    environment = {**os.environ, "REFUND_DATABASE_URL": url, "REFUND_GRPC_LISTEN": address,
                   "PYTHONUNBUFFERED": "1"}
    return Restartable("refund-service", "service.server", environment), address


def start_edge(target: str) -> tuple[Restartable, str]:
    address = f"127.0.0.1:{free_port()}"
    environment = {**os.environ, "REFUND_HTTP_LISTEN": address, "REFUND_GRPC_TARGET": target,
                   "REFUND_EDGE_DEADLINE": "10", "PYTHONUNBUFFERED": "1",
                   "REFUND_EDGE_RATE_LIMIT": "off"}  # the storm sends far more than one merchant's rate
    return Restartable("refund-edge", "gateway_edge.server", environment), address


class Clients:
    """The clients' own record: what they were told, and nothing else."""

    def __init__(self, services: list[str], edges: list[str]):
        self.services, self.edges = services, edges
        self.confirmed = defaultdict(int)  # (merchant, kind) -> minor units confirmed
        self.retries = defaultdict(int)
        self.lock = threading.Lock()

    def _note(self, merchant: int, kind: str, units: int) -> None:
        with self.lock:
            self.confirmed[(merchant, kind)] += units

    def _until_final(self, kind: str, attempt):
        """Call `attempt(i)` until it gives a final answer (not None)."""
        deadline = time.monotonic() + GIVE_UP_AFTER
        i = 0
        while time.monotonic() < deadline:
            answer = attempt(i)
            if answer is not None:
                return answer
            i += 1
            with self.lock:
                self.retries[kind] += 1
            time.sleep(0.05)
        raise AssertionError(f"{kind} got no final answer in {GIVE_UP_AFTER} s")

    def _grpc(self, i: int, method: str, request):
        channel = grpc.insecure_channel(self.services[i % len(self.services)])
        try:
            stub = refund_pb2_grpc.RefundServiceStub(channel)
            return getattr(stub, method)(request, timeout=10)
        finally:
            channel.close()

    def _grpc_final(self, method: str, request, i: int, finals: dict):
        """The reply, or the reason of a final error (in `finals`), or None to retry."""
        try:
            return self._grpc(i, method, request)
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            reason = error_info(error)[0].reason
            assert reason in finals, (method, reason, error.details())
            return finals[reason](error)

    def refund(self, merchant: int, order_id: int, amount: str, key=None) -> None:
        """A refund, signed through an edge (with `key`) or unsigned over gRPC."""
        if key is not None:
            body = signed_body(key, refund_text(merchant, amount, order_id=order_id))

            def attempt(i):
                host, port = self.edges[i % len(self.edges)].rsplit(":", 1)
                try:
                    reply = http_request(host, int(port), "POST", "/direct/refund", body,
                                         {"Content-Type": "application/json"}, timeout=15)
                except (OSError, http.client.HTTPException):  # the edge died mid-answer: no answer
                    return None
                answer = json.loads(reply.body, parse_float=Decimal, parse_int=Decimal)
                if answer["responseCode"] == "9001":
                    return None
                assert answer["responseCode"] in ("0000", "3003"), answer
                return answer["transaction"]["amount"]
        else:
            request = refund_pb2.RefundRequest(merchant_id=str(merchant), order_id=order_id, amount=amount)

            def attempt(i):
                reply = self._grpc_final("Refund", request, i, {
                    "ALREADY_REFUNDED": lambda error: error_info(error)[1].transaction.amount})
                return reply if reply is None or isinstance(reply, str) else reply.transaction.amount

        refunded = self._until_final("refund", attempt)
        self._note(merchant, "refunds", domain.to_minor(str(refunded), "HKD"))

    def sale(self, merchant: int, order_id: int, amount: str) -> None:
        """A sale, sent until answered and then once more: credited once."""
        request = refund_pb2.RecordSaleRequest(
            order_id=order_id, merchant_id=str(merchant), merchant_reference=f"storm-sale-{order_id}",
            currency="HKD", amount=amount, payment_method="VISA", masked_pan="400000******0002", stan="654321")
        for _ in range(2):
            reply = self._until_final("sale", lambda i: self._grpc_final("RecordSale", request, i, {}))
            assert reply.order.amount == amount
        self._note(merchant, "sales", domain.to_minor(amount, "HKD"))

    def settle(self, merchant: int, settlement_id: str, amount: str) -> None:
        request = refund_pb2.SettleRequest(merchant_id=str(merchant), currency="HKD", amount=amount,
                                           settlement_id=settlement_id)
        reply = self._until_final("settle", lambda i: self._grpc_final("Settle", request, i, {}))
        assert (reply.settlement.settlement_id, reply.settlement.amount) == (settlement_id, amount)
        self._note(merchant, "settlements", domain.to_minor(amount, "HKD"))


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


def _run_with_kills(pool, operations: list, processes: list[Restartable], kills: list) -> None:
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
        service, service_address = start_service(url)
        edge, edge_address = start_edge(service_address)
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
            process.stop()

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
