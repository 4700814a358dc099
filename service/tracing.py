"""OpenTelemetry tracing of refund-service and refund-edge: off unless the
standard OTEL_* environment variables turn it on.

On when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`) or an OTLP
endpoint is set (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`),
unless `OTEL_SDK_DISABLED=true`. Everything else is the SDK's own standard
configuration: `OTEL_SERVICE_NAME` (default: the process's name),
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`
(default: parent-based, always on), `OTEL_EXPORTER_OTLP_*` (endpoint, headers,
certificates, timeout), `OTEL_BSP_*` (batching), `OTEL_PROPAGATORS`.

What is traced, by the maintained instrumentations:
- refund-edge: a server span per HTTP request, the root of a new trace (a
  merchant's `traceparent` is ignored) (`opentelemetry-instrumentation-asgi`;
  /healthz and /metrics excluded), and a client span per gRPC call with the
  W3C `traceparent` in its metadata (`opentelemetry-instrumentation-grpc`);
- refund-service: a server span per gRPC call, child of the edge's client span
  (`opentelemetry-instrumentation-grpc`), and a span per database statement
  with its SQL text, never its parameters (`opentelemetry-instrumentation-asyncpg`
  on PostgreSQL, `opentelemetry-instrumentation-sqlite3` on SQLite).
Health checks are not traced. Our own attributes on the HTTP and gRPC server
spans: `refund.request_id` (the X-Request-Id of the logs) and
`refund.response_code`. Request bodies, signatures, card numbers and statement
parameters are never recorded.

Off, nothing of OpenTelemetry is imported and no request does any tracing work:
the hooks in the request paths read `ENABLED` and nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger("refund-tracing")

ENABLED = False

REQUEST_ID_ATTRIBUTE = "refund.request_id"
RESPONSE_CODE_ATTRIBUTE = "refund.response_code"
EXCLUDED_URLS = "/healthz,/metrics"  # polled by machines: no trace for them
# Merchants are outside the gateway: a trace context they send is not continued (else
# they would choose which requests are sampled, and could join traces of their choosing).
UNTRUSTED_CONTEXT_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})
EXPORTERS = ("otlp", "console", "none")

_provider = None


def wanted(environ=os.environ) -> bool:
    """Whether the standard OTEL_* variables ask for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()}
    if exporters:
        return exporters != {"none"}
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporters(environ):
    names = [name.strip().lower() for name in (environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(",")
             if name.strip()]
    unknown = [name for name in names if name not in EXPORTERS]
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {', '.join(unknown)} "
                         f"(this build has {', '.join(EXPORTERS)})")
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc")
    exporters = []
    for name in names:
        if name == "otlp":
            if protocol != "grpc":
                raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: this build exports OTLP over gRPC only")
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
    return exporters


def setup(service_name: str, *, exporter=None, environ=os.environ) -> bool:
    """Turn tracing on for this process when the environment asks for it (or
    when `exporter` is given: the tests' in-memory exporter, exported at once);
    call once, before any server, channel or database connection is made.
    Returns whether tracing is on. A setting it cannot use raises ValueError."""
    global ENABLED, _provider
    if exporter is None and not wanted(environ):
        return False
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.grpc import (
        GrpcAioInstrumentorClient,
        GrpcAioInstrumentorServer,
        filters,
    )
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    exporters = [exporter] if exporter is not None else _exporters(environ)
    named = environ.get("OTEL_SERVICE_NAME") or "service.name=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(resource=Resource.create({} if named else {SERVICE_NAME: service_name}))
    for each in exporters:
        provider.add_span_processor(SimpleSpanProcessor(each) if exporter is not None else BatchSpanProcessor(each))
    not_health = filters.negate(filters.health_check())
    GrpcAioInstrumentorServer(filter_=not_health).instrument(tracer_provider=provider)
    GrpcAioInstrumentorClient(filter_=not_health).instrument(tracer_provider=provider)
    AsyncPGInstrumentor().instrument(tracer_provider=provider)
    if exporter is None:
        from opentelemetry import trace

        trace.set_tracer_provider(provider)  # flushed at exit (the SDK's atexit hook)
    _provider = provider
    ENABLED = True
    log.info("tracing on: %s, sampler %s", ", ".join(type(each).__name__ for each in exporters) or "no exporter",
             type(provider.sampler).__name__)
    return True


def start_from_environment(service_name: str) -> bool:
    """`setup` for a process's main(): False (after one log line saying why) when
    the OTEL_* settings cannot be used, and the process should exit 1."""
    try:
        setup(service_name)
    except (ValueError, ImportError) as exc:
        log.error("cannot set up tracing: %s", exc)
        return False
    return True


def teardown() -> None:
    """Undo setup (for tests that turn tracing on in their own process)."""
    global ENABLED, _provider
    if not ENABLED:
        return
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer

    for instrumentor in (GrpcAioInstrumentorServer(), GrpcAioInstrumentorClient(), AsyncPGInstrumentor()):
        instrumentor.uninstrument()
    _provider.shutdown()
    ENABLED, _provider = False, None


def wrap_asgi(app):
    """The edge's ASGI app inside a span per HTTP request (when tracing is on; else `app` itself)."""
    if not ENABLED:
        return app
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    traced = OpenTelemetryMiddleware(app, excluded_urls=EXCLUDED_URLS, tracer_provider=_provider,
                                     exclude_spans=["receive", "send"])

    async def each_request_its_own_trace(scope, receive, send):
        if scope["type"] == "http":
            scope = {**scope, "headers": [(name, value) for name, value in scope["headers"]
                                          if name not in UNTRUSTED_CONTEXT_HEADERS]}
        await traced(scope, receive, send)

    return each_request_its_own_trace


def traced_sqlite(connection):
    """A SQLite connection whose statements are spans (when tracing is on; else `connection` itself)."""
    if not ENABLED:
        return connection
    from opentelemetry.instrumentation.sqlite3 import SQLite3Instrumentor

    return _StatementsThroughCursors(SQLite3Instrumentor.instrument_connection(connection, _provider))


class _StatementsThroughCursors:
    """The instrumentation traces cursors; the store runs `connection.execute(...)`,
    sqlite3's shortcut for `connection.cursor().execute(...)`: take the long way."""

    def __init__(self, connection):
        self._connection = connection

    def execute(self, *args):
        return self._connection.cursor().execute(*args)

    def __getattr__(self, name):
        return getattr(self._connection, name)


def untraced():
    """A context in which nothing is traced (health probes): a no-op when tracing is off."""
    if not ENABLED:
        return contextlib.nullcontext()
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    return suppress_instrumentation()


def annotate(request_id: str | None, response_code: str | None) -> None:
    """The request id and response code on the current span (the HTTP request's at the
    edge, the call's in the service)."""
    from opentelemetry import trace

    span = trace.get_current_span()
    if request_id:
        span.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)
    if response_code:
        span.set_attribute(RESPONSE_CODE_ATTRIBUTE, response_code)
