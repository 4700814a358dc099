"""refund-service's gRPC server and refund-edge's ASGI app in one process, one
signed refund between them over loopback gRPC (tests/test_tracing.py). Imports
nothing of OpenTelemetry: the tracing-off test checks that a refund does not either."""

from __future__ import annotations

import json

from gateway_edge.app import EdgeApp
from service import tracing
from service.server import create_server
from service.stores import open_store
from tests.conftest import FIXTURES_DIR
from tests.edge_fixtures import example_key, signed_body


def example_fixtures() -> dict:
    return json.loads((FIXTURES_DIR / "fixtures.example.json").read_text())


CARD_NUMBER = "4111111111111111"
REQUEST_ID = "trace-test-0001"
# A trace context a merchant sends, sampled: the edge must not continue it.
MERCHANT_TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
MERCHANT_TRACEPARENT = f"00-{MERCHANT_TRACE_ID:032x}-b7ad6b7169203331-01"


def refund_body(order_id: int = 1076, amount: str = "76.19") -> tuple[bytes, str]:
    """A signed refund carrying a card number in a field the gateway ignores; (body, signature)."""
    request = f'{{"merchantId":"3000001","orderId":{order_id},"amount":{amount},"note":"{CARD_NUMBER}"}}'
    body = signed_body(example_key(), request)
    return body, json.loads(body)["signature"]


async def call_asgi(app, body: bytes) -> tuple[int, bytes]:
    """One POST /direct/refund through the ASGI app, as uvicorn would call it."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/direct/refund", "raw_path": b"/direct/refund", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
             "headers": [(b"host", b"127.0.0.1:8080"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()), (b"x-request-id", REQUEST_ID.encode()),
                         (b"traceparent", MERCHANT_TRACEPARENT.encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def refund_in_one_process(database_url: str, body: bytes) -> tuple[int, bytes]:
    """refund-service's server and refund-edge's app in this process, talking gRPC over loopback."""
    store = await open_store(database_url, command_timeout=5.0)
    server, _health, port = await create_server("127.0.0.1:0", store)
    await server.start()
    edge = EdgeApp(f"127.0.0.1:{port}")
    try:
        return await call_asgi(tracing.wrap_asgi(edge), body)
    finally:
        await edge.close()
        await server.stop(None)
        await store.close()
