"""The floor of a gRPC round trip: a grpc.aio server with a trivial
RefundService whose Refund answers a canned, pre-built RefundResponse of the
size of a real one, without touching a database. It is run like
refund-service (same server construction, same event loop), so that what the
real service spends beyond this is what the refund itself costs.

Prints `trivial-server listening on HOST:PORT`; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from datetime import UTC, datetime

import grpc

from refund.v1 import refund_pb2, refund_pb2_grpc
from service import domain, server
from service.grpc_api import order_message, transaction_message

NOW = datetime(2026, 11, 26, 11, 41, 19, tzinfo=UTC)
ORDER = domain.Order(1_000_001, 8_000_001, "bench-1000001", "HKD", 1000, "REFUNDED", "VISA", NOW, NOW)
REFUND = domain.Transaction(9_999_999, 8_000_001, 1_000_001, "REFUND", "HKD", 1000, "SUCCESS", "411111******1111",
                            "999999", NOW)


class TrivialRefundService(refund_pb2_grpc.RefundServiceServicer):
    def __init__(self):
        self.answer = refund_pb2.RefundResponse(response_code="0000", order=order_message(ORDER),
                                                transaction=transaction_message(REFUND))

    async def Refund(self, request, context):
        return self.answer


async def serve(address: str) -> None:
    options = getattr(server, "SERVER_OPTIONS", [("grpc.so_reuseport", 0)])
    grpc_server = grpc.aio.server(options=options)
    refund_pb2_grpc.add_RefundServiceServicer_to_server(TrivialRefundService(), grpc_server)
    port = grpc_server.add_insecure_port(address)
    await grpc_server.start()
    print(f"trivial-server listening on {address.rsplit(':', 1)[0]}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await grpc_server.stop(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args(argv)
    run = getattr(server, "run_event_loop", asyncio.run)  # the service's own event loop choice
    run(serve(args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
