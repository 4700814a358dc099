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

8. Issue 16's targets (`--rounds`, default 3): this project's signed edge on
   PostgreSQL, the same storm on one merchant, gRPC directly, the signed edge
   on SQLite, and the comparison chains (bench/bare_chain/, bench/peer/, when
   there) alternated round after round; each target printed as the measured
   ratio against its goal.

The report is printed and written to bench-report.md and bench-report.json.

This module only orchestrates; the work is in bench/workload.py (data, keys,
signed bodies), processes.py (starting the processes, PostgreSQL, /proc),
load.py (wrk, the gRPC load generator, measuring one run), floors.py,
extra_runs.py (soak, scale-out, tracing, profiles), targets.py (issue 16's
ratios) and report.py (bench-report.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import targets as issue16
from bench.extra_runs import profile_runs, scale_out, soak, tracing_cost
from bench.floors import chain_floor, grpc_floor, rsa_verify_floor, shares, speed_gauge, store_floor
from bench.load import (
    DEFAULT_GRPC_CLIENT,
    edge_run,
    grpc_loadgen,
    json_result,
    measure,
    prepare_grpc_client,
    show,
    wrk,
    wrk_result,
)
from bench.processes import Postgres, project_chain, rss_mib
from bench.report import GRPC_CLIENTS, machine, markdown
from bench.workload import (
    AMOUNT,
    EDGE_RATE_CAP,
    GRPC_RATE_CAP,
    MERCHANTS,
    Layout,
    Slice,
    check_alignment,
    load_document,
    log,
    make_keys,
    prepare_database,
    settle_database,
    sign_bodies,
)


def plan(args, levels: list[int], arms: list[issue16.Arm]) -> dict[str, Slice]:
    """Every measured run's orders, each run its own."""
    duration = args.duration
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
    slices.update(issue16.plan(layout, arms, args.rounds, duration))
    for piece in slices.values():
        check_alignment(piece)
    return slices


def database_slices(slices: dict[str, Slice]) -> dict[str, list[Slice]]:
    """The orders each database of the project holds (the comparison chains load their own)."""
    main = {n: s for n, s in slices.items() if not n.startswith("target-")}
    return {
        "sqlite": [s for n, s in main.items() if not n.endswith("scale") and n not in ("soak", "floor-grpc")
                   and not n.startswith(("profile", "floor-chain", "trace", "warm-trace"))]
        + issue16.slices_of("sqlite", slices),
        "postgres": [s for n, s in main.items() if n != "floor-grpc"] + issue16.slices_of("pg", slices),
    }


def load_databases(urls: dict[str, str], public: dict[int, str], slices: dict[str, Slice], work: Path) -> None:
    per_db = database_slices(slices)
    loaders = []
    t0 = time.monotonic()
    for db_name, url in urls.items():
        document = work / f"load-{db_name}.json"
        document.write_text(json.dumps(load_document(public, per_db[db_name])))
        loaders.append(prepare_database(url, document))
    log(f"loading {', '.join(f'{n}: {sum(s.count for s in per_db[n])} orders' for n in urls)} with refund-admin")
    for loader, url in zip(loaders, urls.values(), strict=True):
        if loader.wait() != 0:
            raise RuntimeError("refund-admin could not migrate or load the bench data")
        settle_database(url)
    log(f"loaded in {time.monotonic() - t0:.1f}s")


def measure_floors(report: dict, urls: dict[str, str], pg: Postgres | None, private, public, slices, bodies,
                   duration: float, client: str) -> None:
    """The floors first, on a quiet machine."""
    floors = report["floors"]
    floors["speed_gauge_mops"] = speed_gauge()
    log(f"speed gauge: {floors['speed_gauge_mops']:.1f} M loop iterations/s")
    floors["rsa"] = rsa_verify_floor(public[MERCHANTS[0]], private[MERCHANTS[0]])
    log(f"floor: RSA verify {floors['rsa']['verify_per_s']:.0f}/s")
    floors["grpc"] = grpc_floor(slices["floor-grpc"], 32, duration, client)
    log(f"floor: bare gRPC round trip ({client} client) {show(floors['grpc'])}")
    if client != "python":
        floors["grpc-python"] = grpc_floor(slices["floor-grpc"], 32, duration / 2, "python")
        log(f"floor: bare gRPC round trip (python client) {show(floors['grpc-python'])}")
    for db_name, url in urls.items():
        result = store_floor(url, slices["floor-store"], 32, duration, pg if db_name == "postgres" else None)
        floors[f"store-{db_name}"] = result
        log(f"floor: bare store refund on {db_name} {show(result)}")
    if "postgres" in urls:
        floors["chain"] = chain_floor(urls["postgres"], bodies["floor-chain-warm"], bodies["floor-chain"], duration, pg)
        log(f"floor: minimal chain, signed, PostgreSQL {show(floors['chain'])}")


def measure_levels(report: dict, args, db_name: str, url: str, db: Postgres | None, slices, bodies,
                   levels: list[int]) -> None:
    """Signed at the edge, then gRPC at the service, at each concurrency level; RSS, profiles, the soak."""
    chain = project_chain(url, db.name if db else None)
    edge, service = chain.processes["edge"][0], chain.processes["service"][0]
    try:
        # warm-up: connections, pools, caches, prepared statements
        wrk_result(wrk(edge.address, bodies["warm-edge"], 8, 2))
        json_result(grpc_loadgen([service.address], slices["warm-grpc"], 8, 1.5, args.grpc_client))
        report.setdefault("rss_after_warmup", {})[db_name] = {"edge": rss_mib(edge.pid),
                                                              "service": rss_mib(service.pid)}
        for c in levels:
            result = measure("edge", lambda: edge_run([edge], bodies[f"edge-{c}"], c, args.duration),
                             chain.processes, db)
            add(report, result, db_name, "edge", c, 1)
        for c in levels:
            result = measure("grpc", lambda: [json_result(grpc_loadgen([service.address], slices[f"grpc-{c}"], c,
                                                                          args.duration, args.grpc_client))],
                             {"service": [service]}, db)
            add(report, result, db_name, "grpc", c, 1)
        if args.profile and db_name == "postgres":
            report["profiles"] = profile_runs(edge, service, bodies["profile-edge"], slices["profile-grpc"],
                                              args.duration, args.profile, args.grpc_client)
        if db_name == "postgres" and args.soak > 0:
            report["soak"] = soak(edge, service, bodies["soak"], args.soak, db)
        report.setdefault("rss_steady", {})[db_name] = {"edge": rss_mib(edge.pid), "service": rss_mib(service.pid)}
    finally:
        chain.stop()


def run(args) -> dict:
    levels = [int(x) for x in args.levels.split(",")]
    databases = args.databases.split(",")
    arms = issue16.arms_to_run(databases) if args.rounds > 0 else []
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine(), "settings": {
        "duration_s": args.duration, "levels": levels, "soak_s": args.soak, "merchants": len(MERCHANTS),
        "amount": AMOUNT, "grpc_client": args.grpc_client, "rounds": args.rounds}, "runs": [], "floors": {}}
    work = Path(tempfile.mkdtemp(prefix="refund-bench-"))
    pg = None
    try:
        slices = plan(args, levels, arms)
        log(f"keys and {sum(s.count for s in slices.values() if s.signed)} signed bodies "
            f"({os.cpu_count()} processes)")
        private, public = make_keys()
        t0 = time.monotonic()
        bodies = sign_bodies(private, [s for s in slices.values() if s.signed], work)
        log(f"signed in {time.monotonic() - t0:.1f}s")
        urls = {}
        if "postgres" in databases:
            pg = Postgres(args.pg_url)
            urls["postgres"] = pg.url
            report["postgres"] = {"version": pg.version, **pg.settings}
        if "sqlite" in databases:
            urls["sqlite"] = f"sqlite:///{work / 'refund.db'}"
        load_databases(urls, public, slices, work)

        measure_floors(report, urls, pg, private, public, slices, bodies, args.duration, args.grpc_client)
        for db_name, url in urls.items():
            measure_levels(report, args, db_name, url, pg if db_name == "postgres" else None, slices, bodies, levels)
        if args.tracing:
            if "postgres" in urls:
                report["tracing"] = tracing_cost(urls["postgres"], bodies, args.duration, pg)
            else:
                log("--tracing measures on PostgreSQL: add it to --databases")
        if "postgres" in urls and not args.skip_scaleout:
            signed, direct = scale_out(urls["postgres"], bodies["warm-scale"], bodies["edge-scale"],
                                       slices["grpc-scale"], args.duration, pg, args.grpc_client)
            add(report, signed, "postgres", "edge", 32, 2)
            add(report, direct, "postgres", "grpc", 32, 2)
        if arms:
            log(f"targets: {args.rounds} round(s) of {', '.join(arm.name for arm in arms)}")
            report["targets"] = issue16.run_targets(arms, args.rounds, args.duration, slices, bodies, urls, pg,
                                                    public, args.grpc_client)
    finally:
        if pg is not None:
            pg.drop()
        shutil.rmtree(work, ignore_errors=True)
    report["shares"] = shares(report)
    if arms:
        report["target_ratios"] = issue16.ratios(report["targets"], report.get("soak"))
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    return report


