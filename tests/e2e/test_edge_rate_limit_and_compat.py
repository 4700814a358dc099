"""The per-merchant rate limit (9002, HTTP 429, Retry-After, before any call to
the service) and the vendor's compatibility mode (HTTP 200 for every answer
with a code), with a client written the way the vendor's published plugin
is: real `refund-service` and `refund-edge` processes on SQLite. Settings
are given by environment variables, which an edge without them ignores."""

from __future__ import annotations

import base64
import json
import statistics
import subprocess
import threading
import time

import pytest

from tests.support import data
from tests.support.answers import check_answer
from tests.support.data import refund_count
from tests.support.http import http_request
from tests.support.keys import generated_key, public_pem, signed_body

A, B = 3200001, 3200002  # two merchants
A_ORDERS = range(320_000, 320_040)
B_ORDERS = range(321_000, 321_060)


@pytest.fixture
def stack(tmp_path, start_service):
    from service import db

    url = f"sqlite:///{tmp_path / 'limits.db'}"
    db.migrate(url)
    data.load(url, [data.merchant(A, public_pem(generated_key("merchant-a")), balances={"HKD": "100000.00"}),
                    data.merchant(B, public_pem(generated_key("merchant-b")), balances={"HKD": "100000.00"})],
              [data.order(i, A, "10.00", reference=f"inv/2026/{i}") for i in A_ORDERS]
              + [data.order(i, B, "10.00") for i in B_ORDERS])
    service = start_service(url)
    service.url = url
    return service


def refund_body(merchant: int, order: int, amount: str = "10.00", key_name: str | None = None) -> bytes:
    key = generated_key(key_name or ("merchant-a" if merchant == A else "merchant-b"))
    return signed_body(key, f'{{"merchantId":"{merchant}","orderId":{order},"amount":{amount}}}')


# -- rate limit ------------------------------------------------------------------------------


def test_a_merchant_over_its_rate_gets_429_with_9002_and_retry_after_and_another_is_not_slowed(stack, start_edge):
    edge = start_edge(stack.address, env={"REFUND_EDGE_RATE_LIMIT": "200/400",
                                          "REFUND_EDGE_MERCHANT_RATE_LIMITS": f"{A}=1/3"})
    b_orders = iter(B_ORDERS)
    baseline = [edge.post_refund(refund_body(B, next(b_orders))) for _ in range(15)]
    for reply in baseline:
        check_answer(reply, "0000", 200)

    for order in A_ORDERS[:3]:  # A's burst
        check_answer(edge.post_refund(refund_body(A, order)), "0000", 200)
    limited = edge.post_refund(refund_body(A, A_ORDERS[3]))
    answer = check_answer(limited, "9002", 429)
    assert answer["message"] == "RATE_LIMITED" and "retry after" in answer["detail"]
    retry_after = int(limited.headers["retry-after"])
    assert 1 <= retry_after <= 2
    assert refund_count(stack.url, A_ORDERS[3]) == 0  # nothing was done

    # A keeps hammering (every answer 429, fast) while B refunds: B is neither limited nor slowed.
    stop, a_codes = threading.Event(), []

    def hammer():
        while not stop.is_set():
            a_codes.append(edge.post_refund(refund_body(A, A_ORDERS[4])).status)

    hammering = threading.Thread(target=hammer)
    hammering.start()
    try:
        during = [edge.post_refund(refund_body(B, next(b_orders))) for _ in range(15)]
    finally:
        stop.set()
        hammering.join(10)
    for reply in during:
        check_answer(reply, "0000", 200)
    assert a_codes and set(a_codes) <= {429, 200} and a_codes.count(200) <= 2, a_codes
    before = statistics.median(r.elapsed for r in baseline)
    while_hammered = statistics.median(r.elapsed for r in during)
    print(f"\nB's median refund: {before * 1000:.1f} ms alone, {while_hammered * 1000:.1f} ms while A got "
          f"{len(a_codes)} answers, {a_codes.count(429)} of them 429")
    assert while_hammered < max(4 * before, before + 0.1)

    time.sleep(retry_after + 0.2)  # after Retry-After, A is served again
    check_answer(edge.post_refund(refund_body(A, A_ORDERS[5])), "0000", 200)


