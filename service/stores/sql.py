"""SQL text both stores share, with the refund rules written from the domain's
constants: changing a rule in service/domain.py changes the SQL too, and the
property tests then check `decide` and the SQL agree on both databases."""

from __future__ import annotations

from service import domain

# The columns both stores read, in the order of domain.Order and
# domain.Transaction (aliases o for orders, t for transactions).
ORDER_COLUMNS = ("o.id, o.merchant_id, o.merchant_reference, o.currency, o.amount, o.status, "
                 "o.payment_method, o.create_time, o.update_time")
TRANSACTION_COLUMNS = ("t.id, t.merchant_id, t.order_id, t.type, t.currency, t.amount, t.status, t.masked_pan, "
                       "t.stan, t.create_time")
SETTLEMENT_COLUMNS = "settlement_id, merchant_id, currency, amount, balance_after, created_at"


def literal(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def one_of(values) -> str:
    """`(v1, v2, ...)`: SQL literals, sorted so that the statement text is stable."""
    return "(" + ", ".join(literal(v) for v in sorted(values)) + ")"


# The rules of domain.decide, as SQL conditions.


def refundable(status: str) -> str:
    """SQL: the order status in column `status` may be refunded."""
    return f"{status} IN {one_of(domain.REFUNDABLE_STATUSES)}"


def refund_allowed(capability: str) -> str:
    """SQL: the capability `capability` allows a refund."""
    return f"{capability} IN {one_of(domain.REFUNDS_ALLOWED)}"


def partial_allowed(capability: str) -> str:
    """SQL: the capability `capability` allows a partial refund."""
    return f"{capability} IN {one_of(domain.PARTIAL_REFUNDS_ALLOWED)}"


def refunded_status(units: str, amount: str) -> str:
    """SQL: the order's status after a refund of `units` out of `amount`."""
    return (f"CASE WHEN {units} = {amount} THEN {literal(domain.FULLY_REFUNDED)} "
            f"ELSE {literal(domain.PARTLY_REFUNDED)} END")


def decimals_of_currency(currency: str) -> str:
    """SQL: the decimals of the currency in column `currency` (NULL when unknown)."""
    cases = " ".join(f"WHEN {currency} IN ({', '.join(literal(c) for c in codes)}) THEN {digits}"
                     for digits, codes in domain.currencies_by_minor_units().items())
    return f"CASE {cases} END"


REFUND = literal(domain.REFUND)
SALE = literal(domain.SALE)
SUCCEEDED = literal(domain.TRANSACTION_SUCCEEDED)
