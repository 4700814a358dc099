"""The recorded scenario of tests/e2e/test_recorded_edge_answers.py: the data loaded
into a fresh database and the HTTP requests sent to `refund-edge`, one after the
other, in this order (each request may depend on the ones before it: a refund
approved, then answered 3003; an Idempotency-Key claimed, then replayed).

Everything here is deterministic: every merchant is registered with the example
merchant's public key (tests/fixtures/example-merchant.pub.pem) and every request
is signed with its private key (RSASSA-PKCS1-v1_5 signs the same bytes the same
way); signed timestamps are relative to the service's pinned clock (NOW, see
tests/support/record_edge_answers.py). Wrong signatures are valid signatures of other
text, or not base64 at all, never a fresh random key.
"""

from __future__ import annotations

import base64
import copy
import json
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

FIXTURES_DIR = Path(__file__).resolve().parents[1] / "fixtures"
# The service's clock during the scenario (the example answer of docs/api.md).
NOW = datetime.fromisoformat("2026-11-26T11:41:19+00:00")
KEY_ID = "2026-11"
M1, SUSPENDED, PLUGIN, STRICT, RETIRED, UNKNOWN = 3000001, 3000002, 3000003, 3000004, 3000005, 3999999
REFUND, QUERY = "/direct/refund", "/direct/query"
# The edge's flags in the scenario: PLUGIN's answers are all HTTP 200 (the vendor's plugin mode).
EDGE_ARGS = ["--merchant-status-mode", f"{PLUGIN}=always-200", "--rate-limit", "off"]
# refund-admin commands run after the load.
ADMIN_COMMANDS = [["merchant", "suspend", str(SUSPENDED)], ["merchant", "timestamp", str(STRICT), "required"],
                  ["key", "deactivate", str(RETIRED), KEY_ID]]


def _private_key():
    pem = (FIXTURES_DIR / "example-merchant.key.pem").read_bytes()
    return serialization.load_pem_private_key(pem, password=None)


_KEY = _private_key()


def sign(text: str, *, double: bool = False) -> str:
    encoded = base64.b64encode(_KEY.sign(text.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256()))
    return (base64.b64encode(encoded) if double else encoded).decode("ascii")


# -- the data -----------------------------------------------------------------


def _order(order_id, merchant, reference, amount, *, currency="HKD", status="SUCCESS", method="VISA"):
    return {"id": order_id, "merchantId": merchant, "merchantReference": reference, "currency": currency,
            "amount": amount, "status": status, "paymentMethod": method,
            "maskedPan": "411111******1111" if method == "VISA" else "", "stan": f"{order_id % 1_000_000:06d}",
            "createTime": "2026-11-23T10:00:00+00:00"}


def load_document() -> dict:
    """tests/fixtures/fixtures.example.json, with more merchants and orders: one for each answer."""
    document = copy.deepcopy(json.loads((FIXTURES_DIR / "fixtures.example.json").read_text()))
    example = document["merchants"][0]
    example["balances"].append({"currency": "BHD", "unsettled": "100.000"})
    pem = example["keys"][0]["publicKeyPem"]
    for merchant, name in ((SUSPENDED, "Suspended Shop"), (PLUGIN, "Plugin Shop"), (STRICT, "Strict Shop"),
                           (RETIRED, "Retired Key Shop")):
        document["merchants"].append({"id": merchant, "name": name, "status": "ACTIVE",
                                      "keys": [{"keyId": KEY_ID, "publicKeyPem": pem}],
                                      "balances": [{"currency": "HKD", "unsettled": "500.00"}]})
    document["orders"] += [
        _order(1080, M1, "partial-0001", "200.00"), _order(1081, M1, "open-0001", "10.00", status="OPEN"),
        _order(1082, M1, "big-0001", "5000.00"), _order(1083, M1, "idem-0001", "30.00", status="SETTLED",
                                                        method="MASTERCARD"),
        _order(1084, M1, "ref-0001", "40.00"), _order(1085, M1, "fresh-0001", "20.00"),
        _order(1086, M1, "bhd-0001", "1.250", currency="BHD"), _order(1087, M1, "double-0001", "15.00"),
        _order(1088, M1, "voided-0001", "12.00", status="VOIDED"), _order(1089, M1, "charset-0001", "9.99"),
        _order(1090, M1, "exponent-0001", "10.00"),
        _order(2001, SUSPENDED, "susp-0001", "50.00"), _order(3101, PLUGIN, "plugin-0001", "60.00"),
        _order(3102, PLUGIN, "plugin-octopus", "35.50", method="OCTOPUS"),
        _order(4101, STRICT, "strict-0001", "70.00"), _order(5101, RETIRED, "retired-0001", "10.00"),
    ]
    return document


