"""Floors: what the parts of a signed refund cost alone, measured in the same run.
RSA verify, a bare gRPC round trip (bench/trivial_server.py), the bare database
refund (bench/store_floor.py calls the service's store directly), the minimal
chain (bench/minimal_chain.py: the same parts with nothing else), a speed gauge
of the machine; and from them each stage's share of a signed refund's CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.load import edge_run, grpc_loadgen, json_result, measure, wrk, wrk_result
from bench.processes import Postgres, Process, cpu_seconds, minimal_chain, pg_cpu_delta
from bench.workload import AMOUNT, MERCHANTS, ORDER_BASE, ROOT, Slice, signed_body


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


def rsa_verify_floor(public_pem: str, private_pem: bytes, seconds: float = 1.5) -> dict:
    """The service's own verify (signing.verify: decode, key from its cache, RSA) in a loop, one core."""
    from service import signing

    request, signature = signed_body(private_pem, ORDER_BASE)
    assert signing.verify(request, signature, [public_pem])
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(200):
            signing.verify(request, signature, [public_pem])
        count += 200
    elapsed = time.perf_counter() - started
    return {"verify_per_s": count / elapsed, "verify_us": elapsed / count * 1e6}


def grpc_floor(piece: Slice, concurrency: int, duration: float, client: str) -> dict:
    """The trivial servicer driven by `client` ("go", "node" or "python": the last is the same
    grpc.aio client as the edge's, so its CPU per call is the edge's gRPC client floor)."""
    server = Process("trivial", [sys.executable, "-m", "bench.trivial_server"], r"trivial-server listening on (\S+)")
    try:
        json_result(grpc_loadgen([server.address], Slice("warm", piece.first, 2000, False), 8, 1.0, client))
        return measure("grpc-floor", lambda: [json_result(grpc_loadgen([server.address], piece, concurrency,
                                                                          duration, client))],
                       {"server": [server]}, None)
    finally:
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
    chain = minimal_chain(url)
    try:
        wrk_result(wrk(chain.address, warm, 8, 2))
        result = measure("chain-floor", lambda: edge_run([chain], bodies, 32, duration), chain.processes, pg)
        if result["declined"] or result["other"]:  # it does only approvals right: anything else is a fault
            raise RuntimeError(f"the minimal chain answered {result['declined'] + result['other']} of "
                               f"{result['requests']} refunds with something other than 0000")
        return result
    finally:
        chain.stop()


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
        "service: the rest (parse, domain, protos, interceptor, log line, metrics)":
            cpu["service"] - grpc_server - rsa - store,
        "PostgreSQL: backends of this database": cpu["postgres"],
        "PostgreSQL: WAL writer and other auxiliaries": cpu.get("postgres_aux", 0.0),
    }
    total = sum(stages.values())
    return {"total_us": total, "stages": {k: {"us": v, "share": v / total} for k, v in stages.items()}}
