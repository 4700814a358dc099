"""Refund-once and no-overdraft under concurrency, against real refund-service
processes: two on one PostgreSQL database, one on the SQLite default."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter

import grpc
import pytest
import sqlalchemy as sa

from refund.v1 import refund_pb2, refund_pb2_grpc
from service import db, schema
from tests.support import data
from tests.support.in_process import error_info

MERCHANT = 7000001
ORDERS = 200
ORDER_AMOUNT = "100.00"
COVERED = 120  # the balance covers this many full refunds
CALLS = 1000


async def _refund_all(addresses: list[str], requests: list[refund_pb2.RefundRequest]):
    """Send every request at once, round-robin over the services; answers in order."""
    channels = [grpc.aio.insecure_channel(a) for a in addresses]
    stubs = itertools.cycle([refund_pb2_grpc.RefundServiceStub(c) for c in channels])

    async def one(stub, request):
        try:
            reply = await stub.Refund(request, timeout=60)
            return "0000", reply.transaction
        except grpc.aio.AioRpcError as error:
            info, decline = error_info(error)
            return info.metadata["responseCode"], decline.transaction if decline else None

    try:
        return await asyncio.gather(*(one(next(stubs), r) for r in requests))
    finally:
        for channel in channels:
            await channel.close()


def storm(url: str, addresses: list[str]):
    data.load(url, [data.merchant(MERCHANT, balances={"HKD": f"{COVERED * 100}.00"})],
              [data.order(10_000 + i, MERCHANT, ORDER_AMOUNT) for i in range(ORDERS)])
    order_ids = [10_000 + i for i in range(ORDERS)] * (CALLS // ORDERS)
    random.Random(7).shuffle(order_ids)
    requests = [refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=o, amount=ORDER_AMOUNT)
                for o in order_ids]
    answers = asyncio.run(_refund_all(addresses, requests))

    codes = Counter(code for code, _ in answers)
    approved = [txn for code, txn in answers if code == "0000"]
    assert codes["0000"] == COVERED, codes
    assert set(codes) <= {"0000", "3003", "4004"}, codes
    assert len({t.order_id for t in approved}) == COVERED  # no order approved twice
    refund_ids = {t.id for t in approved}
    assert all(txn.id in refund_ids for code, txn in answers if code == "3003")  # 3003 carries the real refund

    engine = db.make_engine(url)
    with engine.connect() as connection:
        unsettled = connection.execute(sa.select(schema.balances.c.unsettled)).scalar_one()
        refunds = connection.execute(
            sa.select(schema.transactions.c.order_id, schema.transactions.c.amount)
            .where(schema.transactions.c.type == "REFUND")).all()
        refunded_orders = connection.execute(
            sa.select(sa.func.count()).select_from(schema.orders).where(schema.orders.c.status == "REFUNDED")).scalar()
        audit = Counter(connection.execute(sa.select(schema.refund_attempts.c.response_code)).scalars())
    engine.dispose()
    assert len(refunds) == len({order for order, _ in refunds}) == refunded_orders == COVERED
    assert unsettled == COVERED * 10000 - sum(amount for _, amount in refunds) == 0
    assert sum(audit.values()) == CALLS
    assert audit == codes
    return codes


@pytest.mark.postgres
@pytest.mark.slow
def test_two_service_processes_on_postgresql_refund_each_order_once_and_never_overdraw(postgres_url, start_service):
    services = [start_service(postgres_url), start_service(postgres_url)]
    codes = storm(postgres_url, [s.address for s in services])
    print(f"PostgreSQL storm, 2 processes: {dict(codes)}")


@pytest.mark.slow
def test_one_service_process_on_sqlite_refunds_each_order_once_and_never_overdraws(sqlite_url, start_service):
    service = start_service(sqlite_url)
    codes = storm(sqlite_url, [service.address])
    print(f"SQLite storm, 1 process: {dict(codes)}")


def test_same_order_stampede_gives_one_approval_and_the_same_refund_to_everyone(database_url, start_service):
    data.load(database_url, [data.merchant(MERCHANT, balances={"HKD": "1000.00"})],
              [data.order(42, MERCHANT, "100.00")])
    service = start_service(database_url)
    request = refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=42, amount="100.00")
    answers = asyncio.run(_refund_all([service.address], [request] * 100))
    codes = Counter(code for code, _ in answers)
    assert codes == {"0000": 1, "3003": 99}
    assert len({txn.id for _, txn in answers}) == 1