# -- the requests ---------------------------------------------------------------


def text(merchant, amount=None, order_id=None, reference=None, **extra) -> str:
    """A signed request's text; the amount is written verbatim as a JSON number."""
    fields = [f'"merchantId":{json.dumps(str(merchant))}']
    if order_id is not None:
        fields.append(f'"orderId":{order_id}')
    if reference is not None:
        fields.append(f'"merchantReference":{json.dumps(reference)}')
    fields += [f"{json.dumps(k)}:{json.dumps(v)}" for k, v in extra.items()]
    if amount is not None:
        fields.append(f'"amount":{amount}')
    return "{" + ",".join(fields) + "}"


def stamp(seconds: int) -> str:
    return (NOW + timedelta(seconds=seconds)).isoformat(timespec="seconds")


def envelope(request_text: str, signature: str | None = None) -> str:
    return json.dumps({"request": request_text, "signature": sign(request_text) if signature is None else signature})


class Requests:
    """Collects the scenario's requests as dicts: name, method, path, headers (in the order
    sent, Content-Length included) and body: a text, or {"repeat": TEXT, "times": N} for a
    long one (a header's value may be one too)."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, name, method, path, body="", headers=None, *, content_type="application/json",
            request_id=True):
        head = [["Host", "edge.test"]]
        if content_type is not None:
            head.append(["Content-Type", content_type])
        if request_id:
            head.append(["X-Request-Id", f"rec-{len(self.items) + 1:03d}"])
        head += [list(h) for h in headers or ()]
        if not any(h[0].lower() in ("content-length", "transfer-encoding") for h in head) and (
                body or method in ("POST", "PUT")):
            length = body["times"] * len(body["repeat"]) if isinstance(body, dict) else len(body.encode("utf-8"))
            head.append(["Content-Length", str(length)])
        self.items.append({"name": name, "method": method, "path": path, "headers": head, "body": body})

    def post(self, name, request_text, *, path=REFUND, signature=None, **kwargs):
        self.add(name, "POST", path, envelope(request_text, signature), **kwargs)


def requests() -> list[dict]:
    r = Requests()
    # Approvals and each decline of the rules (docs/api.md sections 3 and 4).
    r.post("full refund approved", text(M1, "76.19", 1076))
    r.post("the same refund again: 3003 with the first", text(M1, "76.19", 1076))
    r.post("another amount on a refunded order: 3003", text(M1, "10.00", 1076))
    r.post("partial refund approved", text(M1, "50.00", 1080))
    r.post("partial refund again: 3003", text(M1, "50.00", 1080))
    r.post("partial on a full-only method: 4002", text(M1, "50.00", 1077))
    r.post("full on a full-only method approved", text(M1, "120.00", 1077))
    r.post("method without refunds: 4001", text(M1, "35.50", 1078))
    r.post("unpaid order: 3002", text(M1, "10.00", 1081))
    r.post("voided order: 3002", text(M1, "12.00", 1088))
    r.post("no such order: 3001", text(M1, "1.00", 9999999))
    r.post("another merchant's order: 3001", text(M1, "60.00", 3101))
    r.post("more than the order: 4003", text(M1, "40.01", 1084))
    r.post("more than the balance: 4004", text(M1, "1500.00", 1082))
    r.post("JPY refund approved", text(M1, "4800", 1079))
    r.post("BHD with four decimals: 1002", text(M1, "0.0001", 1086))
    r.post("BHD partial approved", text(M1, "0.500", 1086))
    r.post("BHD, zeros beyond the decimals, refunded order: 3003", text(M1, "1.2500", 1086))
    # Amounts.
    for label, amount in (("zero", "0"), ("zero with decimals", "0.00"), ("negative", "-1.00"),
                          ("three decimals for HKD", "1.001"), ("over the maximum", "99999999999999999"),
                          ("huge exponent", "1e400"), ("sixty-five digits", "9" * 65)):
        r.post(f"amount {label}: 1002", text(M1, amount, 1084))
    r.post("amount with an exponent, approved in full", text(M1, "1e1", 1090))
    r.post("amount as a string: 1001", text(M1, '"40.00"', 1084))
    r.post("amount NaN: 1001", text(M1, "NaN", 1084))
    r.post("amount missing: 1001", text(M1, None, 1084))
    r.post("JPY with decimals: 1002", text(M1, "10.5", 1079))
    # The request's fields.
    r.post("ids of different orders: 1001", text(M1, "40.00", 1084, "partial-0001"))
    r.post("refund by merchant reference approved", text(M1, "40.00", reference="ref-0001"))
    r.post("no order id nor reference: 1001", text(M1, "1.00"))
    r.post("order id as a string of digits", text(M1, "1.00", '"9999998"'))
    r.post("order id that is not a number: 1001", text(M1, "1.00", '"abc"'))
    r.post("a key given twice: 1001", '{"merchantId":"3000001","orderId":1085,"orderId":1085,"amount":1.00}')
    r.post("signed text not JSON: 1001", "hello")
    r.post("signed text a JSON array: 1001", "[1,2]")
    r.post("NUL in the reference: 1001", text(M1, "1.00", reference="a\u0000b"))
    r.post("lone surrogate escaped in the reference: 1001", text(M1, "1.00", reference="\ud800"))
    r.post("lone surrogate in an unknown field: ignored", text(M1, "1.00", 9999999).replace(
        '"amount"', '"note":"\\ud800","amount"'))
    r.add("lone surrogate in the envelope: 1001", "POST", REFUND, '{"request":"\\ud800","signature":"AAAA"}')
    r.post("reference over 128 characters: 1001", text(M1, "1.00", reference="r" * 129))
    # Authentication.
    r.post("signature not base64: 2001", text(M1, "1.00", 1085), signature="not base64!")
    r.post("signature of other text: 2001", text(M1, "1.00", 1085), signature=sign(text(M1, "2.00", 1085)))
    r.post("empty signature: 2001", text(M1, "1.00", 1085), signature="")
    r.post("signature base64 twice, approved", text(M1, "15.00", 1087), signature=sign(text(M1, "15.00", 1087),
                                                                                        double=True))
    r.post("unknown merchant: 2001", text(UNKNOWN, "1.00", 1085))
    r.post("merchant's only key deactivated: 2001", text(RETIRED, "10.00", 5101))
    r.post("suspended merchant: 2002", text(SUSPENDED, "50.00", 2001))
    r.post("suspended merchant, wrong signature: 2001", text(SUSPENDED, "50.00", 2001), signature="AAAA")
    # The replay window.
    r.post("timestamp too old: 2003", text(M1, "20.00", 1085, timestamp=stamp(-600)))
    r.post("timestamp too far ahead: 2003", text(M1, "20.00", 1085, timestamp=stamp(600)))
    r.post("timestamp without offset: 1001", text(M1, "20.00", 1085, timestamp="2026-11-26T11:41:19"))
    r.post("timestamp on February 30: 1001", text(M1, "20.00", 1085, timestamp="2026-02-30T11:41:19+00:00"))
    r.post("fresh timestamp approved", text(M1, "20.00", 1085, timestamp=stamp(-5)))
    r.post("the same signed bytes again: 2003", text(M1, "20.00", 1085, timestamp=stamp(-5)))
    r.post("a new timestamp on the refunded order: 3003", text(M1, "20.00", 1085, timestamp=stamp(-4)))
    r.post("timestamp required, missing: 1001", text(STRICT, "70.00", 4101))
    r.post("timestamp required, given: approved", text(STRICT, "70.00", 4101, timestamp=stamp(3)))
    # Idempotency-Key.
    idem = text(M1, "30.00", 1083)
    r.post("Idempotency-Key first use approved", idem, headers=[["Idempotency-Key", "idem-1"]])
    r.post("Idempotency-Key replay: the stored answer", idem, headers=[["Idempotency-Key", "idem-1"]])
    r.post("Idempotency-Key with another request: 1003", text(M1, "29.00", 1083),
           headers=[["Idempotency-Key", "idem-1"]])
    r.post("new Idempotency-Key on the refunded order: 3003", idem, headers=[["Idempotency-Key", "idem-2"]])
    r.post("Idempotency-Key on a decline: 4001", text(M1, "35.50", 1078), headers=[["Idempotency-Key", "idem-3"]])
    r.post("Idempotency-Key decline replayed", text(M1, "35.50", 1078), headers=[["Idempotency-Key", "idem-3"]])
    r.post("Idempotency-Key with a wrong signature: 2001 (not stored)", text(M1, "9.99", 1089), signature="AAAA",
           headers=[["Idempotency-Key", "idem-4"]])
    r.post("the same Idempotency-Key, signed: approved", text(M1, "9.99", 1089), content_type="APPLICATION/JSON",
           headers=[["Idempotency-Key", "idem-4"]])
    r.post("Idempotency-Key of 65 characters: 1001", idem, headers=[["Idempotency-Key", "k" * 65]])
    r.post("two Idempotency-Key headers: 1001", idem, headers=[["Idempotency-Key", "a"], ["Idempotency-Key", "b"]])
    # The HTTP envelope.
    missing = text(M1, "1.00", 9999999)
    r.post("Content-Type text/plain: 415", missing, content_type="text/plain")
    r.post("no Content-Type: 415", missing, content_type=None)
    r.post("Content-Type with charset", missing, content_type="application/json; charset=utf-8")
    r.add("body not JSON: 1001", "POST", REFUND, '{"request":')
    r.add("empty body: 1001", "POST", REFUND, "")
    r.add("body a JSON array: 1001", "POST", REFUND, "[]")
    r.add("request not a string: 1001", "POST", REFUND, '{"request":{"merchantId":"3000001"},"signature":"AAAA"}')
    r.add("signature missing: 1001", "POST", REFUND, json.dumps({"request": missing}))
    r.add("signature a number: 1001", "POST", REFUND, json.dumps({"request": missing, "signature": 5}))
    r.add("envelope key given twice: 1001", "POST", REFUND, '{"request":"{}","request":"{}","signature":"AAAA"}')
    r.add("envelope with NaN: 1001", "POST", REFUND, '{"request":"{}","signature":"AAAA","x":NaN}')
    r.add("envelope with an extra field, ignored", "POST", REFUND,
          json.dumps({"request": missing, "signature": sign(missing), "extra": 1}))
    r.add("body exactly 64 KiB: read, not JSON", "POST", REFUND, {"repeat": " ", "times": 65536})
    r.add("body over 64 KiB: 413", "POST", REFUND, {"repeat": " ", "times": 65537})
    r.add("huge declared body: 413 at once", "POST", REFUND, "", [["Content-Length", "50000000"]])
    r.add("chunked body", "POST", REFUND,
          f"{len(envelope(missing).encode()):x}\r\n{envelope(missing)}\r\n0\r\n\r\n",
          [["Transfer-Encoding", "chunked"]])
    r.add("request head over 16 KiB: 431", "GET", "/healthz", "", [["X-Big", {"repeat": "a", "times": 17000}]])
    # Paths and methods.
    r.add("GET /: 404", "GET", "/", content_type=None)
    r.add("unknown path: 404", "POST", "/direct/unknown", envelope(missing))
    r.add("trailing slash: 404", "POST", REFUND + "/", envelope(missing))
    r.add("query string ignored", "POST", REFUND + "?x=1", envelope(missing))
    r.add("GET /direct/refund: 405", "GET", REFUND, content_type=None)
    r.add("HEAD /direct/refund: 405", "HEAD", REFUND, content_type=None)
    r.add("OPTIONS /direct/refund: 405", "OPTIONS", REFUND, content_type=None)
    r.add("PUT /direct/query: 405", "PUT", QUERY, envelope(missing))
    r.add("DELETE /healthz: 405", "DELETE", "/healthz", content_type=None)
    r.add("GET /healthz", "GET", "/healthz", content_type=None)
    r.add("HEAD /healthz", "HEAD", "/healthz", content_type=None)
    r.add("GET /openapi.json", "GET", "/openapi.json", content_type=None)
    r.add("HEAD /openapi.json", "HEAD", "/openapi.json", content_type=None)
    r.add("GET /metrics on the merchant port: 404", "GET", "/metrics", content_type=None)
    # POST /direct/query.
    r.post("query a refunded order", text(M1, order_id=1076), path=QUERY)
    r.post("query by reference, partially refunded", text(M1, reference="partial-0001"), path=QUERY)
    r.post("query an order not refunded", text(M1, order_id=1082), path=QUERY)
    r.post("query no such order: 3001", text(M1, order_id=9999999), path=QUERY)
    r.post("query another merchant's order: 3001", text(M1, order_id=3101), path=QUERY)
    r.post("query without ids: 1001", text(M1), path=QUERY)
    r.post("query, wrong signature: 2001", text(M1, order_id=1076), path=QUERY, signature="AAAA")
    r.post("query, unknown merchant: 2001", text(UNKNOWN, order_id=1076), path=QUERY)
    r.post("query, suspended merchant: 2002", text(SUSPENDED, order_id=2001), path=QUERY)
    r.post("query, text/plain: 415", text(M1, order_id=1076), path=QUERY, content_type="text/plain")
    # The HTTP-200 mode of one merchant.
    r.post("HTTP-200 mode: approved", text(PLUGIN, "60.00", 3101))
    r.post("HTTP-200 mode: 3003", text(PLUGIN, "60.00", 3101))
    r.post("HTTP-200 mode: 4001", text(PLUGIN, "35.50", 3102))
    r.post("HTTP-200 mode: 1002", text(PLUGIN, "0", 3102))
    r.post("HTTP-200 mode: wrong signature 2001", text(PLUGIN, "1.00", 3102), signature="AAAA")
    r.post("HTTP-200 mode: query", text(PLUGIN, order_id=3101), path=QUERY)
    r.post("HTTP-200 mode: 415 before the merchant is read", text(PLUGIN, "1.00", 3102), content_type="text/plain")
    # X-Request-Id.
    r.post("no X-Request-Id: the edge makes one", missing, request_id=False)
    r.post("an unusable X-Request-Id: the edge makes one", missing, request_id=False,
           headers=[["X-Request-Id", "bad id!"]])
    r.post("X-Request-Id of 128 characters, echoed", missing, request_id=False,
           headers=[["X-Request-Id", "abc.def-" * 16]])
    r.post("X-Request-Id that looks like a signature (80 base64 characters): the edge makes one", missing,
           request_id=False, headers=[["X-Request-Id", "A" * 80]])
    return r.items
