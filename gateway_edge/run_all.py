"""Development launcher: refund-service and refund-edge together; Ctrl-C stops both.

    python -m gateway_edge.run_all

Starts `refund-service` on REFUND_GRPC_LISTEN (default 127.0.0.1:50051), waits
until it prints the address it bound, then starts `refund-edge` on
REFUND_HTTP_LISTEN (default 127.0.0.1:8080) calling that address. Both outputs
are copied to this process's stdout, each line prefixed with its process name.
SIGINT and SIGTERM are forwarded to both (each drains gracefully; SIGHUP counts
as SIGTERM); when either process exits, the other is stopped and the launcher
exits.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
_LISTENING = re.compile(r"listening on (\S+)")
_print_lock = threading.Lock()


class Child:
    """A child process whose output lines are copied with a prefix; `address`
    is what it printed after "listening on"."""

    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.address: str | None = None
        self.listening = threading.Event()
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # A session of its own: a terminal's Ctrl-C reaches the launcher only,
        # which forwards it once (a second SIGINT would force uvicorn to quit).
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=environment, start_new_session=True)
        self._pump = threading.Thread(target=self._copy_output, name=f"{name}-output", daemon=True)
        self._pump.start()

    def _copy_output(self):
        for raw in self.process.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if self.address is None:
                match = _LISTENING.search(line)
                if match:
                    self.address = match.group(1)
                    self.listening.set()
            with _print_lock:
                print(f"[{self.name}] {line}", flush=True)

    def wait_listening(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.listening.wait(0.1):
                return True
            if self.process.poll() is not None:
                return self.listening.is_set()
        return False

    def signal(self, signum: int):
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit status, killing the process if it is not gone within `timeout`."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._pump.join(2.0)
        return code


def say(message: str):
    with _print_lock:
        print(f"[run_all] {message}", flush=True)


def main() -> int:
    grpc_listen = os.environ.get("REFUND_GRPC_LISTEN") or "127.0.0.1:50051"
    http_listen = os.environ.get("REFUND_HTTP_LISTEN") or "127.0.0.1:8080"
    requested: list[int] = []

    def on_signal(signum, _frame):
        # A closed terminal (SIGHUP) must not leave the children, which have
        # sessions of their own, running: stop them as for SIGTERM.
        requested.append(signal.SIGTERM if signum == signal.SIGHUP else signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)

    children: list[Child] = []
    try:
        service = Child("service", [sys.executable, "-m", "service.server", "--listen", grpc_listen])
        children.append(service)
        if not service.wait_listening(STARTUP_TIMEOUT) or requested:
            say("refund-service did not start")
            return _stop_all(children, signal.SIGTERM) or 1
        edge = Child("edge", [sys.executable, "-m", "gateway_edge.server", "--listen", http_listen,
                              "--grpc-target", service.address])
        children.append(edge)
        if not edge.wait_listening(STARTUP_TIMEOUT) or requested:
            say("refund-edge did not start")
            return _stop_all(children, signal.SIGTERM) or 1
        say(f"refund-edge http://{edge.address} -> refund-service {service.address}; Ctrl-C stops both")

        while not requested:
            for child in children:
                code = child.process.poll()
                if code is not None:
                    say(f"{child.name} exited with status {code}; stopping the other")
                    _stop_all(children, signal.SIGTERM)
                    return code or 1
            time.sleep(0.1)
        say(f"{signal.Signals(requested[0]).name}: stopping both")
        return _stop_all(children, requested[0])
    finally:
        for child in children:  # never leave a child behind
            if child.process.poll() is None:
                child.process.kill()
                child.process.wait()


def _stop_all(children: list[Child], signum: int) -> int:
    """Signal every child at once, wait for all; 0 when all exited cleanly."""
    for child in children:
        child.signal(signum)
    codes = [child.wait() for child in children]
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
