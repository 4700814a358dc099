"""What the two comparison chains (bench.bare_chain and bench.peer) take from the
project's bench workload, so that the signed bodies of `make bench` and wrk's
script (bench/refund.lua) work on them unchanged:

- merchants numbered as the bench numbers them, each with an RSA-2048 key;
- orders: order o belongs to merchants[o % len(merchants)] (the bench's
  `merchant_of`), paid (status SUCCESS), AMOUNT HKD each; every merchant's
  HKD balance is BALANCE;
- signed envelopes `{"request": ..., "signature": ...}` made by the bench's own
  signer, one a line;
- the bench's Process (a child process, its pid, the address it prints) and
  Postgres (a database of its own, the CPU of its backends).

This module is the one place that names where those live (bench/workload.py and
bench/processes.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from sqlalchemy.engine import make_url

from bench import processes
from bench import workload as bench

AMOUNT = bench.AMOUNT  # of each order, and of each refund the bench asks for
BALANCE = bench.BALANCE  # each merchant's unsettled HKD balance at the start
ORDER_BASE = bench.ORDER_BASE
CURRENCY = "HKD"  # the bench's only currency: two decimals
HUNDRED = 100  # minor units of one HKD
Process = processes.Process
Postgres = processes.Postgres


def minor_units(amount: str | Decimal) -> int:
    """"10.00" or Decimal("10.00") -> 1000; ValueError if not a whole number of cents."""
    cents = Decimal(amount) * HUNDRED
    if cents != cents.to_integral_value():
        raise ValueError(f"{amount} is not a whole number of cents")
    return int(cents)


def merchant_ids(count: int) -> list[int]:
    """The bench's merchants when it runs with --merchants=count (8000001, 8000002, ...)."""
    bench.MERCHANTS[:] = [8_000_001 + i for i in range(count)]  # as bench/run.py's main sets them
    return list(bench.MERCHANTS)


# -- keys: {"private": {merchant: PEM}, "public": {merchant: PEM}} in a JSON file ----------


def make_keys_file(path: Path, merchants: int) -> dict[int, str]:
    """Fresh keys for the bench's first `merchants` merchants, written to `path`; the public PEMs."""
    merchant_ids(merchants)
    private, public = bench.make_keys(list(bench.MERCHANTS))
    document = {"private": {str(m): pem.decode("ascii") for m, pem in private.items()},
                "public": {str(m): pem for m, pem in public.items()}}
    path.write_text(json.dumps(document))
    return public


def read_keys(path: Path) -> tuple[dict[int, bytes], dict[int, str]]:
    """(private PEMs, public PEMs) by merchant id, in the file's (the bench's) order."""
    document = json.loads(path.read_text())
    return ({int(m): pem.encode("ascii") for m, pem in document["private"].items()},
            {int(m): pem for m, pem in document["public"].items()})


def sign(keys_path: Path, first_order: int, count: int, out: Path) -> Path:
    """`count` signed envelopes for orders first_order, first_order + 1, ... written to `out`,
    one a line, by the bench's own signer (on every core)."""
    private, _ = read_keys(keys_path)
    bench.MERCHANTS[:] = list(private)
    with tempfile.TemporaryDirectory(prefix="chain-sign-") as directory:
        made = bench.sign_bodies(private, [bench.Slice("chain", first_order, count, True)], Path(directory))
        os.replace(made["chain"], out)
    return out


# -- databases ----------------------------------------------------------------------------


def asyncpg_args(database_url: str) -> dict:
    """asyncpg.connect()/create_pool() keywords for any SQLAlchemy-style PostgreSQL URL."""
    url = make_url(database_url)
    return dict(host=url.host or "127.0.0.1", port=url.port or 5432, user=url.username, password=url.password,
                database=url.database)


async def create_database(database_url: str) -> None:
    """Create the URL's database (dropped first if it exists: a chain's data are its own)."""
    import asyncpg

    args = asyncpg_args(database_url)
    name = args.pop("database")
    admin = await asyncpg.connect(**args, database="postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


async def drop_database(database_url: str) -> None:
    import asyncpg

    args = asyncpg_args(database_url)
    name = args.pop("database")
    admin = await asyncpg.connect(**args, database="postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


# -- a running chain ----------------------------------------------------------------------


@dataclass
class Chain:
    """A comparison chain started by `start()`: its processes by role, its own database
    (pg.name; pg.cpu() samples its backends as the bench does for the project's), the
    address wrk is pointed at."""

    processes: dict[str, list[Process]]
    pg: Postgres
    address: str
    stopped: bool = field(default=False, repr=False)

    @property
    def pids(self) -> dict[str, list[int]]:
        return {role: [p.pid for p in group] for role, group in self.processes.items()}

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def stop(self) -> None:
        """Stop the processes (edge first) and drop the database."""
        if self.stopped:
            return
        self.stopped = True
        try:
            for group in reversed(list(self.processes.values())):
                for process in group:
                    process.stop()
        finally:
            self.pg.drop()


def start_chain(pg_admin_url: str, load, *roles) -> Chain:
    """A chain on a database of its own on `pg_admin_url`'s server: `await load(database_url)`,
    then each (role, start) in turn, `start(database_url, address of the one before) -> Process`;
    wrk is pointed at the last one. On any failure what was started is stopped and the database
    dropped."""
    import asyncio

    pg = Postgres(pg_admin_url)
    processes: dict[str, list[Process]] = {}
    address = None
    try:
        asyncio.run(load(pg.url))
        for role, start in roles:
            process = start(pg.url, address)
            processes[role] = [process]
            address = process.address
    except BaseException:
        Chain(processes, pg, "").stop()
        raise
    return Chain(processes, pg, address)


# -- the command lines' shared parts ------------------------------------------------------


def add_setup_arguments(parser) -> None:
    """`setup`'s options, the same for both chains."""
    parser.add_argument("--database-url", required=True, help="the chain's own database (dropped and created)")
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--merchants", type=int, default=32)
    parser.add_argument("--first-order", type=int, default=ORDER_BASE)
    parser.add_argument("--keys", type=Path, required=True,
                        help="JSON file of the merchants' keys; made (fresh keys) when it does not exist")


def add_sign_arguments(parser) -> None:
    parser.add_argument("--keys", type=Path, required=True)
    parser.add_argument("--first-order", type=int, default=ORDER_BASE)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="signed envelopes, one a line (bench/refund.lua's)")


def public_keys_for_setup(args) -> dict[int, str]:
    """The public keys of args.keys, made there first if the file does not exist."""
    if not args.keys.exists():
        return make_keys_file(args.keys, args.merchants)
    _, public = read_keys(args.keys)
    if len(public) != args.merchants:
        raise SystemExit(f"{args.keys} holds {len(public)} merchants' keys, not {args.merchants}")
    return public


def serve_asgi(app, address: str, name: str) -> None:
    """`app` on uvicorn (uvloop, httptools, no access log) at HOST:PORT (port 0: a free one) until
    SIGTERM or SIGINT; prints "NAME listening on HOST:PORT" once it accepts connections."""
    import socket

    import uvicorn

    host, _, port = address.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(2048)  # before saying so: a caller connects as soon as it reads the line
    print(f"{name} listening on {host}:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, loop="uvloop", http="httptools", ws="none", lifespan="on", log_config=None,
                            log_level="warning", access_log=False, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
