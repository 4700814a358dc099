"""The service inside the test process: `InProcessService` (refund-service's
gRPC server on its own event loop thread, for tests that call it with an
ordinary sync gRPC client), the decoding of its rich errors, fake back ends for
the edge (a gRPC server with a RefundService that misbehaves on purpose), the
service's server with the edge's ASGI app in one process, and `with_store`, a
store of the service's own kind used directly."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent import futures

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from gateway_edge.app import EdgeApp
from refund.v1 import refund_pb2, refund_pb2_grpc
from service import tracing
from service.server import create_server
from service.stores import open_store
from tests.support.keys import example_key, signed_body

BACKEND_SERVICE = "refund.v1.RefundService"


class InProcessService:
    def __init__(self, database_url: str, db_timeout: float = 5.0, **store_options):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.store, self.server, self.health, port = self._run(
            self._start(database_url, db_timeout, store_options))
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = refund_pb2_grpc.RefundServiceStub(self.channel)

    def _run(self, coroutine, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _start(self, database_url, db_timeout, store_options):
        store = await open_store(database_url, command_timeout=db_timeout, **store_options)
        server, health, port = await create_server("127.0.0.1:0", store, db_timeout=db_timeout)
        await server.start()
        await health.set_ready(True)
        return store, server, health, port

    def close(self):
        self.channel.close()

        async def stop():
            await self.server.stop(1)
            await self.store.close()

        self._run(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def error_info(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, refund_pb2.RefundDecline | None]:
    """The ErrorInfo (exactly one) and the RefundDecline (if any) of a rich error."""
    status = rpc_status.from_call(error)
    assert status is not None, "error without google.rpc.Status details"
    infos, declines = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(refund_pb2.RefundDecline.DESCRIPTOR):
            decline = refund_pb2.RefundDecline()
            detail.Unpack(decline)
            declines.append(decline)
    assert len(infos) == 1, "a rich error carries exactly one ErrorInfo"
    return infos[0], (declines[0] if declines else None)


# -- fake back ends -----------------------------------------------------------


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class FakeRefundService(refund_pb2_grpc.RefundServiceServicer):
    """MerchantRefund answers as `behaviour` says: "slow" (waits until released),
    "internal" (INTERNAL, no ErrorInfo), "rich_system_error", "rich_unavailable",
    "unknown_reason", "foreign_domain" (an ErrorInfo of another domain),
    "bad_amount" (a success the edge cannot show exactly), "resource_exhausted"."""

    SECRET = "db password hunter2 at /srv/refund/store.py line 42"

    def __init__(self, behaviour: str):
        self.behaviour = behaviour
        self.release = threading.Event()
        self.calls = 0

    def MerchantRefund(self, request, context):
        self.calls += 1
        behaviour = self.behaviour
        if behaviour == "slow":
            self.release.wait(30)
            context.abort(grpc.StatusCode.INTERNAL, "too late")
        if behaviour == "internal":
            context.abort(grpc.StatusCode.INTERNAL, self.SECRET)
        if behaviour == "resource_exhausted":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.SECRET)
        rich = {"rich_system_error": ("SYSTEM_ERROR", code_pb2.INTERNAL),
                "rich_unavailable": ("SERVICE_UNAVAILABLE", code_pb2.UNAVAILABLE),
                "unknown_reason": ("DISK_ON_FIRE", code_pb2.INTERNAL),
                "foreign_domain": ("ORDER_NOT_FOUND", code_pb2.NOT_FOUND)}
        if behaviour in rich:
            reason, code = rich[behaviour]
            info = error_details_pb2.ErrorInfo(
                reason=reason, domain="elsewhere.example" if behaviour == "foreign_domain" else "refund.gateway")
            context.abort_with_status(rpc_status.to_status(
                status_pb2.Status(code=code, message=self.SECRET, details=[_pack(info)])))
        if behaviour == "bad_amount":
            return refund_pb2.MerchantRefundResponse(
                response_code="0000",
                order=refund_pb2.Order(id=1, merchant_id="1", merchant_reference="r", currency="HKD", amount="76.1",
                                       status="REFUNDED"),
                transaction=refund_pb2.Transaction(id=2, merchant_id="1", type="REFUND", currency="HKD",
                                                   amount="7.619e1", status="SUCCESS", stan="000001"))
        raise AssertionError(f"unknown behaviour {behaviour}")


class FakeBackend:
    """A gRPC server in this test process with a fake RefundService and a
    health service whose status the test sets."""

    def __init__(self, behaviour: str, serving: bool = True):
        self.servicer = FakeRefundService(behaviour)
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        refund_pb2_grpc.add_RefundServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.set_serving(serving)
        self.server.start()

    def set_serving(self, serving: bool):
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", BACKEND_SERVICE):
            self.health.set(name, status)

    def stop(self):
        self.servicer.release.set()
        self.server.stop(0).wait(5)


# -- service and edge in one process (tests/e2e/test_tracing.py) ----------------

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


def with_store(database_url: str, work, **store_options):
    """`await work(store)` with a store opened on `database_url` as refund-service
    opens it (closed afterwards), in an event loop of its own; what `work` returned."""
    async def main():
        store = await open_store(database_url, **store_options)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(main())


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

