"""Issue 4, item 6 (first half): hostile input against a live edge, with
hypothesis and with a list of named attacks. No 5xx, no crash, every rejection
with its documented code:

- the body, the envelope or the signed request not JSON of the documented
  shape (duplicate keys outer or inner, NaN / Infinity, invalid UTF-8, a lone
  surrogate, deep nesting, wrong types): 1001 / 400;
- amounts not positive, not finite for the currency (1e400, 5,000 digits),
  too many decimals: 1002 / 400;
- a signature that does not verify (another merchant's key, non-canonical
  base64, a request re-serialized after signing): 2001 / 401;
- text no database can store as given, in any string field (NUL, lone
  surrogates, thousands of characters: merchantReference, merchantId,
  the signature), on /direct/refund and /direct/query: 1001 / 400;
- signed timestamps anywhere in 0001..9999 with any offset: 2003 or 1001;
- a body over 64 KiB (1 MiB): 413; another content type: 415; another
  method: 405.

Everything runs on SQLite and on PostgreSQL (each its own stack). At the
end both processes still run, /healthz says SERVING, the ledger keeps its
invariants and nothing that looks like a card number was answered, logged or
stored. The schemathesis run against the OpenAPI document is in
tests/proofs/test_prove_schemathesis.py.

Long (about 540 lines) on purpose: most of it is the table of hostile requests and the answer each gets.
"""

from __future__ import annotations

import base64
import json
import random
from collections import Counter
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from refund_wire import strict_json
from tests.support.answers import check_reply
from tests.support.cards import assert_no_card_data
from tests.support.data import refund_text
from tests.support.hostile import FIRST_ORDER, INITIAL_HKD, ORDERS, OTHER, M, key_m, key_other, start_stack
from tests.support.keys import envelope, sign, signature_bytes
from tests.support.ledger import check_ledger
from tests.support.postgres import migrated_database
from tests.support.processes import Gateway

MERCHANT_CODES = {"0000", "1001", "1002", "2003", "3001", "3002", "3003", "4001", "4002", "4003", "4004"}
COUNTS: Counter = Counter()  # examples run per property, for the closing figures

HOSTILE_NUMBERS = ["NaN", "-NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "1E400", "0", "-0", "0.0",
                   "-1", "-100.00", "1" + "0" * 5000, "9" * 5000, "0." + "0" * 4998 + "1", "1e999999999",
                   "1e-999999999", "100.001", "100.00000000000000000001", "1E2", "0x10", "01", ".5", "5.", "+1",
                   "100", "100.00", "50.00", "1.250", "500", "0.01", "9223372036854775807", "9223372036854775808",
                   "-9223372036854775809", "1.5e1", "15e-1", "\"100.00\"", "null", "true", "[100]", "{\"v\":1}"]
ORDER_IDS = [str(FIRST_ORDER + i) for i in range(0, ORDERS, 7)] + [
    "0", "-1", "769001", "999999999", "9" * 19, "9" * 20, "1" + "0" * 5000, "1.0", "1e3", "760100.0", "true",
    "null", "\"760101\"", "\"760101 \"", "\"٧٦٠١٠١\"", "\"-760101\"", "\"0760101\"", "[760101]", "{}"]


def _hostile_texts():
    """Strings a database may not store as given: NUL, lone surrogates (what
    "\\ud800" in JSON decodes to), control characters, astral characters, and
    lengths around and far beyond the 128 characters of a reference."""
    characters = st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr), st.sampled_from(
        ["\x00", "\x00", "\x01", "\x7f", "\u2028", "\ufeff", "\U0001f4b3", "/", "\\", '"']))
    return st.one_of(
        st.lists(characters, max_size=40).map("".join),
        st.tuples(st.integers(100, 5000), characters).map(lambda t: t[1] * t[0]),
        st.sampled_from(["\x00", "ref-760106\x00", "\ud800", "ref-\udfff", "\udc00\ud800", "r" * 128, "r" * 129,
                         "é" * 128, "\U0001f4b3" * 128]),
    )


