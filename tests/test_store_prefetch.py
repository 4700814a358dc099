"""MerchantRefund on PostgreSQL reads the merchant's keys and the order in one
statement (credentials_and_snapshot) and decides on that read: the read is
the same as the two it replaces, and a read that is stale by the time the
refund applies is caught by the guarded apply, never refunded twice."""

from __future__ import annotations

import asyncio

import pytest

from service import domain
from service.store_pg import PostgresStore
from tests import data

pytestmark = pytest.mark.postgres

MERCHANT, OTHER = 3000001, 3000002


@pytest.fixture
def loaded(postgres_url):
    _, public = data.new_key_pair()
    data.load(postgres_url,
              [data.merchant(MERCHANT, public, balances={"HKD": "100.00"}), data.merchant(OTHER, balances={"HKD": "1"})],
              [data.order(1, MERCHANT, "10.00"), data.order(2, MERCHANT, "10.00"), data.order(3, OTHER, "10.00")])
    return postgres_url


def run(url, work):
    async def main():
        store = await PostgresStore.open(url)
        try:
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(main())


def test_one_read_gives_what_the_credentials_and_snapshot_reads_give(loaded):
    async def work(store):
        async with store._connection() as conn:
            expected = [await store._snapshot(conn, domain.RefundCommand(MERCHANT, order, reference, "1"))
                        for order, reference in ((1, None), (None, "ref-2"), (3, None), (99, None))]
        got = [await store.credentials_and_snapshot(MERCHANT, order, reference)
               for order, reference in ((1, None), (None, "ref-2"), (3, None), (99, None))]
        credentials = await store.merchant_credentials(MERCHANT)
        return expected, got, credentials, await store.credentials_and_snapshot(42, 1, None)

    expected, got, credentials, unknown = run(loaded, work)
    assert [snapshot for _, snapshot in got] == expected
    assert expected[0].order.id == 1 and expected[1].order.id == 2
    assert expected[2] is None and expected[3] is None  # another merchant's order reads as missing
    assert all(c == credentials for c, _ in got) and credentials.public_keys_pem
    assert unknown == (None, None)


def test_a_stale_prefetched_snapshot_never_refunds_twice(loaded):
    async def work(store):
        _, stale = await store.credentials_and_snapshot(MERCHANT, 1, None)
        command = domain.RefundCommand(MERCHANT, 1, None, "10.00")
        first = await store.refund(command)  # refunded since the prefetch
        second = await store.refund(command, stale)  # decides on the stale read: the apply refuses it
        return first, second

    first, second = run(loaded, work)
    assert first.code is domain.ResponseCode.SUCCESS
    assert second.code is domain.ResponseCode.ALREADY_REFUNDED
    assert second.transaction.id == first.transaction.id
