"""`refund-edge`: the merchant HTTP/JSON edge (raw ASGI on uvicorn + httptools + uvloop).

Listens on --listen / REFUND_HTTP_LISTEN, calls refund-service at
--grpc-target / REFUND_GRPC_TARGET with a deadline of --deadline /
REFUND_EDGE_DEADLINE seconds. Prints `refund-edge listening on HOST:PORT` once
it accepts connections. On SIGTERM or SIGINT it stops accepting, lets the
requests in flight finish (each is bounded by the deadline) and exits 0.
Logs are JSON lines on stderr. Optional: HTTPS (--tls-cert/--tls-key), TLS or
mutual TLS to the service (--grpc-tls-*), signed responses (--signing-key),
Prometheus metrics on a listener of their own (--metrics-listen; off by default).
Limits on connections, request heads, time and requests in flight, the
per-merchant rate limit and the vendor's HTTP-200 mode: docs/edge.md.
"""

from __future__ import annotations

# isort: off
from service import native_logs  # noqa: F401  (first: quiets gRPC core before grpc is imported)
# isort: on

import argparse
import contextlib
import logging
import os
import resource
import signal
import socket
import sys

import uvicorn

from gateway_edge import limits, policy
from gateway_edge import startup as edge_startup
from gateway_edge.app import DEFAULT_BODY_TIMEOUT, DEFAULT_DEADLINE, EdgeApp
from service import startup, telemetry, tracing
from service.startup import StartupError

log = logging.getLogger("refund-edge")

DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"
DEFAULT_GRPC_TARGET = "127.0.0.1:50051"
DEFAULT_RATE_LIMIT = "50/100"
# File descriptors kept free beyond the connection cap: the gRPC channel, logs, the metrics listener.
SPARE_FILE_DESCRIPTORS = 64