def _timestamps():
    """Signed timestamps from year 1 to 9999, with offsets up to +-23:59 and
    fractions, well formed or nearly so."""
    offsets = st.tuples(st.sampled_from("+-"), st.integers(0, 23), st.integers(0, 59)).map(
        lambda o: f"{o[0]}{o[1]:02d}:{o[2]:02d}")
    moments = st.tuples(st.datetimes(), st.sampled_from(["seconds", "microseconds"])).map(
        lambda t: t[0].isoformat(timespec=t[1]))
    return st.one_of(
        st.tuples(moments, offsets | st.just("Z")).map("".join),
        st.sampled_from(["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "9999-12-31T23:59:59.999999-23:59",
                         "0001-01-01T00:00:00.000001+23:59", "2026-02-30T00:00:00Z", "2026-11-26T24:00:00Z",
                         "0000-01-01T00:00:00Z", "10000-01-01T00:00:00Z", "2026-11-26T19:41:19+99:99"]),
    )


def _json_values():
    scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
               | st.text(max_size=12))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                                      max_size=4), max_leaves=10)


def _value_texts():
    return st.one_of(
        st.sampled_from(HOSTILE_NUMBERS),
        st.sampled_from(ORDER_IDS),
        st.sampled_from(['"7600001"', '"7600002"', '"abc"', '"ref-760100"', '"ref-760101"', '""', '"٧٦٠٠٠٠١"',
                         '"7600001\\u0000"', '" 7600001"', '"\\ud800"', '7600001']),
        st.integers(-10**25, 10**25).map(str),
        st.decimals(allow_nan=False, allow_infinity=False).map(str),
        _json_values().map(json.dumps),
        st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
        _hostile_texts().map(json.dumps),
        _timestamps().map(json.dumps),
    )


@st.composite
def _request_texts(draw):
    """A request object as text, fields in any order, any of them repeated."""
    names = st.sampled_from(["merchantId", "orderId", "merchantReference", "amount", "timestamp", "note"]) | \
        st.text(max_size=6)
    pairs = []
    if draw(st.integers(0, 2)):  # mostly well aimed: M, an order or its reference, an amount, unknown fields
        pairs.append(("merchantId", draw(st.sampled_from(['"7600001"', '"7600001"', '"7600002"', '"7609999"']))))
        if draw(st.booleans()):
            pairs.append(("orderId", draw(st.sampled_from(ORDER_IDS))))
        if draw(st.integers(0, 3)) == 0:  # a reference no database stores as given
            pairs.append(("merchantReference", json.dumps(draw(_hostile_texts()))))
        elif draw(st.booleans()) or not pairs[-1][0] == "orderId":
            pairs.append(("merchantReference", f'"ref-{FIRST_ORDER + draw(st.integers(0, ORDERS))}"'))
        if draw(st.integers(0, 4)) == 0:
            pairs.append(("timestamp", json.dumps(draw(_timestamps()))))
        pairs.append(("amount", draw(st.sampled_from(HOSTILE_NUMBERS)
                                     | st.decimals(0, 200, places=draw(st.integers(0, 4))).map(str))))
        names = st.sampled_from(["timestamp", "note", "orderID", "Amount", "merchantid"]) | \
            st.text(max_size=6).filter(lambda n: n not in ("merchantId", "orderId", "merchantReference", "amount"))
        pairs += draw(st.lists(st.tuples(names, _value_texts()), max_size=2))
        if draw(st.integers(0, 9)) == 0:  # now and then a field given twice
            pairs.append(draw(st.sampled_from(pairs)))
    else:
        pairs += draw(st.lists(st.tuples(names, _value_texts()), max_size=5))
    draw(st.randoms()).shuffle(pairs)
    text = "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}"
    return draw(st.sampled_from([text, text, text, text, "[" + text + "]", text + " ", " " + text, text[:-1]]))


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON text (strings skipped)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


