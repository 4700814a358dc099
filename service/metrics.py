"""refund-service's Prometheus metrics, and the gRPC server interceptor that
gives every call its request id, its log line and its measurements.

Metrics (served on --metrics-listen, see docs/operations.md):

    refund_service_rpcs_total{method, code}              calls answered, by gRPC status code
    refund_service_refunds_total{method, response_code}  Refund / MerchantRefund answers by response code
    refund_service_rpc_duration_seconds{method}          time from call to answer (histogram)
    refund_service_rpcs_in_flight                        calls being served now
    refund_service_database_errors_total{kind}           database unreachable / too slow (answered 9001)
    refund_service_refund_batches_total                  database transactions that applied refunds together
    refund_service_refunds_batched_total                 refund attempts run in such a transaction
    refund_service_refund_batches_rolled_back_total      batches rolled back, their refunds run one by one
    refund_service_refund_statements_rolled_back_total   refunds alone rolled back and run again
    refund_service_refunds_waiting_for_lane              refund attempts waiting for their lane now
    refund_service_refund_lane_wait_seconds              how long the longest-waiting of them has waited
    refund_service_refunds_aside                         refund attempts in side lanes now (another client's lock)
    refund_service_refunds_moved_aside_total             refund attempts run in a side lane
    refund_service_refunds_refused_aside_total           refund attempts refused: every side lane taken

The servicer tells the interceptor the outcome of a call with `note_outcome`
(the response code is known there, not from the status code alone).
"""

from __future__ import annotations

import contextvars
import logging
import time
from dataclasses import dataclass

import grpc
import prometheus_client
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from service import telemetry, tracing

prometheus_client.disable_created_metrics()  # no *_created series: less to scrape

log = logging.getLogger("refund-service")

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REFUND_METHODS = frozenset({"Refund", "MerchantRefund"})
QUIET_METHODS = frozenset({"Check", "Watch"})  # health checks: logged at DEBUG only

RPCS = Counter("refund_service_rpcs", "gRPC calls answered, by method and gRPC status code", ["method", "code"])
REFUNDS = Counter("refund_service_refunds",
                  "Refund and MerchantRefund answers, by response code (docs/api.md section 4)",
                  ["method", "response_code"])
