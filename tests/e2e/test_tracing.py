"""OpenTelemetry tracing (service/tracing.py).

On: one signed refund through the edge is one trace: the edge's HTTP server span,
its gRPC client span, the service's gRPC server span (a remote child: the context
went in the call's metadata) and the database statements under it, with the
request id and response code as attributes and never a signature or a card
number. Shown in one process with an in-memory exporter, on both databases, and
across the real processes with the console exporter switched on by
OTEL_TRACES_EXPORTER alone.

Off (no OTEL_* variables): a refund through the edge and the service imports no
OpenTelemetry module at all, so no request can do OpenTelemetry work.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from service import tracing
from tests.support import ROOT
from tests.support.data import example_fixtures, load_document
from tests.support.in_process import CARD_NUMBER, MERCHANT_TRACE_ID, REQUEST_ID, refund_body, refund_in_one_process


@pytest.fixture
def traced():
    exporter = InMemorySpanExporter()
    assert tracing.setup("refund-test", exporter=exporter)
    yield exporter
    tracing.teardown()


def strings_in(span) -> list[str]:
    """Every text a span would export: name, attributes, events and their attributes, status."""
    texts = [span.name, span.status.description or ""]
    texts += [str(value) for value in span.attributes.values()]
    for event in span.events:
        texts += [event.name, *(str(value) for value in event.attributes.values())]
    return texts


def test_one_signed_refund_is_one_trace_from_the_edge_to_the_database(database_url, traced):
    load_document(database_url, example_fixtures())
    body, signature = refund_body()
    status, answer = asyncio.run(refund_in_one_process(database_url, body))
    assert status == 200 and json.loads(answer)["responseCode"] == "0000", answer

    spans = traced.get_finished_spans()
    assert len({span.context.trace_id for span in spans}) == 1, [span.name for span in spans]
    by_id = {span.context.span_id: span for span in spans}
    [edge] = [s for s in spans if s.kind == SpanKind.SERVER and s.parent is None]
    [client] = [s for s in spans if s.kind == SpanKind.CLIENT and "MerchantRefund" in s.name]
    [server] = [s for s in spans if s.kind == SpanKind.SERVER and "MerchantRefund" in s.name]
    statements = [s for s in spans if "db.statement" in s.attributes or "db.query.text" in s.attributes]

    assert edge.name == "POST /direct/refund"
    assert edge.context.trace_id != MERCHANT_TRACE_ID  # a new trace: the merchant's traceparent is not continued
    assert client.parent.span_id == edge.context.span_id
    assert server.parent.span_id == client.context.span_id and server.parent.is_remote  # through the metadata
    assert statements, [span.name for span in spans]
    for statement in statements:  # each under the service's span (directly)
        assert statement.parent.span_id == server.context.span_id, statement.name
    assert set(by_id) == {edge.context.span_id, client.context.span_id, server.context.span_id,
                          *(s.context.span_id for s in statements)}, [span.name for span in spans]
    for span in (edge, server):
        assert span.attributes[tracing.REQUEST_ID_ATTRIBUTE] == REQUEST_ID
        assert span.attributes[tracing.RESPONSE_CODE_ATTRIBUTE] == "0000"

    exported = "\n".join(text for span in spans for text in strings_in(span))
    assert CARD_NUMBER not in exported and signature not in exported
    assert "$1" in exported or "?" in exported  # statements are there, as SQL text with placeholders


def test_a_declined_refund_carries_its_response_code(sqlite_url, traced):
    load_document(sqlite_url, example_fixtures())
    status, answer = asyncio.run(refund_in_one_process(sqlite_url, refund_body(order_id=999999)[0]))
    assert json.loads(answer)["responseCode"] == "3001"
    codes = {span.name: span.attributes.get(tracing.RESPONSE_CODE_ATTRIBUTE) for span in traced.get_finished_spans()
             if span.kind == SpanKind.SERVER}
    assert set(codes.values()) == {"3001"} and len(codes) == 2, codes


def test_tracing_is_off_without_otel_variables_and_on_with_them():
    assert not tracing.wanted({})
    assert not tracing.wanted({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.wanted({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"})
    assert tracing.wanted({"OTEL_TRACES_EXPORTER": "otlp"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"})
    with pytest.raises(ValueError, match="unknown exporter jaeger"):
        tracing.setup("x", environ={"OTEL_TRACES_EXPORTER": "jaeger"})
    assert not tracing.ENABLED


OFF_SCRIPT = """
import asyncio, json, os, sys
assert not any(name.startswith("OTEL_") for name in os.environ)
from service import tracing
from tests.support.data import load_document
from tests.support.data import example_fixtures
from tests.support.in_process import refund_body, refund_in_one_process

