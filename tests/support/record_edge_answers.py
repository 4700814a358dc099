"""Record what `refund-edge` answers to a fixed list of requests, byte for byte.

    .venv/bin/python -m tests.support.record_edge_answers [--out tests/fixtures/edge_answers.json]
                                                   [--database sqlite] [--database postgresql]

For each database (SQLite, and PostgreSQL at REFUND_TEST_PG_URL), one run of the
scenario of tests/support/edge_answers_scenario.py: a fresh database, `refund-admin migrate`,
`load` and the scenario's admin commands (its console script, called in this
process), the real `refund-service` and `refund-edge` processes (their console
scripts) on free ports, then every request sent on a connection of its own, one
after the other. The file written holds the load document, the edge's flags, the
requests and each answer: its status line, its headers (sorted) and its body. The
answers must be the same on both databases (docs/api.md is one contract); if they
are not, nothing is written.
tests/e2e/test_recorded_edge_answers.py replays the file's requests against the
current code and compares.

What is made deterministic, or normalised, and why (each the least that makes two
runs equal):

1. The service's clock is pinned to NOW: `refund-service` is started through
   PINNED_CLOCK, which replaces `datetime.datetime` with a subclass whose `now()`
   and `utcnow()` return NOW before the service is imported (every time the
   service reads is `datetime.now(...)`). So the refund times in the bodies
   (`updateTime`, `createTime`), the replay window of signed timestamps and the
   answers' `X-Signature` are recorded as they are, with no placeholder. The edge
   and `refund-admin` run unchanged (the loaded orders carry their own times).
   Should the service come to read its clock another way (time.time(), a clock
   object), pin that instead: the answers recorded stay what they are.
2. The `date` header (the edge's wall clock, to the second) is dropped.
3. An `x-request-id` the edge made itself (24 random hex digits: the request had
   no usable one, or its head was refused unread) is replaced by "<generated>".
   An id the request sent is kept, so an edge that stopped echoing it differs.
4. Headers are sorted by name (stable: repeated names keep their order). Status
   line, names, values and body are otherwise the exact bytes received.

Answers are signed (`--signing-key` with the example merchant's private key, a
test key), so X-Signature is compared too. The rate limit is off.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from importlib.metadata import entry_points
from pathlib import Path

import sqlalchemy as sa

from tests.support import edge_answers_scenario as scenario

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "edge_answers.json"
BIN = Path(sys.executable).parent  # the virtual environment's console scripts
PG_ADMIN_URL = os.environ.get("REFUND_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
DATABASES = ("sqlite", "postgresql")
GENERATED_ID = re.compile(r"[0-9a-f]{24}\Z")

# Runs a console script (argv[2]) with datetime.datetime.now()/utcnow() pinned to argv[1].
PINNED_CLOCK = r"""
import datetime, sys
from importlib.metadata import entry_points
real, moment = datetime.datetime, datetime.datetime.fromisoformat(sys.argv[1])
class Meta(type):
    def __instancecheck__(cls, other): return isinstance(other, real)
    def __subclasscheck__(cls, other): return issubclass(other, real)
class Pinned(real, metaclass=Meta):
    @classmethod
    def now(cls, tz=None): return moment.astimezone(tz) if tz is not None else real.fromtimestamp(moment.timestamp())
    @classmethod
    def utcnow(cls): return moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)
datetime.datetime = Pinned
(script,) = entry_points(group="console_scripts", name=sys.argv[2])
sys.argv = sys.argv[2:]
sys.exit(script.load()())
"""


class DatabaseUnavailable(Exception):
    pass


# -- the stack ------------------------------------------------------------------


def child_environment(**settings) -> dict:
    """This process's environment without REFUND_* and OTEL_* (nothing from the caller's shell changes the run)."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("REFUND_", "OTEL_"))}
    return {**kept, "PYTHONUNBUFFERED": "1", **settings}


