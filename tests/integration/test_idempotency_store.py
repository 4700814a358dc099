"""The stores' Idempotency-Key claims and replay hashes, on SQLite and
PostgreSQL, and what the servicer does with a claim whose call decided nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import grpc
import pytest

from refund.v1 import refund_pb2
from service import grpc_api
from service.clock import utc_now
from service.stores.port import ClaimState, StoreUnavailable
from tests.support import data
from tests.support.in_process import InProcessService, error_info, with_store
from tests.support.keys import EXAMPLE_PUB_PEM, example_key, sign

LEASE = timedelta(seconds=60)


def test_a_key_is_claimed_once_then_holds_its_answer(database_url):
    async def body(store):
        now = utc_now()
        first = await store.claim_idempotency(1, "k", "hash-a", now, now - LEASE)
        assert first.state is ClaimState.CLAIMED and first.claimed_at == now
        assert (await store.claim_idempotency(1, "k", "hash-a", utc_now(), utc_now() - LEASE)).state \
            is ClaimState.IN_PROGRESS
        assert (await store.claim_idempotency(1, "k", "hash-b", utc_now(), utc_now() - LEASE)).state \
            is ClaimState.CONFLICT
        assert (await store.claim_idempotency(2, "k", "hash-b", utc_now(), utc_now() - LEASE)).state \
            is ClaimState.CLAIMED  # keys are per merchant

        await store.finish_idempotency(1, "k", first.claimed_at, b"\x00stored answer\xff")
        stored = await store.claim_idempotency(1, "k", "hash-a", utc_now(), utc_now() - LEASE)
        assert (stored.state, stored.response) == (ClaimState.STORED, b"\x00stored answer\xff")
        # Storing again (a call that lost its claim) changes nothing.
        await store.finish_idempotency(1, "k", first.claimed_at, b"other")
        assert (await store.claim_idempotency(1, "k", "hash-a", utc_now(), utc_now() - LEASE)).response \
            == b"\x00stored answer\xff"

    with_store(database_url, body)


def test_a_released_key_or_a_stale_claim_can_be_claimed_again(database_url):
    async def body(store):
        first = await store.claim_idempotency(1, "released", "h", utc_now(), utc_now() - LEASE)
        await store.finish_idempotency(1, "released", first.claimed_at, None)
        assert (await store.claim_idempotency(1, "released", "h", utc_now(), utc_now() - LEASE)).state \
            is ClaimState.CLAIMED

        dead = await store.claim_idempotency(1, "stale", "h", utc_now() - timedelta(seconds=120),
                                             utc_now() - LEASE)
        assert dead.state is ClaimState.CLAIMED
        taken = await store.claim_idempotency(1, "stale", "h", utc_now(), utc_now() - LEASE)
        assert taken.state is ClaimState.CLAIMED and taken.claimed_at != dead.claimed_at
        # The dead call's late answer is not stored over the new claim; the new one's is.
        await store.finish_idempotency(1, "stale", dead.claimed_at, b"late")
        await store.finish_idempotency(1, "stale", taken.claimed_at, b"new")
        assert (await store.claim_idempotency(1, "stale", "h", utc_now(), utc_now() - LEASE)).response == b"new"

    with_store(database_url, body)


def test_concurrent_claims_of_one_key_give_it_to_exactly_one(database_url):
    async def body(store):
        now = utc_now()
        claims = await asyncio.gather(*(store.claim_idempotency(7, "race", "h", now, now - LEASE)
                                        for _ in range(20)))
        states = sorted(claim.state.value for claim in claims)
        assert states == ["claimed"] + ["in_progress"] * 19

    with_store(database_url, body)


def test_a_request_hash_is_remembered_once(database_url):
    async def body(store):
        expires = utc_now() + timedelta(seconds=300)
        assert await store.remember_request("a" * 64, 1, expires) is True
        assert await store.remember_request("a" * 64, 1, expires) is False
        assert await store.remember_request("b" * 64, 1, expires) is True

    with_store(database_url, body)


class _FailingRefunds:
    """A store whose refunds fail as the database would when it is unreachable."""

    def __init__(self, store):
        self._store = store
        self.fail = True

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def try_refund(self, command, signed_by):
        if self.fail:
            raise StoreUnavailable("connection refused")
        return await self._store.try_refund(command, signed_by)


def test_a_call_answered_9001_frees_its_key_and_the_retry_runs(sqlite_url):
    data.load(sqlite_url, [data.merchant(3000001, EXAMPLE_PUB_PEM.read_text(), {"HKD": "100.00"})],
              [data.order(1, 3000001, "10.00")])
    service = InProcessService(sqlite_url)
    failing = _FailingRefunds(service.store)
    try:
        request = b'{"merchantId":"3000001","orderId":1,"amount":10.00}'
        signed = refund_pb2.MerchantRefundRequest(request=request, signature=sign(example_key(), request),
                                          idempotency_key="k-1")

        async def call_servicer():
            servicer = grpc_api.RefundServicer(failing)
            context = _Context()
            with pytest.raises(_Aborted) as aborted:
                await servicer.MerchantRefund(signed, context)
            await asyncio.sleep(0.2)  # the background release
            return aborted.value.code

        assert asyncio.run_coroutine_threadsafe(call_servicer(), service._loop).result(10) \
            == grpc.StatusCode.UNAVAILABLE
        # The key was released: the retry through the real server runs and is stored.
        first = service.stub.MerchantRefund(signed, timeout=5)
        assert first.response_code == "0000"
        assert service.stub.MerchantRefund(signed, timeout=5) == first
        other = refund_pb2.MerchantRefundRequest(request=request.replace(b"10.00", b"5.00"),
                                         signature=sign(example_key(), request.replace(b"10.00", b"5.00")),
                                         idempotency_key="k-1")
        with pytest.raises(grpc.RpcError) as conflict:
            service.stub.MerchantRefund(other, timeout=5)
        assert conflict.value.code() == grpc.StatusCode.ABORTED
        assert error_info(conflict.value)[0].reason == "IDEMPOTENCY_CONFLICT"
    finally:
        service.close()


class _Aborted(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


class _Context:
    """Just enough of grpc.aio.ServicerContext for RefundServicer."""

    def time_remaining(self):
        return 5.0

    async def abort(self, code, details, trailing_metadata=()):
        raise _Aborted(code)