# Nesting deeper than this may be refused as "nested too deeply" (1001) before
# anything else; how deep exactly depends on the interpreter's recursion limit.
DEEP = 500


def _expected_for_unsigned_shape(request_text: str) -> str | None:
    """The code a request text must get before any signature is looked at, or
    None; "deep" when it may be 1001 for its nesting alone."""
    data = request_text.encode("utf-8", "surrogatepass")
    if len(data) > 16 * 1024:
        return "1001"
    if _depth(request_text) > DEEP:
        return "deep"
    try:
        fields = strict_json.loads(data)
    except strict_json.StrictJSONError:
        return "1001"
    if not isinstance(fields, dict):
        return "1001"
    merchant = fields.get("merchantId")
    if not (isinstance(merchant, str) and merchant.isascii() and merchant.isdigit() and len(merchant) <= 18):
        return "1001"
    return None


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def stack(request, tmp_path_factory):
    with migrated_database(request.param, tmp_path_factory.mktemp("hostile"), "refund_hostile") as url:
        yield from _checked_stack(url)


def _checked_stack(url):
    COUNTS.clear()
    stack = start_stack(url)
    try:
        yield stack
        # No crash: both processes still serve, the ledger is whole, nothing leaked.
        assert stack.service.process.poll() is None and stack.edge.process.poll() is None
        health = stack.edge.request("GET", "/healthz")
        assert health.status == 200, health.body
        check_ledger(stack.database_url, {(M, "HKD"): INITIAL_HKD, (OTHER, "HKD"): INITIAL_HKD})
        assert_no_card_data(stack.database_url, [r.body for r in stack.replies], [stack.service.output(), stack.edge.output()])
        print(f"\nhostile input: {len(stack.replies)} requests; hypothesis examples {dict(COUNTS)}; "
              f"answers {dict(Counter(json.loads(r.body)['responseCode'] for r in stack.replies))}")
    finally:
        stack.close()


HYPOTHESIS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                             HealthCheck.too_slow, HealthCheck.data_too_large])


# -- hypothesis ------------------------------------------------------------------------


@settings(HYPOTHESIS, max_examples=150)
@given(body=st.one_of(st.binary(max_size=600), st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),
                      _json_values().map(lambda v: json.dumps(v).encode())))
def test_any_body_at_all_is_answered_1001_or_2001_and_never_crashes_the_edge(stack: Gateway, body):
    COUNTS["bodies"] += 1
    try:
        parsed = strict_json.loads(body)
        envelope_ok = isinstance(parsed, dict) and isinstance(parsed.get("request"), str) and \
            isinstance(parsed.get("signature"), str)
    except strict_json.StrictJSONError:
        envelope_ok = False
    check_reply(stack.post_bytes(body), allowed={"1001", "2001"} if envelope_ok else {"1001"})


@settings(HYPOTHESIS, max_examples=150)
@given(request=_json_values() | st.text(max_size=40) | _hostile_texts(),
       signature=_json_values() | st.text(max_size=40) | _hostile_texts(),
       extra=st.dictionaries(st.text(max_size=6), _json_values(), max_size=3), duplicate=st.booleans())
def test_any_envelope_is_answered_with_a_documented_refusal(stack: Gateway, request, signature, extra, duplicate):
    COUNTS["envelopes"] += 1
    fields = {**{k: v for k, v in extra.items() if k not in ("request", "signature")},
              "request": request, "signature": signature}
    text = json.dumps(fields)
    if duplicate:  # the same key twice in the envelope
        text = text[:-1] + ', "request": ' + json.dumps(request) + "}"
        body = text.encode("utf-8", "surrogatepass")
        check_reply(stack.post_bytes(body), expected="1001", status=400 if len(body) <= 64 * 1024 else 413)
        return
    code = check_reply(stack.post_bytes(text.encode("utf-8", "surrogatepass")), allowed={"1001", "2001"})
    if not (isinstance(request, str) and isinstance(signature, str)):
        assert code == "1001"


