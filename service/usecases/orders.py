"""An order and its transactions: for an internal caller, or a merchant's signed query."""

from __future__ import annotations

from service import domain, freshness, signing
from service.clock import utc_now
from service.stores.port import Store


async def order_with_transactions(store: Store, merchant_id: int, order_id: int | None,
                                  reference: str | None) -> tuple[domain.Order, list[domain.Transaction]]:
    """The merchant's order by id and/or reference; 3001 when it has none such
    (another merchant's order looks exactly like a missing one)."""
    if order_id is None and reference is None:
        raise domain.InvalidRequest("order_id or merchant_reference is required")
    domain.check_order_key(order_id, reference)
    found = await store.get_order(merchant_id, order_id, reference)
    if found is None or (reference and order_id and found[0].merchant_reference != reference):
        raise domain.OrderNotFound("order not found")
    return found


async def merchant_order(store: Store, request: bytes, signature: str) \
        -> tuple[domain.Order, list[domain.Transaction]]:
    """The order a merchant's signed query names."""
    signed = await signing.authenticate(store, request, signature)
    signing.check_active(signed)
    await freshness.check(store, signed, utc_now)
    order_id, reference = signing.order_key(signed.fields)
    if order_id is None and reference is None:
        raise domain.InvalidRequest("orderId or merchantReference is required")
    return await order_with_transactions(store, signed.merchant_id, order_id, reference)
