"""The ledger as the database holds it after a run, and the invariants it must
keep whatever happened: no order refunded twice, no partial write, every
balance equal to its start minus what was refunded."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

import sqlalchemy as sa

from service import db, domain


@dataclass
class Ledger:
    """What the database says after a run, and the invariants it must keep."""

    orders: dict = field(default_factory=dict)        # id -> (merchant, currency, amount, status)
    refunds: dict = field(default_factory=dict)       # order id -> [ (txn id, amount) ]
    audit: list = field(default_factory=list)         # (merchant, order, amount text, code, txn id)
    balances: dict = field(default_factory=dict)      # (merchant, currency) -> unsettled

    @property
    def codes(self) -> Counter:
        return Counter(code for _, _, _, code, _ in self.audit)


def read_ledger(url: str) -> Ledger:
    engine = db.make_engine(url)
    ledger = Ledger()
    try:
        with engine.connect() as connection:
            for oid, merchant, currency, amount, status in connection.execute(sa.text(
                    "SELECT id, merchant_id, currency, amount, status FROM orders")):
                ledger.orders[oid] = (merchant, currency, amount, status)
            for oid, tid, amount in connection.execute(sa.text(
                    "SELECT order_id, id, amount FROM transactions WHERE type = 'REFUND'")):
                ledger.refunds.setdefault(oid, []).append((tid, amount))
            ledger.audit = [tuple(row) for row in connection.execute(sa.text(
                "SELECT merchant_id, order_id, amount, response_code, transaction_id FROM refund_attempts"))]
            for merchant, currency, unsettled in connection.execute(sa.text(
                    "SELECT merchant_id, currency, unsettled FROM balances")):
                ledger.balances[(merchant, currency)] = unsettled
    finally:
        engine.dispose()
    return ledger


def check_ledger(url: str, initial: dict[tuple[int, str], int]) -> Ledger:
    """No order refunded twice; no partial write (an order is marked refunded
    exactly when it has one REFUND transaction and one approved audit row
    naming it); balance = initial - refunds = initial - approved audit amounts."""
    ledger = read_ledger(url)
    approved = defaultdict(list)
    for _merchant, order_id, amount_text, code, txn in ledger.audit:
        if code == "0000":
            approved[order_id].append((txn, amount_text))
        else:
            assert txn is None, ("a declined attempt names a transaction", order_id, code, txn)
    refunded_sum = defaultdict(int)
    audited_sum = defaultdict(int)
    for oid, (merchant, currency, amount, status) in ledger.orders.items():
        refunds = ledger.refunds.get(oid, [])
        assert len(refunds) <= 1, f"order {oid} refunded {len(refunds)} times"
        marked = status in domain.REFUNDED_STATUSES
        assert marked == (len(refunds) == 1) == (len(approved.get(oid, [])) == 1), \
            f"partial write on order {oid}: status {status}, refunds {refunds}, approvals {approved.get(oid)}"
        assert len(approved.get(oid, [])) <= 1, f"order {oid} approved {approved[oid]}"
        if refunds:
            (txn_id, refund_amount), = refunds
            (audit_txn, audit_amount), = approved[oid]
            assert audit_txn == txn_id, (oid, audit_txn, txn_id)
            # The audit row keeps the amount as asked: text over gRPC, a JSON number's text when signed.
            assert domain.to_minor(Decimal(audit_amount), currency) == refund_amount, (oid, audit_amount,
                                                                                       refund_amount)
            assert (status == "REFUNDED") == (refund_amount == amount), (oid, status, refund_amount, amount)
            refunded_sum[(merchant, currency)] += refund_amount
            audited_sum[(merchant, currency)] += domain.to_minor(Decimal(audit_amount), currency)
    assert set(approved) <= set(ledger.refunds), "an approval in the audit trail without its refund"
    for key, start in initial.items():
        assert ledger.balances.get(key, 0) >= 0
        assert ledger.balances.get(key, 0) == start - refunded_sum[key] == start - audited_sum[key], \
            (key, ledger.balances.get(key), start, refunded_sum[key], audited_sum[key])
    return ledger
