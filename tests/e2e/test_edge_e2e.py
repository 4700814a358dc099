"""End to end over HTTP: real `refund-service` and `refund-edge` processes on
free ports, data seeded in SQLite (and PostgreSQL where the test is
parametrized with `database_url`), every answer checked for the documented
shape and JSON types (docs/api.md sections 2 to 4).

Long (about 450 lines) on purpose: one live stack, started once, carries every case of the answer's shape.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import threading
from decimal import Decimal

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from tests.support import FIXTURES_DIR
from tests.support.answers import check_answer, check_order, check_transaction
from tests.support.data import (
    balance_of,
    deactivate_key,
    insert_key_directly,
    load_document,
    refund_count,
    set_merchant_status,
)
from tests.support.http import Reply
from tests.support.keys import (
    EXAMPLE_KEY_PEM,
    example_key,
    generated_key,
    public_pem,
    sign,
    signature_bytes,
    signed_body,
)
from tests.support.processes import Gateway

OTHER, SUSPENDED, KEYLESS, ROTATING, BROKEN_KEY = 3000002, 3000003, 3000004, 3000005, 3000006


def _order(id_, merchant, reference, currency, amount, status="SUCCESS", method="VISA", pan="411111******1111",
           stan="000417", created="2026-11-20T08:15:00+00:00"):
    return {"id": id_, "merchantId": merchant, "merchantReference": reference, "currency": currency,
            "amount": amount, "status": status, "paymentMethod": method, "maskedPan": pan, "stan": stan,
            "createTime": created}


def _merchant(id_, name, keys, balances, status="ACTIVE"):
    return {"id": id_, "name": name, "status": status, "keys": keys,
            "balances": [{"currency": c, "unsettled": a} for c, a in balances]}


def _key(key_id, key):
    return {"keyId": key_id, "publicKeyPem": public_pem(key)}


def world() -> dict:
    """The example merchant of fixtures.example.json and its orders, plus
    merchants and orders for every path of docs/api.md section 3."""
    example = json.loads((FIXTURES_DIR / "fixtures.example.json").read_text())
    example["merchants"][0]["balances"].append({"currency": "BHD", "unsettled": "10.000"})
    example["merchants"] += [
        _merchant(OTHER, "Other Shop", [_key("k1", generated_key("other"))], [("HKD", "500.00")]),
        _merchant(SUSPENDED, "Suspended Shop", [_key("k1", generated_key("suspended"))], [("HKD", "100.00")],
                  status="SUSPENDED"),
        _merchant(KEYLESS, "Keyless Shop", [_key("old", generated_key("keyless"))], [("HKD", "100.00")]),
        _merchant(ROTATING, "Rotating Shop",
                  [_key("2026-10", generated_key("rotating-old")), _key("2026-11", generated_key("rotating-new"))],
                  [("HKD", "100.00")]),
        _merchant(BROKEN_KEY, "Shop with an unusable key", [_key("rsa", generated_key("broken"))],
                  [("HKD", "100.00")]),
    ]
    example["orders"] += [
        _order(1080, 3000001, "bh-0001", "BHD", "1.250", status="SETTLED", pan="400000******0002", stan="000421"),
        _order(1081, 3000001, "voided-0001", "HKD", "50.00", status="VOIDED"),
        _order(1082, 3000001, "big-0001", "HKD", "2000.00"),
        _order(1083, 3000001, "open-0001", "HKD", "10.00", status="OPEN"),
        _order(2001, OTHER, "theirs-0001", "HKD", "99.00", stan="000501"),
        _order(3001, SUSPENDED, "susp-0001", "HKD", "10.00"),
        _order(4001, KEYLESS, "keyless-0001", "HKD", "10.00"),
        _order(5001, ROTATING, "rot-0001", "HKD", "10.00"),
        _order(5002, ROTATING, "rot-0002", "HKD", "10.00"),
        _order(6001, BROKEN_KEY, "broken-0001", "HKD", "10.00"),
    ]
    return example


def refund_request(amount: str, order_id=None, reference=None, merchant="3000001") -> str:
    """The signed `request` text, the amount written verbatim as a JSON number."""
    fields = [f'"merchantId":{json.dumps(merchant)}']
    if order_id is not None:
        fields.append(f'"orderId":{order_id}')
    if reference is not None:
        fields.append(f'"merchantReference":{json.dumps(reference, ensure_ascii=False)}')
    fields.append(f'"amount":{amount}')
    return "{" + ",".join(fields) + "}"


def _gateway(url, start_service, start_edge) -> Gateway:
    load_document(url, world())
    deactivate_key(url, KEYLESS, "old")
    # A key refund-admin refuses (EC), stored by other means: newer than the merchant's good RSA key.
    unusable = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")
    insert_key_directly(url, BROKEN_KEY, "ec", unusable)
    service = start_service(url)
    return Gateway(url, service, start_edge(service.address))


@pytest.fixture
def gateway(database_url, start_service, start_edge) -> Gateway:
    """Service and edge on SQLite, and on PostgreSQL."""
    return _gateway(database_url, start_service, start_edge)


@pytest.fixture
def sqlite_gateway(sqlite_url, start_service, start_edge) -> Gateway:
    return _gateway(sqlite_url, start_service, start_edge)


# -- 0000 and 3003 ---------------------------------------------------------------


def test_full_refund_is_approved_with_documented_types_and_a_retry_gets_3003_with_it(gateway):
    reply = gateway.refund(refund_request("76.19", order_id=1076))

    body = check_answer(reply, "0000", 200, order=True, transaction=True)
    check_order(body["order"], id=1076, merchantReference="s22tring", currency="HKD", amount=Decimal("76.19"),
                status="REFUNDED", createTime="2026-11-20T08:15:00+00:00")
    check_transaction(body["transaction"], merchantId=3000001, currency="HKD", amount=Decimal("76.19"),
                      maskedPan="411111******1111")
    text = reply.body.decode("ascii")
    assert '"id":1076,' in text and '"amount":76.19,' in text and '"merchantId":3000001,' in text
    assert "detail" not in body
    assert balance_of(gateway.database_url, 3000001, "HKD") == 100000 - 7619

    retry = gateway.refund(refund_request("76.19", reference="s22tring"))
    again = check_answer(retry, "3003", 200, order=True, transaction=True)
    assert again["transaction"] == body["transaction"]
    assert again["order"]["status"] == "REFUNDED"
    assert refund_count(gateway.database_url, 1076) == 1
    assert balance_of(gateway.database_url, 3000001, "HKD") == 100000 - 7619


def test_amounts_keep_the_currency_precision_and_ids_are_numbers(sqlite_gateway):
    jpy = sqlite_gateway.refund(refund_request("1000", order_id=1079))
    body = check_answer(jpy, "0000", 200, order=True, transaction=True)
    assert body["order"]["status"] == "PARTIALLY_REFUNDED"
    assert '"amount":4800,' in jpy.body.decode() and '"amount":1000,' in jpy.body.decode()
    assert body["transaction"]["maskedPan"] == "555555******4444"

    bhd = sqlite_gateway.refund(refund_request("0.5", reference="bh-0001"))
    body = check_answer(bhd, "0000", 200, order=True, transaction=True)
    assert '"amount":1.250,' in bhd.body.decode() and '"amount":0.500,' in bhd.body.decode()
    assert body["order"]["amount"] == Decimal("1.250") and body["transaction"]["amount"] == Decimal("0.500")
    assert body["order"]["status"] == "PARTIALLY_REFUNDED"

    # A payment method without a card: the masked PAN is empty. orderId as a string of digits is accepted.
    alipay = sqlite_gateway.refund('{"merchantId":"3000001","orderId":"1077","amount":120.00,"note":"ignored"}')
    body = check_answer(alipay, "0000", 200, order=True, transaction=True)
    assert body["transaction"]["maskedPan"] == "" and '"amount":120.00,' in alipay.body.decode()


def test_concurrent_refunds_of_one_order_through_the_edge_refund_it_once(gateway):
    replies: list[Reply] = []
    barrier = threading.Barrier(12)
    body = signed_body(example_key(), refund_request("76.19", order_id=1076))

    def attempt():
        barrier.wait()
        replies.append(gateway.edge.post_refund(body))

    threads = [threading.Thread(target=attempt) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    codes = sorted(reply.json["responseCode"] for reply in replies)
    assert codes == ["0000"] + ["3003"] * 11
    assert len({json.dumps(reply.json["transaction"], default=str) for reply in replies}) == 1
    assert refund_count(gateway.database_url, 1076) == 1
    assert balance_of(gateway.database_url, 3000001, "HKD") == 100000 - 7619


# -- 3001: another merchant's order is a missing order --------------------------


def test_another_merchants_order_is_answered_byte_for_byte_like_a_missing_one(gateway):
    theirs = gateway.refund(refund_request("99.00", order_id=2001))
    missing = gateway.refund(refund_request("99.00", order_id=999999))
    check_answer(theirs, "3001", 200, order=False, transaction=False)
    assert theirs.body == missing.body
    assert (theirs.status, theirs.headers.get("content-type"), theirs.headers.get("content-length")) == \
           (missing.status, missing.headers.get("content-type"), missing.headers.get("content-length"))

    by_reference = gateway.refund(refund_request("99.00", reference="theirs-0001"))
    missing_reference = gateway.refund(refund_request("99.00", reference="no-such-reference"))
    assert by_reference.body == missing_reference.body == missing.body

    # The owner can still refund it: nothing was touched.
    owner = gateway.refund(refund_request("99.00", order_id=2001, merchant=str(OTHER)), generated_key("other"))
    check_answer(owner, "0000", 200, order=True, transaction=True)


# -- 3002, 4001, 4002, 4003, 4004 -------------------------------------------------


@pytest.mark.parametrize("code, request_text, status", [
    ("3002", refund_request("50.00", order_id=1081), "VOIDED"),
    ("3002", refund_request("10.00", reference="open-0001"), "OPEN"),
    ("4001", refund_request("35.50", order_id=1078), "SETTLED"),
    ("4002", refund_request("60.00", order_id=1077), "SUCCESS"),
    ("4003", refund_request("76.20", order_id=1076), "SUCCESS"),
    ("4004", refund_request("2000.00", order_id=1082), "SUCCESS"),
], ids=["3002-voided", "3002-open", "4001-no-refunds", "4002-full-only", "4003-too-much", "4004-balance"])
def test_business_declines_answer_200_with_the_order_and_change_nothing(sqlite_gateway, code, request_text, status):
    reply = sqlite_gateway.refund(request_text)
    body = check_answer(reply, code, 200, order=True, transaction=False)
    assert body["order"]["status"] == status
    assert balance_of(sqlite_gateway.database_url, 3000001, "HKD") == 100000
    assert refund_count(sqlite_gateway.database_url, body["order"]["id"]) == 0


def test_business_declines_on_each_database(gateway):
    """The same declines, all against one gateway per database (PostgreSQL too)."""
    for code, request_text in [("3002", refund_request("50.00", order_id=1081)),
                               ("4001", refund_request("35.50", order_id=1078)),
                               ("4002", refund_request("60.00", order_id=1077)),
                               ("4003", refund_request("76.20", order_id=1076)),
                               ("4004", refund_request("2000.00", order_id=1082))]:
        check_answer(gateway.refund(request_text), code, 200, order=True, transaction=False)
    assert balance_of(gateway.database_url, 3000001, "HKD") == 100000
    check_answer(gateway.refund(refund_request("76.19", order_id=1076)), "0000", 200)


# -- 1001 and 1002 -----------------------------------------------------------------


def published_example_body() -> bytes:
    """The example request exactly as the original document publishes it."""
    text = (FIXTURES_DIR / "direct-refund.original.txt").read_text()
    match = re.search(r"Example:\n(\{\n\"request\".*?\n\})\n", text, re.S)
    assert match, "the published example is not where it was"
    return match.group(1).encode("utf-8")


def test_the_published_example_body_gets_a_clear_1001(gateway):
    body = published_example_body()
    assert b's22tring\\",}"' in body  # the trailing comma, and no amount
    reply = gateway.edge.post_refund(body)
    answer = check_answer(reply, "1001", 400, order=False, transaction=False)
    assert "not valid JSON" in answer["detail"]

    # Its signature decodes twice to 256 bytes (the double encoding).
    signature = json.loads(body)["signature"]
    assert len(base64.b64decode(base64.b64decode(signature))) == 256

    # Fixed and signed, but still without an amount: 1001 saying so.
    fixed = '{"merchantId":"3000001","merchantReference":"s22tring"}'
    answer = check_answer(gateway.refund(fixed, double=True), "1001", 400)
    assert "amount" in answer["detail"]


def test_malformed_envelopes_and_requests_get_1001_with_a_helpful_detail(sqlite_gateway):
    edge = sqlite_gateway.edge
    key = example_key()
    envelopes = {
        b"": "not valid JSON",
        b"refund please": "not valid JSON",
        b"[]": "JSON object",
        b'"text"': "JSON object",
        b'{"signature": "abc="}': "request",
        b'{"request": 1, "signature": "abc="}': "request",
        b'{"request": {"merchantId": "3000001"}, "signature": "abc="}': "request",
        b'{"request": "{}"}': "signature",
        b'{"request": "{}", "signature": 5}': "signature",
        b'{"request": "{}", "request": "{}", "signature": "abc="}': "duplicate key",
        b'{"request": NaN, "signature": "abc="}': "NaN",
        b'{"request": "{}", "signature": "abc=", "x": Infinity}': "Infinity",
        b'{"request": "\xff\xfe", "signature": "abc="}': "UTF-8",
        b'{"request": "\\ud800", "signature": "abc="}': "Unicode",
        b"[" * 30_000 + b"]" * 30_000: "nested too deeply",
        b'\xef\xbb\xbf{"request": "{}", "signature": "abc="}': "not valid JSON",
    }
    for body, hint in envelopes.items():
        answer = check_answer(edge.post_refund(body), "1001", 400, order=False, transaction=False)
        assert hint in answer["detail"], (body[:60], answer)

    requests = {
        "[1]": "JSON object",
        "{\"merchantId\":\"3000001\",\"orderId\":1076,\"amount\":76.19,": "not valid JSON",
        '{"merchantId":"3000001","orderId":1076,"orderId":1077,"amount":1.00}': "duplicate key",
        '{"merchantId":"3000001","orderId":1076,"amount":NaN}': "NaN",
        '{"merchantId":3000001,"orderId":1076,"amount":1.00}': "merchantId",
        '{"merchantId":"30000x1","orderId":1076,"amount":1.00}': "merchantId",
        '{"orderId":1076,"amount":1.00}': "merchantId",
        '{"merchantId":"3000001","amount":1.00}': "orderId or merchantReference",
        '{"merchantId":"3000001","orderId":1076.5,"amount":1.00}': "orderId",
        '{"merchantId":"3000001","orderId":true,"amount":1.00}': "orderId",
        '{"merchantId":"3000001","merchantReference":1076,"amount":1.00}': "merchantReference",
        '{"merchantId":"3000001","orderId":1076,"amount":"76.19"}': "amount",
        '{"merchantId":"3000001","orderId":1076}': "amount",
    }
    for request, hint in requests.items():
        answer = check_answer(sqlite_gateway.refund(request, key), "1001", 400, order=False, transaction=False)
        assert hint in answer["detail"], (request, answer)

    # orderId and merchantReference that name different orders: 1001 (the caller's own order shown).
    answer = check_answer(sqlite_gateway.refund(refund_request("1.00", order_id=1076, reference="alipay-0001")),
                          "1001", 400)
    assert "different orders" in answer["detail"]
    # Nothing was refunded on the way.
    check_answer(sqlite_gateway.refund(refund_request("76.19", order_id=1076)), "0000", 200)


def test_invalid_amounts_get_1002(gateway):
    cases = [
        (refund_request("0", order_id=1076), False),
        (refund_request("0.00", order_id=1076), False),
        (refund_request("-76.19", order_id=1076), False),
        (refund_request("76.191", order_id=1076), True),  # three decimals for HKD
        (refund_request("1.5", order_id=1079), True),  # decimals for JPY
        (refund_request("1.2505", reference="bh-0001"), True),  # four decimals for BHD
        (refund_request("1e400", order_id=1076), True),
        (refund_request("123456789012345678901234567890", order_id=1076), True),
        (refund_request("10000000000000.00", order_id=1076), True),  # past the maximum of 10**15 - 1 minor units
        (refund_request("92233720368547758.07", order_id=1076), True),
    ]
    for request, with_order in cases:
        answer = check_answer(gateway.refund(request), "1002", 400, order=with_order, transaction=False)
        assert "amount" in answer["detail"], (request, answer)
    check_answer(gateway.refund(refund_request("76.19", order_id=1076)), "0000", 200)


# -- signatures: 2001, 2002, openssl, double base64 ------------------------------


def _non_canonical(signature: str) -> str:
    """The same bytes with unused bits set in the last base64 character (256
    bytes encode as 342 characters and "==": the last character carries 4 unused bits)."""
    assert signature.endswith("==")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(signature[-3])
    altered = signature[:-3] + alphabet[last | 0b0001] + "=="
    if altered == signature:
        altered = signature[:-3] + alphabet[last | 0b0010] + "=="
    assert base64.b64decode(altered) == base64.b64decode(signature)
    return altered


def test_authentication_failures_get_2001_and_refund_nothing(gateway):
    key = example_key()
    request = refund_request("76.19", order_id=1076)
    good = sign(key, request)
    pss = base64.b64encode(key.sign(request.encode(), padding.PSS(padding.MGF1(hashes.SHA256()), 32),
                                    hashes.SHA256())).decode()
    cases = {
        "unknown merchant": (refund_request("76.19", order_id=1076, merchant="3999999"),
                             sign(key, refund_request("76.19", order_id=1076, merchant="3999999"))),
        "no active key": (refund_request("10.00", order_id=4001, merchant=str(KEYLESS)),
                          sign(generated_key("keyless"), refund_request("10.00", order_id=4001,
                                                                        merchant=str(KEYLESS)))),
        "another merchant's key": (request, sign(generated_key("other"), request)),
        "altered after signing (amount)": (request.replace("76.19", "7.62"), good),
        "altered after signing (whitespace)": (request.replace(",", ", "), good),
        "non-canonical base64": (request, _non_canonical(good)),
        "MIME line breaks": (request, "\n".join(good[i:i + 76] for i in range(0, len(good), 76))),
        "URL-safe alphabet": (request, good.replace("+", "-").replace("/", "_")),
        "no padding": (request, good.rstrip("=")),
        "empty signature": (request, ""),
        "not base64": (request, "not a signature"),
        "PSS instead of PKCS#1 v1.5": (request, pss),
        "signature over other bytes": (request, sign(key, request.encode("utf-8") + b"\n")),
    }
    assert "+" in good or "/" in good
    for name, (request_text, signature) in cases.items():
        answer = check_answer(gateway.send(request_text, signature), "2001", 401, order=False, transaction=False)
        assert answer["detail"] == "authentication failed", (name, answer)
    assert refund_count(gateway.database_url, 1076) == 0

    check_answer(gateway.send(request, good), "0000", 200)


def test_suspended_merchant_gets_2002_and_suspension_takes_effect_on_the_next_request(gateway):
    suspended = refund_request("10.00", order_id=3001, merchant=str(SUSPENDED))
    answer = check_answer(gateway.refund(suspended, generated_key("suspended")), "2002", 403, order=False)
    assert answer["detail"] == "merchant is not active"
    # Without a good signature, suspension is not revealed.
    check_answer(gateway.refund(suspended, example_key()), "2001", 401)

    set_merchant_status(gateway.database_url, 3000001, "SUSPENDED")
    check_answer(gateway.refund(refund_request("76.19", order_id=1076)), "2002", 403)
    set_merchant_status(gateway.database_url, 3000001, "ACTIVE")
    check_answer(gateway.refund(refund_request("76.19", order_id=1076)), "0000", 200)


def test_any_active_key_verifies_and_a_deactivated_key_fails_on_the_next_request(sqlite_gateway):
    merchant = str(ROTATING)
    check_answer(sqlite_gateway.refund(refund_request("10.00", order_id=5001, merchant=merchant),
                                       generated_key("rotating-old")), "0000", 200)
    check_answer(sqlite_gateway.refund(refund_request("5.00", order_id=5002, merchant=merchant),
                                       generated_key("rotating-new")), "0000", 200)
    deactivate_key(sqlite_gateway.database_url, ROTATING, "2026-10")
    deactivate_key(sqlite_gateway.database_url, ROTATING, "2026-11")
    check_answer(sqlite_gateway.refund(refund_request("10.00", order_id=5001, merchant=merchant),
                                       generated_key("rotating-old")), "2001", 401)

    # A stored key the service cannot use (EC) verifies nothing; the merchant's RSA key still does.
    broken = refund_request("10.00", order_id=6001, merchant=str(BROKEN_KEY))
    check_answer(sqlite_gateway.refund(broken, example_key()), "2001", 401)
    check_answer(sqlite_gateway.refund(broken, generated_key("broken")), "0000", 200)


def test_a_request_signed_by_the_openssl_command_line_is_accepted(gateway, tmp_path):
    request = refund_request("76.19", reference="s22tring")
    signature = subprocess.run(
        ["bash", "-c", 'printf "%s" "$REQ" | openssl dgst -sha256 -sign "$KEY" | base64 -w0'],
        env={"REQ": request, "KEY": str(EXAMPLE_KEY_PEM), "PATH": "/usr/bin:/bin"},
        check=True, capture_output=True, text=True).stdout
    assert base64.b64decode(signature, validate=True) == signature_bytes(example_key(), request)  # PKCS#1 v1.5
    body = check_answer(gateway.send(request, signature), "0000", 200, order=True, transaction=True)
    assert body["order"]["merchantReference"] == "s22tring"


def test_a_double_base64_signature_is_accepted(sqlite_gateway):
    request = refund_request("120.00", order_id=1077)
    signature = sign(example_key(), request, double=True)
    assert len(base64.b64decode(base64.b64decode(signature))) == 256
    check_answer(sqlite_gateway.send(request, signature), "0000", 200, order=True, transaction=True)


def test_non_ascii_reference_is_signed_and_verified_as_utf8(sqlite_gateway):
    """The signed bytes are the UTF-8 of the request string, whether the
    envelope escapes the characters or sends them raw."""
    request = refund_request("1.00", reference="訂單-0001")
    assert not request.isascii()
    signature = sign(example_key(), request)
    escaped = json.dumps({"request": request, "signature": signature}).encode("ascii")
    raw = json.dumps({"request": request, "signature": signature}, ensure_ascii=False).encode("utf-8")
    for body in (escaped, raw):
        check_answer(sqlite_gateway.edge.post_refund(body), "3001", 200)
