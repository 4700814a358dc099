"""The floor of the database part of a refund: the service's own store
(`service.stores.open_store`, as `refund-service` opens it) called directly,
with no gRPC and no signature, `--concurrency` refunds in flight, each on a
distinct order. Prints one JSON line like bench/loadgen_grpc.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter

from bench.loadgen_grpc import _cpu, percentile
from service import domain
from service.stores import open_store
from service.usecases import refunds


async def run(url: str, merchants: list[int], first_order: int, orders: int, amount: str, concurrency: int,
              duration: float) -> dict:
    store = await open_store(url, command_timeout=10.0)
    commands = [domain.RefundCommand(merchants[i % len(merchants)], first_order + i, None, amount)
                for i in range(orders)]
    latencies: list[float] = []
    codes: Counter = Counter()
    next_index = 0

    async def worker(stop_at: float):
        nonlocal next_index
        perf = time.perf_counter
        while next_index < len(commands) and perf() < stop_at:
            command = commands[next_index]
            next_index += 1
            started = perf()
            result = await refunds.refund(store, command)
            latencies.append(perf() - started)
            codes[result.code.value] += 1

    # warm the pool and the prepared statements on a few orders first, then wait for
    # the orchestrator (which samples the database's CPU) to say go
    warm, commands = commands[:200], commands[200:]
    await asyncio.gather(*(refunds.refund(store, command) for command in warm))
    await handshake("ready")
    cpu0, wall0 = _cpu(), time.perf_counter()
    await asyncio.gather(*(worker(wall0 + duration) for _ in range(concurrency)))
    wall = time.perf_counter() - wall0
    cpu = _cpu() - cpu0
    latencies.sort()
    done = len(latencies)
    result = {"requests": done, "seconds": wall, "rate": done / wall if wall else 0.0,
              "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000,
              "codes": dict(codes), "exhausted": next_index >= len(commands),
              "client_cpu_us": cpu / done * 1e6 if done else None, "pid": os.getpid()}
    await handshake(json.dumps(result))  # the database is sampled again before the pool closes
    await store.close()
    return result


async def handshake(line: str) -> None:
    """Print a line, then wait for one on stdin."""
    print(line, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--merchant", type=int, action="append", required=True)
    parser.add_argument("--first-order", type=int, required=True)
    parser.add_argument("--orders", type=int, required=True)
    parser.add_argument("--amount", default="10.00")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    from service import server

    runner = getattr(server, "run_event_loop", asyncio.run)  # the service's own event loop choice
    result = runner(run(args.database_url, args.merchant, args.first_order, args.orders, args.amount,
                        args.concurrency, args.duration))
    return 0 if result["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