def test_requests_that_fail_authentication_do_not_spend_a_merchants_budget(stack, start_edge):
    edge = start_edge(stack.address, env={"REFUND_EDGE_MERCHANT_RATE_LIMITS": f"{A}=0.5/2"})
    for order in A_ORDERS[10:20]:  # a forger who knows A's id, signing with another key
        check_answer(edge.post_refund(refund_body(A, order, key_name="forger")), "2001", 401)
    check_answer(edge.post_refund(refund_body(A, A_ORDERS[10])), "0000", 200)
    check_answer(edge.post_refund(refund_body(A, A_ORDERS[11])), "0000", 200)
    check_answer(edge.post_refund(refund_body(A, A_ORDERS[12])), "9002", 429)


def test_the_default_rate_applies_to_every_merchant_and_off_turns_the_limit_off(stack, start_edge):
    limited = start_edge(stack.address, env={"REFUND_EDGE_RATE_LIMIT": "1/2"})
    codes = [limited.post_refund(refund_body(B, order)).status for order in B_ORDERS[:4]]
    assert codes[:2] == [200, 200] and 429 in codes[2:], codes
    unlimited = start_edge(stack.address, env={"REFUND_EDGE_RATE_LIMIT": "1/2",
                                               "REFUND_EDGE_MERCHANT_RATE_LIMITS": f"{B}=off"})
    codes = [unlimited.post_refund(refund_body(B, order)).status for order in B_ORDERS[10:20]]
    assert codes == [200] * 10


def test_bad_rate_limit_settings_stop_the_edge_with_a_message(stack):
    from tests.support.processes import Process

    for env, said in (({"REFUND_EDGE_RATE_LIMIT": "fast"}, "'fast'"),
                      ({"REFUND_EDGE_MERCHANT_RATE_LIMITS": "abc=1"}, "MERCHANT_ID=VALUE"),
                      ({"REFUND_EDGE_RATE_LIMIT": "0"}, "'0'"),
                      ({"REFUND_EDGE_MAX_CONNECTIONS": "0"}, "REFUND_EDGE_MAX_CONNECTIONS"),
                      ({"REFUND_EDGE_STATUS_MODE": "sometimes-200"}, "sometimes-200")):
        with pytest.raises(RuntimeError) as caught:
            Process.edge(stack.address, env=env)
        lines = [json.loads(line) for line in str(caught.value).splitlines()[1:] if line.startswith("{")]
        assert any(e.get("exit_code") == 2 and said in e["message"] for e in lines), (env, lines)


# -- the HTTP-200 compatibility mode ------------------------------------------------------------


def test_a_merchant_in_the_http_200_mode_gets_every_code_with_http_200_and_others_the_documented_status(
        stack, start_edge):
    edge = start_edge(stack.address, env={"REFUND_EDGE_MERCHANT_STATUS_MODES": f"{A}=always-200"})
    forged_a = edge.post_refund(refund_body(A, A_ORDERS[0], key_name="forger"))
    check_answer(forged_a, "2001", 200)
    check_answer(edge.post_refund(refund_body(B, B_ORDERS[0], key_name="forger")), "2001", 401)
    check_answer(edge.post_refund(refund_body(A, A_ORDERS[0], amount="0")), "1002", 200)
    check_answer(edge.post_refund(refund_body(B, B_ORDERS[0], amount="0")), "1002", 400)
    # Without a merchant to go by, the edge's default applies.
    check_answer(edge.post_refund(b"[]"), "1001", 400)


