"""At most once per Idempotency-Key (docs/api.md section 7).

The first call with a key claims it (a row whose primary key keeps it unique
across processes), runs, and stores its answer; a later call with the same
request bytes gets that answer again, one with other bytes 1003. A call that
finds the key claimed by a call still running waits for that call's answer
(within its own deadline). An answer that decided nothing (9001, 9999, 2001,
2003, or no answer at all) is not stored: the key is released and a retry runs
again. Stored answers are opaque bytes, written by the caller's `encode`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from service import domain
from service.clock import utc_now
from service.domain import ResponseCode
from service.stores.port import ClaimState, Store

log = logging.getLogger(__name__)

# Answers that say nothing was decided.
UNSTORED = frozenset({ResponseCode.SERVICE_UNAVAILABLE, ResponseCode.SYSTEM_ERROR, ResponseCode.REQUEST_EXPIRED,
                      ResponseCode.AUTHENTICATION_FAILED})
# How often a call waits-and-looks while another call holds its key.
CLAIM_POLL_SECONDS = 0.02
# A claim this old without an answer belongs to a call that died or could not
# release it: it may be taken over. A call holds its claim at most its deadline,
# which is at most db_timeout (the lease is twice that, at least 2 s).
MIN_CLAIM_LEASE_SECONDS = 2.0
# Tries, and the first pause between them, to release a claim whose call decided nothing.
RELEASE_TRIES = 5
RELEASE_FIRST_PAUSE = 0.1


@dataclass(frozen=True)
class Replayed:
    """The stored answer of an earlier call with the same key and bytes, as `encode` wrote it."""

    answer: bytes


class IdempotencyKeys:
    def __init__(self, store: Store, db_timeout: float,
                 encode: Callable[[domain.RefundResult | domain.DomainError], bytes]):
        self._store = store
        self._encode = encode
        self.lease = timedelta(seconds=max(MIN_CLAIM_LEASE_SECONDS, 2 * db_timeout))
        self._background: set[asyncio.Task] = set()

    async def once(self, merchant_id: int, key: str, request: bytes,
                   execute: Callable[[], Awaitable[domain.RefundResult]]) -> domain.RefundResult | Replayed:
        """Run `execute` at most once for (merchant, key)."""
        request_hash = hashlib.sha256(request).hexdigest()
        while True:
            now = utc_now()
            claim = await self._store.claim_idempotency(merchant_id, key, request_hash, now, now - self.lease)
            if claim.state is ClaimState.CLAIMED:
                break
            if claim.state is ClaimState.STORED:
                return Replayed(claim.response)
            if claim.state is ClaimState.CONFLICT:
                raise domain.IdempotencyConflict("this Idempotency-Key was used with a different request")
            await asyncio.sleep(CLAIM_POLL_SECONDS)
        try:
            result = await execute()
        except domain.DomainError as error:
            if error.code in UNSTORED:
                self._release_later(merchant_id, key, claim.claimed_at)
            else:
                await self._store.finish_idempotency(merchant_id, key, claim.claimed_at, self._encode(error))
            raise
        except BaseException:  # unavailable, timed out, cancelled, a bug: nothing to store
            self._release_later(merchant_id, key, claim.claimed_at)
            raise
        await self._store.finish_idempotency(merchant_id, key, claim.claimed_at, self._encode(result))
        return result

    def _release_later(self, merchant_id: int, key: str, claimed_at: datetime) -> None:
        """Free a key whose call decided nothing, in the background (this call
        may be cancelled by its deadline). If it fails, the claim goes stale
        after the lease and the next call with the key takes it over."""
        async def release():
            pause = RELEASE_FIRST_PAUSE
            for attempt in range(RELEASE_TRIES):
                try:
                    await self._store.finish_idempotency(merchant_id, key, claimed_at, None)
                    return
                except Exception as exc:
                    if attempt + 1 == RELEASE_TRIES:
                        log.warning("could not release an Idempotency-Key (it frees itself after %ss): %s",
                                    int(self.lease.total_seconds()), type(exc).__name__)
                        return
                await asyncio.sleep(pause)
                pause *= 2

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
