"""`refund-service`: the gRPC server.

Serves refund.v1.RefundService, grpc.health.v1.Health and server reflection.
On SIGTERM or SIGINT it drains: health turns NOT_SERVING, new calls are
refused, calls in flight get up to the grace period to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from refund.v1 import refund_pb2, refund_pb2_grpc
from service import config
from service.grpc_api import RefundServicer
from service.store import StoreUnavailable, open_store

log = logging.getLogger("refund-service")

SERVICE_NAME = refund_pb2.DESCRIPTOR.services_by_name["RefundService"].full_name


async def create_server(address: str, store, *, db_timeout: float = 5.0):
    """A started-to-be server bound to `address`; returns (server, health servicer, port)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    refund_pb2_grpc.add_RefundServiceServicer_to_server(RefundServicer(store, db_timeout), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, health_servicer, port


def bound_address(address: str, port: int) -> str:
    host = address.rsplit(":", 1)[0]
    return f"{host}:{port}"


async def serve(args) -> int:
    url = config.database_url(args.database_url)
    try:
        store = await open_store(url, command_timeout=args.db_timeout)
    except (StoreUnavailable, ValueError) as exc:
        log.error("cannot open the database %s: %s", config.redact(url), exc)
        return 1
    address = config.grpc_listen(args.listen)
    try:
        server, health_servicer, port = await create_server(address, store, db_timeout=args.db_timeout)
    except (OSError, RuntimeError) as exc:
        log.error("cannot listen on %s: %s", address, exc)
        await store.close()
        return 1
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(f"refund-service listening on {bound_address(address, port)} "
          f"(database {config.redact(url)})", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    log.info("draining: health NOT_SERVING, new calls refused, %.1fs grace for calls in flight", args.grace)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(args.grace)
    await store.close()
    log.info("stopped")
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="refund-service", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", help=f"address to listen on (env REFUND_GRPC_LISTEN, default "
                                         f"{config.DEFAULT_GRPC_LISTEN}; port 0 picks a free port)")
    parser.add_argument("--database-url", help="SQLAlchemy database URL (env REFUND_DATABASE_URL, default "
                                               f"{config.DEFAULT_DATABASE_URL})")
    parser.add_argument("--db-timeout", type=float, default=config.env_float("REFUND_DB_TIMEOUT", 5.0),
                        help="seconds a database call may take before the answer is UNAVAILABLE "
                             "(env REFUND_DB_TIMEOUT, default 5)")
    parser.add_argument("--grace", type=float, default=config.env_float("REFUND_SHUTDOWN_GRACE", 10.0),
                        help="seconds calls in flight get to finish on SIGTERM (env REFUND_SHUTDOWN_GRACE, default 10)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
