"""The one way to start our real processes, and a gateway made of two of them.

`Process.service(...)`, `Process.edge(...)` and `Process.relay(...)` start
`refund-service`, `refund-edge` and `refund-relay` on free ports (or on a fixed
address, for tests that SIGKILL and restart a process and want its clients to
keep one address). Each prints `NAME listening on HOST:PORT`; `address` is what
it printed. Output goes to a file, never to a pipe nobody reads (a full pipe
would block the process under load).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import ROOT
from tests.support.http import Reply, http_request
from tests.support.keys import envelope, example_key, signed_body


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A real process of ours (`python -m MODULE ARGS`), started at once and
    waited for until it says where it listens."""

    def __init__(self, name: str, module: str, args=(), environment: dict | None = None, *,
                 metrics_address: str | None = None):
        self.name, self.module, self.args = name, module, list(args)
        self.environment = environment if environment is not None else dict(os.environ)
        self.metrics_address = metrics_address
        self._start()

    @classmethod
    def service(cls, database_url: str, *args: str, env: dict | None = None,
                listen: str = "127.0.0.1:0") -> Process:
        """`refund-service` on `database_url`."""
        environment = {**os.environ, "REFUND_DATABASE_URL": database_url, "REFUND_GRPC_LISTEN": listen,
                       "PYTHONUNBUFFERED": "1", **(env or {})}
        return cls("refund-service", "service.server", args, environment)

    @classmethod
    def edge(cls, grpc_target: str, *args: str, deadline: float | None = None, env: dict | None = None,
             listen: str = "127.0.0.1:0") -> Process:
        """`refund-edge` in front of the service at `grpc_target`. No rate limit unless a test
        sets one: storms and hostile runs send far more than one merchant's rate."""
        environment = {**os.environ, "REFUND_HTTP_LISTEN": listen, "REFUND_GRPC_TARGET": grpc_target,
                       "PYTHONUNBUFFERED": "1", "REFUND_EDGE_RATE_LIMIT": "off", **(env or {})}
        if deadline is not None:
            environment["REFUND_EDGE_DEADLINE"] = str(deadline)
        return cls("refund-edge", "gateway_edge.server", args, environment)

    @classmethod
    def relay(cls, database_url: str, nats_url: str, name: str = "nats") -> Process:
        """`refund-relay` from `database_url` to the NATS server at `nats_url`, its metrics on a fixed port."""
        metrics = f"127.0.0.1:{free_port()}"
        environment = {**os.environ, "REFUND_DATABASE_URL": database_url, "REFUND_NATS_URL": nats_url,
                       "REFUND_RELAY_NAME": name, "REFUND_RELAY_METRICS_LISTEN": metrics, "PYTHONUNBUFFERED": "1"}
        return cls("refund-relay", "service.relay", [], environment, metrics_address=metrics)

    # -- life -------------------------------------------------------------------

    def _start(self) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")[1])
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", self.module, *self.args], env=self.environment,
                                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.address = self._wait_for_address()
        host, port = self.address.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.url = f"http://{self.address}"

    def _wait_for_address(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(rf"{self.name} listening on (\S+)", self.output())
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.process.kill()
        raise RuntimeError(f"{self.name} did not start:\n" + self.output())

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send `sig` (SIGTERM: drain and exit), wait, kill after `timeout`; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def close(self) -> int:
        """`stop()`, then remove the log; the exit status."""
        code = self.stop()
        self.log_path.unlink(missing_ok=True)
        return code

    def kill(self) -> None:
        """SIGKILL: calls in flight are lost, nothing is drained."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def restart(self) -> None:
        """Start the same command again, with a fresh log (after `kill` or `stop`)."""
        self.log_path.unlink(missing_ok=True)
        self._start()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- talking to it ------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 30.0) -> Reply:
        return http_request(self.host, self.port, method, path, body, headers, timeout)

    def post_refund(self, body: bytes, content_type: str = "application/json", **kwargs) -> Reply:
        return self.request("POST", "/direct/refund", body, {"Content-Type": content_type}, **kwargs)

    def metric(self, name: str) -> float | None:
        """The first sample of `name` on the metrics listener given at start, or None."""
        try:
            with urllib.request.urlopen(f"http://{self.metrics_address}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return None


def restartable_service(database_url: str) -> tuple[Process, str]:
    """A service on a fixed port, so that its clients keep one address across SIGKILL and restart."""
    address = f"127.0.0.1:{free_port()}"
    return Process.service(database_url, listen=address), address


def restartable_edge(grpc_target: str, deadline: float = 10) -> tuple[Process, str]:
    """An edge on a fixed port (see `restartable_service`)."""
    address = f"127.0.0.1:{free_port()}"
    return Process.edge(grpc_target, deadline=deadline, listen=address), address


def kill_hard(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait(10)


@dataclass
class Gateway:
    """A `refund-service` and a `refund-edge` in front of it, on one database,
    with a merchant's client: every reply is kept in `replies`."""

    database_url: str
    service: Process
    edge: Process
    replies: list = field(default_factory=list)

    def post_bytes(self, body: bytes, content_type: str = "application/json", *, path: str = "/direct/refund",
                   headers: dict | None = None, **kwargs) -> Reply:
        """`body` exactly as given."""
        reply = self.edge.request("POST", path, body, {"Content-Type": content_type, **(headers or {})}, **kwargs)
        self.replies.append(reply)
        return reply

    def post(self, path: str, request_text: str, key=None, headers: dict | None = None, *,
             double: bool = False) -> Reply:
        """`request_text` signed with `key` (the example merchant's by default)."""
        return self.post_bytes(signed_body(key or example_key(), request_text, double=double), path=path,
                               headers=headers)

    def refund(self, request_text: str, key=None, idempotency_key: str | None = None, headers=None, *,
               double: bool = False) -> Reply:
        headers = dict(headers or {})
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        return self.post("/direct/refund", request_text, key, headers, double=double)

    def query(self, request_text: str, key=None, headers=None) -> Reply:
        return self.post("/direct/query", request_text, key, headers)

    def send(self, request_text: str, signature: str, path: str = "/direct/refund") -> Reply:
        """`request_text` with the signature given, whatever it is."""
        return self.post_bytes(envelope(request_text, signature), path=path)

    def close(self) -> None:
        for process in (self.edge, self.service):
            process.stop()
