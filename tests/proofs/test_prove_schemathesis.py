"""Issue 4, item 6 (second half): schemathesis against the edge's OpenAPI
document (gateway_edge/openapi.json), on a live edge and service.

A schema hook signs what schemathesis generates: every generated envelope
whose `request` is a string gets the real signature of that string with the
merchant's key, and now and then its `request` is replaced by a signed
request built from the document's own SignedRequest schema (so generated
requests reach the refund rules, not only the signature check). Positive and
negative data. Checks: schemathesis's own (no server error, status code,
content type, headers and body conform to the document, schema-invalid data
rejected) and ours (every answer's code is documented for its HTTP status).

Left out: `positive_data_acceptance`, which expects 2xx for any
schema-valid body; a schema-valid envelope whose `request` text is not a
valid signed request is rightly answered 400 / 401.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway_edge.app import OPENAPI_PATH
from tests.support.answers import check_reply
from tests.support.cards import assert_no_card_data
from tests.support.hostile import FIRST_ORDER, INITIAL_HKD, ORDERS, OTHER, M, key_m, start_stack
from tests.support.http import Reply
from tests.support.keys import sign
from tests.support.ledger import check_ledger
from tests.support.postgres import migrated_database

SCHEMA = schemathesis.openapi.from_path(OPENAPI_PATH)
SIGNED_REQUEST = SCHEMA.raw_schema["components"]["schemas"]["SignedRequest"]
CASES: Counter = Counter()
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


def _signed_requests():
    """Request texts from the document's SignedRequest schema, aimed at M's orders."""
    amounts = st.decimals(min_value="0.001", max_value="300", places=3) | st.decimals(
        min_value="1", max_value="300", places=2) | st.integers(1, 600)
    order_id = st.integers(FIRST_ORDER - 5, FIRST_ORDER + ORDERS + 5) | st.integers(
        FIRST_ORDER, FIRST_ORDER + ORDERS).map(str)
    reference = st.integers(FIRST_ORDER - 5, FIRST_ORDER + ORDERS).map(lambda o: f"ref-{o}") | st.text(
        max_size=SIGNED_REQUEST["properties"]["merchantReference"]["maxLength"])
    which = st.sampled_from([{"orderId": order_id}, {"merchantReference": reference},
                             {"orderId": order_id, "merchantReference": reference}, {}])
    return which.flatmap(lambda optional: st.fixed_dictionaries(
        {"merchantId": st.just(str(M)), "amount": amounts, **optional})).map(lambda fields: json.dumps({k: (float(v) if not isinstance(v, (str, int)) else v)
                                     for k, v in fields.items()}, separators=(",", ":"))
          if "amount" not in fields or isinstance(fields["amount"], int)
          else json.dumps({k: v for k, v in fields.items() if k != "amount"}, separators=(",", ":"))[:-1]
          + f',"amount":{fields["amount"]}}}')


@SCHEMA.hook("flatmap_body")
def sign_generated_bodies(context, body):
    """The signing hook: sign the generated request string, or swap in a signed
    request from SignedRequest. Bodies that are not envelopes pass unchanged."""
    if not (isinstance(body, dict) and isinstance(body.get("request"), str) and isinstance(body.get("signature"), str)):
        return st.just(body)  # not an envelope (negative data stays negative: nothing missing is added)

    def signed(request: str) -> dict:
        return {**body, "request": request, "signature": sign(key_m(), request.encode("utf-8", "surrogatepass"))}

    return st.one_of(st.just(body), st.just(signed(body["request"])), _signed_requests().map(signed))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with migrated_database("sqlite", tmp_path_factory.mktemp("schemathesis"), "refund_hostile") as url:
        yield from _checked_stack(url)


def _checked_stack(url):
    stack = start_stack(url)
    try:
        yield stack
        assert stack.service.process.poll() is None and stack.edge.process.poll() is None
        assert stack.edge.request("GET", "/healthz").status == 200
        check_ledger(stack.database_url, {(M, "HKD"): INITIAL_HKD, (OTHER, "HKD"): INITIAL_HKD})
        assert_no_card_data(stack.database_url, [r.body for r in stack.replies], [stack.service.output(), stack.edge.output()])
        codes = Counter(json.loads(r.body).get("responseCode", "-") for r in stack.replies if r.body.startswith(b"{"))
        print(f"\nschemathesis: {dict(CASES)} cases; answers {dict(codes)}")
    finally:
        stack.close()


SETTINGS = settings(deadline=None, max_examples=150, suppress_health_check=list(HealthCheck))


def _run(stack, case, mode: str):
    CASES[f"{case.method} {case.path} {mode}"] += 1
    response = case.call(base_url=stack.edge.url, timeout=30)
    case.validate_response(response, checks=CHECKS)
    reply = Reply(response.status_code, {k.lower(): v[0] if isinstance(v, list) else v
                                         for k, v in response.headers.items()}, response.content, response.elapsed)
    if case.path == "/direct/refund":
        stack.replies.append(reply)
        check_reply(reply)
    else:
        assert response.status_code == 200, (case.path, response.status_code, response.content[:200])


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_schemathesis_finds_no_server_error_and_no_undocumented_answer_on_the_refund_endpoint(stack, mode):
    strategy = SCHEMA["/direct/refund"]["POST"].as_strategy(generation_mode=mode, hooks=SCHEMA.hooks)

    @SETTINGS
    @given(case=strategy)
    def run(case):
        _run(stack, case, mode.value)

    run()


def test_schemathesis_on_the_read_only_endpoints(stack):
    for path in ("/healthz", "/openapi.json"):
        strategy = SCHEMA[path]["GET"].as_strategy(hooks=SCHEMA.hooks)

        @settings(SETTINGS, max_examples=5)
        @given(case=strategy)
        def run(case):
            _run(stack, case, "positive")

        run()
