"""Honest health: readiness follows the database (without a restart), liveness
stays up, SIGTERM shows NOT_SERVING to polling probes for the pre-stop period,
and open health watches cannot hold the drain open."""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from refund.v1 import refund_pb2, refund_pb2_grpc
from tests.support import data

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = "refund.v1.RefundService"
MERCHANT = 7600001


def check(address: str, service: str = "", timeout: float = 5.0):
    """The health status, or the gRPC status code name when the call itself fails."""
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout).status
        except grpc.RpcError as error:
            return error.code().name


def wait_for(address: str, wanted, service: str = "", limit: float = 60.0, log=lambda: "") -> float:
    began = time.monotonic()
    while time.monotonic() - began < limit:
        if check(address, service) == wanted:
            return time.monotonic() - began
        time.sleep(0.1)
    raise AssertionError(f"health of {service!r} did not become {wanted} within {limit} s "
                         f"(last: {check(address, service)})\n{log()}")


def metric(metrics_address: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} not exported"
    return float(match.group(1))


def refund(address: str, order_id: int) -> str:
    with grpc.insecure_channel(address) as channel:
        return refund_pb2_grpc.RefundServiceStub(channel).Refund(
            refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=order_id, amount="1.00"),
            timeout=10).response_code


@pytest.mark.postgres
def test_health_follows_the_database_down_at_start_then_up_down_and_up_again_without_a_restart(
        private_postgres, start_service):
    pg = private_postgres
    url = pg.create_database()
    data.load(url, [data.merchant(MERCHANT, balances={"HKD": "100.00"})],
              [data.order(order_id, MERCHANT, "10.00") for order_id in (1, 2)])
    pg.crash()

    service = start_service(url, "--wait-for-database", "120", "--readiness-interval", "0.2", "--db-timeout", "2",
                            "--metrics-listen", "127.0.0.1:0")
    metrics_address = re.search(r"refund-service metrics on http://(\S+)/metrics", service.output()).group(1)
    pid = service.process.pid
    for name in ("", SERVICE):
        assert check(service.address, name) == NOT_SERVING
    assert check(service.address, "liveness") == SERVING
    assert metric(metrics_address, "refund_service_ready") == 0

    pg.start()
    came_up = wait_for(service.address, SERVING)
    assert check(service.address, SERVICE) == SERVING
    assert metric(metrics_address, "refund_service_ready") == 1
    assert refund(service.address, 1) == "0000"

    pg.crash()
    went_down = wait_for(service.address, NOT_SERVING, log=service.output)
    assert check(service.address, "liveness") == SERVING  # no reason to restart the process
    assert metric(metrics_address, "refund_service_ready") == 0
    assert metric(metrics_address, "refund_service_database_unreachable_total") == 1

    pg.start()
    wait_for(service.address, SERVING)
    assert refund(service.address, 2) == "0000"
    assert service.process.poll() is None and service.process.pid == pid
    output = service.output()
    assert "the database does not answer: health NOT_SERVING" in output
    assert "the database answers: health SERVING" in output
    print(f"\nhealth: SERVING {came_up:.2f} s after the database came up, NOT_SERVING {went_down:.2f} s after "
          "it crashed, SERVING again after it came back; one process throughout")


def test_waiting_for_a_database_that_never_comes_ends_with_exit_3(start_service):
    url = "postgresql+psycopg://postgres@127.0.0.1:1/refund"
    service = start_service(url, "--wait-for-database", "1.5", "--readiness-interval", "0.2")
    assert check(service.address) == NOT_SERVING
    assert service.process.wait(30) == 3
    assert "did not answer within --wait-for-database 1.5s" in service.output()


def test_sigterm_shows_not_serving_to_polling_probes_for_the_pre_stop_period_then_closes(sqlite_url, start_service):
    data.load(sqlite_url, [data.merchant(MERCHANT, balances={"HKD": "100.00"})], [data.order(1, MERCHANT, "10.00")])
    service = start_service(sqlite_url, "--pre-stop", "3", "--grace", "5")
    assert check(service.address) == SERVING
    signalled = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    statuses = []
    served_during_pre_stop = None
    while service.process.poll() is None and time.monotonic() - signalled < 20:
        status = check(service.address, timeout=2)
        statuses.append((round(time.monotonic() - signalled, 2), status))
        if status == NOT_SERVING and served_during_pre_stop is None:
            served_during_pre_stop = refund(service.address, 1)  # calls are still taken meanwhile
        time.sleep(0.1)
    assert service.process.wait(20) == 0
    not_serving = [at for at, status in statuses if status == NOT_SERVING]
    assert not_serving and not_serving[-1] - not_serving[0] >= 2.0, statuses
    assert SERVING not in [status for at, status in statuses if at > 0.5], statuses
    assert served_during_pre_stop == "0000"


def test_an_open_health_watch_does_not_hold_the_drain_open(sqlite_url, start_service):
    service = start_service(sqlite_url, "--grace", "15")
    statuses, ended = [], threading.Event()

    def watch():
        with grpc.insecure_channel(service.address) as channel:
            for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60):
                statuses.append(reply.status)
        ended.set()  # the stream ended normally (OK), not by an error

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    deadline = time.monotonic() + 10
    while not statuses and time.monotonic() < deadline:
        time.sleep(0.05)
    signalled = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(15) == 0
    took = time.monotonic() - signalled
    watcher.join(5)
    assert statuses == [SERVING, NOT_SERVING] and ended.is_set()
    assert took < 5.0, f"exit took {took:.1f} s: the watch held the drain (grace 15 s)"
