"""The conventional peer of issue 16: FastAPI + pydantic + SQLAlchemy 2 async ORM
(asyncpg), one process, no gRPC hop (bench/peer/app.py), on data of its own shaped
like `make bench`'s (bench/bare_chain/workload.py): the bench's signed bodies and
bench/refund.lua work on it unchanged. Its packages are in the `bench` extra.

From Python (what bench/run.py calls):

    chain = peer.start(pg_admin_url, public_keys, first_order, orders)
    chain.address, chain.pids   # {"peer": [pid]}; chain.pg.cpu() for its backends
    chain.stop()                # stops the process, drops the database

From a shell (see `python -m bench.peer --help`):

    python -m bench.peer setup --database-url URL --orders N --merchants M --keys KEYS.json
    python -m bench.peer serve --database-url URL --listen 127.0.0.1:8072
    python -m bench.peer sign --keys KEYS.json --count 1000 --out bodies.txt
    python -m bench.peer drop --database-url URL
"""

from __future__ import annotations

import sys

from bench.bare_chain.workload import AMOUNT, BALANCE, ORDER_BASE, Chain, Process, start_chain

ORDERS = 100_000  # as many as the bare chain's


def start(pg_admin_url: str, public_keys: dict[int, str], first_order: int = ORDER_BASE, orders: int = ORDERS, *,
          amount: str = AMOUNT, balance: str = BALANCE, listen: str = "127.0.0.1:0") -> Chain:
    """A database of its own on `pg_admin_url`'s server, loaded (order o belongs to the
    o % n-th merchant of `public_keys`, in its order), the peer started."""
    from bench.peer.data import setup

    return start_chain(
        pg_admin_url, lambda url: setup(url, public_keys, first_order, orders, amount, balance),
        ("peer", lambda url, _: Process("peer", [sys.executable, "-m", "bench.peer", "serve", "--database-url", url,
                                                 "--listen", listen], r"peer listening on (\S+)")))
