"""The report of `make bench`: bench-report.md's tables (printed too), from the
report dictionary that bench-report.json holds.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess

from bench import targets as issue16
from bench.workload import ROOT

GRPC_CLIENTS = {"go": "bench/loadgen_grpc.go (Go's grpc) for gRPC",
                "node": "bench/loadgen_grpc.mjs (Node.js http2) for gRPC",
                "python": "bench/loadgen_grpc.py (a Python grpc.aio client) for gRPC"}


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


def markdown(report: dict) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        "# Refund gateway benchmark",
        "",
        f"{report['started']}, commit {m['commit']}: {m['cpus']} cores ({m['cpu_model']}), Python {m['python']}, "
        f"grpcio {m['grpcio']}, asyncpg {m['asyncpg']}"
        + (f", PostgreSQL {report['postgres']['version']} "
           f"(synchronous_commit={report['postgres']['synchronous_commit']}, "
           f"fsync={report['postgres']['fsync']})" if "postgres" in report else "") + ".",
        f"Each run {s['duration_s']:g} s, every request on a different order, {s['merchants']} merchants, "
        f"amount {s['amount']} HKD (full refunds). Load generators run on the same 2 cores: wrk for the edge, "
        + GRPC_CLIENTS.get(s.get("grpc_client"), GRPC_CLIENTS["python"])
        + "; their CPU is in the `loadgen` column, not in the total.",
        "",
        *targets_section(report),
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
            f"{c.get('edge', 0):.0f} | {c['service']:.0f} | {c.get('postgres', 0):.0f} "
            f"| {c.get('postgres_aux', 0):.0f} "
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
            extra = (f", PostgreSQL backends {r['cpu_us'].get('postgres', 0):.0f} us"
                     if "postgres" in r["cpu_us"] else "")
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
                         f"the end ({sk[name]['growth_mib']:+.1f} in all, "
                         f"{sk[name]['growth_after_first_fifth_mib']:+.1f} "
                         f"after the first fifth), at most {sk[name]['max_mib']:.1f}.")
    if report.get("tracing"):
        t = report["tracing"]
        lines += ["", "## Tracing off and on (signed refunds at the edge, PostgreSQL, 32 connections)", "",
                  "Fresh processes for each; on: OTEL_TRACES_EXPORTER=otlp, every request sampled "
                  f"(OTEL_TRACES_SAMPLER=always_on), {t['spans_exported']} spans exported to an OTLP sink "
                  "in the bench.",
                  "", "| tracing | refunds/s | p50 ms | p99 ms | edge us | service us | total us |",
                  "|---|---|---|---|---|---|---|"]
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


def targets_section(report: dict) -> list[str]:
    """Issue 16's targets, each as the ratio measured in this run against its goal."""
    if "targets" not in report:
        return []
    t = report["targets"]
    lines = ["## Targets (issue 16): measured ratio vs goal", "",
             f"The chains below were run alternately, {t['rounds']} round(s) of {report['settings']['duration_s']:g} s "
             "each, signed at 32 connections (gRPC: 32 in flight), every run on orders of its own. A ratio is taken "
             "within each round; the median of the rounds is compared with the goal, the range is the rounds' "
             "spread. CPU per refund here is the chain's own processes and its database's backends (the "
             "instance-wide PostgreSQL auxiliaries and the load generator left out). `CPU bound`, for a rate: the "
             "inverse ratio of the two chains' CPU per refund, counting everything their runs kept busy (load "
             "generator, PostgreSQL's auxiliaries): the rate ratio they would show if both kept the machine "
             "equally busy. A measured ratio differs from it only by how much busier one chain kept the two cores "
             "(`busy` below), so a goal well above it needs the CPU per refund to change, not less waiting.", "",
             "| target | measured | rounds' range | CPU bound | goal | met |", "|---|---|---|---|---|---|"]
    for row in report.get("target_ratios", []):
        if "missing" in row:
            lines.append(f"| {row['target']} | not measured: {row['missing']} | | | {row['goal']} | |")
        else:
            bound = f"{row['cpu_bound']:.2f}" if "cpu_bound" in row else ""
            lines.append(f"| {row['target']} | {row['ratio']:.2f} | {row['low']:.2f} to {row['high']:.2f} | {bound} "
                         f"| {row['goal']} | {'yes' if row['met'] else 'NO'} |")
    lines += ["", "| chain | refunds/s | p99 ms | CPU us per refund | by process | busy | other load | wrapped "
              "| answers |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in issue16.medians(t).items():
        parts = ", ".join(f"{k} {v:.0f}" for k, v in m["cpu_us"].items() if k != "postgres_aux")
        lines.append(f"| {name}: {m['label']} | {m['rate']:.0f} | {m['p99_ms']:.1f} | {m['cpu']:.0f} | {parts} "
                     f"| {m['busy_pct']:.0f}% | {m['foreign_cpu_pct']:.0f}% | {m['wrapped']} | {m['answers']} |")
    lines += ["", "Medians of the rounds. `by process` includes the load generator (`loadgen`), which `CPU us per "
              "refund` leaves out. `busy`: the share of the machine's two cores busy during the run, whoever used "
              "them. `wrapped`: times the pre-signed bodies ran out and repeated (those answers are 3003 and "
              "cheaper); a ratio with wrapped runs flatters that chain. `answers`: of all the rounds.", ""]
    return lines
