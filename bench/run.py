"""`make bench`: the refund path under load, on SQLite and PostgreSQL.

What it does, in one run:

1. Data of its own: a fresh PostgreSQL database (created, dropped at the
   end) and a temporary SQLite file, migrated and loaded with `refund-admin
   load` (merchants with fresh RSA keys, tens of thousands of paid orders:
   every request of the run names a different order). The signed bodies for
   the edge are made up front, in parallel, before any clock starts.
2. The real processes: `refund-service` and `refund-edge` on free ports.
3. Load: signed `POST /direct/refund` at the edge with wrk (bench/refund.lua
   cycles through the pre-signed bodies), unsigned `Refund` at the service
   with bench/loadgen_grpc.py (a Python grpc.aio client in its own process: it
   competes with the service for the two cores, and its CPU is shown), at
   several concurrency levels, on each database.
4. For each run: refunds/s, p50/p99 latency, CPU per refund of each process
   (edge, service, load generator, and PostgreSQL: the backends of this
   database, plus the instance-wide auxiliary processes such as the WAL
   writer), read from /proc/PID/stat before and after.
5. Floors: RSA verify/s, a bare gRPC round trip (bench/trivial_server.py), the
   bare database refund (bench/store_floor.py calls the store directly), the
   minimal chain (bench/minimal_chain.py: the same parts with nothing else);
   and each stage's share of a signed refund's cost.
6. Memory: RSS of each process at steady state and over a soak of `--soak`
   seconds. Scale-out: two services and two edges on one PostgreSQL.
7. With --tracing: the cost of OpenTelemetry tracing, signed refunds at the
   edge on PostgreSQL with tracing off, then on (every request sampled,
   exported over OTLP/gRPC to a sink in this process), fresh processes each.

The report is printed and written to bench-report.md and bench-report.json.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import multiprocessing
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LUA = Path(__file__).with_name("refund.lua")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

MERCHANTS = [8_000_001 + i for i in range(32)]  # --merchants
ORDER_BASE = 10_000_000
AMOUNT = "10.00"
BALANCE = "1000000000.00"
# Orders per measured run: duration x this rate (the bodies wrap, and say so, past it).
EDGE_RATE_CAP = 2600
GRPC_RATE_CAP = 4000


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- processes ------------------------------------------------------------------


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


def start_service(url: str, env: dict | None = None) -> Process:
    return Process("service", [str(BIN / "refund-service")], r"listening on (\S+)",
                   {**_NO_TRACING, "REFUND_DATABASE_URL": url, "REFUND_GRPC_LISTEN": "127.0.0.1:0", **(env or {})})


def start_edge(target: str, env: dict | None = None) -> Process:
    # No rate limit: the load test is one merchant at thousands of requests a second.
    return Process("edge", [str(BIN / "refund-edge"), "--listen", "127.0.0.1:0", "--grpc-target", target,
                            "--log-level", "warning"], r"refund-edge listening on (\S+)",
                   {**_NO_TRACING, "REFUND_EDGE_RATE_LIMIT": "off", **(env or {})})


class OtlpSink:
    """An OTLP/gRPC trace receiver that counts spans and keeps nothing: where the
    traced processes export to (its CPU is this process's, not theirs)."""

    def __init__(self):
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        sink = self

        class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                sink.spans += sum(len(scope.spans) for resource_spans in request.resource_spans
                                  for scope in resource_spans.scope_spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.spans = 0
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def environment(self) -> dict:
        """Tracing on, every request sampled, exported here."""
        return {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
                "OTEL_EXPORTER_OTLP_INSECURE": "true", "OTEL_TRACES_SAMPLER": "always_on"}

    def stop(self) -> None:
        self.server.stop(None)


def tracing_cost(url: str, bodies: dict[str, Path], duration: float, pg: Postgres) -> dict:
    """Signed refunds at the edge, 32 connections, tracing off then on (fresh processes each)."""
    sink = OtlpSink()
    results = {}
    try:
        for mode, env in (("off", {}), ("on", sink.environment())):
            service = start_service(url, env)
            edge = start_edge(service.address, env)
            try:
                wrk_result(wrk(edge.address, bodies[f"warm-trace-{mode}"], 8, 2))
                result = measure("edge", lambda: edge_run([edge], bodies[f"trace-{mode}"], 32, duration),
                                 {"edge": [edge], "service": [service]}, pg)
            finally:
                edge.stop()
                service.stop()
            result.update(database="postgres", path="edge", concurrency=32, instances=1, tracing=mode)
            results[mode] = result
            log(f"tracing {mode:3}: {show(result)}")
        results["spans_exported"] = sink.spans
    finally:
        sink.stop()
    return results


# -- PostgreSQL ---------------------------------------------------------------


class Postgres:
    """A database of the bench's own on the server of `admin_url`, and the CPU of its processes."""

    AUX = ("walwriter", "checkpointer", "background writer", "autovacuum launcher", "logical replication launcher",
           "walsender", "archiver")

    def __init__(self, admin_url: str):
        import psycopg
        import sqlalchemy as sa

        self._psycopg = psycopg
        parsed = sa.make_url(admin_url)
        self.name = f"refund_bench_{uuid.uuid4().hex[:10]}"
        self.url = parsed.set(database=self.name).render_as_string(hide_password=False)
        self._conninfo = dict(host=parsed.host or "127.0.0.1", port=parsed.port or 5432, user=parsed.username,
                              password=parsed.password, dbname=parsed.database or "postgres")
        self._admin = psycopg.connect(**self._conninfo, autocommit=True)
        self._admin.execute(f'CREATE DATABASE "{self.name}"')
        self.version = self._admin.execute("SHOW server_version").fetchone()[0]
        self.settings = dict(self._admin.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('synchronous_commit', 'fsync', 'shared_buffers', 'wal_sync_method')").fetchall())

    def pids(self) -> tuple[set[int], set[int]]:
        """(processes working for this database, the instance's auxiliary processes)."""
        rows = self._admin.execute("SELECT pid, datname, backend_type FROM pg_stat_activity "
                                   "WHERE pid <> pg_backend_pid()").fetchall()
        ours = {pid for pid, datname, _ in rows if datname == self.name}
        aux = {pid for pid, datname, kind in rows if datname is None and kind in self.AUX}
        return ours, aux

    def cpu(self) -> dict:
        """{"ours": pids, "aux": pids, "seconds": {pid: CPU seconds}} now."""
        ours, aux = self.pids()
        return {"ours": ours, "aux": aux, "seconds": {pid: cpu_seconds(pid) or 0.0 for pid in ours | aux}}

    def drop(self) -> None:
        with contextlib.suppress(Exception):
            self._admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self._admin.close()


def pg_cpu_delta(before: dict, after: dict) -> tuple[float, float]:
    """CPU seconds of (this database's backends, the auxiliary processes) between two samples;
    a backend that started in between counts from zero."""
    def delta(group: str) -> float:
        return sum(after["seconds"][pid] - before["seconds"].get(pid, 0.0) for pid in after[group])
    return delta("ours"), delta("aux")


# -- data -----------------------------------------------------------------------


@dataclass
class Slice:
    name: str
    first: int
    count: int
    signed: bool


@dataclass
class Layout:
    slices: dict[str, Slice] = field(default_factory=dict)
    next_order: int = ORDER_BASE

    def add(self, name: str, count: int, signed: bool) -> Slice:
        count = -(-count // len(MERCHANTS)) * len(MERCHANTS)  # slices start on a multiple of len(MERCHANTS)
        piece = Slice(name, self.next_order, count, signed)
        self.slices[name] = piece
        self.next_order += count
        return piece


def merchant_of(order_id: int) -> int:
    return MERCHANTS[order_id % len(MERCHANTS)]


def request_text(order_id: int) -> str:
    return json.dumps({"merchantId": str(merchant_of(order_id)), "orderId": order_id}, separators=(",", ":"))[:-1] \
        + f',"amount":{AMOUNT}}}'


_SIGNING_KEYS = {}


def _init_signer(pems: dict[int, bytes]) -> None:
    from cryptography.hazmat.primitives import serialization

    for merchant, pem in pems.items():
        _SIGNING_KEYS[merchant] = serialization.load_pem_private_key(pem, password=None)


def _sign_range(bounds: tuple[int, int]) -> list[str]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    lines = []
    for order_id in range(*bounds):
        request = request_text(order_id)
        signature = _SIGNING_KEYS[merchant_of(order_id)].sign(request.encode(), padding.PKCS1v15(), hashes.SHA256())
        lines.append(json.dumps({"request": request, "signature": base64.b64encode(signature).decode("ascii")}))
    return lines


def make_keys() -> tuple[dict[int, bytes], dict[int, str]]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private, public = {}, {}
    for merchant in MERCHANTS:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private[merchant] = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())
        public[merchant] = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")
    return private, public


def sign_bodies(private: dict[int, bytes], slices: list[Slice], directory: Path) -> dict[str, Path]:
    """One file of signed envelopes per slice, one per line; signed on every core."""
    files = {}
    with multiprocessing.get_context("fork").Pool(os.cpu_count(), _init_signer, (private,)) as pool:
        for piece in slices:
            step = 500
            chunks = [(start, min(start + step, piece.first + piece.count))
                      for start in range(piece.first, piece.first + piece.count, step)]
            path = directory / f"bodies-{piece.name}.txt"
            with open(path, "w") as out:
                for lines in pool.imap(_sign_range, chunks):
                    out.write("\n".join(lines) + "\n")
            files[piece.name] = path
    return files


def load_document(public: dict[int, str], slices: list[Slice]) -> dict:
    from tests import data  # the test suite's builders of fixtures.example.json-shaped documents

    merchants = [data.merchant(m, public[m], {"HKD": BALANCE}) for m in MERCHANTS]
    orders = [data.order(order_id, merchant_of(order_id), AMOUNT, reference=f"bench-{order_id}")
              for piece in slices for order_id in range(piece.first, piece.first + piece.count)]
    return {"paymentMethods": data.PAYMENT_METHODS, "merchants": merchants, "orders": orders}


def prepare_database(url: str, document_path: Path) -> subprocess.Popen:
    """migrate + load with refund-admin, as an operator would; returns the running process."""
    admin = str(BIN / "refund-admin")
    script = f"'{admin}' --database-url '{url}' migrate >/dev/null && '{admin}' --database-url '{url}' load " \
             f"'{document_path}' >/dev/null"
    return subprocess.Popen(["sh", "-c", script], cwd=ROOT)


# -- load generators --------------------------------------------------------------


def wrk(address: str, bodies: Path, connections: int, duration: float, extra: list | None = None) -> subprocess.Popen:
    threads = 1 if connections < 4 else 2
    return subprocess.Popen(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s", "--timeout", "10s",
         "-s", str(LUA), f"http://{address}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "BENCH_BODIES": str(bodies), "BENCH_THREADS": str(threads)})


def wrk_result(process: subprocess.Popen) -> dict:
    output, _ = process.communicate()
    match = re.search(r"BENCH_RESULT (\{.*\})", output)
    if not match:
        raise RuntimeError(f"wrk gave no result:\n{output}")
    result = json.loads(match.group(1))
    result["rate"] = result["requests"] / result["seconds"]
    return result


GRPC_CLIENT = "node"  # --grpc-client


def grpc_loadgen(targets: list[str], piece: Slice, concurrency: int, duration: float) -> subprocess.Popen:
    generator = ["node", str(Path(__file__).with_name("loadgen_grpc.mjs"))] if GRPC_CLIENT == "node" \
        else [sys.executable, "-m", "bench.loadgen_grpc"]
    argv = [*generator, "--first-order", str(piece.first), "--orders",
            str(piece.count), "--amount", AMOUNT, "--concurrency", str(concurrency), "--duration", str(duration)]
    for target in targets:
        argv += ["--target", target]
    for merchant in MERCHANTS:
        argv += ["--merchant", str(merchant)]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)


def check_alignment(piece: Slice) -> None:
    """The load generators give order first+i to merchants[i % n]; the data give order o to
    merchants[o % n]: slices start on a multiple of n so the two agree."""
    assert piece.first % len(MERCHANTS) == 0


def json_result(process: subprocess.Popen) -> dict:
    output, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"load generator failed ({process.returncode}):\n{output}")
    return json.loads(output.strip().splitlines()[-1])


# -- one measured run --------------------------------------------------------------


def measure(kind: str, start_load, processes: dict[str, list[Process]], pg: Postgres | None) -> dict:
    """Run the load started by `start_load()` and account each process's CPU to it."""
    before = {name: [cpu_seconds(p.pid) for p in group] for name, group in processes.items()}
    pg_before = pg.cpu() if pg else None
    children0, busy0, wall0 = children_cpu(), machine_busy(), time.monotonic()
    results = start_load()
    children, busy, wall = children_cpu() - children0, machine_busy() - busy0, time.monotonic() - wall0
    after = {name: [cpu_seconds(p.pid) for p in group] for name, group in processes.items()}
    pg_after = pg.cpu() if pg else None
    merged = merge(results)
    requests = merged["requests"]
    per = 1e6 / requests if requests else float("nan")
    cpu = {name: sum(a - b for a, b in zip(after[name], before[name])) * per for name in processes}
    cpu["loadgen"] = children * per
    if pg:
        ours, aux = pg_cpu_delta(pg_before, pg_after)
        cpu["postgres"] = ours * per
        cpu["postgres_aux"] = aux * per
    merged["cpu_us"] = cpu
    merged["cpu_total_us"] = sum(v for k, v in cpu.items() if k != "loadgen")
    # Whatever else ran meanwhile (other users of this machine): the bench's figures are only
    # as good as this is small.
    ours = sum(cpu.values()) * requests / 1e6
    merged["machine_busy_pct"] = busy / wall / os.cpu_count() * 100
    merged["foreign_cpu_pct"] = max(0.0, busy - ours) / wall / os.cpu_count() * 100
    merged["rss_mib"] = {name: [rss_mib(p.pid) for p in group] for name, group in processes.items()}
    merged["kind"] = kind
    return merged


def merge(results: list[dict]) -> dict:
    """One result from the load generators that ran side by side."""
    if len(results) == 1:
        return dict(results[0])
    requests = sum(r["requests"] for r in results)
    seconds = max(r["seconds"] for r in results)
    merged = {"requests": requests, "seconds": seconds, "rate": sum(r["rate"] for r in results),
              "p50_ms": max(r["p50_ms"] for r in results), "p99_ms": max(r["p99_ms"] for r in results),
              "parts": results}
    for key in ("approved", "declined", "other", "wrapped"):
        if key in results[0]:
            merged[key] = sum(r[key] for r in results)
    if "codes" in results[0]:
        codes = {}
        for r in results:
            for code, n in r["codes"].items():
                codes[code] = codes.get(code, 0) + n
        merged["codes"] = codes
    return merged


def edge_run(edges: list[Process], bodies: Path, connections: int, duration: float) -> list[dict]:
    if len(edges) == 1:
        return [wrk_result(wrk(edges[0].address, bodies, connections, duration))]
    parts = split_file(bodies, len(edges))
    running = [wrk(e.address, part, connections // len(edges), duration) for e, part in zip(edges, parts)]
    return [wrk_result(p) for p in running]


def split_file(path: Path, ways: int) -> list[Path]:
    lines = path.read_text().splitlines()
    parts = []
    for k in range(ways):
        part = path.with_name(f"{path.stem}-part{k}.txt")
        part.write_text("\n".join(lines[k::ways]) + "\n")
        parts.append(part)
    return parts


# -- floors ------------------------------------------------------------------------


def rsa_verify_floor(public_pem: str, private_pem: bytes, seconds: float = 1.5) -> dict:
    """The service's own verify (signing.verify: decode, key from its cache, RSA) in a loop, one core."""
    from service import signing

    _init_signer({MERCHANTS[0]: private_pem})
    line = json.loads(_sign_range((ORDER_BASE, ORDER_BASE + 1))[0])
    request, signature = line["request"].encode(), line["signature"]
    assert signing.verify(request, signature, [public_pem])
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(200):
            signing.verify(request, signature, [public_pem])
        count += 200
    elapsed = time.perf_counter() - started
    return {"verify_per_s": count / elapsed, "verify_us": elapsed / count * 1e6}


def speed_gauge(seconds: float = 1.0) -> float:
    """Millions of iterations per second of a fixed pure-Python loop, on one core: how fast this
    machine is right now (a shared or throttled machine is slower; compare runs by it)."""
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        total = 0
        for i in range(100_000):
            total += i & 7
        count += 100_000
    return count / (time.perf_counter() - started) / 1e6


def grpc_floor(piece: Slice, concurrency: int, duration: float, client: str) -> dict:
    """The trivial servicer driven by `client` ("node" or "python": the latter is the same
    grpc.aio client as the edge's, so its CPU per call is the edge's gRPC client floor)."""
    global GRPC_CLIENT
    server = Process("trivial", [sys.executable, "-m", "bench.trivial_server"], r"trivial-server listening on (\S+)")
    chosen, GRPC_CLIENT = GRPC_CLIENT, client
    try:
        json_result(grpc_loadgen([server.address], Slice("warm", piece.first, 2000, False), 8, 1.0))
        return measure("grpc-floor", lambda: [json_result(grpc_loadgen([server.address], piece, concurrency,
                                                                          duration))],
                       {"server": [server]}, None)
    finally:
        GRPC_CLIENT = chosen
        server.stop()


def store_floor(url: str, piece: Slice, concurrency: int, duration: float, pg: Postgres | None) -> dict:
    """bench/store_floor.py warms up, says "ready", waits for a line, runs, prints its result and waits
    again before closing its pool: the database's backends are sampled while they exist."""
    argv = [sys.executable, "-m", "bench.store_floor", "--database-url", url, "--first-order", str(piece.first),
            "--orders", str(piece.count), "--amount", AMOUNT, "--concurrency", str(concurrency), "--duration",
            str(duration)]
    for merchant in MERCHANTS:
        argv += ["--merchant", str(merchant)]
    process = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if process.stdout.readline().strip() != "ready":
        process.kill()
        raise RuntimeError("bench.store_floor did not start")
    before = cpu_seconds(process.pid)
    pg_before = pg.cpu() if pg else None
    process.stdin.write("go\n")
    process.stdin.flush()
    result = json.loads(process.stdout.readline())
    after = cpu_seconds(process.pid)
    pg_after = pg.cpu() if pg else None
    process.stdin.write("done\n")
    process.stdin.flush()
    process.wait(30)
    per = 1e6 / result["requests"]
    result["cpu_us"] = {"store": (after - before) * per}
    if pg:
        ours, aux = pg_cpu_delta(pg_before, pg_after)
        result["cpu_us"].update(postgres=ours * per, postgres_aux=aux * per)
    result["cpu_total_us"] = sum(result["cpu_us"].values())
    result["kind"] = "store-floor"
    return result


def chain_floor(url: str, warm: Path, bodies: Path, duration: float, pg: Postgres) -> dict:
    """The issue's minimal chain (bench/minimal_chain.py: raw ASGI edge -> grpc.aio -> RSA verify + the
    one-statement refund, nothing else) under the same signed load as the real edge at 32 connections."""
    module = [sys.executable, "-m", "bench.minimal_chain"]
    service = Process("minimal-service", [*module, "service", "--database-url", url],
                      r"minimal-service listening on (\S+)")
    try:
        edge = Process("minimal-edge", [*module, "edge", "--grpc-target", service.address],
                       r"minimal-edge listening on (\S+)")
    except Exception:
        service.stop()
        raise
    try:
        wrk_result(wrk(edge.address, warm, 8, 2))
        result = measure("chain-floor", lambda: edge_run([edge], bodies, 32, duration),
                         {"edge": [edge], "service": [service]}, pg)
        if result["declined"] or result["other"]:  # it does only approvals right: anything else is a fault
            raise RuntimeError(f"the minimal chain answered {result['declined'] + result['other']} of "
                               f"{result['requests']} refunds with something other than 0000")
        return result
    finally:
        edge.stop()
        service.stop()


# -- the whole bench ---------------------------------------------------------------


def run(args) -> dict:
    levels = [int(x) for x in args.levels.split(",")]
    duration = args.duration
    databases = args.databases.split(",")
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine(), "settings": {
        "duration_s": duration, "levels": levels, "soak_s": args.soak, "merchants": len(MERCHANTS),
        "amount": AMOUNT, "grpc_client": GRPC_CLIENT}, "runs": [], "floors": {}}
    work = Path(tempfile.mkdtemp(prefix="refund-bench-"))
    processes: list[Process] = []
    pg = None
    try:
        layout = Layout()
        edge_size = int(duration * EDGE_RATE_CAP)
        grpc_size = int(duration * GRPC_RATE_CAP)
        slices = {
            "warm-edge": layout.add("warm-edge", 2000, True),
            **{f"edge-{c}": layout.add(f"edge-{c}", edge_size, True) for c in levels},
            "edge-scale": layout.add("edge-scale", edge_size, True),
            "warm-scale": layout.add("warm-scale", 2000, True),
            "soak": layout.add("soak", min(30_000, max(edge_size, int(args.soak * 1500))), True),
            "warm-grpc": layout.add("warm-grpc", 3000, False),
            **{f"grpc-{c}": layout.add(f"grpc-{c}", grpc_size, False) for c in levels},
            "grpc-scale": layout.add("grpc-scale", grpc_size, False),
            "floor-store": layout.add("floor-store", int(duration * 6000), False),
            "floor-grpc": layout.add("floor-grpc", int(duration * 8000), False),
            "floor-chain-warm": layout.add("floor-chain-warm", 2000, True),
            "floor-chain": layout.add("floor-chain", edge_size, True),
        }
        if args.tracing:
            for mode in ("off", "on"):
                slices[f"warm-trace-{mode}"] = layout.add(f"warm-trace-{mode}", 2000, True)
                slices[f"trace-{mode}"] = layout.add(f"trace-{mode}", edge_size, True)
        if args.profile:
            slices["profile-edge"] = layout.add("profile-edge", edge_size, True)
            slices["profile-grpc"] = layout.add("profile-grpc", grpc_size, False)
        for piece in slices.values():
            check_alignment(piece)
        log(f"keys and {sum(s.count for s in slices.values() if s.signed)} signed bodies "
            f"({os.cpu_count()} processes)")
        private, public = make_keys()
        t0 = time.monotonic()
        bodies = sign_bodies(private, [s for s in slices.values() if s.signed], work)
        log(f"signed in {time.monotonic() - t0:.1f}s")

        per_db_slices = {
            "sqlite": [s for n, s in slices.items() if not n.endswith("scale") and n not in ("soak", "floor-grpc")
                       and not n.startswith(("profile", "floor-chain", "trace", "warm-trace"))],
            "postgres": [s for n, s in slices.items() if n != "floor-grpc"],
        }
        urls, loaders = {}, []
        if "postgres" in databases:
            pg = Postgres(args.pg_url)
            urls["postgres"] = pg.url
            report["postgres"] = {"version": pg.version, **pg.settings}
        if "sqlite" in databases:
            urls["sqlite"] = f"sqlite:///{work / 'refund.db'}"
        t0 = time.monotonic()
        for db_name, url in urls.items():
            document = work / f"load-{db_name}.json"
            document.write_text(json.dumps(load_document(public, per_db_slices[db_name])))
            loaders.append(prepare_database(url, document))
        log(f"loading {', '.join(f'{n}: {sum(s.count for s in per_db_slices[n])} orders' for n in urls)} "
            "with refund-admin")
        for loader in loaders:
            if loader.wait() != 0:
                raise RuntimeError("refund-admin could not migrate or load the bench data")
        log(f"loaded in {time.monotonic() - t0:.1f}s")

        # -- floors first, on a quiet machine
        report["floors"]["speed_gauge_mops"] = speed_gauge()
        log(f"speed gauge: {report['floors']['speed_gauge_mops']:.1f} M loop iterations/s")
        report["floors"]["rsa"] = rsa_verify_floor(public[MERCHANTS[0]], private[MERCHANTS[0]])
        log(f"floor: RSA verify {report['floors']['rsa']['verify_per_s']:.0f}/s")
        report["floors"]["grpc"] = grpc_floor(slices["floor-grpc"], 32, duration, GRPC_CLIENT)
        log(f"floor: bare gRPC round trip ({GRPC_CLIENT} client) {show(report['floors']['grpc'])}")
        if GRPC_CLIENT != "python":
            report["floors"]["grpc-python"] = grpc_floor(slices["floor-grpc"], 32, duration / 2, "python")
            log(f"floor: bare gRPC round trip (python client) {show(report['floors']['grpc-python'])}")
        for db_name, url in urls.items():
            result = store_floor(url, slices["floor-store"], 32, duration, pg if db_name == "postgres" else None)
            report["floors"][f"store-{db_name}"] = result
            log(f"floor: bare store refund on {db_name} {show(result)}")
        if "postgres" in urls:
            report["floors"]["chain"] = chain_floor(urls["postgres"], bodies["floor-chain-warm"],
                                                    bodies["floor-chain"], duration, pg)
            log(f"floor: minimal chain, signed, PostgreSQL {show(report['floors']['chain'])}")

        for db_name, url in urls.items():
            db = pg if db_name == "postgres" else None
            service = start_service(url)
            edge = start_edge(service.address)
            processes += [service, edge]
            both = {"edge": [edge], "service": [service]}
            only_service = {"service": [service]}
            # warm-up: connections, pools, caches, prepared statements
            wrk_result(wrk(edge.address, bodies["warm-edge"], 8, 2))
            json_result(grpc_loadgen([service.address], slices["warm-grpc"], 8, 1.5))
            report.setdefault("rss_after_warmup", {})[db_name] = {"edge": rss_mib(edge.pid),
                                                                  "service": rss_mib(service.pid)}
            for c in levels:
                result = measure("edge", lambda: edge_run([edge], bodies[f"edge-{c}"], c, duration), both, db)
                add(report, result, db_name, "edge", c, 1)
            for c in levels:
                result = measure("grpc", lambda: [json_result(grpc_loadgen([service.address], slices[f"grpc-{c}"], c,
                                                                              duration))], only_service, db)
                add(report, result, db_name, "grpc", c, 1)
            if args.profile and db_name == "postgres":
                report["profiles"] = profile_runs(edge, service, bodies["profile-edge"], slices["profile-grpc"],
                                                  duration, args.profile)
            if db_name == "postgres" and args.soak > 0:
                report["soak"] = soak(edge, service, bodies["soak"], args.soak, db)
            report.setdefault("rss_steady", {})[db_name] = {"edge": rss_mib(edge.pid), "service": rss_mib(service.pid)}
            for process in (edge, service):
                process.stop()
                processes.remove(process)

        if args.tracing:
            if "postgres" in urls:
                report["tracing"] = tracing_cost(urls["postgres"], bodies, duration, pg)
            else:
                log("--tracing measures on PostgreSQL: add it to --databases")

        if "postgres" in urls and not args.skip_scaleout:
            services = [start_service(urls["postgres"]) for _ in range(2)]
            # each edge spreads its calls over both services (round_robin over a two-address target)
            edges = [start_edge("ipv4:" + ",".join(s.address for s in services)) for _ in range(2)]
            processes += services + edges
            for e, part in zip(edges, split_file(bodies["warm-scale"], len(edges))):  # orders not yet refunded
                wrk_result(wrk(e.address, part, 4, 1))
            group = {"edge": edges, "service": services}
            result = measure("edge", lambda: edge_run(edges, bodies["edge-scale"], 32, duration), group, pg)
            add(report, result, "postgres", "edge", 32, 2)
            result = measure("grpc", lambda: [json_result(grpc_loadgen([s.address for s in services],
                                                                         slices["grpc-scale"], 32, duration))],
                             {"service": services}, pg)
            add(report, result, "postgres", "grpc", 32, 2)
            for process in services + edges:
                process.stop()
                processes.remove(process)
    finally:
        for process in processes:
            process.stop()
        if pg is not None:
            pg.drop()
        shutil.rmtree(work, ignore_errors=True)
    report["shares"] = shares(report)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    return report


def add(report: dict, result: dict, db_name: str, kind: str, connections: int, instances: int) -> None:
    result.update(database=db_name, path=kind, concurrency=connections, instances=instances)
    report["runs"].append(result)
    log(f"{db_name:8} {kind:4} x{instances} c={connections:<3} {show(result)}")
    if result.get("wrapped"):
        log(f"  note: the bodies ran out and wrapped {result['wrapped']} times: some answers are 3003")


def show(result: dict) -> str:
    cpu = " ".join(f"{k}={v:.0f}" for k, v in result["cpu_us"].items())
    noise = f"  other load {result['foreign_cpu_pct']:.0f}%" if "foreign_cpu_pct" in result else ""
    return (f"{result['rate']:7.0f}/s  p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms  "
            f"CPU us/refund: {cpu}{noise}")


def soak(edge: Process, service: Process, bodies: Path, seconds: float, pg: Postgres) -> dict:
    """Signed refunds at 32 connections for `seconds`, sampling RSS every second."""
    log(f"soak: {seconds:g}s at the edge, 32 connections")
    samples = []
    process = wrk(edge.address, bodies, 32, seconds)
    started = time.monotonic()
    while process.poll() is None:
        samples.append({"t": round(time.monotonic() - started, 1), "edge": rss_mib(edge.pid),
                        "service": rss_mib(service.pid)})
        time.sleep(1.0)
    result = wrk_result(process)
    result["rate"] = result["requests"] / result["seconds"]
    head = samples[: max(1, len(samples) // 10)]
    settled = samples[len(samples) // 5: len(samples) // 5 + max(1, len(samples) // 10)]
    tail = samples[-max(1, len(samples) // 10):]
    summary = {"seconds": seconds, "requests": result["requests"], "rate": result["rate"],
               "approved": result["approved"], "declined": result["declined"], "p99_ms": result["p99_ms"]}
    for name in ("edge", "service"):
        start = statistics.median(s[name] for s in head if s[name])
        end = statistics.median(s[name] for s in tail if s[name])
        after_fifth = statistics.median(s[name] for s in settled if s[name])
        summary[name] = {"start_mib": start, "end_mib": end, "max_mib": max(s[name] for s in samples if s[name]),
                         "growth_mib": end - start, "after_first_fifth_mib": after_fifth,
                         "growth_after_first_fifth_mib": end - after_fifth}
    summary["samples"] = samples[:: max(1, len(samples) // 60)]
    log(f"soak: {summary['rate']:.0f}/s; RSS edge {summary['edge']['start_mib']:.1f} -> "
        f"{summary['edge']['end_mib']:.1f} MiB, service {summary['service']['start_mib']:.1f} -> "
        f"{summary['service']['end_mib']:.1f} MiB")
    return summary


def profile_runs(edge: Process, service: Process, bodies: Path, grpc_slice: Slice, duration: float,
                 directory: str) -> dict:
    """py-spy on the service and the edge during a signed run, then on the service during a gRPC run."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    py_spy = str(BIN / "py-spy")
    if not Path(py_spy).exists():
        log("--profile needs py-spy: .venv/bin/pip install -e '.[bench]'; no profiles taken")
        return {}
    profiles = {}

    def record(pid: int, name: str) -> subprocess.Popen:
        return subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", str(int(duration)), "--rate",
                                 "250", "--format", "raw", "--nonblocking", "-o", str(out / f"{name}.txt")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    spies = [record(service.pid, "service-edge-run"), record(edge.pid, "edge-edge-run")]
    wrk_result(wrk(edge.address, bodies, 32, duration))
    for spy in spies:
        spy.wait()
    spy = record(service.pid, "service-grpc-run")
    json_result(grpc_loadgen([service.address], grpc_slice, 32, duration))
    spy.wait()
    for name in ("service-edge-run", "edge-edge-run", "service-grpc-run"):
        profiles[name] = top_frames(out / f"{name}.txt")
        log(f"profile {name}: " + "; ".join(f"{f} {p:.0f}%" for f, p in profiles[name]["self"][:6]))
    return profiles


def top_frames(path: Path, count: int = 15) -> dict:
    """The leaf frames (self time) and selected frames (inclusive) of py-spy's collapsed stacks."""
    self_time, inclusive, total = {}, {}, 0
    if not path.exists():
        return {"self": [], "inclusive": []}
    for line in path.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not samples.isdigit():
            continue
        n = int(samples)
        total += n
        frames = [re.sub(r" \((.*/)?([^/]*)\)", r" (\2)", f) for f in stack.split(";")]
        self_time[frames[-1]] = self_time.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    pct = lambda d: sorted(((k, v * 100 / total) for k, v in d.items()), key=lambda kv: -kv[1])  # noqa: E731
    return {"samples": total, "self": pct(self_time)[:count], "inclusive": pct(inclusive)[:count * 3]}


def shares(report: dict) -> dict:
    """Each stage's share of a signed refund through the edge on PostgreSQL at 32 connections."""
    run32 = next((r for r in report["runs"] if r["database"] == "postgres" and r["path"] == "edge"
                  and r["concurrency"] == 32 and r["instances"] == 1), None)
    floors = report["floors"]
    if run32 is None or "grpc" not in floors or "store-postgres" not in floors:
        return {}
    cpu = run32["cpu_us"]
    grpc_server = floors["grpc"]["cpu_us"]["server"]
    grpc_client = floors.get("grpc-python", floors["grpc"])["cpu_us"]["loadgen"]  # the edge's own client
    rsa = floors["rsa"]["verify_us"]
    store = floors["store-postgres"]["cpu_us"]["store"]
    stages = {
        "edge: HTTP, envelope, rendering": cpu["edge"] - grpc_client,
        "edge: gRPC client (floor: Python grpc.aio client per call)": grpc_client,
        "service: gRPC server machinery (floor: trivial servicer)": grpc_server,
        "service: RSA verify (floor)": rsa,
        "service: store, asyncpg side (floor: store called directly)": store,
        "service: the rest (parse, domain, protos, interceptor, log line, metrics)": cpu["service"] - grpc_server - rsa - store,
        "PostgreSQL: backends of this database": cpu["postgres"],
        "PostgreSQL: WAL writer and other auxiliaries": cpu.get("postgres_aux", 0.0),
    }
    total = sum(stages.values())
    return {"total_us": total, "stages": {k: {"us": v, "share": v / total} for k, v in stages.items()}}


def machine() -> dict:
    import asyncpg
    import grpc

    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     "")
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "grpcio": grpc.__version__, "asyncpg": asyncpg.__version__, "kernel": platform.release(),
            "commit": commit.stdout.strip()}


# -- the report ----------------------------------------------------------------------


def markdown(report: dict) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        "# Refund gateway benchmark",
        "",
        f"{report['started']}, commit {m['commit']}: {m['cpus']} cores ({m['cpu_model']}), Python {m['python']}, "
        f"grpcio {m['grpcio']}, asyncpg {m['asyncpg']}"
        + (f", PostgreSQL {report['postgres']['version']} (synchronous_commit={report['postgres']['synchronous_commit']}, "
           f"fsync={report['postgres']['fsync']})" if "postgres" in report else "") + ".",
        f"Each run {s['duration_s']:g} s, every request on a different order, {s['merchants']} merchants, "
        f"amount {s['amount']} HKD (full refunds). Load generators run on the same 2 cores: wrk for the edge, "
        + ("bench/loadgen_grpc.mjs (Node.js http2) for gRPC" if s.get("grpc_client") == "node" else
           "bench/loadgen_grpc.py (a Python grpc.aio client) for gRPC")
        + "; their CPU is in the `loadgen` column, not in the total.",
        "",
        "## Throughput, latency, CPU per refund",
        "",
        "CPU is microseconds of CPU time per refund, from /proc/PID/stat; `postgres` sums the backends of the "
        "bench database, `pg aux` the instance's WAL writer, checkpointer and other auxiliaries (shared with "
        "anything else on this server). `total` = edge + service + postgres + pg aux.",
        "",
        "| database | path | processes | conns | refunds/s | p50 ms | p99 ms | edge | service | postgres | pg aux "
        "| total | loadgen | other load | answers |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        c = r["cpu_us"]
        answers = (f"{r['approved']} ok, {r['declined']} declined" + (f", {r['other']} other" if r["other"] else "")
                   if "approved" in r else ", ".join(f"{k} {v}" for k, v in r.get("codes", {}).items()))
        lines.append(
            f"| {r['database']} | {r['path']} | {r['instances']}+{r['instances'] if r['path'] == 'edge' else 0} "
            f"| {r['concurrency']} | {r['rate']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{c.get('edge', 0):.0f} | {c['service']:.0f} | {c.get('postgres', 0):.0f} | {c.get('postgres_aux', 0):.0f} "
            f"| {r['cpu_total_us']:.0f} | {c['loadgen']:.0f} | {r.get('foreign_cpu_pct', 0):.0f}% | {answers} |")
    lines += ["", "`processes` is services+edges. `other load`: the share of the machine's CPU (both cores) that "
              "went to processes outside the bench during the run (other users of the machine); figures taken "
              "with more than a few percent of it are low.", "", "## Floors", ""]
    f = report["floors"]
    if "speed_gauge_mops" in f:
        lines.append(f"- Speed gauge (a fixed pure-Python loop, one core): {f['speed_gauge_mops']:.1f} M iterations/s. "
                     "The same code measured on this machine at other times ran up to 1.5 times slower or faster "
                     "(a shared host): compare reports by this figure.")
    if "rsa" in f:
        lines.append(f"- RSA-2048 verify (the service's `signing.verify`, one core): {f['rsa']['verify_per_s']:.0f}/s, "
                     f"{f['rsa']['verify_us']:.1f} us each.")
    for name, client in (("grpc", s.get("grpc_client", "")), ("grpc-python", "python")):
        if name in f:
            g = f[name]
            lines.append(f"- Bare gRPC round trip (trivial grpc.aio servicer, 32 in flight, {client} client): "
                         f"{g['rate']:.0f}/s, p50 {g['p50_ms']:.2f} ms, p99 {g['p99_ms']:.2f} ms; server "
                         f"{g['cpu_us']['server']:.0f} us, client {g['cpu_us']['loadgen']:.0f} us of CPU per call.")
    for name in ("store-sqlite", "store-postgres"):
        if name in f:
            r = f[name]
            extra = f", PostgreSQL backends {r['cpu_us'].get('postgres', 0):.0f} us" if "postgres" in r["cpu_us"] else ""
            lines.append(f"- Bare database refund, {name[6:]} (the service's store called directly, 32 in flight): "
                         f"{r['rate']:.0f}/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms; store process "
                         f"{r['cpu_us']['store']:.0f} us{extra} of CPU per refund.")
    if "chain" in f:
        r = f["chain"]
        c = r["cpu_us"]
        real = next((x for x in report["runs"] if x["database"] == "postgres" and x["path"] == "edge"
                     and x["concurrency"] == 32 and x["instances"] == 1), None)
        versus = (f" The real chain in this run: {real['rate'] / r['rate'] * 100:.0f}% of its rate, "
                  f"{real['cpu_total_us'] / r['cpu_total_us']:.2f} times its CPU per refund.") if real else ""
        lines.append(f"- Minimal chain (bench/minimal_chain.py: raw ASGI edge, grpc.aio, RSA verify, the one-statement "
                     f"refund; no logs, metrics, strict JSON or error paths), signed, PostgreSQL, 32 connections: "
                     f"{r['rate']:.0f}/s, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms; CPU per refund: edge "
                     f"{c['edge']:.0f}, service {c['service']:.0f}, PostgreSQL {c.get('postgres', 0):.0f} us "
                     f"(total {r['cpu_total_us']:.0f}).{versus}")
    if report.get("shares"):
        lines += ["", "## Where a signed refund's CPU goes (edge, PostgreSQL, 32 connections)", "",
                  "| stage | us | share |", "|---|---|---|"]
        for name, stage in report["shares"]["stages"].items():
            lines.append(f"| {name} | {stage['us']:.0f} | {stage['share'] * 100:.0f}% |")
        lines.append(f"| total | {report['shares']['total_us']:.0f} | 100% |")
        lines += ["", "Floors are measured alone, so the stages are estimates: under load the same work can cost more "
                  "(cache misses, more wake-ups)."]
    lines += ["", "## Memory (RSS, MiB)", ""]
    for db_name, rss in report.get("rss_after_warmup", {}).items():
        steady = report.get("rss_steady", {}).get(db_name, {})
        lines.append(f"- {db_name}: after warm-up edge {rss['edge']:.1f}, service {rss['service']:.1f}; "
                     f"after all runs edge {steady.get('edge', float('nan')):.1f}, "
                     f"service {steady.get('service', float('nan')):.1f}.")
    if "soak" in report:
        sk = report["soak"]
        lines.append(f"- Soak, PostgreSQL, edge at 32 connections for {sk['seconds']:g} s: {sk['requests']} requests "
                     f"({sk['rate']:.0f}/s; {sk['approved']} approved, {sk['declined']} answered 3003 once the "
                     f"pre-signed bodies wrapped), p99 {sk['p99_ms']:.1f} ms.")
        for name in ("edge", "service"):
            lines.append(f"  - {name}: {sk[name]['start_mib']:.1f} MiB at the start, "
                         f"{sk[name]['after_first_fifth_mib']:.1f} after the first fifth, {sk[name]['end_mib']:.1f} at "
                         f"the end ({sk[name]['growth_mib']:+.1f} in all, {sk[name]['growth_after_first_fifth_mib']:+.1f} "
                         f"after the first fifth), at most {sk[name]['max_mib']:.1f}.")
    if report.get("tracing"):
        t = report["tracing"]
        lines += ["", "## Tracing off and on (signed refunds at the edge, PostgreSQL, 32 connections)", "",
                  "Fresh processes for each; on: OTEL_TRACES_EXPORTER=otlp, every request sampled "
                  f"(OTEL_TRACES_SAMPLER=always_on), {t['spans_exported']} spans exported to an OTLP sink in the bench.",
                  "", "| tracing | refunds/s | p50 ms | p99 ms | edge us | service us | total us |", "|---|---|---|---|---|---|---|"]
        for mode in ("off", "on"):
            r = t[mode]
            lines.append(f"| {mode} | {r['rate']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                         f"{r['cpu_us'].get('edge', 0):.0f} | {r['cpu_us']['service']:.0f} | {r['cpu_total_us']:.0f} |")
        off, on = t["off"], t["on"]
        lines.append(f"\nOn costs {on['cpu_total_us'] - off['cpu_total_us']:+.0f} us of CPU per refund "
                     f"({(on['cpu_total_us'] / off['cpu_total_us'] - 1) * 100:+.0f}%) and "
                     f"{(on['rate'] / off['rate'] - 1) * 100:+.0f}% throughput.")
    if report.get("profiles"):
        lines += ["", "## Profiles (py-spy, PostgreSQL, 32 in flight; self time)", ""]
        for name, prof in report["profiles"].items():
            lines.append(f"- {name}: " + "; ".join(f"`{fr}` {p:.0f}%" for fr, p in prof["self"][:8]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=float(os.environ.get("BENCH_DURATION", 8)),
                        help="seconds per measured run (default 8)")
    parser.add_argument("--levels", default=os.environ.get("BENCH_LEVELS", "8,32,64"),
                        help="concurrency levels: connections at the edge, calls in flight at gRPC (default 8,32,64)")
    parser.add_argument("--soak", type=float, default=float(os.environ.get("BENCH_SOAK", 20)),
                        help="seconds of the memory soak on PostgreSQL; 0 skips it (default 20; 300 for the 5-minute one)")
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--pg-url", default=os.environ.get("REFUND_BENCH_PG_URL")
                        or os.environ.get("REFUND_TEST_PG_URL") or "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                        help="a PostgreSQL server where the bench may create and drop a database of its own")
    parser.add_argument("--merchants", type=int, default=int(os.environ.get("BENCH_MERCHANTS", 32)),
                        help="merchants the orders are spread over, each with its own key and balance (default 32; "
                             "1 puts every refund on one balance row)")
    parser.add_argument("--grpc-client", choices=["node", "python"],
                        default="node" if shutil.which("node") else "python",
                        help="gRPC load generator: bench/loadgen_grpc.mjs (Node.js http2, the default when node is "
                             "installed) or bench/loadgen_grpc.py (grpc.aio)")
    parser.add_argument("--skip-scaleout", action="store_true")
    parser.add_argument("--tracing", action="store_true",
                        help="also measure OpenTelemetry tracing on (100%% sampled, OTLP) against off, on PostgreSQL")
    parser.add_argument("--profile", metavar="DIR", help="also run py-spy on the service and the edge; stacks to DIR")
    parser.add_argument("--report", default="bench-report", help="report file stem (default bench-report: .md, .json)")
    args = parser.parse_args(argv)
    global GRPC_CLIENT
    GRPC_CLIENT = args.grpc_client
    MERCHANTS[:] = [8_000_001 + i for i in range(args.merchants)]
    if shutil.which("wrk") is None:
        print("make bench needs wrk (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    report = run(args)
    text = markdown(report)
    Path(f"{args.report}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    Path(f"{args.report}.md").write_text(text)
    print()
    print(text)
    log(f"report written to {args.report}.md and {args.report}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
