"""`refund-service`: the gRPC server.

Serves refund.v1.RefundService, grpc.health.v1.Health and server reflection.
At start it checks its settings, TLS files and database (reachable, migrated to
this version's head) and exits with a documented status and one JSON log line
when one is wrong (service.startup). Health readiness follows the database
(service.readiness). On SIGTERM or SIGINT it drains: health turns NOT_SERVING,
after --pre-stop seconds open health watches end and new calls are refused,
calls in flight get up to the grace period to finish. TLS files are reloaded
when they change and on SIGHUP (service.tls).

Logs are JSON lines on stderr, one per call (with the caller's x-request-id).
With --tls-cert/--tls-key it serves TLS, and with --tls-ca too it requires
client certificates signed by that CA (mutual TLS). With --metrics-listen it
serves Prometheus metrics at http://HOST:PORT/metrics.
"""

from __future__ import annotations

# isort: off
from service import native_logs  # noqa: F401  (first: quiets gRPC core before grpc is imported)
# isort: on

import asyncio
import logging
import os
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from refund.v1 import refund_pb2, refund_pb2_grpc
from service import config, events, metrics, readiness, startup, telemetry, tracing
from service.grpc_api import DecodingInterceptor, RefundServicer
from service.startup import StartupError
from service.stores import group_commit, open_store
from service.stores.port import StoreUnavailable

log = logging.getLogger("refund-service")

