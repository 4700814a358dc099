"""The bare chain of issue 16: the project's hops with nothing else, to measure the
project against (docs/performance.md).

    raw ASGI edge on uvicorn (httptools, uvloop)          bench/bare_chain/edge.py
      -> grpc.aio Refund with the signed bytes             bench/bare_chain/wire.py
      -> RSA-2048 PKCS#1 v1.5 verify (key in memory), json.loads,
         ONE asyncpg statement on balances, orders, transactions
                                                          bench/bare_chain/service.py

No audit row, strict parsing, logs, metrics or error paths. Its data are its own
and shaped like `make bench`'s (bench/bare_chain/workload.py), so the bench's
signed bodies and bench/refund.lua work on it unchanged.

From Python (what bench/run.py calls):

    chain = bare_chain.start(pg_admin_url, public_keys, first_order, orders)
    chain.address, chain.pids   # {"service": [pid], "edge": [pid]}; chain.pg.cpu() for its backends
    chain.stop()                # stops both processes, drops the database

From a shell (see `python -m bench.bare_chain --help`):

    python -m bench.bare_chain setup --database-url URL --orders N --merchants M --keys KEYS.json
    python -m bench.bare_chain serve-service --database-url URL --listen 127.0.0.1:50070
    python -m bench.bare_chain serve-edge --listen 127.0.0.1:8070 --service 127.0.0.1:50070
    python -m bench.bare_chain sign --keys KEYS.json --count 1000 --out bodies.txt
    python -m bench.bare_chain drop --database-url URL
"""

from __future__ import annotations

import sys

from bench.bare_chain.workload import AMOUNT, BALANCE, ORDER_BASE, Chain, Process, start_chain

ORDERS = 100_000  # the bare chain
_MODULE = [sys.executable, "-m", "bench.bare_chain"]


def start(pg_admin_url: str, public_keys: dict[int, str], first_order: int = ORDER_BASE, orders: int = ORDERS, *,
          amount: str = AMOUNT, balance: str = BALANCE, service_listen: str = "127.0.0.1:0",
          edge_listen: str = "127.0.0.1:0") -> Chain:
    """A database of its own on `pg_admin_url`'s server, loaded (order o belongs to the
    o % n-th merchant of `public_keys`, in its order), the service and the edge started."""
    from bench.bare_chain.service import setup

    return start_chain(
        pg_admin_url, lambda url: setup(url, public_keys, first_order, orders, amount, balance),
        ("service", lambda url, _: Process("bare-service", [*_MODULE, "serve-service", "--database-url", url,
                                                            "--listen", service_listen],
                                           r"bare-service listening on (\S+)")),
        ("edge", lambda _, service: Process("bare-edge", [*_MODULE, "serve-edge", "--listen", edge_listen,
                                                          "--service", service], r"bare-edge listening on (\S+)")))
