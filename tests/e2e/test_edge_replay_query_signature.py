"""docs/api.md section 7 end to end, on real processes: the signed `timestamp`
and its replay window, signed responses verified by the merchant with
`openssl dgst -verify`, and `POST /direct/query`."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import pytest

from tests.support.answers import check_answer, check_order, check_transaction
from tests.support.data import (
    MERCHANT,
    OTHER,
    admin,
    make_gateway_key,
    now_iso,
    refund_count,
    request_text,
    seed,
    set_balance,
    set_merchant_status,
)
from tests.support.keys import envelope, example_key, generated_key, sign
from tests.support.processes import Gateway, Process


@pytest.fixture
def gateway(database_url, start_service, start_edge) -> Gateway:
    seed(database_url)
    service = start_service(database_url)
    return Gateway(database_url, service, start_edge(service.address))


@pytest.fixture
def sqlite_gateway(sqlite_url, start_service, start_edge) -> Gateway:
    seed(sqlite_url)
    service = start_service(sqlite_url)
    return Gateway(sqlite_url, service, start_edge(service.address))


# -- the replay window ------------------------------------------------------------------


def test_a_declined_request_replayed_later_gets_2003_even_once_the_balance_allows_it(gateway):
    request = request_text(2000, "2000.00", timestamp=now_iso())
    check_answer(gateway.refund(request), "4004", 200)

    set_balance(gateway.database_url, MERCHANT, "3000.00")
    replay = gateway.refund(request)
    answer = check_answer(replay, "2003", 401, order=False, transaction=False)
    assert "received before" in answer["detail"]
    assert refund_count(gateway.database_url, 2000) == 0

    # Signed again with a new timestamp it is a new request.
    check_answer(gateway.refund(request_text(2000, "2000.00", timestamp=now_iso(1))), "0000", 200)


@pytest.mark.parametrize("offset", [-301, 301, -86400], ids=["301s-late", "301s-early", "a-day-old"])
def test_a_timestamp_outside_300_seconds_gets_2003(sqlite_gateway, offset):
    reply = sqlite_gateway.refund(request_text(111, "1.00", timestamp=now_iso(offset)))
    assert "300 seconds" in check_answer(reply, "2003", 401)["detail"]
    assert refund_count(sqlite_gateway.database_url, 111) == 0


def test_a_timestamp_inside_the_window_in_any_zone_is_accepted(sqlite_gateway):
    check_answer(sqlite_gateway.refund(request_text(112, "1.00", timestamp=now_iso(-250, tz_hours=-5))), "0000", 200)
    check_answer(sqlite_gateway.refund(request_text(113, "1.00", timestamp=now_iso(250, tz_hours=0)
                                                    .replace("+00:00", "Z"))), "0000", 200)


@pytest.mark.parametrize("timestamp", ["2026-11-26 10:00:00+08:00", "2026-11-26T10:00:00", "1764122400",
                                       "2026-02-30T10:00:00+08:00", 1764122400, ""],
                         ids=["space", "no-offset", "epoch-text", "no-such-day", "number", "empty"])
def test_a_malformed_timestamp_is_1001(sqlite_gateway, timestamp):
    request = request_text(114, "1.00")[:-1] + f',"timestamp":{json.dumps(timestamp)}}}'
    assert "ISO 8601" in check_answer(sqlite_gateway.refund(request), "1001", 400)["detail"]


def test_a_merchant_can_be_required_to_send_a_timestamp(sqlite_gateway):
    url = sqlite_gateway.database_url
    admin(url, "merchant", "timestamp", str(MERCHANT), "required")
    set_balance(url, MERCHANT, "900.00")  # reloading the merchant keeps the setting
    assert "signed timestamp: required" in admin(url, "merchant", "show", str(MERCHANT))
    refused = sqlite_gateway.refund(request_text(115, "1.00"))
    assert "timestamp is required" in check_answer(refused, "1001", 400)["detail"]
    check_answer(sqlite_gateway.refund(request_text(115, "1.00", timestamp=now_iso())), "0000", 200)
    # Another merchant is not affected.
    check_answer(sqlite_gateway.refund(request_text(201, "1.00", merchant=OTHER), generated_key("other")),
                 "0000", 200)

    admin(url, "merchant", "timestamp", str(MERCHANT), "optional")
    check_answer(sqlite_gateway.refund(request_text(116, "1.00")), "0000", 200)


def test_a_stored_idempotency_key_answer_wins_over_the_replay_check(gateway):
    request = request_text(117, "1.00", timestamp=now_iso())
    first = gateway.refund(request, idempotency_key="ts-117")
    check_answer(first, "0000", 200)

    assert gateway.refund(request, idempotency_key="ts-117").body == first.body
    check_answer(gateway.refund(request), "2003", 401)
    check_answer(gateway.refund(request, idempotency_key="ts-117-other"), "2003", 401)


@pytest.mark.postgres
def test_service_processes_sharing_postgres_agree_on_replays(postgres_url, start_service, start_edge):
    seed(postgres_url)
    first, second = (start_service(postgres_url) for _ in range(2))
    edge_a, edge_b = start_edge(first.address), start_edge(second.address)
    request = request_text(118, "1.00", timestamp=now_iso())
    body = envelope(request, sign(example_key(), request))
    check_answer(edge_a.post_refund(body), "0000", 200)
    check_answer(edge_b.post_refund(body), "2003", 401)


def test_requests_without_a_timestamp_behave_as_before(sqlite_gateway):
    request = request_text(119, "1.00")
    check_answer(sqlite_gateway.refund(request), "0000", 200)
    check_answer(sqlite_gateway.refund(request), "3003", 200)


# -- signed responses --------------------------------------------------------------------


def openssl_verifies(public_pem, body: bytes, signature_header: str, directory) -> bool:
    """The merchant's check: `openssl dgst -sha256 -verify pub.pem -signature sig.bin body.bin`."""
    (directory / "body.bin").write_bytes(body)
    (directory / "sig.bin").write_bytes(base64.b64decode(signature_header, validate=True))
    result = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(public_pem), "-signature",
                             str(directory / "sig.bin"), str(directory / "body.bin")],
                            capture_output=True, text=True, timeout=30)
    return result.returncode == 0 and "Verified OK" in result.stdout


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line")
def test_every_edge_response_is_signed_and_the_merchant_verifies_it_with_openssl(sqlite_url, start_service,
                                                                               start_edge, tmp_path):
    seed(sqlite_url)
    private, public = make_gateway_key(sqlite_url, tmp_path)
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    service = start_service(sqlite_url)
    edge = start_edge(service.address, env={"REFUND_EDGE_SIGNING_KEY": str(private)})
    gateway = Gateway(sqlite_url, service, edge)

    replies = {
        "0000": gateway.refund(request_text(101, "76.19")),
        "3003": gateway.refund(request_text(101, "76.19")),
        "3001": gateway.refund(request_text(999, "1.00")),
        "2001": gateway.refund(request_text(102, "1.00"), generated_key("stranger")),
        "1001": edge.post_refund(b"{not json"),
        "415": edge.post_refund(b"{}", content_type="text/plain"),
        "404": edge.request("GET", "/nowhere"),
        "405": edge.request("GET", "/direct/refund"),
        "query": gateway.query(request_text(101)),
        "healthz": edge.request("GET", "/healthz"),
        "openapi": edge.request("GET", "/openapi.json"),
        "head": edge.request("HEAD", "/healthz"),
    }
    for name, reply in replies.items():
        assert "x-signature" in reply.headers, name
        body = replies["healthz"].body if name == "head" else reply.body  # HEAD: the headers of GET, no body
        assert openssl_verifies(public, body, reply.headers["x-signature"], tmp_path), name
    # A body changed by one byte does not verify.
    approved = replies["0000"]
    forged = approved.body.replace(b'"amount":76.19', b'"amount":96.19')
    assert forged != approved.body
    assert not openssl_verifies(public, forged, approved.headers["x-signature"], tmp_path)

    # After a key rotation, `gateway-key public --all` lists both keys, newest first.
    admin(sqlite_url, "gateway-key", "create", "--out", str(tmp_path / "next.key.pem"))
    listed = admin(sqlite_url, "gateway-key", "public", "--all")
    assert listed.count("BEGIN PUBLIC KEY") == 2 and public.read_text() in listed
    assert listed.index(public.read_text()) > listed.index("BEGIN PUBLIC KEY")


