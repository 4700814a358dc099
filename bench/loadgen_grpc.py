"""gRPC load generator: unsigned `RefundService.Refund` calls, `--concurrency`
in flight, each on a distinct order, for `--duration` seconds (or until the
orders run out). Prints one JSON line: requests, seconds, refunds/s, latency
p50/p99 (ms), the gRPC status codes seen, and this process's own CPU.

It runs in its own process and competes with the service for this machine's
cores; the orchestrator reports its CPU next to the others. Requests are
serialised before the clock starts and sent as raw bytes, and answers are not
parsed (only their status code is counted), so the generator spends as little
CPU per call as the Python gRPC client allows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from collections import Counter

import grpc

from refund.v1 import refund_pb2

METHOD = "/refund.v1.RefundService/Refund"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


async def run(targets: list[str], merchants: list[int], first_order: int, orders: int, amount: str,
              concurrency: int, duration: float) -> dict:
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    calls = [c.unary_unary(METHOD, request_serializer=None, response_deserializer=None) for c in channels]
    for channel in channels:
        await channel.channel_ready()
    bodies = [refund_pb2.RefundRequest(merchant_id=str(merchants[i % len(merchants)]), order_id=first_order + i,
                                       amount=amount).SerializeToString() for i in range(orders)]
    latencies: list[float] = []
    codes: Counter = Counter()
    next_index = 0
    stop_at = 0.0

    async def worker(number: int):
        nonlocal next_index
        call = calls[number % len(calls)]
        perf = time.perf_counter
        while True:
            index = next_index
            if index >= len(bodies) or perf() >= stop_at:
                return
            next_index = index + 1
            started = perf()
            try:
                await call(bodies[index], timeout=10)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as error:
                codes[error.code().name] += 1
            latencies.append(perf() - started)

    cpu0, wall0 = _cpu(), time.perf_counter()
    stop_at = wall0 + duration
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    wall = time.perf_counter() - wall0
    cpu = _cpu() - cpu0
    for channel in channels:
        await channel.close()
    latencies.sort()
    done = len(latencies)
    return {"requests": done, "seconds": wall, "rate": done / wall if wall else 0.0,
            "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000,
            "codes": dict(codes), "exhausted": next_index >= len(bodies),
            "client_cpu_us": cpu / done * 1e6 if done else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", required=True, help="HOST:PORT; repeat to round-robin")
    parser.add_argument("--merchant", type=int, action="append", required=True)
    parser.add_argument("--first-order", type=int, required=True)
    parser.add_argument("--orders", type=int, required=True)
    parser.add_argument("--amount", default="10.00")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--uvloop", action="store_true", help="run the client on uvloop")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        uvloop.install()
    result = asyncio.run(run(args.target, args.merchant, args.first_order, args.orders, args.amount,
                             args.concurrency, args.duration))
    result["pid"] = os.getpid()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
