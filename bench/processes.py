"""The processes the bench measures: starting and stopping them, the PostgreSQL
database of the bench's own, and the CPU and memory of each from /proc.

A `Chain` is whatever answers signed `POST /direct/refund` at one address: this
project's `refund-edge` + `refund-service`, the minimal chain, or a comparison
chain (the bare chain, the conventional peer). Adding one is one function that
starts its processes and returns a `Chain`; see `comparison_chain`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.workload import BIN, ROOT

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- /proc -----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, /proc/stat; idle and iowait excluded)."""
    with open("/proc/stat") as file:
        values = [int(v) for v in file.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- our processes ---------------------------------------------------------------


class Process:
    """A real process of ours, its output in a file, started and waited for."""

    def __init__(self, name: str, argv: list[str], ready: str, env: dict | None = None, cwd: Path = ROOT):
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        with open(self.log_path, "w") as out:
            self.popen = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.pid = self.popen.pid
        self.address = self._wait(ready)

    def _wait(self, ready: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(ready, self.log_path.read_text(errors="replace"))
            if match:
                return match.group(1)
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.log_path.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log_path.unlink(missing_ok=True)


# The processes run with no OTEL_* variable (tracing off) unless a run sets them.
_NO_TRACING = {name: "" for name in os.environ if name.startswith("OTEL_")}


def start_service(url: str, env: dict | None = None, argv: list[str] | None = None, cwd: Path = ROOT) -> Process:
    return Process("service", argv or [str(BIN / "refund-service")], r"listening on (\S+)",
                   {**_NO_TRACING, "REFUND_DATABASE_URL": url, "REFUND_GRPC_LISTEN": "127.0.0.1:0", **(env or {})},
                   cwd=cwd)


def start_edge(target: str, env: dict | None = None, argv: list[str] | None = None, cwd: Path = ROOT) -> Process:
    # No rate limit: the load test is one merchant at thousands of requests a second.
    # Its log level is the default (info: one line per request), as the service's is.
    return Process("edge", [*(argv or [str(BIN / "refund-edge")]), "--listen", "127.0.0.1:0", "--grpc-target", target],
                   r"refund-edge listening on (\S+)",
                   {**_NO_TRACING, "REFUND_EDGE_RATE_LIMIT": "off", **(env or {})}, cwd=cwd)


# -- chains ------------------------------------------------------------------------


@dataclass
class Pid:
    """A process someone else started: all `measure` needs is its pid."""
    pid: int


@dataclass
class Chain:
    """Processes answering signed POST /direct/refund at `address` (host:port).

    `processes` maps a role ("edge", "service") to the processes whose CPU counts as that
    role's; `database` is the PostgreSQL database whose backends are this chain's (None on
    SQLite); `grpc_address` is where unsigned gRPC `Refund` calls go, if the chain takes them."""
    name: str
    address: str
    processes: dict[str, list]
    stop: Callable[[], None]
    database: str | None = None
    grpc_address: str | None = None


def project_chain(url: str, database: str | None = None, env: dict | None = None) -> Chain:
    """This project's refund-service and refund-edge on the database at `url`."""
    service = start_service(url, env)
    try:
        edge = start_edge(service.address, env)
    except Exception:
        service.stop()
        raise

    def stop() -> None:
        edge.stop()
        service.stop()
    return Chain("project", edge.address, {"edge": [edge], "service": [service]}, stop, database, service.address)


def minimal_chain(url: str, database: str | None = None) -> Chain:
    """bench/minimal_chain.py: raw ASGI edge -> grpc.aio -> RSA verify + the service's one-statement refund."""
    module = [sys.executable, "-m", "bench.minimal_chain"]
    service = Process("minimal-service", [*module, "service", "--database-url", url],
                      r"minimal-service listening on (\S+)")
    try:
        edge = Process("minimal-edge", [*module, "edge", "--grpc-target", service.address],
                       r"minimal-edge listening on (\S+)")
    except Exception:
        service.stop()
        raise

    def stop() -> None:
        edge.stop()
        service.stop()
    return Chain("minimal", edge.address, {"edge": [edge], "service": [service]}, stop, database)


# The comparison chains of issue 16, each a package of bench/ built on its own:
# name -> (module, what the report calls it).
COMPARISON_CHAINS = {
    "bare": ("bench.bare_chain", "bare chain"),
    "peer": ("bench.peer", "conventional peer (FastAPI + SQLAlchemy)"),
}


def comparison_available(name: str) -> bool:
    return importlib.util.find_spec(COMPARISON_CHAINS[name][0]) is not None


def comparison_chain(name: str, admin_url: str, public_keys: dict[int, str], first_order: int,
                     orders: int) -> Chain | None:
    """Hook for the comparison chains: None while `bench/<module>/` is not there.

    The module's `start(admin_url, public_keys, first_order, orders)` makes a PostgreSQL database
    of its own on that server, loads orders first_order .. first_order + orders - 1 (order o
    belongs to the (o % n)-th merchant of `public_keys`, as in the workload) and starts its
    processes; it returns a handle with `address` (host:port of its HTTP endpoint), `pids`
    ({role: [pid]}), `pg.name` (its database) and `stop()` (which also drops the database)."""
    if not comparison_available(name):
        return None
    handle = importlib.import_module(COMPARISON_CHAINS[name][0]).start(admin_url, public_keys, first_order, orders)
    processes = {role: [Pid(pid) for pid in (pids if isinstance(pids, list) else [pids])]
                 for role, pids in handle.pids.items()}
    return Chain(name, handle.address, processes, handle.stop, handle.pg.name)


# -- PostgreSQL ---------------------------------------------------------------


class Postgres:
    """A database of the bench's own on the server of `admin_url`, and the CPU of its processes."""

    AUX = ("walwriter", "checkpointer", "background writer", "autovacuum launcher", "logical replication launcher",
           "walsender", "archiver")

    def __init__(self, admin_url: str):
        import psycopg
        import sqlalchemy as sa

        parsed = sa.make_url(admin_url)
        self.admin_url = admin_url
        self.name = f"refund_bench_{uuid.uuid4().hex[:10]}"
        self.url = parsed.set(database=self.name).render_as_string(hide_password=False)
        conninfo = dict(host=parsed.host or "127.0.0.1", port=parsed.port or 5432, user=parsed.username,
                        password=parsed.password, dbname=parsed.database or "postgres")
        self._admin = psycopg.connect(**conninfo, autocommit=True)
        self._admin.execute(f'CREATE DATABASE "{self.name}"')
        self.version = self._admin.execute("SHOW server_version").fetchone()[0]
        self.settings = dict(self._admin.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('synchronous_commit', 'fsync', 'shared_buffers', 'wal_sync_method')").fetchall())

    def pids(self, database: str | None = None) -> tuple[set[int], set[int]]:
        """(processes working for `database`, default the bench's own; the instance's auxiliary processes)."""
        rows = self._admin.execute("SELECT pid, datname, backend_type FROM pg_stat_activity "
                                   "WHERE pid <> pg_backend_pid()").fetchall()
        ours = {pid for pid, datname, _ in rows if datname == (database or self.name)}
        aux = {pid for pid, datname, kind in rows if datname is None and kind in self.AUX}
        return ours, aux

    def cpu(self, database: str | None = None) -> dict:
        """{"ours": pids, "aux": pids, "seconds": {pid: CPU seconds}} now."""
        ours, aux = self.pids(database)
        return {"ours": ours, "aux": aux, "seconds": {pid: cpu_seconds(pid) or 0.0 for pid in ours | aux}}

    def of(self, database: str) -> PgDatabase:
        """The CPU of another database on this server (a comparison chain's)."""
        return PgDatabase(self, database)

    def drop(self) -> None:
        with contextlib.suppress(Exception):
            self._admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self._admin.close()


@dataclass
class PgDatabase:
    server: Postgres
    name: str

    def cpu(self) -> dict:
        return self.server.cpu(self.name)


def pg_cpu_delta(before: dict, after: dict) -> tuple[float, float]:
    """CPU seconds of (this database's backends, the auxiliary processes) between two samples;
    a backend that started in between counts from zero."""
    def delta(group: str) -> float:
        return sum(after["seconds"][pid] - before["seconds"].get(pid, 0.0) for pid in after[group])
    return delta("ours"), delta("aux")