def test_the_edge_wide_http_200_mode_covers_every_answer_with_a_code_and_a_merchant_can_opt_out(
        stack, start_edge):
    edge = start_edge(stack.address, env={"REFUND_EDGE_STATUS_MODE": "always-200",
                                          "REFUND_EDGE_MERCHANT_STATUS_MODES": f"{B}=documented",
                                          "REFUND_EDGE_MERCHANT_RATE_LIMITS": f"{A}=0.1/1",
                                          "REFUND_EDGE_MAX_HEADER_BYTES": "4096"})
    check_answer(edge.post_refund(b"[]"), "1001", 200)
    check_answer(edge.post_refund(b"{}", content_type="text/plain"), "1001", 200)
    check_answer(edge.post_refund(b" " * (64 * 1024 + 1)), "1001", 200)
    check_answer(edge.request("GET", "/direct/refund"), "1001", 200)
    check_answer(edge.request("POST", "/nowhere", b"{}", {"Content-Type": "application/json"}), "1001", 200)
    check_answer(edge.request("GET", "/healthz", headers={"X-Big": "a" * 5000}), "1001", 200)  # 431 otherwise
    check_answer(edge.post_refund(refund_body(A, A_ORDERS[0], key_name="forger")), "2001", 200)
    check_answer(edge.post_refund(refund_body(A, A_ORDERS[0])), "0000", 200)
    limited = edge.post_refund(refund_body(A, A_ORDERS[1]))
    check_answer(limited, "9002", 200)
    assert "retry-after" in limited.headers
    check_answer(edge.post_refund(refund_body(B, B_ORDERS[0], key_name="forger")), "2001", 401)


# -- a client written to the vendor's published plugin -------------------------------------------


def php_json_encode(value) -> str:
    """PHP's json_encode() with its default flags: compact, "/" escaped as "\\/",
    non-ASCII as \\uXXXX, floats in their shortest form."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True).replace("/", "\\/")


def openssl_sign(text: str, key_path) -> bytes:
    """What PHP's openssl_sign($data, $signature, $key, OPENSSL_ALGO_SHA256) computes."""
    return subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key_path)], input=text.encode("utf-8"),
                          capture_output=True, check=True).stdout


def vendor_plugin_refund(edge, key_path, merchant: int, order: int, amount: float, reference: str | None = None):
    """The published plugin's refund: merchantId a string, orderId an integer,
    amount a float, json_encode'd, openssl_sign'ed, base64 envelope; it reads
    the answer only on HTTP 200 and reports anything else as a generic failure."""
    fields = {"merchantId": str(merchant), "orderId": order, "amount": amount}
    if reference is not None:
        fields["merchantReference"] = reference
    request = php_json_encode(fields)
    body = php_json_encode({"request": request,
                            "signature": base64.b64encode(openssl_sign(request, key_path)).decode("ascii")})
    reply = http_request(edge.host, edge.port, "POST", "/direct/refund", body.encode("ascii"),
                         {"Content-Type": "application/json"})
    if reply.status != 200:
        return "request failed"
    return json.loads(reply.body)["responseCode"]


def test_a_client_written_to_the_vendors_plugin_gets_every_code_in_the_http_200_mode(stack, start_edge, tmp_path):
    from cryptography.hazmat.primitives import serialization

    key_path = tmp_path / "merchant-a.key.pem"
    key_path.write_bytes(generated_key("merchant-a").private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    forger_path = tmp_path / "forger.key.pem"
    forger_path.write_bytes(generated_key("forger").private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    order, reference = A_ORDERS[0], f"inv/2026/{A_ORDERS[0]}"  # "/" in the reference: sent as "\/"

    documented = start_edge(stack.address)
    # The documented statuses: the plugin sees 0000 and 3003, but loses every code sent with another status.
    assert vendor_plugin_refund(documented, key_path, A, order, 10.0, reference) == "0000"
    assert vendor_plugin_refund(documented, key_path, A, order, 10.0, reference) == "3003"
    assert vendor_plugin_refund(documented, forger_path, A, A_ORDERS[1], 10.0) == "request failed"
    assert vendor_plugin_refund(documented, key_path, A, A_ORDERS[1], 10.001) == "request failed"

    compatible = start_edge(stack.address, env={"REFUND_EDGE_MERCHANT_STATUS_MODES": f"{A}=always-200"})
    assert vendor_plugin_refund(compatible, forger_path, A, A_ORDERS[1], 10.0) == "2001"
    assert vendor_plugin_refund(compatible, key_path, A, A_ORDERS[1], 10.001) == "1002"
    assert vendor_plugin_refund(compatible, key_path, A, A_ORDERS[1], 0.5) == "0000"
    assert vendor_plugin_refund(compatible, key_path, A, A_ORDERS[1], 0.5) == "3003"
    assert vendor_plugin_refund(compatible, key_path, A, 999_999, 1.0) == "3001"
