"""`refund-edge`: the merchant HTTP/JSON edge (raw ASGI on uvicorn + httptools + uvloop).

Listens on --listen / REFUND_HTTP_LISTEN, calls refund-service at
--grpc-target / REFUND_GRPC_TARGET with a deadline of --deadline /
REFUND_EDGE_DEADLINE seconds. Prints `refund-edge listening on HOST:PORT` once
it accepts connections. On SIGTERM or SIGINT it stops accepting, lets the
requests in flight finish (each is bounded by the deadline) and exits 0.
Logs are JSON lines on stderr. Optional: HTTPS (--tls-cert/--tls-key), TLS or
mutual TLS to the service (--grpc-tls-*), signed responses (--signing-key).
"""

from __future__ import annotations

from service import native_logs  # noqa: F401  (first: quiets gRPC core before grpc is imported)

import contextlib
import logging
import os
import signal
import socket
import sys

import uvicorn

from gateway_edge import startup as edge_startup
from gateway_edge.app import DEFAULT_BODY_TIMEOUT, DEFAULT_DEADLINE, EdgeApp
from service import startup, telemetry, tracing
from service.startup import StartupError

log = logging.getLogger("refund-edge")

DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"
DEFAULT_GRPC_TARGET = "127.0.0.1:50051"


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
    args = parser.parse_args(argv)
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
    app = tracing.wrap_asgi(EdgeApp(args.grpc_target, deadline=args.deadline, body_timeout=args.body_timeout,
                                    signer=signer, grpc_credentials=credentials))
    config = uvicorn.Config(
        app, loop="uvloop", http="httptools", ws="none", lifespan="on", interface="asgi3",
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
    EdgeServer(config, sock, edge_tls, args.tls_reload_interval).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
