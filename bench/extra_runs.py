"""Runs beyond the main table: the memory soak, scale-out (two services and two
edges on one PostgreSQL), tracing off against on, and py-spy profiles.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import time
from pathlib import Path

from bench.load import edge_run, grpc_loadgen, json_result, measure, show, wrk, wrk_result
from bench.processes import Postgres, Process, project_chain, rss_mib, start_edge, start_service
from bench.workload import BIN, Slice, log, split_file


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


def scale_out(url: str, warm: Path, bodies: Path, grpc_slice: Slice, duration: float, pg: Postgres,
              client: str) -> list[dict]:
    """Two services and two edges on one PostgreSQL, each edge spreading its calls over both services
    (round_robin over a two-address target): signed at the edges, then gRPC at the services."""
    services, edges = [], []
    try:
        services += [start_service(url) for _ in range(2)]
        edges += [start_edge("ipv4:" + ",".join(s.address for s in services)) for _ in range(2)]
        for e, part in zip(edges, split_file(warm, len(edges)), strict=False):  # orders not yet refunded
            wrk_result(wrk(e.address, part, 4, 1))
        group = {"edge": edges, "service": services}
        signed = measure("edge", lambda: edge_run(edges, bodies, 32, duration), group, pg)
        direct = measure("grpc", lambda: [json_result(grpc_loadgen([s.address for s in services], grpc_slice, 32,
                                                                     duration, client))],
                         {"service": services}, pg)
        return [signed, direct]
    finally:
        for process in edges + services:
            process.stop()


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
            chain = project_chain(url, env=env)
            try:
                wrk_result(wrk(chain.address, bodies[f"warm-trace-{mode}"], 8, 2))
                result = measure("edge", lambda: edge_run([chain], bodies[f"trace-{mode}"], 32, duration),
                                 chain.processes, pg)
            finally:
                chain.stop()
            result.update(database="postgres", path="edge", concurrency=32, instances=1, tracing=mode)
            results[mode] = result
            log(f"tracing {mode:3}: {show(result)}")
        results["spans_exported"] = sink.spans
    finally:
        sink.stop()
    return results


def profile_runs(edge: Process, service: Process, bodies: Path, grpc_slice: Slice, duration: float,
                 directory: str, client: str) -> dict:
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
    json_result(grpc_loadgen([service.address], grpc_slice, 32, duration, client))
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