def split_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def bind(address: str) -> socket.socket:
    host, port = split_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def shown(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class EdgeServer(uvicorn.Server):
    """uvicorn's server, announcing the bound address and exiting 0 after a
    graceful stop (uvicorn re-raises the signal by default)."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket, tls=None, tls_reload_interval: float = 5.0):
        super().__init__(config)
        self.sock = sock
        self.tls = tls
        self.tls_reload_interval = tls_reload_interval
        self._tls_task = None

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started:
            scheme = "https" if self.tls else "http"
            self._tls_task = edge_startup.follow_tls_files(self.tls, self.tls_reload_interval)
            startup.announce("refund-edge", f"refund-edge listening on {shown(self.sock)} ({scheme})",
                             address=shown(self.sock), scheme=scheme)

    async def shutdown(self, sockets=None):
        if self._tls_task is not None:
            self._tls_task.cancel()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def parse_args(argv=None):
    env = os.environ.get
    parser = startup.JsonArgumentParser(prog="refund-edge", description=__doc__.splitlines()[0])
    from_env, positive = startup.from_env, startup.positive_seconds
    parser.add_argument("--listen", default=env("REFUND_HTTP_LISTEN") or DEFAULT_HTTP_LISTEN,
                        help=f"HOST:PORT to listen on (env REFUND_HTTP_LISTEN, default {DEFAULT_HTTP_LISTEN}; "
                             "port 0 picks a free port)")
    parser.add_argument("--grpc-target", default=env("REFUND_GRPC_TARGET") or DEFAULT_GRPC_TARGET,
                        help=f"refund-service address (env REFUND_GRPC_TARGET, default {DEFAULT_GRPC_TARGET})")
    parser.add_argument("--deadline", type=positive,
                        default=from_env(parser, "REFUND_EDGE_DEADLINE", positive, DEFAULT_DEADLINE),
                        help="seconds a call to refund-service may take before the answer is 9001 "
                             f"(env REFUND_EDGE_DEADLINE, default {DEFAULT_DEADLINE:g})")
    parser.add_argument("--body-timeout", type=positive,
                        default=from_env(parser, "REFUND_EDGE_BODY_TIMEOUT", positive, DEFAULT_BODY_TIMEOUT),
                        help="seconds a client may take to send the request body before the answer is 408 "
                             f"(env REFUND_EDGE_BODY_TIMEOUT, default {DEFAULT_BODY_TIMEOUT:g})")
    parser.add_argument("--access-log", action="store_true",
                        help="also log uvicorn's access line for every request (off by default)")
    startup.add_log_level(parser, "one line per merchant request")
    parser.add_argument("--signing-key", default=env("REFUND_EDGE_SIGNING_KEY"),
                        help="PEM RSA private key to sign every response with (X-Signature); made by "
                             "`refund-admin gateway-key create` (env REFUND_EDGE_SIGNING_KEY; default: unsigned)")
    parser.add_argument("--tls-cert", default=env("REFUND_EDGE_TLS_CERT"),
                        help="PEM certificate (chain) to serve HTTPS with (env REFUND_EDGE_TLS_CERT; default HTTP)")
    parser.add_argument("--tls-key", default=env("REFUND_EDGE_TLS_KEY"),
                        help="PEM private key of --tls-cert (env REFUND_EDGE_TLS_KEY)")
    parser.add_argument("--tls-reload-interval", type=positive,
                        default=from_env(parser, "REFUND_TLS_RELOAD_INTERVAL", positive, 5.0),
                        help="seconds between looks at --tls-cert/--tls-key; changed files are used for new "
                             "handshakes (also on SIGHUP) (env REFUND_TLS_RELOAD_INTERVAL, default 5)")
    parser.add_argument("--allow-expired-certificate", action="store_true",
                        default=from_env(parser, "REFUND_ALLOW_EXPIRED_CERTIFICATE", startup.flag, False),
                        help="use an expired certificate (with a warning) instead of exiting 5 "
                             "(env REFUND_ALLOW_EXPIRED_CERTIFICATE=1)")
    parser.add_argument("--grpc-tls-ca", default=env("REFUND_EDGE_GRPC_TLS_CA"),
                        help="PEM CA certificate(s) to verify refund-service with; turns on TLS to the service "
                             "(env REFUND_EDGE_GRPC_TLS_CA)")
    parser.add_argument("--grpc-tls-cert", default=env("REFUND_EDGE_GRPC_TLS_CERT"),
                        help="PEM client certificate for mutual TLS with refund-service "
                             "(env REFUND_EDGE_GRPC_TLS_CERT)")
    parser.add_argument("--grpc-tls-key", default=env("REFUND_EDGE_GRPC_TLS_KEY"),
                        help="PEM private key of --grpc-tls-cert (env REFUND_EDGE_GRPC_TLS_KEY)")
    parser.add_argument("--metrics-listen", default=env("REFUND_EDGE_METRICS_LISTEN"),
                        help="HOST:PORT to serve Prometheus metrics on at /metrics, apart from the merchant port "
                             "(env REFUND_EDGE_METRICS_LISTEN; default off)")
    limit = parser.add_argument_group("limits (docs/edge.md)")
    count = positive_int
    limit.add_argument("--max-connections", type=count,
                       default=from_env(parser, "REFUND_EDGE_MAX_CONNECTIONS", count, limits.DEFAULT_MAX_CONNECTIONS),
                       help="open connections at most; beyond, the longest idle is closed, or the new one gets 503 "
                            f"(env REFUND_EDGE_MAX_CONNECTIONS, default {limits.DEFAULT_MAX_CONNECTIONS})")
    limit.add_argument("--max-in-flight", type=count,
                       default=from_env(parser, "REFUND_EDGE_MAX_IN_FLIGHT", count, limits.DEFAULT_MAX_IN_FLIGHT),
                       help="requests being answered at most; beyond, 503 with 9001 at once "
                            f"(env REFUND_EDGE_MAX_IN_FLIGHT, default {limits.DEFAULT_MAX_IN_FLIGHT})")
    limit.add_argument("--max-header-bytes", type=count,
                       default=from_env(parser, "REFUND_EDGE_MAX_HEADER_BYTES", count, limits.DEFAULT_MAX_HEADER_BYTES),
                       help="bytes of a request line and headers at most; beyond, 431 "
                            f"(env REFUND_EDGE_MAX_HEADER_BYTES, default {limits.DEFAULT_MAX_HEADER_BYTES})")
    limit.add_argument("--header-timeout", type=positive,
                       default=from_env(parser, "REFUND_EDGE_HEADER_TIMEOUT", positive, limits.DEFAULT_HEADER_TIMEOUT),
                       help="seconds to receive a request line and headers; beyond, 408 "
                            f"(env REFUND_EDGE_HEADER_TIMEOUT, default {limits.DEFAULT_HEADER_TIMEOUT:g})")
    limit.add_argument("--keep-alive-timeout", type=positive,
                       default=from_env(parser, "REFUND_EDGE_KEEP_ALIVE_TIMEOUT", positive,
                                        limits.DEFAULT_KEEP_ALIVE_TIMEOUT),
                       help="seconds an idle keep-alive connection is kept "
                            f"(env REFUND_EDGE_KEEP_ALIVE_TIMEOUT, default {limits.DEFAULT_KEEP_ALIVE_TIMEOUT:g})")
    limit.add_argument("--rate-limit", default=env("REFUND_EDGE_RATE_LIMIT") or DEFAULT_RATE_LIMIT,
                       help="each merchant's requests per second on this edge, RATE[/BURST] or off; beyond, 429 "
                            f"with 9002 (env REFUND_EDGE_RATE_LIMIT, default {DEFAULT_RATE_LIMIT})")
    limit.add_argument("--merchant-rate-limit", action="append",
                       default=_env_list("REFUND_EDGE_MERCHANT_RATE_LIMITS"), metavar="MERCHANT_ID=RATE[/BURST]|off",
                       help="a merchant's own rate limit; repeatable (env REFUND_EDGE_MERCHANT_RATE_LIMITS, "
                            "comma-separated)")
    compat = parser.add_argument_group("HTTP statuses (docs/edge.md)")
    modes = " or ".join(mode.value for mode in policy.StatusMode)
    compat.add_argument("--status-mode", default=env("REFUND_EDGE_STATUS_MODE") or policy.StatusMode.DOCUMENTED.value,
                        help=f"{modes}: always-200 answers HTTP 200 with the code in the body, as the vendor's "
                             "published plugin expects (env REFUND_EDGE_STATUS_MODE, default documented)")
    compat.add_argument("--merchant-status-mode", action="append",
                        default=_env_list("REFUND_EDGE_MERCHANT_STATUS_MODES"), metavar="MERCHANT_ID=MODE",
                        help="a merchant's own status mode; repeatable (env REFUND_EDGE_MERCHANT_STATUS_MODES, "
                             "comma-separated)")
    args = parser.parse_args(argv)
    try:
        args.rate_limiter = policy.RateLimiter(policy.parse_rate(args.rate_limit),
                                               policy.parse_overrides(args.merchant_rate_limit, policy.parse_rate))
        args.status_modes = policy.StatusModes(policy.parse_status_mode(args.status_mode),
                                               policy.parse_overrides(args.merchant_status_mode,
                                                                      policy.parse_status_mode))
    except ValueError as exc:
        parser.error(str(exc))
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if bool(args.grpc_tls_cert) != bool(args.grpc_tls_key):
        parser.error("--grpc-tls-cert and --grpc-tls-key go together")
    if args.grpc_tls_cert and not args.grpc_tls_ca:
        parser.error("--grpc-tls-cert needs --grpc-tls-ca (the CA that signed refund-service's certificate)")
    try:
        split_address(args.listen)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _env_list(name: str) -> list[str]:
    value = os.environ.get(name)
    return [value] if value else []


def connection_cap(wanted: int) -> int:
    """`wanted`, raising the soft limit on open files to fit it (and the spare
    descriptors) when the hard limit allows; else the most that fits, with a warning."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = wanted + SPARE_FILE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
        if soft < needed:
            fitting = max(1, soft - SPARE_FILE_DESCRIPTORS)
            log.warning("--max-connections %d does not fit the open-file limit %d; using %d", wanted, soft, fitting)
            return fitting
    return wanted


def main(argv=None) -> int:
    telemetry.configure_logging("info")
    startup.install_json_excepthooks(log)
    args = parse_args(argv)
    telemetry.configure_logging(args.log_level)
    if not tracing.start_from_environment("refund-edge"):  # off unless OTEL_* asks (docs/operations.md)
        return startup.EXIT_USAGE  # an unusable OTEL_* value, logged
    try:
        signer = edge_startup.signer(args)
        credentials = edge_startup.grpc_credentials(args)
        edge_tls = edge_startup.https(args)
    except StartupError as exc:
        return startup.refuse(log, exc)
    try:
        sock = bind(args.listen)
    except OSError as exc:
        return startup.refuse(log, StartupError(f"cannot listen on {args.listen}: {exc}", startup.EXIT_FAULT))
    sockets, metrics_port = [sock], None
    if args.metrics_listen:  # a second socket of the same server, where only /metrics is served
        try:
            metrics_sock = bind(args.metrics_listen)
        except (OSError, ValueError) as exc:
            return startup.refuse(log, StartupError(f"cannot serve metrics on {args.metrics_listen}: {exc}",
                                                    startup.EXIT_FAULT))
        sockets.append(metrics_sock)
        metrics_port = metrics_sock.getsockname()[1]
        scheme = "https" if edge_tls else "http"  # a socket of the same server: TLS like the merchant port
        startup.announce("refund-edge", f"refund-edge metrics on {scheme}://{shown(metrics_sock)}/metrics",
                         metrics_address=shown(metrics_sock))
    edge_limits = limits.EdgeLimits(
        max_connections=connection_cap(args.max_connections), max_in_flight=args.max_in_flight,
        max_header_bytes=args.max_header_bytes, header_timeout=args.header_timeout,
        keep_alive_timeout=args.keep_alive_timeout)
    app = tracing.wrap_asgi(EdgeApp(
        args.grpc_target, deadline=args.deadline, body_timeout=args.body_timeout, signer=signer,
        grpc_credentials=credentials, max_in_flight=edge_limits.max_in_flight, rate_limiter=args.rate_limiter,
        status_modes=args.status_modes, metrics_port=metrics_port))
    protocol = limits.guarded_protocol(
        edge_limits, signer, always_200=args.status_modes.default is policy.StatusMode.ALWAYS_200)
    config = uvicorn.Config(
        app, loop="uvloop", http=protocol, ws="none", lifespan="on", interface="asgi3",
        timeout_keep_alive=edge_limits.keep_alive_timeout,
        log_config=None, log_level=args.log_level, access_log=args.access_log,
        server_header=False, proxy_headers=False,
        # In-flight requests are bounded by the body timeout and the deadline; give them that and a little more.
        timeout_graceful_shutdown=int(args.body_timeout + args.deadline) + 2,
    )
    config.load()
    if edge_tls:
        config.ssl = edge_tls.context  # our policy, and the certificate follows its files (service.tls)
    log.info("calling refund-service at %s (%s) with a %.3gs deadline; responses %s", args.grpc_target,
             "plaintext" if credentials is None else "mutual TLS" if args.grpc_tls_cert else "TLS", args.deadline,
             "signed" if signer else "unsigned")
    rate = args.rate_limiter
    log.info("limits: %d connections, %d requests in flight, %d-byte heads, %gs for a head, %gs for a body, %gs "
             "keep-alive; rate limit per merchant %s (%d overrides); statuses %s (%d overrides)",
             edge_limits.max_connections, edge_limits.max_in_flight, edge_limits.max_header_bytes,
             edge_limits.header_timeout, args.body_timeout, edge_limits.keep_alive_timeout,
             rate.default or "off", len(rate.overrides), args.status_modes.default.value,
             len(args.status_modes.overrides or {}))
    EdgeServer(config, sock, edge_tls, args.tls_reload_interval).run(sockets=sockets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
