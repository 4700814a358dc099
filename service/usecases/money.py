"""Money into and out of a merchant's unsettled balance: sales and settlements,
each journaled with its balance change in one transaction and idempotent by
the caller's id (the order id, the settlement id)."""

from __future__ import annotations

from datetime import datetime

from service import domain
from service.clock import utc_now
from service.stores import port
from service.stores.port import Sale, Settlement, Store


def sale_of(order_id: int, merchant_id: str, merchant_reference: str, currency: str, amount: str,
            payment_method: str, masked_pan: str, stan: str, create_time: datetime | None) -> Sale:
    """A sale to record, from a caller's values (1001 or 1002 when one is not valid)."""
    if order_id <= 0 or not merchant_reference:
        raise domain.InvalidRequest("order_id and merchant_reference (at most 128 characters) are required")
    domain.check_text(merchant_reference, "merchant_reference", domain.MAX_REFERENCE_LENGTH)
    if not payment_method:
        raise domain.InvalidRequest("payment_method is required")
    domain.check_text(payment_method, "payment_method", 32)
    return Sale(order_id=order_id, merchant_id=domain.parse_merchant_id(merchant_id),
                merchant_reference=merchant_reference, currency=currency,
                amount=domain.to_minor(amount, currency), payment_method=payment_method,
                masked_pan=domain.check_masked_pan(masked_pan), stan=domain.check_stan(stan),
                create_time=create_time or utc_now())


async def record_sale(store: Store, sale: Sale) -> tuple[domain.Order, domain.Transaction, int]:
    """The order, its sale and the balance after it; the same again for the same
    sale; port.SaleConflict when another order holds the id or the reference."""
    return await store.record_sale(sale)


async def settle(store: Store, settlement_id: str, merchant_id: str, currency: str, amount: str) -> Settlement:
    """Pay a settlement out of the unsettled balance, once per settlement id: the
    same id again returns the stored settlement; 1003 when that id was used for
    another merchant, currency or amount; 4004 (nothing stored) when the
    balance does not cover it."""
    asked = Settlement(domain.check_settlement_id(settlement_id), domain.parse_merchant_id(merchant_id), currency,
                       domain.to_minor(amount, currency), 0, utc_now())
    try:
        made, _ = await store.settle(asked)
    except port.InsufficientBalance as exc:
        raise domain.InsufficientBalance(str(exc)) from None
    except port.SettlementConflict as exc:
        raise domain.IdempotencyConflict(str(exc)) from None
    return made