def test_without_a_gateway_key_responses_carry_no_signature(sqlite_gateway):
    reply = sqlite_gateway.refund(request_text(101, "1.00"))
    check_answer(reply, "0000", 200)
    assert "x-signature" not in reply.headers


def test_the_edge_refuses_to_start_with_an_unusable_signing_key(sqlite_url, tmp_path):
    not_a_key = tmp_path / "not-a-key.pem"
    not_a_key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    for path in (not_a_key, tmp_path / "missing.pem"):
        with pytest.raises(RuntimeError) as failed:
            Process.edge("127.0.0.1:1", "--signing-key", str(path))
        assert "Traceback" not in str(failed.value)
        assert "signing-key" in str(failed.value) or "cannot read" in str(failed.value)


# -- POST /direct/query ---------------------------------------------------------------------


def check_query_answer(reply) -> dict:
    """A 0000 query answer: the order and its transactions, with the documented types."""
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    body = reply.json
    assert set(body) == {"responseCode", "message", "order", "transactions"}, body
    assert (body["responseCode"], body["message"]) == ("0000", "SUCCESS")
    check_order(body["order"])
    for txn in body["transactions"]:
        assert txn["type"] in ("SALE", "REFUND")
        check_transaction({**txn, "type": "REFUND"})  # the shape and types of a refund transaction
    return body


