"""Refund an order (docs/api.md section 3): for an internal caller (`refund`)
or for a merchant's signed request (`Refunds.merchant_refund`).

The one loop: try the refund in one statement; what that does not apply is
decided by domain.decide on the snapshot it read; a decline is audited, an
approval applied by the store with guards that refuse it when the order or
the balance moved since the read, in which case the order is read and
decided again.

A signed request is parsed once and its signature verified once, with the
merchant's keys as last read (signing.KnownCredentials) when they verify it:
the refund's own statement then checks that the key is still active and the
merchant still ACTIVE. When it is not, the request is authenticated afresh
(2001 or 2002) and the refund tried again.
"""

from __future__ import annotations

from refund_wire.formats import IDEMPOTENCY_KEY
from service import domain, freshness, signing
from service.clock import utc_now
from service.stores.port import Attempt, Interrupted, SignedBy, Store, StoreUnavailable
from service.usecases.idempotency import IdempotencyKeys, Replayed

# Decisions on one refund when the order or the balance keeps moving between read and write.
MAX_DECISIONS = 5
# Fresh authentications of one signed refund whose merchant's keys keep changing.
MAX_CREDENTIAL_CHANGES = 3


async def refund(store: Store, command: domain.RefundCommand,
                 signed_by: SignedBy | None = None) -> domain.RefundResult | None:
    """Decide and apply one refund attempt. None (nothing written) when
    `signed_by`'s key or merchant no longer holds; never None without it."""
    return await finish(store, command, await store.try_refund(command, signed_by), signed_by)


async def finish(store: Store, command: domain.RefundCommand, attempt: Attempt,
                 signed_by: SignedBy | None = None) -> domain.RefundResult | None:
    """The rest of `refund` after the store's try: decide on what it read, and
    apply or audit; read and decide again while the state moves under it."""
    for _ in range(MAX_DECISIONS):
        if attempt.applied is not None:
            return attempt.applied
        if attempt.interrupted is Interrupted.CREDENTIALS_CHANGED:
            return None
        snapshot = attempt.snapshot if attempt.interrupted is None else await store.read_snapshot(command)
        decision = domain.decide(command, snapshot)
        if not decision.approved:
            await store.record_decline(command, decision, snapshot)
            return domain.result_of(decision, snapshot)
        applied = await store.apply_refund(command, decision, snapshot, signed_by)
        if isinstance(applied, domain.Transaction):
            order = domain.refunded_order(snapshot.order, decision, applied.create_time)
            return domain.result_of(decision, snapshot, applied, order)
        attempt = Attempt(interrupted=applied)
    raise StoreUnavailable("the order kept changing; retry")


class Refunds:
    """Merchants' signed refunds, with the keys last read and the Idempotency-Keys."""

    def __init__(self, store: Store, keys: IdempotencyKeys):
        self._store = store
        self._keys = keys
        self.known = signing.KnownCredentials()

    async def merchant_refund(self, request: bytes, signature: str,
                              idempotency_key: str = "") -> domain.RefundResult | Replayed:
        """A signed refund; with an Idempotency-Key, at most once per key."""
        if idempotency_key and not IDEMPOTENCY_KEY.match(idempotency_key):
            raise domain.InvalidRequest("Idempotency-Key must be 1 to 64 printable ASCII characters")
        signed = await self._authenticate(request, signature)
        if idempotency_key:
            return await self._keys.once(signed.merchant_id, idempotency_key, request,
                                         lambda: self._refund_signed(signed, signature))
        return await self._refund_signed(signed, signature)

    async def _authenticate(self, request: bytes, signature: str) -> signing.Authenticated:
        """Parse once and verify: with the keys last read when they verify the
        signature and the merchant needs nothing more (ACTIVE, no timestamp
        required or given); else with the keys the store has now, verifying
        again only when the key that verified is no longer among them."""
        fields = signing.parse_request(request)
        merchant_id = domain.parse_merchant_id(fields["merchantId"])
        known = self.known.get(merchant_id)
        key_id = signing.verifying_key_id(request, signature, known)  # the same work for a merchant not seen
        if key_id is not None and known.status == "ACTIVE" and not known.require_timestamp \
                and "timestamp" not in fields:
            return signing.Authenticated(request, fields, merchant_id, known, key_id)
        verified = None if key_id is None else (key_id, known.public_keys_pem[known.key_ids.index(key_id)])
        return await signing.authenticate(self._store, request, signature, fields=fields, known=self.known,
                                          verified=verified)

    async def _refund_signed(self, signed: signing.Authenticated, signature: str) -> domain.RefundResult:
        """Refund a verified request, guarded by the key that verified it; when
        that key or its merchant changed, authenticate afresh and try again."""
        signing.check_active(signed)
        await freshness.check(self._store, signed, utc_now)
        command = signing.command_from(signed.fields)
        timestamped = "timestamp" in signed.fields
        for _ in range(MAX_CREDENTIAL_CHANGES):
            signed_by = SignedBy(signed.key_id, timestamped) if signed.key_id is not None else None
            result = await refund(self._store, command, signed_by)
            if result is not None:
                return result
            signed = await signing.authenticate(self._store, signed.request, signature, fields=signed.fields,
                                                known=self.known)
            signing.check_active(signed)
            freshness.signed_time(signed.fields, signed.credentials.require_timestamp)  # 1001 if now required
        raise StoreUnavailable("the merchant's keys kept changing; retry")
