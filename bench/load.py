"""Load and its accounting: wrk with pre-signed bodies at an edge, the gRPC load
generator at a service, and `measure`, which runs a load and charges each
process its CPU per refund (from /proc/PID/stat before and after).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.processes import children_cpu, cpu_seconds, machine_busy, pg_cpu_delta, rss_mib
from bench.workload import AMOUNT, MERCHANTS, ROOT, Slice, split_file

LUA = Path(__file__).with_name("refund.lua")
# Go's gRPC from Debian's packages (golang-go golang-google-grpc-dev), built in GOPATH mode.
GO_PATH = Path("/usr/share/gocode")
GO_SOURCE = Path(__file__).with_name("loadgen_grpc.go")
GO_BINARY = ROOT / ".tools" / "loadgen_grpc"
# The gRPC load generator, the cheapest there is: bench/loadgen_grpc.go when Go and its gRPC are
# installed, else bench/loadgen_grpc.mjs (Node.js) when node is, else bench/loadgen_grpc.py.
DEFAULT_GRPC_CLIENT = "go" if shutil.which("go") and (GO_PATH / "src/google.golang.org/grpc").is_dir() \
    else "node" if shutil.which("node") else "python"


def go_loadgen() -> Path:
    """bench/loadgen_grpc.go built (again when its source is newer) into .tools/."""
    if not GO_BINARY.exists() or GO_BINARY.stat().st_mtime < GO_SOURCE.stat().st_mtime:
        GO_BINARY.parent.mkdir(exist_ok=True)
        subprocess.run(["go", "build", "-o", str(GO_BINARY), str(GO_SOURCE)], check=True, cwd=ROOT,
                       env={**os.environ, "GO111MODULE": "off", "GOPATH": str(GO_PATH)})
    return GO_BINARY


def prepare_grpc_client(client: str = DEFAULT_GRPC_CLIENT) -> None:
    """Build what `client` needs before any run: a build's CPU would count as the load generator's."""
    if client == "go":
        go_loadgen()


def _generator(client: str) -> list[str]:
    """argv of the gRPC load generator `client` ("go", "node" or "python")."""
    if client == "go":
        return [str(go_loadgen())]
    if client == "node":
        return ["node", str(Path(__file__).with_name("loadgen_grpc.mjs"))]
    return [sys.executable, "-m", "bench.loadgen_grpc"]


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


def grpc_loadgen(targets: list[str], piece: Slice, concurrency: int, duration: float,
                 client: str = DEFAULT_GRPC_CLIENT) -> subprocess.Popen:
    argv = [*_generator(client), "--first-order", str(piece.first), "--orders",
            str(piece.count), "--amount", AMOUNT, "--concurrency", str(concurrency), "--duration", str(duration)]
    for target in targets:
        argv += ["--target", target]
    for merchant in MERCHANTS:
        argv += ["--merchant", str(merchant)]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)


def json_result(process: subprocess.Popen) -> dict:
    output, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"load generator failed ({process.returncode}):\n{output}")
    return json.loads(output.strip().splitlines()[-1])


def edge_run(edges: list, bodies: Path, connections: int, duration: float) -> list[dict]:
    """wrk at each of `edges` (anything with an `address`), the bodies shared out between them."""
    if len(edges) == 1:
        return [wrk_result(wrk(edges[0].address, bodies, connections, duration))]
    parts = split_file(bodies, len(edges))
    running = [wrk(e.address, part, connections // len(edges), duration) for e, part in zip(edges, parts, strict=False)]
    return [wrk_result(p) for p in running]


def measure(kind: str, start_load, processes: dict[str, list], pg) -> dict:
    """Run the load started by `start_load()` and account each process's CPU to it; `pg`
    (a Postgres or one of its databases, or None) adds the CPU of its backends."""
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
    cpu = {name: sum(a - b for a, b in zip(after[name], before[name], strict=False)) * per for name in processes}
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


def show(result: dict) -> str:
    cpu = " ".join(f"{k}={v:.0f}" for k, v in result["cpu_us"].items())
    noise = f"  other load {result['foreign_cpu_pct']:.0f}%" if "foreign_cpu_pct" in result else ""
    return (f"{result['rate']:7.0f}/s  p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms  "
            f"CPU us/refund: {cpu}{noise}")
