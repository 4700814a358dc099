"""Logs and metrics of the real processes: JSON log lines with the request id
the edge makes (or takes from X-Request-Id), carried to the service in gRPC
metadata and returned in the response; Prometheus metrics on the edge's
/metrics and on the service's metrics port; no card number, signature or
stack trace in any log line."""

from __future__ import annotations

import io
import json
import logging
import re
import sqlite3

import grpc
import pytest
import sqlalchemy as sa

from refund.v1 import refund_pb2, refund_pb2_grpc
from service import telemetry
from tests.support.answers import check_answer, log_lines, wait_for_log
from tests.support.data import request_text, seed
from tests.support.http import Reply, http_request
from tests.support.keys import envelope, example_key, sign
from tests.support.processes import Gateway
from tests.support.prometheus import metrics_text, sample

PAN = "4111111111111111"


def _metrics_url(service) -> str:
    return re.search(r"refund-service metrics on (\S+)", service.output()).group(1)


@pytest.fixture
def gateway(sqlite_url, start_service, start_edge) -> Gateway:
    seed(sqlite_url)
    service = start_service(sqlite_url, "--metrics-listen", "127.0.0.1:0", "--db-timeout", "1")
    return Gateway(sqlite_url, service, start_edge(service.address, "--metrics-listen", "127.0.0.1:0"))


def edge_metrics(gateway) -> Reply:
    address = re.search(r"refund-edge metrics on http://(\S+)/metrics", gateway.edge.output()).group(1)
    host, port = address.rsplit(":", 1)
    return http_request(host, int(port), "GET", "/metrics")


# -- request ids -------------------------------------------------------------------------


def test_the_request_id_is_taken_from_x_request_id_passed_to_the_service_and_returned(gateway):
    reply = gateway.refund(request_text(101, "1.00"), headers={"X-Request-Id": "shop-7f3a:retry.1"})
    check_answer(reply, "0000", 200)
    assert reply.headers["x-request-id"] == "shop-7f3a:retry.1"

    edge_lines = wait_for_log(gateway.edge, lambda e: e.get("request_id") == "shop-7f3a:retry.1")
    service_lines = wait_for_log(gateway.service, lambda e: e.get("request_id") == "shop-7f3a:retry.1")
    [edge_line] = [e for e in edge_lines if e.get("request_id") == "shop-7f3a:retry.1"]
    assert (edge_line["path"], edge_line["status"], edge_line["response_code"]) == ("/direct/refund", 200, "0000")
    [service_line] = [e for e in service_lines if e.get("request_id") == "shop-7f3a:retry.1"]
    assert (service_line["rpc"], service_line["code"], service_line["response_code"]) == \
           ("MerchantRefund", "OK", "0000")
    assert service_line["duration_ms"] >= 0


@pytest.mark.parametrize("sent", [None, "has spaces", "x" * 129, "semi;colon", PAN],
                         ids=["none", "spaces", "too-long", "semicolon", "card-number"])
def test_a_missing_or_insane_request_id_is_replaced_by_a_new_one(gateway, sent):
    headers = {"X-Request-Id": sent} if sent is not None else {}
    reply = gateway.refund(request_text(999, "1.00"), headers=headers)
    check_answer(reply, "3001", 200)
    made = reply.headers["x-request-id"]
    assert made != sent and re.fullmatch(r"[0-9a-f]{24}", made)
    lines = wait_for_log(gateway.service, lambda e: e.get("request_id") == made)
    assert any(e.get("request_id") == made and e.get("rpc") == "MerchantRefund" for e in lines)


def test_every_response_carries_a_request_id(gateway):
    for reply in (gateway.edge.request("GET", "/healthz"), gateway.edge.request("GET", "/nowhere"),
                  gateway.edge.post_refund(b"{}", content_type="text/plain"), edge_metrics(gateway)):
        assert re.fullmatch(r"[0-9a-f]{24}", reply.headers["x-request-id"])


# -- log lines ---------------------------------------------------------------------------


