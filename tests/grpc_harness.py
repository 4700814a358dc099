"""An in-process refund gRPC server on a free port, run on its own event loop
thread, for tests that call it with an ordinary (sync) gRPC client."""

from __future__ import annotations

import asyncio
import threading

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from refund.v1 import refund_pb2, refund_pb2_grpc
from service.server import create_server
from service.stores import open_store


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