@settings(HYPOTHESIS, max_examples=300)
@given(request=_request_texts(), signer=st.sampled_from(["m", "m", "m", "other"]), double=st.booleans())
def test_any_signed_request_is_answered_with_its_documented_code(stack: Gateway, request, signer, double):
    COUNTS["signed requests"] += 1
    key = key_m() if signer == "m" else key_other()
    raw = request.encode("utf-8", "surrogatepass")
    signature = base64.b64encode(signature_bytes(key, raw))
    if double:
        signature = base64.b64encode(signature)
    body = b'{"request":' + json.dumps(request).encode() + b',"signature":"' + signature + b'"}'
    code = check_reply(stack.post_bytes(body), allowed=MERCHANT_CODES | {"2001"})
    expected = _expected_for_unsigned_shape(request)
    if expected == "deep":  # 1001 for the nesting alone, or what the request gets otherwise
        if code == "1001":
            return
        expected = None
    if expected is not None:
        assert code == expected, (code, request[:200])
        return
    fields = strict_json.loads(raw)
    if (signer, fields["merchantId"]) not in (("m", str(M)), ("other", str(OTHER))):
        assert code == "2001", (code, request[:200])  # another merchant's key, or an unknown merchant
    else:
        assert code in MERCHANT_CODES, (code, request[:200])
        if _unstorable(fields.get("merchantReference")):  # refused before the database (or the timestamp first)
            assert code in ("1001", "2003"), (code, request[:200])


def _unstorable(text) -> bool:
    """Whether `text`, sent as JSON, is a reference no order can have. Judged as the
    service reads it: JSON joins a high and a low surrogate escaped side by side
    ("\\ud800\\udc00") into one character (U+10000), which is storable."""
    if not isinstance(text, str):
        return False
    text = json.loads(json.dumps(text))
    return len(text) > 128 or any(c == "\x00" or "\ud800" <= c <= "\udfff" for c in text)


@settings(HYPOTHESIS, max_examples=150)
@given(reference=_hostile_texts() | st.sampled_from([f"ref-{FIRST_ORDER + i}" for i in range(0, ORDERS, 11)]),
       order_id=st.none() | st.sampled_from([FIRST_ORDER + 6, 769_001, 1]), signer=st.sampled_from(["m", "other"]),
       timestamp=st.none() | _timestamps())
@example(reference="\ud800\udc00", order_id=None, signer="m", timestamp=None)  # a surrogate pair: one character
@example(reference="\ud800", order_id=None, signer="m", timestamp=None)  # a lone surrogate: refused
def test_any_order_query_is_answered_with_its_documented_code(stack: Gateway, reference, order_id, signer,
                                                             timestamp):
    COUNTS["order queries"] += 1
    fields = {"merchantId": str(M)}
    if order_id is not None:
        fields["orderId"] = order_id
    fields["merchantReference"] = reference
    if timestamp is not None:
        fields["timestamp"] = timestamp
    request = json.dumps(fields)  # lone surrogates and NUL as \\u escapes, as JSON writes them
    key = key_m() if signer == "m" else key_other()
    code = check_reply(stack.post_bytes(envelope(request, sign(key, request)), path="/direct/query"), allowed={"0000", "1001", "2001", "2003",
                                                                                    "3001"})
    if len(request) > 16 * 1024:  # too long to be looked at, whoever signed it (or over 64 KiB: 413)
        assert code == "1001"
    elif signer == "other":
        assert code == "2001"
    elif _unstorable(reference):
        assert code in ("1001", "2003"), (code, request[:200])


def _mutations():
    return st.one_of(
        st.tuples(st.just("insert"), st.integers(0, 80), st.characters()),
        st.tuples(st.just("delete"), st.integers(0, 80), st.just("")),
        st.tuples(st.just("replace"), st.integers(0, 80), st.characters()),
        st.tuples(st.just("reserialize"), st.integers(0, 5), st.just("")),
    )


