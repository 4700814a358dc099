"""refund-edge's Prometheus metrics, served at http://METRICS_LISTEN/metrics with
--metrics-listen (off by default; never on the merchant-facing port; see docs/operations.md).

    refund_edge_requests_total{path, status}            HTTP requests answered, by HTTP status
    refund_edge_refunds_total{response_code}            POST /direct/refund answers by response code
    refund_edge_queries_total{response_code}            POST /direct/query answers by response code
    refund_edge_request_duration_seconds{path}          time from request to answer (histogram)
    refund_edge_requests_in_flight                      requests being answered now
    refund_edge_backend_failures_total{response_code}   answers 9001 / 9999: the service unreachable, slow or failing
    refund_edge_open_connections                        HTTP connections open now
    refund_edge_connections_refused_total{reason}       connections closed by a limit (gateway_edge.limits):
        shed_idle, over_capacity, header_too_large, header_timeout, idle_timeout
    refund_edge_overload_total                          requests answered 9001 at once: too many in flight
    refund_edge_rate_limited_total                      requests answered 9002 (HTTP 429): a merchant over its rate

`path` is one of the edge's routes, or "other" for any other path.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

prometheus_client.disable_created_metrics()  # no *_created series: less to scrape

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter("refund_edge_requests", "HTTP requests answered, by path and HTTP status", ["path", "status"])
REFUNDS = Counter("refund_edge_refunds", "POST /direct/refund answers, by response code (docs/api.md section 4)",
                  ["response_code"])
QUERIES = Counter("refund_edge_queries", "POST /direct/query answers, by response code", ["response_code"])
DURATION = Histogram("refund_edge_request_duration_seconds", "Seconds from receiving a request to answering it",
                     ["path"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("refund_edge_requests_in_flight", "HTTP requests being answered")
BACKEND_FAILURES = Counter("refund_edge_backend_failures",
                           "Answers 9001 (service unreachable or too slow) and 9999 (unexpected fault)",
                           ["response_code"])

OPEN_CONNECTIONS = Gauge("refund_edge_open_connections", "HTTP connections open")
CONNECTIONS_REFUSED = Counter("refund_edge_connections_refused",
                              "Connections closed by a limit: shed_idle, over_capacity, header_too_large, "
                              "header_timeout, idle_timeout", ["reason"])
OVERLOAD = Counter("refund_edge_overload", "Requests answered 9001 at once because too many were in flight")
RATE_LIMITED = Counter("refund_edge_rate_limited", "Requests answered 9002 (HTTP 429): a merchant over its rate limit")

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


def exposition() -> bytes:
    return prometheus_client.generate_latest()
