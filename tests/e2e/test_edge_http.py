"""The edge's HTTP envelope (413, 415, 405, 404), its behaviour when the back
end is down, slow or broken (9001, 9999), /healthz, the OpenAPI document and
graceful shutdown: real `refund-edge` processes, with the real service or a
fake gRPC back end in this test process."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import threading
import time

import pytest

from gateway_edge import answers
from gateway_edge.app import EdgeApp
from refund_wire import codes, status
from service import domain
from service.domain import ResponseCode
from tests.support import FIXTURES_DIR
from tests.support.answers import check_answer
from tests.support.data import load_document
from tests.support.http import Reply, http_request
from tests.support.in_process import FakeRefundService
from tests.support.keys import example_key, signed_body
from tests.support.openapi import conforms
from tests.support.processes import free_port

REQUEST = '{"merchantId":"3000001","orderId":1076,"amount":76.19}'
MAX_BODY = 64 * 1024


def example_fixtures() -> dict:
    return json.loads((FIXTURES_DIR / "fixtures.example.json").read_text())


# -- 413, 415, 405, 404 ----------------------------------------------------------


def test_an_oversized_body_gets_413_before_anything_is_parsed_or_forwarded(fake_backend, start_edge):
    backend = fake_backend("internal")
    edge = start_edge(backend.address)

    over = b" " * (MAX_BODY + 1)
    check_answer(edge.post_refund(over), "1001", 413)

    # Exactly at the cap the body is read (and here refused as not JSON).
    at_cap = b" " * MAX_BODY
    check_answer(edge.post_refund(at_cap), "1001", 400)

    # Without Content-Length (chunked), the edge stops reading once over the cap.
    chunks = (b"x" * 8192 for _ in range(20))
    reply = edge.request("POST", "/direct/refund", chunks,
                         {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    check_answer(reply, "1001", 413)

    # A huge declared body is refused at once, without waiting for it.
    with socket.create_connection((edge.host, edge.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /direct/refund HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 50000000\r\n\r\n")
        head = sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 413 "), head
        assert time.monotonic() - started < 2
    assert backend.servicer.calls == 0


def test_a_body_that_trickles_in_gets_408_after_the_body_timeout_and_the_connection_is_closed(
        fake_backend, start_edge):
    backend = fake_backend("internal")
    edge = start_edge(backend.address, "--body-timeout", "0.5")
    with socket.create_connection((edge.host, edge.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /direct/refund HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"request\":")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        elapsed = time.monotonic() - started
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), head
    assert json.loads(body) == {"responseCode": "1001", "message": "INVALID_REQUEST",
                                "detail": "the body did not arrive within 0.5 seconds"}
    assert 0.4 < elapsed < 2.0
    assert backend.servicer.calls == 0


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/json-patch+json", "application/jsonp", "json"])
def test_a_body_that_is_not_application_json_gets_415(fake_backend, start_edge, content_type):
    backend = fake_backend("internal")
    edge = start_edge(backend.address)
    headers = {"Content-Type": content_type} if content_type else {}
    reply = edge.request("POST", "/direct/refund", signed_body(example_key(), REQUEST), headers)
    answer = check_answer(reply, "1001", 415)
    assert "application/json" in answer["detail"]
    assert backend.servicer.calls == 0


def test_application_json_with_a_charset_or_in_capitals_is_accepted(fake_backend, start_edge):
    backend = fake_backend("internal")
    edge = start_edge(backend.address)
    for content_type in ("application/json; charset=utf-8", "Application/JSON", "application/json;charset=UTF-8"):
        check_answer(edge.post_refund(signed_body(example_key(), REQUEST), content_type), "9999", 500)
    assert backend.servicer.calls == 3


def test_other_methods_get_405_with_allow_and_unknown_paths_get_404(fake_backend, start_edge):
    backend = fake_backend("internal")
    edge = start_edge(backend.address)
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS"):
        reply = edge.request(method, "/direct/refund")
        check_answer(reply, "1001", 405)
        assert reply.headers["allow"] == "POST"
    for path in ("/healthz", "/openapi.json"):
        reply = edge.request("POST", path, b"{}", {"Content-Type": "application/json"})
        check_answer(reply, "1001", 405)
        assert reply.headers["allow"] == "GET, HEAD"
    for path in ("/", "/direct/refund/", "/direct/Refund", "/direct/query/", "/admin", "/../etc/passwd"):
        answer = check_answer(edge.request("POST", path, b"{}", {"Content-Type": "application/json"}), "1001", 404)
        assert answer["detail"] == "no such endpoint"
    # A query string does not change the route.
    check_answer(edge.request("POST", "/direct/refund?x=1", signed_body(example_key(), REQUEST),
                              {"Content-Type": "application/json"}), "9999", 500)
    assert backend.servicer.calls == 1


def test_head_works_wherever_get_does(fake_backend, start_edge):
    edge = start_edge(fake_backend("internal").address)
    for path in ("/healthz", "/openapi.json"):
        got, head = edge.request("GET", path), edge.request("HEAD", path)
        assert head.status == got.status and head.body == b"", (path, head)
        assert head.headers["content-length"] == got.headers["content-length"] == str(len(got.body))
        assert head.headers["content-type"] == got.headers["content-type"]


def test_metrics_are_served_on_their_own_listener_only(fake_backend, start_edge):
    edge = start_edge(fake_backend("internal").address, "--metrics-listen", "127.0.0.1:0")
    # Not to merchants: 404 like any unknown path on the merchant port.
    for method in ("GET", "HEAD"):
        assert edge.request(method, "/metrics").status == 404
    metrics_address = re.search(r"refund-edge metrics on http://(\S+)/metrics", edge.output()).group(1)
    host, port = metrics_address.rsplit(":", 1)
    scraped = http_request(host, int(port), "GET", "/metrics")
    assert scraped.status == 200 and b"refund_edge_requests_total" in scraped.body
    head = http_request(host, int(port), "HEAD", "/metrics")
    assert head.status == 200 and head.body == b""
    # The metrics listener serves nothing else.
    assert http_request(host, int(port), "GET", "/healthz").status == 404
    assert http_request(host, int(port), "POST", "/direct/refund", b"{}",
                        {"Content-Type": "application/json"}).status == 404


def test_the_edge_serves_no_metrics_unless_asked(fake_backend, start_edge):
    edge = start_edge(fake_backend("internal").address)
    assert "metrics on" not in edge.output()
    assert edge.request("GET", "/metrics").status == 404


# -- 9001: back end down or slow ---------------------------------------------------


def test_backend_down_gets_9001_within_the_deadline_and_the_edge_recovers_when_it_comes_up(
        sqlite_url, start_service, start_edge):
    port = free_port()
    edge = start_edge(f"127.0.0.1:{port}", deadline=1.0)
    body = signed_body(example_key(), REQUEST)

    for _ in range(3):
        reply = edge.post_refund(body, timeout=10)
        answer = check_answer(reply, "9001", 503, order=False, transaction=False)
        assert "retrying is safe" in answer["detail"]
        assert reply.elapsed < 1.5
    health = edge.request("GET", "/healthz")
    assert (health.status, health.json) == (503, {"status": "UNREACHABLE"})

    load_document(sqlite_url, example_fixtures())
    start_service(sqlite_url, "--listen", f"127.0.0.1:{port}")
    deadline = time.monotonic() + 10
    while edge.request("GET", "/healthz").status != 200:
        assert time.monotonic() < deadline, "the edge did not reconnect to the back end"
        time.sleep(0.1)
    assert edge.request("GET", "/healthz").json == {"status": "SERVING"}
    check_answer(edge.post_refund(body), "0000", 200, order=True, transaction=True)


def test_backend_slow_gets_9001_within_the_deadline_for_every_request(fake_backend, start_edge):
    backend = fake_backend("slow")
    edge = start_edge(backend.address, deadline=1.0)
    replies: list[Reply] = []

    def attempt():
        replies.append(edge.post_refund(signed_body(example_key(), REQUEST), timeout=10))

    threads = [threading.Thread(target=attempt) for _ in range(5)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - started < 2.0
    for reply in replies:
        check_answer(reply, "9001", 503, order=False, transaction=False)
        assert 0.9 < reply.elapsed < 1.6, reply.elapsed
    assert backend.servicer.calls == 5


def test_backend_says_unavailable_with_our_error_info_gets_9001(fake_backend, start_edge):
    backend = fake_backend("rich_unavailable")
    edge = start_edge(backend.address)
    answer = check_answer(edge.post_refund(signed_body(example_key(), REQUEST)), "9001", 503)
    assert FakeRefundService.SECRET not in answer["detail"]


# -- 9999: faults behind the edge ---------------------------------------------------


def test_backend_faults_get_9999_that_reveal_nothing_internal(fake_backend, start_edge):
    backend = fake_backend("internal")
    edge = start_edge(backend.address)
    bodies = set()
    for behaviour in ("internal", "rich_system_error", "unknown_reason", "foreign_domain", "bad_amount",
                      "resource_exhausted"):
        backend.servicer.behaviour = behaviour
        reply = edge.post_refund(signed_body(example_key(), REQUEST))
        answer = check_answer(reply, "9999", 500, order=False, transaction=False)
        assert "retrying is safe" in answer["detail"], behaviour
        bodies.add(reply.body)
    assert len(bodies) == 1, bodies
    log = edge.output()
    assert "cannot render the back end's answer" in log and "unknown reason 'DISK_ON_FIRE'" in log


def test_an_unexpected_exception_in_the_app_is_answered_9999_json():
    """In process: whatever escapes a handler becomes the 9999 JSON answer."""
    app = EdgeApp("127.0.0.1:1")

    async def exploding(scope, receive, responder):
        raise KeyError("internal state")

    app._routes["/direct/refund"]["POST"] = exploding
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/direct/refund",
             "headers": [(b"content-type", b"application/json")]}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 500
    body = json.loads(sent[1]["body"])
    assert body["responseCode"] == "9999" and body["message"] == "SYSTEM_ERROR"
    assert "internal state" not in sent[1]["body"].decode()


def test_the_edge_and_the_service_share_one_vocabulary_and_every_code_has_an_http_status():
    assert answers.ResponseCode is codes.ResponseCode is domain.ResponseCode  # refund_wire, for both
    assert set(answers.HTTP_STATUS) == set(ResponseCode) == set(status.GRPC_CODES) | {ResponseCode.SUCCESS}


# -- /healthz -------------------------------------------------------------------------


def test_healthz_is_ready_only_while_the_back_end_says_serving(fake_backend, start_edge):
    backend = fake_backend("internal", serving=True)
    edge = start_edge(backend.address)
    reply = edge.request("GET", "/healthz")
    assert (reply.status, reply.body) == (200, b'{"status":"SERVING"}')
    assert reply.headers["content-type"] == "application/json"
    backend.set_serving(False)
    reply = edge.request("GET", "/healthz")
    assert (reply.status, reply.json) == (503, {"status": "NOT_SERVING"})
    backend.stop()
    reply = edge.request("GET", "/healthz", timeout=5)
    assert (reply.status, reply.json) == (503, {"status": "UNREACHABLE"})
    assert reply.elapsed < 1.5


# -- the OpenAPI document ----------------------------------------------------------------


def test_the_openapi_document_is_served_and_describes_what_the_edge_does(sqlite_url, start_service, start_edge):
    load_document(sqlite_url, example_fixtures())
    service = start_service(sqlite_url)
    edge = start_edge(service.address, deadline=1.0)

    served = edge.request("GET", "/openapi.json")
    assert served.status == 200 and served.headers["content-type"] == "application/json"
    from gateway_edge.app import OPENAPI_PATH

    assert served.body == OPENAPI_PATH.read_bytes()
    document = served.json
    assert document["openapi"].startswith("3.")
    refund_responses = document["paths"]["/direct/refund"]["post"]["responses"]
    assert set(refund_responses) == {str(s) for s in answers.HTTP_STATUS.values()} | {"404", "405", "408", "413", "415",
                                                                                        "431"}
    for code, http_status in answers.HTTP_STATUS.items():
        enum = refund_responses[str(http_status)]["content"]["application/json"]["schema"]["allOf"][1]
        assert code.value in enum["properties"]["responseCode"]["enum"], code
        assert code.name in enum["properties"]["message"]["enum"], code
    answer = document["components"]["schemas"]["Answer"]["properties"]
    assert answer["responseCode"]["enum"] == [c.value for c in ResponseCode]
    assert answer["message"]["enum"] == [c.name for c in ResponseCode]

    key = example_key()
    post = lambda body, **kw: edge.post_refund(body, **kw)  # noqa: E731
    replies = [
        post(signed_body(key, '{"merchantId":"3000001","orderId":1076,"amount":76.19}')),  # 0000
        post(signed_body(key, '{"merchantId":"3000001","orderId":1076,"amount":76.19}')),  # 3003
        post(signed_body(key, '{"merchantId":"3000001","orderId":9,"amount":1.00}')),  # 3001
        post(signed_body(key, '{"merchantId":"3000001","orderId":1077,"amount":1.00}')),  # 4002
        post(signed_body(key, '{"merchantId":"3000001","orderId":1077,"amount":0}')),  # 1002
        post(b"[]"),  # 1001
        post(signed_body(key, '{"merchantId":"3000002","orderId":1,"amount":1}')),  # 2001
        post(b"{}", content_type="text/plain"),  # 415
        post(b" " * (MAX_BODY + 1)),  # 413
    ]
    for reply in replies:
        conforms(reply, document, "/direct/refund", "POST")
    conforms(edge.request("GET", "/direct/refund"), document, "/direct/refund", "POST")  # 405 (documented on POST)
    conforms(edge.request("GET", "/healthz"), document, "/healthz", "GET")
    assert [r.json["responseCode"] for r in replies] == ["0000", "3003", "3001", "4002", "1002", "1001", "2001",
                                                         "1001", "1001"]
    service.stop()
    down = post(signed_body(key, '{"merchantId":"3000001","orderId":1077,"amount":120.00}'))
    conforms(down, document, "/direct/refund", "POST")
    assert down.json["responseCode"] == "9001"
    conforms(edge.request("GET", "/healthz"), document, "/healthz", "GET")


# -- graceful shutdown -------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_edge_answers_the_requests_in_flight_then_exits_0(fake_backend, start_edge, sig):
    backend = fake_backend("slow")
    edge = start_edge(backend.address, deadline=1.5)
    replies: list[Reply] = []
    thread = threading.Thread(target=lambda: replies.append(edge.post_refund(signed_body(example_key(), REQUEST))))
    thread.start()
    deadline = time.monotonic() + 5
    while backend.servicer.calls == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    edge.process.send_signal(sig)
    thread.join(10)
    assert edge.process.wait(10) == 0
    assert time.monotonic() - started < 5
    check_answer(replies[0], "9001", 503)
    with pytest.raises(OSError):
        socket.create_connection((edge.host, edge.port), timeout=1).close()