@settings(HYPOTHESIS, max_examples=150)
@given(order=st.integers(0, ORDERS - 1), mutation=_mutations())
def test_a_request_changed_after_signing_is_never_acted_on(stack: Gateway, order, mutation):
    COUNTS["changed after signing"] += 1
    original = refund_text(M, "100.00", order_id=FIRST_ORDER + order)
    kind, position, char = mutation
    position %= len(original)
    if kind == "insert":
        changed = original[:position] + char + original[position:]
    elif kind == "delete":
        changed = original[:position] + original[position + 1:]
    elif kind == "replace":
        changed = original[:position] + char + original[position + 1:]
    else:  # re-serialized: same fields, other spacing, order or escapes
        fields = json.loads(original, parse_float=Decimal)
        options = [dict(), dict(indent=1), dict(sort_keys=True), dict(separators=(", ", ": ")),
                   dict(ensure_ascii=True, separators=(",", ":"), sort_keys=True), dict(indent="\t")][position]
        changed = json.dumps({k: (float(v) if isinstance(v, Decimal) else v) for k, v in fields.items()}, **options)
        if changed == original:
            changed = changed.replace(":", ": ", 1)
    if changed == original:
        return
    body = envelope(changed, sign(key_m(), original))
    expected = _expected_for_unsigned_shape(changed) or "2001"
    check_reply(stack.post_bytes(body.encode() if isinstance(body, str) else body), expected=expected)


# -- named attacks ----------------------------------------------------------------------

ORDER = FIRST_ORDER + 6  # a VISA HKD 100.00 order that the named attacks aim at
JPY_ORDER = FIRST_ORDER + 11


def _signed(request: str, key=None) -> bytes:
    return envelope(request, sign(key or key_m(), request))


def _non_canonical(signature: str) -> list[str]:
    raw = base64.b64decode(signature)
    standard = base64.b64encode(raw).decode()
    last_char_with_stray_bits = standard[:-3] + chr(ord(standard[-3]) + 1) + standard[-2:] \
        if standard.endswith("==") else standard[:-2] + chr(ord(standard[-2]) + 1) + standard[-1:]
    return [
        standard.rstrip("="),                                  # padding left out
        standard + "=",                                        # too much padding
        standard[:64] + "\n" + standard[64:],                  # a line break inside
        " " + standard,                                        # leading white space
        base64.urlsafe_b64encode(raw).decode(),                # the URL-safe alphabet
        last_char_with_stray_bits,                             # unused bits set in the last character
        base64.b64encode(base64.b64encode(raw)).decode().rstrip("="),  # double encoding, unpadded
        base64.b32encode(raw).decode(),                        # another encoding altogether
        raw.hex(),
        "",
    ]


