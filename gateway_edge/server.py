"""`refund-edge`: the merchant HTTP/JSON edge (raw ASGI on uvicorn + httptools + uvloop).

Listens on --listen / REFUND_HTTP_LISTEN, calls refund-service at
--grpc-target / REFUND_GRPC_TARGET with a deadline of --deadline /
REFUND_EDGE_DEADLINE seconds. Prints `refund-edge listening on HOST:PORT` once
it accepts connections. On SIGTERM or SIGINT it stops accepting, lets the
requests in flight finish (each is bounded by the deadline) and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys

import uvicorn

from gateway_edge.app import DEFAULT_BODY_TIMEOUT, DEFAULT_DEADLINE, EdgeApp

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

    def __init__(self, config: uvicorn.Config, sock: socket.socket):
        super().__init__(config)
        self.sock = sock

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started:
            print(f"refund-edge listening on {shown(self.sock)}", flush=True)

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
    parser = argparse.ArgumentParser(prog="refund-edge", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default=env("REFUND_HTTP_LISTEN") or DEFAULT_HTTP_LISTEN,
                        help=f"HOST:PORT to listen on (env REFUND_HTTP_LISTEN, default {DEFAULT_HTTP_LISTEN}; "
                             "port 0 picks a free port)")
    parser.add_argument("--grpc-target", default=env("REFUND_GRPC_TARGET") or DEFAULT_GRPC_TARGET,
                        help=f"refund-service address (env REFUND_GRPC_TARGET, default {DEFAULT_GRPC_TARGET})")
    parser.add_argument("--deadline", type=float, default=env("REFUND_EDGE_DEADLINE") or str(DEFAULT_DEADLINE),
                        help="seconds a call to refund-service may take before the answer is 9001 "
                             f"(env REFUND_EDGE_DEADLINE, default {DEFAULT_DEADLINE:g})")
    parser.add_argument("--body-timeout", type=float,
                        default=env("REFUND_EDGE_BODY_TIMEOUT") or str(DEFAULT_BODY_TIMEOUT),
                        help="seconds a client may take to send the request body before the answer is 408 "
                             f"(env REFUND_EDGE_BODY_TIMEOUT, default {DEFAULT_BODY_TIMEOUT:g})")
    parser.add_argument("--access-log", action="store_true", help="log every request (off by default)")
    parser.add_argument("--log-level", default=env("REFUND_LOG_LEVEL") or "info",
                        choices=["debug", "info", "warning", "error"], help="env REFUND_LOG_LEVEL, default info")
    args = parser.parse_args(argv)
    if not args.deadline > 0 or not args.body_timeout > 0:
        parser.error("--deadline and --body-timeout must be positive numbers of seconds")
    try:
        split_address(args.listen)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sock = bind(args.listen)
    except OSError as exc:
        log.error("cannot listen on %s: %s", args.listen, exc)
        return 1
    app = EdgeApp(args.grpc_target, deadline=args.deadline, body_timeout=args.body_timeout)
    config = uvicorn.Config(
        app, loop="uvloop", http="httptools", ws="none", lifespan="on", interface="asgi3",
        log_config=None, log_level=args.log_level, access_log=args.access_log,
        server_header=False, proxy_headers=False,
        # In-flight requests are bounded by the body timeout and the deadline; give them that and a little more.
        timeout_graceful_shutdown=int(args.body_timeout + args.deadline) + 2,
    )
    log.info("calling refund-service at %s with a %.3gs deadline", args.grpc_target, args.deadline)
    EdgeServer(config, sock).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
