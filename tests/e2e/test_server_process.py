"""The refund-service process: start-up, errors at start, graceful drain."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from refund.v1 import refund_pb2, refund_pb2_grpc
from tests.support import ROOT, data

MERCHANT = 3000001


def test_service_on_port_zero_prints_the_address_it_bound_and_serves_health(sqlite_url, start_service):
    service = start_service(sqlite_url)
    assert not service.address.endswith(":0")
    with grpc.insecure_channel(service.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert service.stop(signal.SIGINT) == 0


def test_unknown_database_url_is_refused_with_a_message_not_a_traceback():
    result = subprocess.run([sys.executable, "-m", "service.server", "--listen", "127.0.0.1:0",
                             "--database-url", "mysql://user:secret@localhost/x"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2  # a bad setting (docs/operations.md, exit status)
    assert "sqlite:///PATH" in result.stderr and "postgresql+psycopg://" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "secret" not in result.stderr + result.stdout


@pytest.mark.postgres
def test_sigterm_lets_calls_in_flight_finish_and_refuses_new_ones(postgres_url, start_service):
    data.load(postgres_url, [data.merchant(MERCHANT, balances={"HKD": "1000.00"})],
              [data.order(1, MERCHANT, "10.00")])
    service = start_service(postgres_url, "--grace", "20")
    engine = sa.create_engine(postgres_url)
    locker = engine.connect()
    locker.execute(sa.text("SELECT 1 FROM orders WHERE id = 1 FOR UPDATE"))  # the refund will wait on this lock

    channel = grpc.insecure_channel(service.address)
    stub = refund_pb2_grpc.RefundServiceStub(channel)
    in_flight = stub.Refund.future(refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=1, amount="10.00"),
                                   timeout=30)
    time.sleep(0.5)
    assert not in_flight.done()

    stopped = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with grpc.insecure_channel(service.address) as fresh:
        with pytest.raises(grpc.RpcError) as refused:
            refund_pb2_grpc.RefundServiceStub(fresh).Refund(
                refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=1, amount="10.00"), timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    threading.Timer(1.0, locker.rollback).start()  # release the lock: the call in flight completes
    assert in_flight.result().response_code == "0000"
    assert service.process.wait(20) == 0
    assert time.monotonic() - stopped < 20
    assert "draining" in service.output()
    locker.close()
    channel.close()
    engine.dispose()


def test_sigterm_turns_health_to_not_serving_for_watchers(sqlite_url, start_service):
    service = start_service(sqlite_url, "--grace", "2")
    with grpc.insecure_channel(service.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=20)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        service.process.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert service.process.wait(10) == 0