def add(report: dict, result: dict, db_name: str, kind: str, connections: int, instances: int) -> None:
    result.update(database=db_name, path=kind, concurrency=connections, instances=instances)
    report["runs"].append(result)
    log(f"{db_name:8} {kind:4} x{instances} c={connections:<3} {show(result)}")
    if result.get("wrapped"):
        log(f"  note: the bodies ran out and wrapped {result['wrapped']} times: some answers are 3003")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=float(os.environ.get("BENCH_DURATION", 8)),
                        help="seconds per measured run (default 8)")
    parser.add_argument("--levels", default=os.environ.get("BENCH_LEVELS", "8,32,64"),
                        help="concurrency levels: connections at the edge, calls in flight at gRPC (default 8,32,64)")
    parser.add_argument("--soak", type=float, default=float(os.environ.get("BENCH_SOAK", 20)),
                        help="seconds of the memory soak on PostgreSQL; 0 skips it "
                             "(default 20; 300 for the 5-minute one)")
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--pg-url", default=os.environ.get("REFUND_BENCH_PG_URL")
                        or os.environ.get("REFUND_TEST_PG_URL") or "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                        help="a PostgreSQL server where the bench may create and drop a database of its own")
    parser.add_argument("--merchants", type=int, default=int(os.environ.get("BENCH_MERCHANTS", 32)),
                        help="merchants the orders are spread over, each with its own key and balance (default 32; "
                             "1 puts every refund on one balance row)")
    parser.add_argument("--grpc-client", choices=list(GRPC_CLIENTS), default=DEFAULT_GRPC_CLIENT,
                        help="gRPC load generator: bench/loadgen_grpc.go (Go's grpc, the default when Go and "
                             "golang-google-grpc-dev are installed), bench/loadgen_grpc.mjs (Node.js http2, the "
                             "default when only node is) or bench/loadgen_grpc.py (grpc.aio)")
    parser.add_argument("--skip-scaleout", action="store_true")
    parser.add_argument("--tracing", action="store_true",
                        help="also measure OpenTelemetry tracing on (100%% sampled, OTLP) against off, on PostgreSQL")
    parser.add_argument("--profile", metavar="DIR", help="also run py-spy on the service and the edge; stacks to DIR")
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", 3)),
                        help="rounds of issue 16's targets: the chains alternated, each run --duration seconds "
                             "(default 3; 0 skips them)")
    parser.add_argument("--report", default="bench-report", help="report file stem (default bench-report: .md, .json)")
    args = parser.parse_args(argv)
    MERCHANTS[:] = [8_000_001 + i for i in range(args.merchants)]
    if shutil.which("wrk") is None:
        print("make bench needs wrk (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    prepare_grpc_client(args.grpc_client)
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
