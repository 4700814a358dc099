"""Compare versions of the code on this noisy machine: each version in its own
copy of the tree, all on the same loaded data, alternated round after round
(A, B, A, B, ... with the order rotated each round), medians of the rounds.

    git worktree add /tmp/before HEAD~1 && cp -r gen/refund /tmp/before/gen/
    .venv/bin/python -m bench.ab /tmp/before . --rounds 3 --modes edge-postgres,grpc-postgres,edge-sqlite

Each round starts `refund-service` and `refund-edge` from each tree (PYTHONPATH
set to it), warms them up and runs each mode for `--duration` seconds on orders
no other run touches. Extra environment for a tree: AB_ENV_<its directory name>
as JSON, e.g. AB_ENV_before='{"REFUND_LOG_LEVEL": "warning"}'.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench import run as bench


def start(tree: Path, url: str) -> tuple[bench.Process, bench.Process]:
    env = {"REFUND_DATABASE_URL": url, "REFUND_GRPC_LISTEN": "127.0.0.1:0", "PYTHONPATH": f"{tree}:{tree}/gen",
           "REFUND_EDGE_RATE_LIMIT": "off",  # one merchant at full speed; an edge without the setting ignores it
           **json.loads(os.environ.get(f"AB_ENV_{tree.name}", "{}"))}
    service = bench.Process("service", [sys.executable, "-c", "from service.server import main; main()"],
                            r"listening on (\S+)", env, cwd=tree)
    try:
        edge = bench.Process("edge", [sys.executable, "-c", "from gateway_edge.server import main; main()",
                                      "--listen", "127.0.0.1:0", "--grpc-target", service.address,
                                      "--log-level", "warning"], r"refund-edge listening on (\S+)", env, cwd=tree)
    except Exception:
        service.stop()
        raise
    return service, edge


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=lambda p: Path(p).resolve())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--modes", default="edge-postgres,grpc-postgres",
                        help="comma-separated PATH-DATABASE: edge or grpc, postgres or sqlite")
    parser.add_argument("--pg-url", default=os.environ.get("REFUND_BENCH_PG_URL",
                                                           "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    args = parser.parse_args(argv)
    modes = [tuple(m.split("-")) for m in args.modes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="refund-ab-"))
    layout = bench.Layout()
    runs = {(r, t, m): layout.add(f"{r}-{t}-{'-'.join(m)}", int(args.duration * (1800 if m[0] == "edge" else 2500)),
                                  m[0] == "edge")
            for r in range(args.rounds) for t in range(len(args.trees)) for m in modes}
    warm = {(r, t): (layout.add(f"warm-edge-{r}-{t}", 1500, True), layout.add(f"warm-grpc-{r}-{t}", 1500, False))
            for r in range(args.rounds) for t in range(len(args.trees))}  # fresh orders: warm the approvals
    private, public = bench.make_keys()
    bodies = bench.sign_bodies(private, [s for s in layout.slices.values() if s.signed], work)
    pg = bench.Postgres(args.pg_url) if any(db == "postgres" for _, db in modes) else None
    urls = {db: pg.url if db == "postgres" else f"sqlite:///{work / 'refund.db'}" for _, db in modes}
    document = work / "load.json"
    document.write_text(json.dumps(bench.load_document(public, list(layout.slices.values()))))
    for url in urls.values():
        if bench.prepare_database(url, document).wait() != 0:
            raise RuntimeError("refund-admin could not load the data")
    results: dict = {}
    try:
        for r in range(args.rounds):
            order = list(enumerate(args.trees))
            order = order[r % len(order):] + order[:r % len(order)]
            for t, tree in order:
                for db, url in urls.items():
                    service, edge = start(tree, url)
                    try:
                        bench.wrk_result(bench.wrk(edge.address, bodies[warm[(r, t)][0].name], 8, 2))
                        bench.json_result(bench.grpc_loadgen([service.address], warm[(r, t)][1], 8, 1.5))
                        for mode in modes:
                            if mode[1] != db:
                                continue
                            piece = runs[(r, t, mode)]
                            if mode[0] == "edge":
                                result = bench.measure("edge", lambda: bench.edge_run(
                                    [edge], bodies[piece.name], args.connections, args.duration),
                                    {"edge": [edge], "service": [service]}, pg if db == "postgres" else None)
                            else:
                                result = bench.measure("grpc", lambda: [bench.json_result(bench.grpc_loadgen(
                                    [service.address], piece, args.connections, args.duration))],
                                    {"service": [service]}, pg if db == "postgres" else None)
                            results.setdefault((t, mode), []).append(result)
                            bench.log(f"round {r} {tree.name} {'-'.join(mode)}: {bench.show(result)}")
                    finally:
                        edge.stop()
                        service.stop()
    finally:
        if pg is not None:
            pg.drop()
    print("\nmedians of the rounds")
    for mode in modes:
        for t, tree in enumerate(args.trees):
            done = results.get((t, mode), [])
            if done:
                cpu = " ".join(f"{k}={statistics.median(x['cpu_us'][k] for x in done):.0f}" for k in done[0]["cpu_us"])
                print(f"{'-'.join(mode):14} {tree.name:12} {statistics.median(x['rate'] for x in done):6.0f}/s  "
                      f"p99 {statistics.median(x['p99_ms'] for x in done):6.1f} ms  CPU us/refund: {cpu}  "
                      f"total={statistics.median(x['cpu_total_us'] for x in done):.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