def test_query_returns_the_order_with_all_its_transactions(gateway):
    before = gateway.query(request_text(120))
    body = check_query_answer(before)
    check_order(body["order"], id=120, merchantReference="shop-120", status="SUCCESS")
    assert [t["type"] for t in body["transactions"]] == ["SALE"]
    sale = body["transactions"][0]
    assert sale["maskedPan"] == "411111******1111" and sale["merchantId"] == MERCHANT
    assert '"amount":100.00' in before.body.decode()

    refund = check_answer(gateway.refund(request_text(120, "30.00")), "0000", 200)
    after = check_query_answer(gateway.query(request_text(reference="shop-120")))
    assert after["order"] == refund["order"]
    assert after["order"]["status"] == "PARTIALLY_REFUNDED"
    assert after["transactions"][0] == sale
    assert after["transactions"][1] == refund["transaction"]
    # Both identifiers, naming the same order.
    assert gateway.query(request_text(120, reference="shop-120")).body == gateway.query(request_text(120)).body


def test_query_answers_like_the_refund_endpoint_for_what_is_wrong(gateway):
    missing = gateway.query(request_text(999999))
    theirs = gateway.query(request_text(201))
    check_answer(missing, "3001", 200, order=False)
    assert theirs.body == missing.body
    assert gateway.query(request_text(120, reference="shop-119")).json["responseCode"] == "3001"
    check_answer(gateway.query(request_text()), "1001", 400)
    check_answer(gateway.query(request_text(120), generated_key("stranger")), "2001", 401)
    check_answer(gateway.edge.request("POST", "/direct/query", b"[]", {"Content-Type": "application/json"}),
                 "1001", 400)
    check_answer(gateway.edge.request("GET", "/direct/query"), "1001", 405)

    stamped = request_text(120, timestamp=now_iso())
    check_query_answer(gateway.query(stamped))
    check_answer(gateway.query(stamped), "2003", 401)

    set_merchant_status(gateway.database_url, MERCHANT, "SUSPENDED")
    check_answer(gateway.query(request_text(120)), "2002", 403)


def test_query_and_refund_answers_conform_to_the_openapi_document(sqlite_gateway):
    from tests.support.openapi import conforms

    document = sqlite_gateway.edge.request("GET", "/openapi.json").json
    gateway = sqlite_gateway
    for reply in (gateway.query(request_text(101)), gateway.query(request_text(999)), gateway.query(request_text()),
                  gateway.query(request_text(101), generated_key("stranger"))):
        conforms(reply, document, "/direct/query", "POST")
    check_answer(gateway.refund(request_text(101, "1.00"), idempotency_key="doc"), "0000", 200)
    for reply in (gateway.refund(request_text(101, "2.00"), idempotency_key="doc"),
                  gateway.refund(request_text(102, "1.00", timestamp=now_iso(-1000)))):
        conforms(reply, document, "/direct/refund", "POST")
    parameters = document["paths"]["/direct/refund"]["post"]["parameters"]
    assert {"$ref": "#/components/parameters/IdempotencyKey"} in parameters
    assert "timestamp" in document["components"]["schemas"]["SignedRequest"]["properties"]
