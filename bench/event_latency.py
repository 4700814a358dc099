"""How long after a movement commits a WatchEvents consumer receives its event
(docs/events.md): RecordSale calls one at a time against an in-process service,
each timed from its answer (the transaction has committed) to the event's
arrival on a stream that was caught up. SQLite and PostgreSQL.

    .venv/bin/python -m bench.event_latency [--sales 200] [--pg-url URL]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import uuid

import sqlalchemy as sa

from refund.v1 import refund_pb2
from service import db
from tests.support import data
from tests.support.in_process import InProcessService

MERCHANT = 9140001


def measure(url: str, sales: int, pause: float) -> list[float]:
    data.load(url, [data.merchant(MERCHANT, balances={"HKD": "1.00"})], [])
    service = InProcessService(url)
    arrived: dict[int, float] = {}
    call = service.stub.WatchEvents(refund_pb2.WatchEventsRequest(types=["SALE"]))

    def read():
        try:
            for response in call:
                arrived[response.event.order_id] = time.monotonic()
        except Exception:  # noqa: BLE001 - cancelled at the end
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    answered = {}
    try:
        for i in range(sales):
            service.stub.RecordSale(refund_pb2.RecordSaleRequest(
                order_id=1 + i, merchant_id=str(MERCHANT), merchant_reference=f"lat-{i}", currency="HKD",
                amount="1.00", payment_method="VISA", stan="000001"))
            answered[1 + i] = time.monotonic()
            time.sleep(pause)
        deadline = time.monotonic() + 30
        while len(arrived) < sales and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        call.cancel()
        service.close()
    return [max(0.0, arrived[o] - answered[o]) for o in answered if o in arrived]


def report(name: str, latencies: list[float]) -> None:
    ms = sorted(x * 1000 for x in latencies)
    print(f"{name:10} n={len(ms)}  p50 {statistics.median(ms):6.1f} ms  p95 {ms[int(len(ms) * .95) - 1]:6.1f} ms  "
          f"max {ms[-1]:6.1f} ms")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sales", type=int, default=200)
    parser.add_argument("--pause", type=float, default=0.03, help="seconds between sales")
    parser.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        url = f"sqlite:///{work}/events.db"
        db.migrate(url)
        report("sqlite", measure(url, args.sales, args.pause))
    admin = sa.create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
    name = f"refund_event_latency_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        url = sa.make_url(args.pg_url).set(database=name).render_as_string(hide_password=False)
        db.migrate(url)
        report("postgresql", measure(url, args.sales, args.pause))
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
