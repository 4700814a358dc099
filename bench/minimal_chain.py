"""The floor of the whole chain: the issue's "minimal chain" (a raw ASGI edge
-> grpc.aio -> RSA verify + one asyncpg statement), built from the same parts
as the real one and nothing else.

    python -m bench.minimal_chain service --database-url URL   # prints "minimal-service listening on H:P"
    python -m bench.minimal_chain edge --grpc-target H:P        # prints "minimal-edge listening on H:P"

The service verifies `signature` over the `request` bytes with the merchant's
key (all active keys are read once, at start) and runs the service's own
one-statement refund (PostgresStore.try_refund, guarded by the key id as
the real path is), answering the order and the refund transaction. The edge parses
the envelope with the standard json module and renders the answer's main fields.

What it leaves out, and the real chain has: strict JSON (duplicate keys, Decimal
numbers), every error path and its response code, deadlines, request ids, log
lines, metrics, the interceptor, the declines' read-decide-apply path,
Idempotency-Key, the replay window, re-reading keys. It answers only approved
refunds correctly: it is a measuring stick, not a service.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import socket

import asyncpg
import grpc
import uvicorn
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from sqlalchemy.engine import make_url

from refund.v1 import refund_pb2, refund_pb2_grpc
from service import domain, server
from service.grpc_api import order_message, transaction_message
from service.stores.port import SignedBy
from service.stores.postgres import PostgresStore


class MinimalService(refund_pb2_grpc.RefundServiceServicer):
    def __init__(self, store: PostgresStore, keys: dict):
        self.store, self.keys = store, keys

    async def MerchantRefund(self, request, context):
        fields = json.loads(request.request)
        merchant_id = int(fields["merchantId"])
        key_id, key = self.keys[merchant_id]
        key.verify(base64.b64decode(request.signature), request.request, padding.PKCS1v15(), hashes.SHA256())
        command = domain.RefundCommand(merchant_id, int(fields["orderId"]), None, str(fields["amount"]))
        result = (await self.store.try_refund(command, SignedBy(key_id))).applied
        if result is None:  # not approved as things stand: out of its scope
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not refunded")
        return refund_pb2.MerchantRefundResponse(response_code="0000", order=order_message(result.order),
                                                 transaction=transaction_message(result.transaction))


async def serve_service(database_url: str, address: str) -> None:
    url = make_url(database_url)
    pool = await asyncpg.create_pool(host=url.host or "127.0.0.1", port=url.port or 5432, user=url.username,
                                     password=url.password, database=url.database, min_size=2, max_size=20)
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT merchant_id, key_id, public_key_pem FROM merchant_keys WHERE active")
    keys = {r["merchant_id"]: (r["key_id"], serialization.load_pem_public_key(r["public_key_pem"].encode()))
            for r in rows}
    grpc_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    refund_pb2_grpc.add_RefundServiceServicer_to_server(MinimalService(PostgresStore(pool, 5.0), keys), grpc_server)
    port = grpc_server.add_insecure_port(address)
    await grpc_server.start()
    print(f"minimal-service listening on {address.rsplit(':', 1)[0]}:{port}", flush=True)
    await _until_stopped()
    await grpc_server.stop(1)
    await pool.close()


class MinimalEdge:
    def __init__(self, target: str):
        self.target = target
        self.stub = None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if self.stub is None:
            self.stub = refund_pb2_grpc.RefundServiceStub(grpc.aio.insecure_channel(self.target))
        envelope = json.loads(body)
        reply = await self.stub.MerchantRefund(refund_pb2.MerchantRefundRequest(
            request=envelope["request"].encode(), signature=envelope["signature"]), timeout=10)
        answer = {"responseCode": reply.response_code, "message": "SUCCESS",
                  "order": {"orderId": reply.order.id, "status": reply.order.status, "amount": reply.order.amount},
                  "transaction": {"transactionId": reply.transaction.id, "amount": reply.transaction.amount,
                                  "stan": reply.transaction.stan}}
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(answer, separators=(",", ":")).encode()})


def serve_edge(target: str, address: str) -> None:
    host, _, port = address.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(2048)  # before saying so: the bench connects as soon as it reads the line
    print(f"minimal-edge listening on {host}:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(MinimalEdge(target), loop="uvloop", http="httptools", ws="none", lifespan="on",
                            log_config=None, log_level="warning", access_log=False, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["service", "edge"])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--database-url")
    parser.add_argument("--grpc-target")
    args = parser.parse_args(argv)
    if args.role == "service":
        server.run_event_loop(serve_service(args.database_url, args.listen))
    else:
        serve_edge(args.grpc_target, args.listen)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
