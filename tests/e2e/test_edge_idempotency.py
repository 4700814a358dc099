"""Idempotency-Key end to end (docs/api.md section 7): real refund-service and
refund-edge processes, on SQLite and on PostgreSQL.

The same key with the same request gets the byte-identical stored answer,
whatever happened since; the same key with another request gets 1003 / 409;
concurrent requests with one key never both execute (the audit trail shows
one attempt)."""

from __future__ import annotations

import json
import threading

import pytest
import sqlalchemy as sa

from service import db, schema
from tests.support.answers import check_answer
from tests.support.data import (
    MERCHANT,
    OTHER,
    balance_of,
    make_gateway_key,
    refund_count,
    request_text,
    seed,
    set_balance,
    set_merchant_status,
)
from tests.support.keys import envelope, example_key, generated_key, sign
from tests.support.processes import Gateway


def attempts_of(url: str, order_id: int) -> list[str]:
    """The audit trail of one order: the response code of every decided attempt."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(sa.select(schema.refund_attempts.c.response_code).where(
                schema.refund_attempts.c.order_id == order_id).order_by(schema.refund_attempts.c.id)).scalars())
    finally:
        engine.dispose()


def _gateway(url, start_service, start_edge, tmp_path) -> Gateway:
    seed(url)
    private, _ = make_gateway_key(url, tmp_path)
    service = start_service(url)
    return Gateway(url, service, start_edge(service.address, "--signing-key", str(private)))


@pytest.fixture
def gateway(database_url, start_service, start_edge, tmp_path) -> Gateway:
    return _gateway(database_url, start_service, start_edge, tmp_path)


def test_the_same_key_and_request_get_the_byte_identical_stored_answer_whatever_happened_since(gateway):
    request = request_text(101, "40.00")
    first = gateway.refund(request, idempotency_key="refund-101-a")
    body = check_answer(first, "0000", 200, order=True, transaction=True)

    # Since then: the order was refunded (a retry without the key gets 3003), the
    # balance changed, the merchant was suspended.
    check_answer(gateway.refund(request), "3003", 200)
    set_balance(gateway.database_url, MERCHANT, "5.00")
    set_merchant_status(gateway.database_url, MERCHANT, "SUSPENDED")
    check_answer(gateway.refund(request_text(102, "1.00")), "2002", 403)

    again = gateway.refund(request, idempotency_key="refund-101-a")
    assert (again.status, again.body) == (first.status, first.body)
    assert again.headers["x-signature"] == first.headers["x-signature"]
    assert again.headers["content-length"] == first.headers["content-length"]
    # The same request bytes in an envelope written differently are the same request.
    escaped = json.dumps({"signature": sign(example_key(), request), "request": request}, ensure_ascii=True,
                         indent=1).encode()
    third = gateway.edge.request("POST", "/direct/refund", escaped,
                                 {"Content-Type": "application/json", "Idempotency-Key": "refund-101-a"})
    assert third.body == first.body
    assert refund_count(gateway.database_url, 101) == 1
    assert body["transaction"]["amount"] == json.loads(again.body)["transaction"]["amount"]


def test_a_declined_answer_is_stored_too_and_does_not_turn_into_an_approval(gateway):
    request = request_text(2000, "2000.00")  # more than the HKD 1000.00 balance
    declined = gateway.refund(request, idempotency_key="big-one")
    check_answer(declined, "4004", 200, order=True, transaction=False)

    set_balance(gateway.database_url, MERCHANT, "3000.00")
    again = gateway.refund(request, idempotency_key="big-one")
    assert again.body == declined.body and again.status == 200
    assert refund_count(gateway.database_url, 2000) == 0
    # A new key is a new attempt: now it is approved.
    check_answer(gateway.refund(request, idempotency_key="big-two"), "0000", 200)
    assert attempts_of(gateway.database_url, 2000) == ["4004", "0000"]


def test_the_same_key_with_another_request_gets_1003_and_changes_nothing(gateway):
    check_answer(gateway.refund(request_text(103, "10.00"), idempotency_key="k-103"), "0000", 200)

    for other in (request_text(103, "20.00"), request_text(104, "10.00"), request_text(103, "10.0")):
        conflict = gateway.refund(other, idempotency_key="k-103")
        check_answer(conflict, "1003", 409, order=False, transaction=False)
    assert refund_count(gateway.database_url, 104) == 0
    assert attempts_of(gateway.database_url, 103) == ["0000"]
    assert balance_of(gateway.database_url, MERCHANT, "HKD") == 100000 - 1000


def test_keys_belong_to_one_merchant(gateway):
    check_answer(gateway.refund(request_text(105, "10.00"), idempotency_key="shared-key"), "0000", 200)
    theirs = gateway.refund(request_text(201, "99.00", merchant=OTHER), generated_key("other"),
                            idempotency_key="shared-key")
    check_answer(theirs, "0000", 200, order=True, transaction=True)
    assert balance_of(gateway.database_url, OTHER, "HKD") == 50000 - 9900


def test_concurrent_requests_with_one_key_never_both_execute(gateway):
    body = json.dumps({"request": request_text(106, "100.00"),
                       "signature": sign(example_key(), request_text(106, "100.00"))}).encode()
    barrier = threading.Barrier(12)
    replies = []

    def send():
        barrier.wait()
        replies.append(gateway.edge.request("POST", "/direct/refund", body, {
            "Content-Type": "application/json", "Idempotency-Key": "storm-106"}))

    threads = [threading.Thread(target=send) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert {reply.status for reply in replies} == {200}
    assert len({reply.body for reply in replies}) == 1, {reply.body for reply in replies}
    check_answer(replies[0], "0000", 200)
    # One execution: one audit row (twelve executions would leave one 0000 and eleven 3003).
    assert attempts_of(gateway.database_url, 106) == ["0000"]
    assert refund_count(gateway.database_url, 106) == 1


@pytest.mark.postgres
def test_one_key_sent_at_once_through_two_edges_and_two_services_executes_once(postgres_url, start_service,
                                                                               start_edge):
    seed(postgres_url)
    services = [start_service(postgres_url) for _ in range(2)]
    edges = [start_edge(service.address) for service in services]
    request = request_text(107, "100.00")
    body = envelope(request, sign(example_key(), request))
    barrier = threading.Barrier(16)
    replies = []

    def send(index):
        barrier.wait()
        replies.append(edges[index % 2].request("POST", "/direct/refund", body, {
            "Content-Type": "application/json", "Idempotency-Key": "two-processes"}))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len({reply.body for reply in replies}) == 1
    check_answer(replies[0], "0000", 200)
    assert attempts_of(postgres_url, 107) == ["0000"]


@pytest.mark.parametrize("key", ["x" * 65, "caf\u00e9", ""], ids=["65-chars", "not-ascii", "empty"])
def test_a_malformed_idempotency_key_is_refused_with_1001(gateway, key):
    body = envelope(request_text(108, "1.00"), sign(example_key(), request_text(108, "1.00")))
    reply = gateway.edge.request("POST", "/direct/refund", body, {
        "Content-Type": "application/json", "Idempotency-Key": key.encode("utf-8").decode("latin-1")})
    answer = check_answer(reply, "1001", 400)
    assert "Idempotency-Key" in answer["detail"]
    assert refund_count(gateway.database_url, 108) == 0


def test_64_printable_characters_including_spaces_and_symbols_are_a_valid_key(gateway):
    key = ("order 109 / retry #1 ~!@$%^&*()_+{}|:<>?" + "z" * 64)[:64]
    first = gateway.refund(request_text(109, "1.00"), idempotency_key=key)
    check_answer(first, "0000", 200)
    assert gateway.refund(request_text(109, "1.00"), idempotency_key=key).body == first.body


def test_an_answer_that_decided_nothing_is_not_stored(gateway):
    """2001 (bad signature) is not stored: the key stays free for the real request."""
    request = request_text(110, "5.00")
    bad = gateway.edge.request("POST", "/direct/refund", envelope(request, sign(generated_key("stranger"), request)),
                               {"Content-Type": "application/json", "Idempotency-Key": "k-110"})
    check_answer(bad, "2001", 401)
    check_answer(gateway.refund(request, idempotency_key="k-110"), "0000", 200)


def test_refund_client_sends_an_idempotency_key_and_a_timestamp(gateway):
    import subprocess
    import sys

    from tests.support import ROOT
    from tests.support.keys import EXAMPLE_KEY_PEM

    command = [sys.executable, "-m", "gateway_edge.client", "--url", gateway.edge.url, "--key", str(EXAMPLE_KEY_PEM),
               "--merchant-id", str(MERCHANT), "--order-id", "111", "--amount", "3.00", "--timestamp",
               "--idempotency-key", "client-111"]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stdout + first.stderr
    assert '"responseCode":"0000"' in first.stdout
    # Another amount under the same key: other request bytes.
    command[command.index("3.00")] = "4.00"
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "HTTP 409" in again.stdout and '"responseCode":"1003"' in again.stdout
