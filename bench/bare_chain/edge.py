"""The bare chain's edge: a raw ASGI app on uvicorn (httptools, uvloop). It parses
the envelope of POST /direct/refund, calls the service's `Refund` with the signed
bytes and answers a small JSON in the project's shape (the amount a JSON number):

    {"responseCode":"0000","message":"SUCCESS","order":{"orderId":10000000,"status":"REFUNDED"},
     "transaction":{"transactionId":1,"amount":10.00}}
    {"responseCode":"3002","message":"DECLINED"}

Nothing else: no strict parsing, limits, request ids, logs, metrics or error answers.
"""

from __future__ import annotations

import json

import grpc

from bench.bare_chain import wire
from bench.bare_chain.workload import serve_asgi

_JSON = [(b"content-type", b"application/json")]


class BareEdge:
    def __init__(self, target: str):
        self.target = target
        self.refund = None  # the stub, made on the server's own event loop

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                self.refund = wire.stub(grpc.aio.insecure_channel(self.target))
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["method"] != "POST" or scope["path"] != "/direct/refund":
            await send({"type": "http.response.start", "status": 404, "headers": _JSON})
            await send({"type": "http.response.body", "body": b'{"responseCode":"1001","message":"NOT FOUND"}'})
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        envelope = json.loads(body)
        reply = await self.refund(wire.RefundRequest(request=envelope["request"].encode(),
                                                     signature=envelope["signature"]), timeout=10)
        if reply.response_code == "0000":
            answer = (f'{{"responseCode":"0000","message":"SUCCESS","order":{{"orderId":{reply.order_id},'
                      f'"status":"{reply.order_status}"}},"transaction":{{"transactionId":{reply.transaction_id},'
                      f'"amount":{reply.amount}}}}}')
        else:
            answer = f'{{"responseCode":"{reply.response_code}","message":"DECLINED"}}'
        await send({"type": "http.response.start", "status": 200, "headers": _JSON})
        await send({"type": "http.response.body", "body": answer.encode()})


def serve(target: str, address: str) -> None:
    """Serve until SIGTERM or SIGINT; prints "bare-edge listening on HOST:PORT" once it accepts."""
    serve_asgi(BareEdge(target), address, "bare-edge")