DURATION = Histogram("refund_service_rpc_duration_seconds", "Seconds from receiving a gRPC call to answering it",
                     ["method"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("refund_service_rpcs_in_flight", "gRPC calls being served")
DATABASE_ERRORS = Counter("refund_service_database_errors",
                          "Database calls that failed or timed out (answered 9001 SERVICE_UNAVAILABLE)", ["kind"])


class _GroupCommitCollector:
    """The store's group commit (service/stores/group_commit.py), read when
    scraped: it counts for itself, nothing is added to the refund path. Zeros
    until a store is watched, so the series exist from the first scrape."""

    group = None  # the store's GroupCommit
    _FAMILIES = (
        ("refund_service_refund_batches", "batches",
         "Database transactions that applied two or more refunds together (group commit)"),
        ("refund_service_refunds_batched", "batched",
         "Refund attempts (approved or found to decline) run in such a transaction"),
        ("refund_service_refund_batches_rolled_back", "rolled_back",
         "Batches the database rolled back as a whole; their refunds then ran one by one"),
        ("refund_service_refund_statements_rolled_back", "alone_rolled_back",
         "Refund statements run alone that the database rolled back (a deadlock's victim) and that then ran again"),
        ("refund_service_refunds_moved_aside", "moved_aside",
         "Refund attempts run in their merchant's side lane: their lane gave up waiting for a lock another client "
         "held (or another of the merchant's already waited there)"),
        ("refund_service_refunds_refused_aside", "refused_aside",
         "Refund attempts answered unavailable (nothing written) because every side lane was taken"),
    )

    def collect(self):
        for name, count, documentation in self._FAMILIES:
            yield CounterMetricFamily(name, documentation, value=getattr(self.group, count) if self.group else 0)
        waiting, longest = self.group.waiting() if self.group else (0, 0.0)
        yield GaugeMetricFamily("refund_service_refunds_waiting_for_lane",
                                "Refund attempts waiting for their lane's running transaction (group commit)",
                                value=waiting)
        yield GaugeMetricFamily("refund_service_refund_lane_wait_seconds",
                                "Seconds the longest-waiting of them has waited so far (0: none waits)",
                                value=longest)
        yield GaugeMetricFamily("refund_service_refunds_aside",
                                "Refund attempts in side lanes now, waiting for a lock another client holds",
                                value=self.group.in_side_lanes() if self.group else 0)


_GROUP_COMMIT = _GroupCommitCollector()
prometheus_client.REGISTRY.register(_GROUP_COMMIT)


def watch_group_commit(group) -> None:
    """Export `group`'s counts (the store's group commit) from now on."""
    _GROUP_COMMIT.group = group


@dataclass
class _Outcome:
    response_code: str = ""
    code: grpc.StatusCode | None = None


_OUTCOME: contextvars.ContextVar[_Outcome | None] = contextvars.ContextVar("rpc_outcome", default=None)


def note_outcome(response_code: str, code: grpc.StatusCode = grpc.StatusCode.OK) -> None:
    """Record the current call's response code and status code (for its log line and metrics)."""
    outcome = _OUTCOME.get()
    if outcome is not None:
        outcome.response_code, outcome.code = response_code, code


def database_error(kind: str) -> None:
    DATABASE_ERRORS.labels(kind).inc()


def _request_id(context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == telemetry.METADATA_KEY:
            return telemetry.sane_request_id(value) or telemetry.new_request_id()
    return telemetry.new_request_id()


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary-unary method: request id (from `x-request-id`
    metadata, else a new one) in a context variable for the log lines of the
    call, one log line per call, metrics. Streaming methods pass through."""

    def __init__(self):
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        cached = self._wrapped.get(handler_call_details.method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(handler, handler_call_details.method.rsplit("/", 1)[-1]))
            self._wrapped[handler_call_details.method] = cached
        return cached[1]

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary
        duration = DURATION.labels(method)
        level = logging.DEBUG if method in QUIET_METHODS else logging.INFO
        counts_refunds = method in REFUND_METHODS
        rpcs = telemetry.MetricChildren(lambda code: RPCS.labels(method, code.name))  # by status code
        refunds = telemetry.MetricChildren(lambda response_code: REFUNDS.labels(method, response_code))

        async def behaviour(request, context):
            request_id_token = telemetry.REQUEST_ID.set(_request_id(context))
            outcome = _Outcome()
            outcome_token = _OUTCOME.set(outcome)
            IN_FLIGHT.inc()
            started = time.perf_counter()
            failed = False
            try:
                return await inner(request, context)
            except BaseException:
                failed = True
                raise
            finally:
                elapsed = time.perf_counter() - started
                IN_FLIGHT.dec()
                duration.observe(elapsed)
                code = outcome.code or (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
                rpcs[code].inc()
                if counts_refunds and outcome.response_code:
                    refunds[outcome.response_code].inc()
                if tracing.ENABLED:
                    tracing.annotate(telemetry.REQUEST_ID.get(), outcome.response_code)
                if log.isEnabledFor(level):
                    fields = {"rpc": method, "code": code.name, "duration_ms": round(elapsed * 1000, 3)}
                    if outcome.response_code:
                        fields["response_code"] = outcome.response_code
                    log.log(level, "rpc %s %s", method, code.name, extra={"fields": fields})
                _OUTCOME.reset(outcome_token)
                telemetry.REQUEST_ID.reset(request_id_token)

        return grpc.unary_unary_rpc_method_handler(
            behaviour, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def serve_metrics(address: str) -> str:
    """Serve the Prometheus text format at http://ADDRESS/metrics (a thread); the bound address."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"metrics address must be HOST:PORT, got {address!r}")
    server, _thread = prometheus_client.start_http_server(int(port), addr=host.strip("[]"))
    bound_port = server.server_address[1]
    return f"{host}:{bound_port}"