SERVICE_NAME = refund_pb2.DESCRIPTOR.services_by_name["RefundService"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def reflection_v1(service_names) -> grpc.GenericRpcHandler:
    """grpc.reflection.v1 (what current grpcurl and Postman ask first): the
    same messages as v1alpha under another package name, so v1alpha's servicer
    answers it."""
    servicer = reflection.aio.ReflectionServicer(service_names)
    info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    return grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": info})


async def create_server(address: str, store, *, db_timeout: float = 5.0,
                        credentials: grpc.ServerCredentials | None = None):
    """A started-to-be server bound to `address` (TLS with `credentials`);
    returns (server, health servicer, port). Readiness starts NOT_SERVING."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)],
                             interceptors=[metrics.TelemetryInterceptor(), DecodingInterceptor()])
    refund_pb2_grpc.add_RefundServiceServicer_to_server(RefundServicer(store, db_timeout), server)
    health_servicer = readiness.ServiceHealth(("", SERVICE_NAME))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    served = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME, REFLECTION_V1)
    reflection.enable_server_reflection(served, server)
    server.add_generic_rpc_handlers((reflection_v1(served),))
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, health_servicer, port


def service_tls(args):
    """service.tls.ServiceTls from the flags, None for plaintext; StartupError when unusable."""
    if not args.tls_cert and not args.tls_key:
        if args.tls_ca:
            raise StartupError("--tls-ca needs --tls-cert and --tls-key", startup.EXIT_USAGE)
        return None
    if not (args.tls_cert and args.tls_key):
        raise StartupError("--tls-cert and --tls-key go together", startup.EXIT_USAGE)
    from service.tls import ServiceTls

    return ServiceTls(args.tls_cert, args.tls_key, args.tls_ca, allow_expired=args.allow_expired_certificate)


def bound_address(address: str, port: int) -> str:
    host = address.rsplit(":", 1)[0]
    return f"{host}:{port}"


async def serve(args) -> int:
    """Check, listen, serve until SIGTERM/SIGINT, drain; the exit status (service.startup)."""
    url = args.database_url
    where = config.redact(url)
    waiting = False
    try:
        tls = service_tls(args)
        try:
            warning = await startup.check_database(url, args.db_timeout)
        except StartupError as exc:
            if not (exc.transient and args.wait_for_database > 0):
                raise
            log.warning("%s: listening NOT_SERVING, waiting up to %gs for it", exc, args.wait_for_database)
            waiting, warning = True, None
        if warning:
            log.warning("%s", warning)
        store = await open_store(url, command_timeout=args.db_timeout, connect=not waiting, lanes=args.db_lanes)
    except StartupError as exc:
        return startup.refuse(log, exc)
    except (StoreUnavailable, ValueError) as exc:
        return startup.refuse(log, StartupError(f"cannot open the database {where}: {exc}", startup.EXIT_DATABASE))
    try:
        return await _serve(args, store, tls, waiting)
    finally:
        await store.close()


async def _serve(args, store, tls, waiting: bool) -> int:
    url, address = args.database_url, args.listen
    credentials = tls.credentials if tls else None
    try:
        server, health_servicer, port = await create_server(address, store, db_timeout=args.db_timeout,
                                                            credentials=credentials)
    except (OSError, RuntimeError) as exc:
        return startup.refuse(log, StartupError(f"cannot listen on {address}: {exc}", startup.EXIT_FAULT))
    if args.metrics_listen:
        try:
            metrics_address = metrics.serve_metrics(args.metrics_listen)
            metrics.watch_group_commit(getattr(store, "group_commit", None))
        except (OSError, ValueError) as exc:
            return startup.refuse(log, StartupError(f"cannot serve metrics on {args.metrics_listen}: {exc}",
                                                    startup.EXIT_FAULT))
        startup.announce("refund-service", f"refund-service metrics on http://{metrics_address}/metrics",
                         metrics_address=metrics_address)
    if not waiting:
        await health_servicer.set_ready(True)
    await server.start()
    mode = "mutual TLS" if args.tls_ca else "TLS" if tls else "plaintext"
    shown = bound_address(address, port)
    startup.announce("refund-service", f"refund-service listening on {shown} ({mode}, database {config.redact(url)})",
                     address=shown, tls=mode, ready=health_servicer.ready)

    schema_checked = not waiting

    async def probe():
        nonlocal schema_checked
        if schema_checked:
            await store.ping()
            return
        warning = await startup.check_database(url, args.db_timeout)
        if warning:
            log.warning("%s", warning)
        schema_checked = True

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tasks = [asyncio.create_task(readiness.follow_database(health_servicer, probe, interval=args.readiness_interval,
                                                           timeout=args.db_timeout))]
    if waiting:
        tasks.append(asyncio.create_task(_give_up_waiting(health_servicer, args.wait_for_database)))
    if tls:
        tasks.append(asyncio.create_task(_follow_tls_files(tls, args.tls_reload_interval)))
        loop.add_signal_handler(signal.SIGHUP, lambda: tls.reload_if_changed(forced=True))
    else:  # SIGHUP means "reload": never let it stop the process
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP: no TLS files to reload"))
    stopping = asyncio.create_task(stop.wait())
    failure, pending = None, {stopping, *tasks}
    while failure is None and not stopping.done():  # until a signal, or a task fails (a task may also just end)
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        failure = next((task.exception() for task in done if task is not stopping and task.exception()), None)
    for task in tasks:
        task.cancel()
    if failure is not None:
        stopping.cancel()
        error = failure if isinstance(failure, StartupError) else StartupError(
            telemetry.describe_exception(failure), startup.EXIT_FAULT)
        await server.stop(0)
        return startup.refuse(log, error)

    log.info("draining: health NOT_SERVING, %.1fs pre-stop, then new calls refused and %.1fs grace for calls "
             "in flight", args.pre_stop, args.grace)
    await health_servicer.enter_graceful_shutdown()
    if args.pre_stop > 0:
        await asyncio.sleep(args.pre_stop)
    await health_servicer.end_watches()
    events.drain()  # WatchEvents streams end (OK); their callers resume elsewhere from their cursor
    await server.stop(args.grace)
    log.info("stopped")
    return startup.EXIT_STOPPED


async def _give_up_waiting(health_servicer, limit: float) -> None:
    """StartupError (exit 3) when the database has not answered within `limit` seconds of the start."""
    deadline = asyncio.get_running_loop().time() + limit
    while not health_servicer.ready:
        if asyncio.get_running_loop().time() >= deadline:
            raise StartupError(f"the database did not answer within --wait-for-database {limit:g}s",
                               startup.EXIT_DATABASE)
        await asyncio.sleep(0.1)


async def _follow_tls_files(tls, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        tls.reload_if_changed()


def parse_args(argv=None):
    parser = startup.JsonArgumentParser(prog="refund-service", description=__doc__.splitlines()[0])
    env = startup.from_env
    seconds, positive = startup.seconds, startup.positive_seconds
    parser.add_argument("--listen", default=config.grpc_listen(),
                        help=f"address to listen on (env REFUND_GRPC_LISTEN, default "
                             f"{config.DEFAULT_GRPC_LISTEN}; port 0 picks a free port)")
    parser.add_argument("--database-url", type=startup.database_url,
                        default=env(parser, "REFUND_DATABASE_URL", startup.database_url, config.DEFAULT_DATABASE_URL),
                        help=f"database URL: {config.EXPECTED_FORMS} (env REFUND_DATABASE_URL, default "
                             f"{config.DEFAULT_DATABASE_URL}); the file or database must exist and be migrated "
                             "(`refund-admin migrate`)")
    parser.add_argument("--db-timeout", type=positive, default=env(parser, "REFUND_DB_TIMEOUT", positive, 5.0),
                        help="seconds a database call may take before the answer is UNAVAILABLE "
                             "(env REFUND_DB_TIMEOUT, default 5)")
    parser.add_argument("--db-lanes", type=startup.lanes,
                        default=env(parser, "REFUND_DB_LANES", startup.lanes, group_commit.LANES),
                        help="PostgreSQL: refund transactions this process runs at once; refunds arriving "
                             "meanwhile go together in the next, one per lane (env REFUND_DB_LANES, 1-64, default "
                             f"{group_commit.LANES})")
    parser.add_argument("--wait-for-database", type=seconds,
                        default=env(parser, "REFUND_WAIT_FOR_DATABASE", seconds, 0.0),
                        help="when the database is unreachable at start, listen NOT_SERVING and wait this many "
                             "seconds for it before exiting 3 (env REFUND_WAIT_FOR_DATABASE, default 0: exit at once)")
    parser.add_argument("--readiness-interval", type=positive,
                        default=env(parser, "REFUND_READINESS_INTERVAL", positive, 1.0),
                        help="seconds between database probes behind health readiness "
                             "(env REFUND_READINESS_INTERVAL, default 1)")
    parser.add_argument("--pre-stop", type=seconds, default=env(parser, "REFUND_PRE_STOP", seconds, 0.0),
                        help="seconds health answers NOT_SERVING after SIGTERM while calls are still taken, before "
                             "the listener closes (env REFUND_PRE_STOP, default 0)")
    parser.add_argument("--grace", type=seconds, default=env(parser, "REFUND_SHUTDOWN_GRACE", seconds, 10.0),
                        help="seconds calls in flight get to finish on SIGTERM (env REFUND_SHUTDOWN_GRACE, default 10)")
    getenv = os.environ.get
    parser.add_argument("--tls-cert", default=getenv("REFUND_GRPC_TLS_CERT"),
                        help="PEM certificate (chain) to serve TLS with (env REFUND_GRPC_TLS_CERT; default plaintext)")
    parser.add_argument("--tls-key", default=getenv("REFUND_GRPC_TLS_KEY"),
                        help="PEM private key of --tls-cert (env REFUND_GRPC_TLS_KEY)")
    parser.add_argument("--tls-ca", default=getenv("REFUND_GRPC_TLS_CA"),
                        help="PEM CA certificate(s): require client certificates signed by it, i.e. mutual TLS "
                             "(env REFUND_GRPC_TLS_CA)")
    parser.add_argument("--tls-reload-interval", type=positive,
                        default=env(parser, "REFUND_TLS_RELOAD_INTERVAL", positive, 5.0),
                        help="seconds between looks at the TLS files; changed files are used for new handshakes "
                             "(also on SIGHUP) (env REFUND_TLS_RELOAD_INTERVAL, default 5)")
    parser.add_argument("--allow-expired-certificate", action="store_true",
                        default=env(parser, "REFUND_ALLOW_EXPIRED_CERTIFICATE", startup.flag, False),
                        help="serve an expired --tls-cert (with a warning) instead of exiting 5 "
                             "(env REFUND_ALLOW_EXPIRED_CERTIFICATE=1)")
    parser.add_argument("--metrics-listen", default=getenv("REFUND_METRICS_LISTEN"),
                        help="HOST:PORT to serve Prometheus metrics on at /metrics (env REFUND_METRICS_LISTEN; "
                             "default off; port 0 picks a free port)")
    startup.add_log_level(parser, "one line per call")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    telemetry.configure_logging("info")
    startup.install_json_excepthooks(log)
    args = parse_args(argv)
    telemetry.configure_logging(args.log_level)
    if not tracing.start_from_environment("refund-service"):  # off unless OTEL_* asks (docs/operations.md)
        return startup.EXIT_USAGE  # an unusable OTEL_* value, logged
    return run_event_loop(serve(args))


def run_event_loop(main_coroutine):
    """Run the service on uvloop: grpc.aio and asyncpg both work on it, and each
    call costs less CPU than on asyncio's default loop (docs/performance.md)."""
    import uvloop

    return uvloop.run(main_coroutine)


if __name__ == "__main__":
    sys.exit(main())