def _attacks():
    good = refund_text(M, "100.00", order_id=ORDER)
    good_signature = sign(key_m(), good)
    good_body = envelope(good, good_signature)
    deep = "[" * 100_000 + "]" * 100_000
    attacks = [
        # duplicate keys, outer and inner
        ("outer duplicate request", b'{"request":' + json.dumps(good).encode() + b',"request":'
         + json.dumps(good).encode() + b',"signature":"' + good_signature.encode() + b'"}', 400, "1001"),
        ("outer duplicate signature", good_body[:-1] + b',"signature":"' + good_signature.encode() + b'"}', 400, "1001"),
        ("inner duplicate amount", _signed('{"merchantId":"7600001","orderId":%d,"amount":1.00,"amount":100.00}'
                                           % ORDER), 400, "1001"),
        ("inner duplicate merchantId", _signed('{"merchantId":"7600002","merchantId":"7600001","orderId":%d,'
                                               '"amount":100.00}' % ORDER), 400, "1001"),
        ("inner duplicate orderId", _signed('{"merchantId":"7600001","orderId":1,"orderId":%d,"amount":100.00}'
                                            % ORDER), 400, "1001"),
        ("inner duplicate in a nested object", _signed('{"merchantId":"7600001","orderId":%d,"amount":100.00,'
                                                       '"note":{"a":1,"a":2}}' % ORDER), 400, "1001"),
        # NaN, Infinity, huge and tiny numbers
        ("NaN amount", _signed(refund_text(M, "NaN", order_id=ORDER)), 400, "1001"),
        ("Infinity amount", _signed(refund_text(M, "Infinity", order_id=ORDER)), 400, "1001"),
        ("-Infinity amount", _signed(refund_text(M, "-Infinity", order_id=ORDER)), 400, "1001"),
        ("NaN in the envelope", good_body[:-1] + b',"extra":NaN}', 400, "1001"),
        ("Infinity as the signature", b'{"request":' + json.dumps(good).encode() + b',"signature":Infinity}',
         400, "1001"),
        ("1e400 amount", _signed(refund_text(M, "1e400", order_id=ORDER)), 400, "1002"),
        ("-1e400 amount", _signed(refund_text(M, "-1e400", order_id=ORDER)), 400, "1002"),
        ("1e-400 amount", _signed(refund_text(M, "1e-400", order_id=ORDER)), 400, "1002"),
        ("5,000-digit amount", _signed(refund_text(M, "9" * 5000, order_id=ORDER)), 400, "1002"),
        ("5,000-decimal amount", _signed(refund_text(M, "1." + "0" * 4999, order_id=ORDER)), 400, "1002"),
        ("5,000-digit orderId", _signed(refund_text(M, "100.00", order_id="1" + "0" * 4999)), 400, "1001"),
        ("5,000-digit merchantId", _signed('{"merchantId":"%s","orderId":%d,"amount":100.00}' % ("7" * 5000, ORDER)),
         400, "1001"),
        ("5,000-digit number in the envelope", good_body[:-1] + b',"extra":' + b"9" * 5000 + b"}", None, None),
        ("JPY amount with decimals", _signed(refund_text(M, "100.5", order_id=JPY_ORDER)), 400, "1002"),
        ("amount as a string", _signed('{"merchantId":"7600001","orderId":%d,"amount":"100.00"}' % ORDER),
         400, "1001"),
        ("zero amount", _signed(refund_text(M, "0", order_id=ORDER)), 400, "1002"),
        ("negative amount", _signed(refund_text(M, "-100.00", order_id=ORDER)), 400, "1002"),
        # deep nesting
        ("deeply nested body", deep[:60_000].encode() + b"]" * 0, 400, "1001"),
        ("deeply nested envelope field", good_body[:-1] + b',"x":' + b"[" * 20_000 + b"]" * 20_000 + b"}",
         400, "1001"),
        ("deeply nested request", _signed('{"merchantId":"7600001","orderId":%d,"amount":100.00,"x":%s}'
                                          % (ORDER, "[" * 7000 + "]" * 7000)), 400, "1001"),
        # size
        ("1 MiB body", b'{"request":"' + b"a" * (1024 * 1024) + b'","signature":""}', 413, "1001"),
        ("request over 16 KiB", _signed(refund_text(M, "100.00", order_id=ORDER, note="n" * 17_000)), 400, "1001"),
        # encodings
        ("invalid UTF-8 body", good_body[:-1] + b',"x":"\xff\xfe"}', 400, "1001"),
        ("invalid UTF-8 in the request string", b'{"request":"{\\"merchantId\\":\\"7600001\xc3\\"}",'
                                                b'"signature":"AAAA"}', 400, "1001"),
        ("overlong UTF-8", b'{"request":"\xc0\xaf","signature":"AAAA"}', 400, "1001"),
        ("lone surrogate in the request", b'{"request":"{\\"merchantId\\":\\"7600001\\",\\"x\\":\\"\\ud800\\"}",'
                                          b'"signature":"AAAA"}', 400, "1001"),
        ("UTF-16 body", good_body.decode().encode("utf-16"), 400, "1001"),
        ("BOM before the body", b"\xef\xbb\xbf" + good_body, 400, "1001"),
        # text no database stores as given, in the signed request and in the envelope
        ("NUL in merchantReference", _signed(refund_text(M, "100.00", reference="ref-760106\x00")), 400, "1001"),
        ("NUL alone as merchantReference", _signed(refund_text(M, "100.00", reference="\x00")), 400, "1001"),
        ("NUL in merchantReference with an orderId",
         _signed(refund_text(M, "100.00", order_id=ORDER, reference="ref-760106\x00")), 400, "1001"),
        ("lone surrogate as merchantReference", _signed(refund_text(M, "100.00", reference="\ud800")), 400, "1001"),
        ("lone low surrogate in merchantReference", _signed(refund_text(M, "100.00", reference="ref-\udc00")),
         400, "1001"),
        ("129-character merchantReference", _signed(refund_text(M, "100.00", reference="r" * 129)), 400, "1001"),
        ("5,000-character merchantReference", _signed(refund_text(M, "100.00", reference="\u00e9" * 5000)),
         400, "1001"),
        ("NUL in merchantId", _signed('{"merchantId":"7600001\\u0000","orderId":%d,"amount":100.00}' % ORDER),
         400, "1001"),
        ("lone surrogate as the signature", b'{"request":' + json.dumps(good).encode() + b',"signature":"\\ud800"}',
         400, "1001"),
        ("lone surrogate inside the signature", b'{"request":' + json.dumps(good).encode() + b',"signature":"'
         + good_signature[:20].encode() + b'\\udfff' + good_signature[20:].encode() + b'"}', 400, "1001"),
        ("NUL as the signature", b'{"request":' + json.dumps(good).encode() + b',"signature":"\\u0000"}', 401, "2001"),
        # signed timestamps at the ends of the calendar
        ("timestamp in year 1 at +14:00", _signed(refund_text(M, "100.00", order_id=ORDER,
                                                             timestamp="0001-01-01T00:00:00+14:00")), 401, "2003"),
        ("timestamp at the end of year 9999 at -14:00",
         _signed(refund_text(M, "100.00", order_id=ORDER, timestamp="9999-12-31T23:59:59.999999-14:00")), 401, "2003"),
        ("timestamp in year 0", _signed(refund_text(M, "100.00", order_id=ORDER, timestamp="0000-01-01T00:00:00Z")),
         400, "1001"),
        ("timestamp with a 99:99 offset", _signed(refund_text(M, "100.00", order_id=ORDER,
                                                             timestamp="2026-11-26T19:41:19+99:99")), 400, "1001"),
        # wrong shapes
        ("empty body", b"", 400, "1001"),
        ("array body", b"[]", 400, "1001"),
        ("request as an object", b'{"request":{"merchantId":"7600001"},"signature":"AAAA"}', 400, "1001"),
        ("signature as a number", b'{"request":' + json.dumps(good).encode() + b',"signature":1}', 400, "1001"),
        ("missing signature", b'{"request":' + json.dumps(good).encode() + b"}", 400, "1001"),
        ("published example with its trailing comma",
         b'{"request":"{\\"merchantId\\":\\"7600001\\",\\"merchantReference\\":\\"ref-760106\\",}","signature":"x"}',
         400, "1001"),
        # signatures
        ("another merchant's key", _signed(good, key_other()), 401, "2001"),
        ("another merchant's key naming the other merchant on M's order",
         _signed(refund_text(OTHER, "100.00", order_id=ORDER), key_other()), 200, "3001"),
        ("unknown merchant", _signed(refund_text(7609999, "100.00", order_id=ORDER)), 401, "2001"),
        ("signature of another request", envelope(good, sign(key_m(), refund_text(M, "1.00", order_id=ORDER))),
         401, "2001"),
        ("re-serialized with spaces", envelope(json.dumps(json.loads(good)), good_signature), 401, "2001"),
        ("re-serialized with sorted keys", envelope(json.dumps(json.loads(good), sort_keys=True,
                                                               separators=(",", ":")), good_signature), 401, "2001"),
        ("re-serialized with a trailing newline", envelope(good + "\n", good_signature), 401, "2001"),
        ("re-serialized with an escaped character", envelope(good.replace("merchantId", "merchant\\u0049d"),
                                                             good_signature), 401, "2001"),
    ]
    attacks += [(f"non-canonical base64 #{i}", envelope(good, variant), 401, "2001")
                for i, variant in enumerate(_non_canonical(good_signature))]
    return attacks