class Process:
    """A process of ours that prints `NAME listening on HOST:PORT`; its output goes to a file."""

    def __init__(self, name: str, argv: list[str], env: dict):
        self.name = name
        self.log = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            match = re.search(rf"{name} listening on (\S+?)[\s\"]", self.log.read_text(errors="replace"))
            if match:
                self.address = match.group(1)
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        output = self.log.read_text(errors="replace")
        self.stop()
        raise RuntimeError(f"{name} did not start:\n{output}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.unlink(missing_ok=True)


@contextlib.contextmanager
def fresh_database(kind: str):
    """The URL of a new, empty database of `kind`, removed afterwards."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="edge-answers-") as folder:
            yield f"sqlite:///{folder}/refund.db"
        return
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"edge_answers_{uuid.uuid4().hex[:12]}"
    try:
        with engine.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        engine.dispose()
        raise DatabaseUnavailable(f"PostgreSQL not reachable at {sa.make_url(PG_ADMIN_URL).render_as_string()}: "
                                  f"{type(exc.orig).__name__}") from None
    try:
        yield sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def admin(url: str, *args: str) -> None:
    """`refund-admin --database-url URL ARGS...`, its console script called in this process."""
    (script,) = entry_points(group="console_scripts", name="refund-admin")
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = script.load()(["--database-url", url, *args])
    if code != 0:
        raise RuntimeError(f"refund-admin {' '.join(args)} exited {code}:\n{output.getvalue()}")


@contextlib.contextmanager
def stack(kind: str, recorded: dict):
    """The address of a `refund-edge` in front of a `refund-service` on a fresh, loaded database."""
    with fresh_database(kind) as url, tempfile.NamedTemporaryFile("w", suffix=".json") as load_file:
        json.dump(recorded["load"], load_file)
        load_file.flush()
        admin(url, "migrate")
        admin(url, "load", load_file.name)
        for command in recorded["admin_commands"]:
            admin(url, *command)
        service = Process("refund-service", [sys.executable, "-c", PINNED_CLOCK, recorded["now"], "refund-service"],
                          child_environment(REFUND_DATABASE_URL=url, REFUND_GRPC_LISTEN="127.0.0.1:0"))
        try:
            signing_key = str(scenario.FIXTURES_DIR / "example-merchant.key.pem")
            edge = Process("refund-edge", [str(BIN / "refund-edge"), *recorded["edge_args"],
                                           "--signing-key", signing_key],
                           child_environment(REFUND_HTTP_LISTEN="127.0.0.1:0", REFUND_GRPC_TARGET=service.address))
            try:
                yield edge.address
            finally:
                edge.stop()
        finally:
            service.stop()


# -- one exchange -------------------------------------------------------------


def expand(value) -> str:
    """A text of the fixture: a string, or {"repeat": TEXT, "times": N} for a long one."""
    return value["repeat"] * value["times"] if isinstance(value, dict) else value


def raw_request(request: dict) -> bytes:
    head = f"{request['method']} {request['path']} HTTP/1.1\r\n"
    head += "".join(f"{name}: {expand(value)}\r\n" for name, value in request["headers"])
    return (head + "\r\n").encode("latin-1") + expand(request["body"]).encode("utf-8")


def exchange(address: str, request: dict) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """Send one request on a new connection; (status line, headers, body) as received."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(raw_request(request))
        data = b""
        while b"\r\n\r\n" not in data:
            data += _receive(sock)
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        headers = [tuple(part.strip() for part in line.split(b":", 1)) for line in lines]
        lengths = [int(value) for name, value in headers if name.lower() == b"content-length"]
        length = 0 if request["method"] == "HEAD" else (lengths[0] if lengths else 0)
        while len(body) < length:
            body += _receive(sock)
    return status_line, headers, body


def _receive(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("the edge closed the connection before a whole answer")
    return chunk


def normalised(request: dict, status_line: bytes, headers, body: bytes) -> dict:
    """The answer as recorded: normalisations 2-4 of the module's docstring."""
    sent_ids = {expand(v) for n, v in request["headers"] if n.lower() == "x-request-id"}
    kept = []
    for name, value in headers:
        name_text, value_text = name.decode("latin-1"), value.decode("latin-1")
        if name_text.lower() == "date":
            continue
        if name_text.lower() == "x-request-id" and value_text not in sent_ids and GENERATED_ID.match(value_text):
            value_text = "<generated>"
        kept.append([name_text, value_text])
    kept.sort(key=lambda header: header[0].lower())
    answer = {"name": request["name"], "status": status_line.decode("latin-1"), "headers": kept}
    try:
        answer["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        answer["body_base64"] = base64.b64encode(body).decode("ascii")
    return answer


def body_bytes(answer: dict) -> bytes:
    if "body_base64" in answer:
        return base64.b64decode(answer["body_base64"])
    return answer["body"].encode("utf-8")


def first_difference(index: int, request: dict, old: dict, new: dict) -> str:
    """Which request, and the first part of its answer that differs (status line, body, then
    headers: a body that differs changes Content-Length and X-Signature too), with both versions."""
    where = f"request {index + 1} {request['name']!r} ({request['method']} {request['path']})"
    if old["status"] != new["status"]:
        return f"{where}: status line\n  recorded: {old['status']}\n  now:      {new['status']}"
    before, after = body_bytes(old), body_bytes(new)
    if before != after:
        at = next((i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b), min(len(before), len(after)))
        return (f"{where}: body, first different byte at offset {at} (lengths {len(before)} and {len(after)})\n"
                f"  recorded: ...{before[max(0, at - 60):at + 60]!r}\n"
                f"  now:      ...{after[max(0, at - 60):at + 60]!r}")
    recorded, now = dict(map(tuple, old["headers"])), dict(map(tuple, new["headers"]))
    for name in sorted(set(recorded) | set(now)):
        if recorded.get(name) != now.get(name):
            return f"{where}: header {name}\n  recorded: {recorded.get(name)!r}\n  now:      {now.get(name)!r}"
    return f"{where}: headers\n  recorded: {old['headers']}\n  now:      {new['headers']}"


def run(kind: str, recorded: dict) -> list[dict]:
    """Every request of `recorded` against a fresh stack on `kind`; the normalised answers, in order."""
    with stack(kind, recorded) as address:
        return [normalised(request, *exchange(address, request)) for request in recorded["requests"]]


# -- the file -------------------------------------------------------------------


def scenario_document() -> dict:
    return {"about": "Requests to refund-edge and its answers, recorded by `python -m tests.support.record_edge_answers` "
                     "(normalisations in its docstring); replayed by tests/e2e/test_recorded_edge_answers.py.",
            "now": scenario.NOW.isoformat(), "edge_args": scenario.EDGE_ARGS,
            "admin_commands": scenario.ADMIN_COMMANDS, "load": scenario.load_document(),
            "requests": scenario.requests()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.record_edge_answers", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"file to write (default {DEFAULT_OUT})")
    parser.add_argument("--database", action="append", choices=DATABASES,
                        help="record on this database (repeatable; default both)")
    args = parser.parse_args(argv)
    document = scenario_document()
    answers = {}
    for kind in args.database or DATABASES:
        started = time.monotonic()
        answers[kind] = run(kind, document)
        print(f"{kind}: {len(answers[kind])} answers in {time.monotonic() - started:.1f} s")
    (first, first_answers), *others = answers.items()
    for kind, other in others:  # docs/api.md promises the same answers on either database
        differing = [i for i, (a, b) in enumerate(zip(first_answers, other, strict=False)) if a != b]
        if differing:
            i = differing[0]
            print(f"{first} and {kind} answer differently ({len(differing)} answers); the first:\n"
                  + first_difference(i, document["requests"][i], first_answers[i], other[i]), file=sys.stderr)
            return 1
    document["answers"] = first_answers
    args.out.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
