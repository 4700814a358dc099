"""refund-edge's Prometheus metrics, served at GET /metrics (see docs/operations.md).

    refund_edge_requests_total{path, status}            HTTP requests answered, by HTTP status
    refund_edge_refunds_total{response_code}            POST /direct/refund answers by response code
    refund_edge_queries_total{response_code}            POST /direct/query answers by response code
    refund_edge_request_duration_seconds{path}          time from request to answer (histogram)
    refund_edge_requests_in_flight                      requests being answered now
    refund_edge_backend_failures_total{response_code}   answers 9001 / 9999: the service unreachable, slow or failing

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

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


def exposition() -> bytes:
    return prometheus_client.generate_latest()