ATTACKS = _attacks()


@pytest.mark.parametrize("name, body, status, code", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_named_attack_is_refused_with_its_documented_code(stack: Gateway, name, body, status, code):
    reply = stack.post_bytes(body if isinstance(body, bytes) else body.encode("utf-8"))
    answer = check_reply(reply, expected=code, status=status)
    if name == "5,000-digit number in the envelope":  # an ignored extra field: the request is served as usual
        assert answer in ("0000", "3003"), answer
    else:
        assert answer != "0000", "a named attack was approved"


QUERY_ATTACKS = [
    ("NUL in merchantReference", {"merchantReference": "ref-760106\x00"}, "1001"),
    ("NUL in merchantReference with an orderId", {"orderId": ORDER, "merchantReference": "ref-760106\x00"}, "1001"),
    ("lone surrogate as merchantReference", {"merchantReference": "\ud800"}, "1001"),
    ("129-character merchantReference", {"merchantReference": "r" * 129}, "1001"),
    ("timestamp in year 1 at +14:00", {"orderId": ORDER, "timestamp": "0001-01-01T00:00:00+14:00"}, "2003"),
    ("the order itself", {"orderId": ORDER}, "0000"),
]


@pytest.mark.parametrize("name, fields, code", QUERY_ATTACKS, ids=[a[0] for a in QUERY_ATTACKS])
def test_named_attack_on_the_order_query_is_answered_with_its_documented_code(stack: Gateway, name, fields,
                                                                              code):
    request = json.dumps({"merchantId": str(M), **fields})
    check_reply(stack.post_bytes(envelope(request, sign(key_m(), request)), path="/direct/query"), expected=code)


def test_http_level_refusals_have_their_documented_status_and_code(stack: Gateway):
    good = _signed(refund_text(M, "100.00", order_id=ORDER))
    check_reply(stack.post_bytes(good, content_type="text/plain"), expected="1001", status=415)
    check_reply(stack.post_bytes(good, content_type="application/x-www-form-urlencoded"), expected="1001", status=415)
    reply = stack.edge.request("PUT", "/direct/refund", good, {"Content-Type": "application/json"})
    stack.replies.append(reply)
    check_reply(reply, expected="1001", status=405)
    reply = stack.edge.request("POST", "/direct/refund/../refund", good, {"Content-Type": "application/json"})
    stack.replies.append(reply)
    check_reply(reply, expected="1001", status=404)
    chunked = stack.edge.request("POST", "/direct/refund", iter([b"{" + b" " * 70_000, b"}"]),
                                 {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    stack.replies.append(chunked)
    check_reply(chunked, expected="1001", status=413)


def test_a_refund_after_all_that_still_works_exactly_once(stack: Gateway):
    order = FIRST_ORDER + random.Random(1).choice([i for i in range(ORDERS) if i % 10 in (0, 6, 7, 8, 9)])
    body = _signed(refund_text(M, "100.00", order_id=order))
    first = check_reply(stack.post_bytes(body), allowed={"0000", "3003", "4004"})
    assert check_reply(stack.post_bytes(body)) == ("3003" if first in ("0000", "3003") else "4004")