def test_logs_are_one_json_object_per_line_without_card_numbers_signatures_or_tracebacks(gateway):
    signatures = []

    def signed(request: str) -> bytes:
        signatures.append(sign(example_key(), request))
        return envelope(request, signatures[-1])

    bodies = [
        signed(request_text(reference=PAN, amount="1.00")),                        # 3001
        signed(request_text(101, "1.00", card=f"{PAN[:4]} {PAN[4:8]} {PAN[8:12]} {PAN[12:]}")),  # 0000
        signed(request_text(101, "1.00", merchant=PAN)),                           # 2001: the PAN as merchant id
        signed(request_text(102, f"1{PAN}")),                                      # 1002
        f'{{"request": "{PAN}", "signature": '.encode(),                           # 1001: not JSON
        envelope(request_text(103, "1.00"), sign(example_key(), "something else")),  # 2001: wrong signature
    ]
    for body in bodies:
        gateway.edge.request("POST", "/direct/refund", body, {"Content-Type": "application/json",
                                                              "Idempotency-Key": PAN, "X-Request-Id": PAN})
    gateway.query(request_text(reference=PAN))
    # An internal caller sends a full card number where a masked one belongs.
    with grpc.insecure_channel(gateway.service.address) as channel:
        with pytest.raises(grpc.RpcError):
            refund_pb2_grpc.RefundServiceStub(channel).RecordSale(refund_pb2.RecordSaleRequest(
                order_id=9001, merchant_id="3000001", merchant_reference="r-9001", currency="HKD", amount="1.00",
                payment_method="VISA", masked_pan=PAN, stan="000001"), timeout=5)
    # The database unavailable: the warning path.
    blocker = sqlite3.connect(sa.make_url(gateway.database_url).database, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        check_answer(gateway.refund(request_text(104, "1.00")), "9001", 503)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    wait_for_log(gateway.edge, lambda e: e.get("status") == 503)
    for process in (gateway.edge, gateway.service):
        output = process.output()
        entries = log_lines(output)  # every line parses as one JSON object
        assert len(entries) >= len(bodies)
        for forbidden in (PAN, PAN[:4] + " " + PAN[4:8], "Traceback", *signatures):
            assert forbidden not in output, forbidden
        assert all(e["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") for e in entries)


def test_the_json_formatter_scrubs_card_numbers_and_base64_and_never_writes_a_traceback():
    stream = io.StringIO()
    logger = logging.getLogger("test-telemetry")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(telemetry.JsonFormatter())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        signature = sign(example_key(), "x")
        logger.warning("card %s, spaced 5500-0000-0000-0004, signature %s, order 1234567890123",
                       PAN, signature, extra={"fields": {"note": f"pan={PAN}"}})
        try:
            {}["secret-value-in-message"]
        except KeyError:
            logger.exception("it failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == ("card [card number removed], spaced [card number removed], signature "
                                "[base64 removed], order 1234567890123")  # not a Luhn number: kept
    assert first["note"] == "pan=[card number removed]"
    assert second["message"] == "it failed"
    assert re.fullmatch(r"KeyError at e2e/test_observability\.py:\d+", second["error"])
    assert "secret-value" not in stream.getvalue() and "Traceback" not in stream.getvalue()


# -- metrics -------------------------------------------------------------------------------


def test_the_edge_and_the_service_expose_prometheus_metrics(gateway):
    check_answer(gateway.refund(request_text(105, "1.00")), "0000", 200)
    check_answer(gateway.refund(request_text(105, "1.00")), "3003", 200)
    check_answer(gateway.refund(request_text(999, "1.00")), "3001", 200)
    assert gateway.query(request_text(105)).json["responseCode"] == "0000"

    edge = edge_metrics(gateway)
    assert edge.status == 200 and edge.headers["content-type"].startswith("text/plain")
    text = edge.body.decode()
    for code, count in (("0000", 1), ("3003", 1), ("3001", 1)):
        assert sample(text, "refund_edge_refunds_total", response_code=code) == count, code
    assert sample(text, "refund_edge_queries_total", response_code="0000") == 1
    assert sample(text, "refund_edge_requests_total", path="/direct/refund", status="200") == 3
    assert sample(text, "refund_edge_request_duration_seconds_count", path="/direct/refund") == 3
    assert sample(text, "refund_edge_requests_in_flight") == 1  # this request

    service = metrics_text(_metrics_url(gateway.service))
    for code in ("0000", "3003", "3001"):
        assert sample(service, "refund_service_refunds_total", method="MerchantRefund", response_code=code) == 1
    assert sample(service, "refund_service_rpcs_total", method="MerchantRefund", code="OK") == 1
    assert sample(service, "refund_service_rpcs_total", method="MerchantRefund", code="ALREADY_EXISTS") == 1
    assert sample(service, "refund_service_rpcs_total", method="MerchantGetOrder", code="OK") == 1
    assert sample(service, "refund_service_rpc_duration_seconds_count", method="MerchantRefund") == 3
    assert sample(service, "refund_service_rpcs_in_flight") == 0

    blocker = sqlite3.connect(sa.make_url(gateway.database_url).database, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        check_answer(gateway.refund(request_text(106, "1.00")), "9001", 503)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    service = metrics_text(_metrics_url(gateway.service))
    errors = [sample(service, "refund_service_database_errors_total", kind=kind) or 0
              for kind in ("unavailable", "timeout")]
    assert sum(errors) >= 1
    assert sample(service, "refund_service_refunds_total", method="MerchantRefund", response_code="9001") == 1
    text = edge_metrics(gateway).body.decode()
    assert sample(text, "refund_edge_backend_failures_total", response_code="9001") == 1


def test_the_service_serves_no_metrics_unless_asked(sqlite_url, start_service):
    service = start_service(sqlite_url)
    assert "metrics on" not in service.output()


@pytest.mark.postgres
def test_the_service_counts_its_group_commits_on_postgresql(postgres_url, start_service):
    """Refunds of one merchant sent at once go to PostgreSQL in batches, and the
    metrics say how many batches and how many refunds were in them."""
    import concurrent.futures

    from tests.support import data

    merchant = 3600001
    data.load(postgres_url, [data.merchant(merchant, balances={"HKD": "1000.00"})],
              [data.order(order_id, merchant, "1.00") for order_id in range(1, 61)])
    service = start_service(postgres_url, "--metrics-listen", "127.0.0.1:0", "--db-lanes", "1")
    with grpc.insecure_channel(service.address) as channel:
        stub = refund_pb2_grpc.RefundServiceStub(channel)

        def refund(order_id):
            return stub.Refund(refund_pb2.RefundRequest(merchant_id=str(merchant), order_id=order_id, amount="1.00"),
                               timeout=30).response_code

        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            codes = list(pool.map(refund, range(1, 61)))
    assert codes == ["0000"] * 60
    text = metrics_text(_metrics_url(service))
    batches, batched = sample(text, "refund_service_refund_batches_total"), \
        sample(text, "refund_service_refunds_batched_total")
    assert batches >= 1 and batched >= 2 * batches and batched <= 60
    assert sample(text, "refund_service_refund_batches_rolled_back_total") == 0
    assert sample(text, "refund_service_refund_statements_rolled_back_total") == 0
    assert sample(text, "refund_service_refunds_total", method="Refund", response_code="0000") == 60


@pytest.mark.postgres
def test_a_refund_waiting_for_another_clients_row_lock_moves_aside_and_holds_up_no_other(postgres_url,
                                                                                          start_service):
    """Another client holds merchant A's balance row. A's refund waits for it in the
    process's one lane for LANE_LOCK_TIMEOUT, then moves aside, so B's refund, behind
    it in the lane though nothing of B is locked, is approved while the lock is held.
    The gauges show A aside and nothing waiting in the lane; once the lock goes A's
    refund is approved too, and the gauges are back to zero."""
    import concurrent.futures
    import time

    from tests.support import data

    first, second = 3610001, 3610002
    data.load(postgres_url, [data.merchant(m, balances={"HKD": "100.00"}) for m in (first, second)],
              [data.order(1, first, "1.00"), data.order(2, second, "1.00")])
    service = start_service(postgres_url, "--metrics-listen", "127.0.0.1:0", "--db-lanes", "1")
    url = _metrics_url(service)
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as lock, grpc.insecure_channel(service.address) as channel, \
                concurrent.futures.ThreadPoolExecutor(2) as pool:
            lock.execute(sa.text("SELECT 1 FROM balances WHERE merchant_id = :m FOR UPDATE"), {"m": first})
            stub = refund_pb2_grpc.RefundServiceStub(channel)

            def refund(merchant, order_id):
                return stub.Refund(refund_pb2.RefundRequest(merchant_id=str(merchant), order_id=order_id,
                                                            amount="1.00"), timeout=10).response_code

            blocked = pool.submit(refund, first, 1)
            with engine.connect() as watch:  # until A's statement waits for the balance row
                waiting_for_a_lock = sa.text("SELECT count(*) FROM pg_stat_activity "
                                             "WHERE datname = current_database() AND wait_event_type = 'Lock'")
                deadline = time.monotonic() + 5
                while watch.execute(waiting_for_a_lock).scalar() == 0 and time.monotonic() < deadline:
                    time.sleep(0.02)
            behind = pool.submit(refund, second, 2)
            assert behind.result(5) == "0000"  # answered while A's lock is still held
            text = metrics_text(url)
            assert not blocked.done()
            assert sample(text, "refund_service_refunds_aside") == 1
            assert sample(text, "refund_service_refunds_moved_aside_total") == 1
            assert sample(text, "refund_service_refunds_waiting_for_lane") == 0
            lock.rollback()
            assert blocked.result(10) == "0000"
    finally:
        engine.dispose()
    text = metrics_text(url)
    assert sample(text, "refund_service_refunds_aside") == 0
    assert sample(text, "refund_service_refunds_waiting_for_lane") == 0
    assert sample(text, "refund_service_refund_lane_wait_seconds") == 0


@pytest.mark.postgres
def test_two_services_refunding_the_same_orders_at_once_roll_nothing_back(postgres_url, start_service):
    """Two refund-service processes get the same 120 refunds at once, in opposite
    orders, for a merchant with balances in two currencies, so both form batches.
    Each refund statement takes its merchant's advisory lock first, so no refund
    of one process waits in a cycle for one of the other: PostgreSQL, told to look
    for deadlocks after 20 ms, rolls nothing back (both services' counters stay
    0), and each order is refunded exactly once."""
    import collections
    import concurrent.futures

    from tests.support import data
    from tests.support.postgres import look_for_deadlocks_after

    merchant, orders = 3600002, list(range(1, 121))
    data.load(postgres_url, [data.merchant(merchant, balances={"HKD": "1000.00", "USD": "1000.00"})],
              [data.order(o, merchant, "1.00", currency="HKD" if o % 2 else "USD") for o in orders])
    look_for_deadlocks_after(postgres_url, "20ms")  # before the services connect: their sessions take it
    services = [start_service(postgres_url, "--metrics-listen", "127.0.0.1:0") for _ in range(2)]
    channels = [grpc.insecure_channel(service.address) for service in services]
    try:
        stubs = [refund_pb2_grpc.RefundServiceStub(channel) for channel in channels]

        def refund(call):
            stub, order_id = call
            try:
                return stub.Refund(refund_pb2.RefundRequest(merchant_id=str(merchant), order_id=order_id,
                                                            amount="1.00"), timeout=30).response_code
            except grpc.RpcError as error:  # 3003 over gRPC: ALREADY_EXISTS
                return error.code().name

        calls = [call for pair in zip(orders, reversed(orders), strict=True)
                 for call in ((stubs[0], pair[0]), (stubs[1], pair[1]))]
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            codes = collections.Counter(pool.map(refund, calls))
    finally:
        for channel in channels:
            channel.close()
    assert codes == {"0000": 120, "ALREADY_EXISTS": 120}
    texts = [metrics_text(_metrics_url(service)) for service in services]
    assert sum(sample(text, "refund_service_refunds_batched_total") for text in texts) >= 4, "no batches formed"
    for text in texts:
        assert sample(text, "refund_service_refund_batches_rolled_back_total") == 0
        assert sample(text, "refund_service_refund_statements_rolled_back_total") == 0