assert not any(name.startswith("opentelemetry") for name in sys.modules), "imported before the request"
assert tracing.start_from_environment("refund-service") and not tracing.ENABLED
url = sys.argv[1]
load_document(url, example_fixtures())
status, answer = asyncio.run(refund_in_one_process(url, refund_body()[0]))
assert json.loads(answer)["responseCode"] == "0000", answer
loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
print("loaded:", loaded)
assert not loaded
"""


def test_with_tracing_off_a_refund_does_no_opentelemetry_work(sqlite_url, tmp_path):
    """Not even an import: in a fresh interpreter (this one may have loaded it for the tests above)."""
    (tmp_path / "off.py").write_text(textwrap.dedent(OFF_SCRIPT))
    environment = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    done = subprocess.run([sys.executable, str(tmp_path / "off.py"), sqlite_url], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**environment, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "loaded: []" in done.stdout


# -- the real processes, switched on by OTEL_TRACES_EXPORTER ----------------------------


def console_spans(text: str) -> list[dict]:
    """The spans the console exporter printed (JSON objects) among the process's other output."""
    decoder, spans, index = json.JSONDecoder(), [], 0
    while (index := text.find("{\n", index)) != -1:
        try:
            value, end = decoder.raw_decode(text, index)
        except ValueError:
            index += 1
            continue
        if isinstance(value, dict) and "context" in value and "kind" in value:
            spans.append(value)
        index = end
    return spans



def test_the_processes_trace_across_the_wire_when_otel_variables_say_so(sqlite_url, start_service, start_edge):
    load_document(sqlite_url, example_fixtures())
    otel = {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    service = start_service(sqlite_url, env=otel)
    edge = start_edge(service.address, env=otel)
    body, signature = refund_body()
    reply = edge.request("POST", "/direct/refund", body, {"Content-Type": "application/json",
                                                          "X-Request-Id": REQUEST_ID})
    assert reply.json["responseCode"] == "0000", reply.body
    assert edge.stop() == 0 and service.stop() == 0  # the exporters flush at exit

    edge_spans, service_spans = console_spans(edge.output()), console_spans(service.output())
    [http] = [s for s in edge_spans if s["kind"] == "SpanKind.SERVER"]
    [client] = [s for s in edge_spans if s["kind"] == "SpanKind.CLIENT"]
    [server] = [s for s in service_spans if s["kind"] == "SpanKind.SERVER"]
    statements = [s for s in service_spans if s["kind"] == "SpanKind.CLIENT"]
    assert {s["context"]["trace_id"] for s in [http, client, server, *statements]} == {http["context"]["trace_id"]}
    assert client["parent_id"] == http["context"]["span_id"]
    assert server["parent_id"] == client["context"]["span_id"]
    assert statements and all(s["parent_id"] == server["context"]["span_id"] for s in statements)
    assert server["resource"]["attributes"]["service.name"] == "refund-service"
    assert http["resource"]["attributes"]["service.name"] == "refund-edge"
    assert http["attributes"][tracing.REQUEST_ID_ATTRIBUTE] == server["attributes"][tracing.REQUEST_ID_ATTRIBUTE] \
        == REQUEST_ID
    everything = edge.output() + service.output()
    assert CARD_NUMBER not in everything and signature not in everything


@pytest.mark.parametrize("module", ["service.server", "gateway_edge.server"])
def test_an_unusable_otel_setting_stops_the_process_at_start_with_a_message(sqlite_url, module):
    environment = {**os.environ, "REFUND_DATABASE_URL": sqlite_url, "REFUND_GRPC_LISTEN": "127.0.0.1:0",
                   "REFUND_HTTP_LISTEN": "127.0.0.1:0", "OTEL_TRACES_EXPORTER": "otlp",
                   "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
    done = subprocess.run([sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=environment)
    assert done.returncode == 2, done.stdout + done.stderr  # a bad environment value (docs/operations.md)
    assert "cannot set up tracing" in done.stderr and "OTLP over gRPC only" in done.stderr
    assert "Traceback" not in done.stderr
