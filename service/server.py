"""`refund-service`: the gRPC server.

Serves refund.v1.RefundService, grpc.health.v1.Health and server reflection.
On SIGTERM or SIGINT it drains: health turns NOT_SERVING, new calls are
refused, calls in flight get up to the grace period to finish.

Logs are JSON lines on stderr, one per call (with the caller's x-request-id).
With --tls-cert/--tls-key it serves TLS, and with --tls-ca too it requires
client certificates signed by that CA (mutual TLS). With --metrics-listen it
serves Prometheus metrics at http://HOST:PORT/metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from refund.v1 import refund_pb2, refund_pb2_grpc
from service import config, metrics, telemetry, tracing
from service.grpc_api import RefundServicer
from service.store import StoreUnavailable, open_store

log = logging.getLogger("refund-service")

SERVICE_NAME = refund_pb2.DESCRIPTOR.services_by_name["RefundService"].full_name


async def create_server(address: str, store, *, db_timeout: float = 5.0,
                        credentials: grpc.ServerCredentials | None = None):
    """A started-to-be server bound to `address` (TLS with `credentials`);
    returns (server, health servicer, port)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=[metrics.TelemetryInterceptor()])
    refund_pb2_grpc.add_RefundServiceServicer_to_server(RefundServicer(store, db_timeout), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, health_servicer, port


def server_credentials(ca: str | None, cert: str | None, key: str | None) -> grpc.ServerCredentials | None:
    """TLS from PEM files: none without a certificate; client certificates
    signed by `ca` required when `ca` is given (mutual TLS)."""
    if not cert and not key:
        if ca:
            raise ValueError("--tls-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together")
    pair = (Path(key).read_bytes(), Path(cert).read_bytes())
    root = Path(ca).read_bytes() if ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=root, require_client_auth=root is not None)


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
        credentials = server_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    except OSError as exc:
        log.error("cannot read a TLS file: %s: %s", exc.filename, exc.strerror)
        await store.close()
        return 1
    except ValueError as exc:
        log.error("cannot set up TLS: %s", exc)
        await store.close()
        return 1
    try:
        server, health_servicer, port = await create_server(address, store, db_timeout=args.db_timeout,
                                                            credentials=credentials)
    except (OSError, RuntimeError) as exc:
        log.error("cannot listen on %s: %s", address, exc)
        await store.close()
        return 1
    if args.metrics_listen:
        try:
            metrics_address = metrics.serve_metrics(args.metrics_listen)
        except (OSError, ValueError) as exc:
            log.error("cannot serve metrics on %s: %s", args.metrics_listen, exc)
            await store.close()
            return 1
        print(f"refund-service metrics on http://{metrics_address}/metrics", flush=True)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    tls = "mutual TLS" if args.tls_ca else "TLS" if credentials else "plaintext"
    print(f"refund-service listening on {bound_address(address, port)} "
          f"({tls}, database {config.redact(url)})", flush=True)

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
    env = os.environ.get
    parser.add_argument("--tls-cert", default=env("REFUND_GRPC_TLS_CERT"),
                        help="PEM certificate (chain) to serve TLS with (env REFUND_GRPC_TLS_CERT; default plaintext)")
    parser.add_argument("--tls-key", default=env("REFUND_GRPC_TLS_KEY"),
                        help="PEM private key of --tls-cert (env REFUND_GRPC_TLS_KEY)")
    parser.add_argument("--tls-ca", default=env("REFUND_GRPC_TLS_CA"),
                        help="PEM CA certificate(s): require client certificates signed by it, i.e. mutual TLS "
                             "(env REFUND_GRPC_TLS_CA)")
    parser.add_argument("--metrics-listen", default=env("REFUND_METRICS_LISTEN"),
                        help="HOST:PORT to serve Prometheus metrics on at /metrics (env REFUND_METRICS_LISTEN; "
                             "default off; port 0 picks a free port)")
    parser.add_argument("--log-level", default=env("REFUND_LOG_LEVEL") or "info",
                        choices=["debug", "info", "warning", "error"],
                        help="info logs one line per call (env REFUND_LOG_LEVEL, default info)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    telemetry.configure_logging(args.log_level)
    if not tracing.start_from_environment("refund-service"):  # off unless OTEL_* asks (docs/operations.md)
        return 1
    return run_event_loop(serve(args))


def run_event_loop(main_coroutine):
    """Run the service on uvloop: grpc.aio and asyncpg both work on it, and each
    call costs less CPU than on asyncio's default loop (docs/performance.md)."""
    import uvloop

    return uvloop.run(main_coroutine)


if __name__ == "__main__":
    sys.exit(main())
