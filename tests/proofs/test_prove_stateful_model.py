"""Issue 4, item 9: a hypothesis RuleBasedStateMachine over the real service
(gRPC, in process, on a free port), on SQLite and on PostgreSQL.

Rules: record a sale (RecordSale), refund in full, in part, again (a
duplicate), more than the order, with too many decimals, as another merchant,
an order that does not exist, on payment methods without refunds (OCTOPUS,
NONE) or with full refunds only (ALIPAY, FULL_ONLY), and settle (Settle).
Each answer is compared with what a plain model of docs/api.md section 3 says, and
after every step the database itself must show at most one refund per order,
no negative balance, and balance = sales - refunds - settlements.

One database per test; each example gets two fresh merchants (its own and
"another merchant"), so examples never see each other's orders or balances.
"""

from __future__ import annotations

import itertools
from collections import Counter

import grpc
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from refund.v1 import refund_pb2
from service import domain
from tests.support import data
from tests.support.in_process import InProcessService, error_info

FIRST_MERCHANT = 7_800_000
METHODS = {"VISA": "FULL_AND_PARTIAL", "ALIPAY": "FULL_ONLY", "OCTOPUS": "NONE"}
PANS = {"VISA": "411111******1111", "ALIPAY": "", "OCTOPUS": ""}
CURRENCIES = ["HKD", "JPY"]
FIGURES = {}
CODES: Counter = Counter()


def _machine(service: InProcessService, engine: sa.Engine, merchants):
    stub = service.stub

    class RefundModel(RuleBasedStateMachine):
        orders = Bundle("orders")

        @initialize()
        def fresh_merchants(self):
            self.merchant, self.other = next(merchants)
            self.order_ids = itertools.count(self.merchant * 1000)
            self.model = {}  # order id -> {currency, amount, method, refund: (txn id, amount) | None}
            self.sales = dict.fromkeys(CURRENCIES, 0)
            self.refunds = dict.fromkeys(CURRENCIES, 0)
            self.settled = dict.fromkeys(CURRENCIES, 0)
            self.steps = 0

        def balance(self, currency: str) -> int:
            return self.sales[currency] - self.refunds[currency] - self.settled[currency]

        def text(self, units: int, currency: str) -> str:
            return domain.format_minor(units, currency)

        # -- rules ---------------------------------------------------------------

        @rule(target=orders, method=st.sampled_from(sorted(METHODS)), currency=st.sampled_from(CURRENCIES),
              units=st.integers(1, 50_000))
        def record_sale(self, method, currency, units):
            order_id = next(self.order_ids)
            reply = stub.RecordSale(refund_pb2.RecordSaleRequest(
                order_id=order_id, merchant_id=str(self.merchant), merchant_reference=f"sale-{order_id}",
                currency=currency, amount=self.text(units, currency), payment_method=method,
                masked_pan=PANS[method], stan=f"{order_id % 1_000_000:06d}"), timeout=10)
            self.model[order_id] = {"currency": currency, "amount": units, "method": method, "refund": None}
            self.sales[currency] += units
            assert reply.order.status == "SUCCESS" and reply.order.id == order_id
            assert reply.unsettled_balance == self.text(self.balance(currency), currency)
            self.steps += 1
            return order_id

        refund_kinds = st.sampled_from(["full", "partial", "over", "duplicate", "decimals"])

        @rule(order_id=orders, kind=refund_kinds, by_reference=st.booleans(), data=st.data())
        def refund(self, order_id, kind, by_reference, data):
            self._refund(order_id, kind, by_reference, data)

        @rule(order_id=orders, kind=refund_kinds, by_reference=st.booleans(), data=st.data())
        def refund_again(self, order_id, kind, by_reference, data):  # refunds twice as often as the rest
            self._refund(order_id, kind, by_reference, data)

        def _refund(self, order_id, kind, by_reference, data):
            order = self.model[order_id]
            currency, amount = order["currency"], order["amount"]
            if kind == "full":
                units = amount
            elif kind == "partial":
                units = data.draw(st.integers(1, max(1, amount - 1)))
            elif kind == "over":
                units = amount + data.draw(st.integers(1, 1000))
            else:  # "duplicate": the earlier refund again; "decimals": see below
                units = order["refund"][1] if order["refund"] else amount
            if kind == "decimals":  # one decimal more than the currency has: 12.341 HKD, 500.5 JPY
                text = self.text(amount, currency) + ("1" if domain.minor_units(currency) else ".5")
            else:
                text = self.text(units, currency)
            request = refund_pb2.RefundRequest(merchant_id=str(self.merchant), amount=text,
                                               **({"merchant_reference": f"sale-{order_id}"} if by_reference
                                                  else {"order_id": order_id}))
            expected = self.expect(order, units, kind)
            CODES[expected] += 1
            try:
                reply = stub.Refund(request, timeout=10)
            except grpc.RpcError as error:
                info, decline = error_info(error)
                code = info.metadata["responseCode"]
                assert code == expected, (code, expected, kind, order, self.balance(currency))
                assert decline is not None and decline.order.id == order_id
                if code == "3003":
                    assert decline.transaction.id == order["refund"][0], "3003 must carry the earlier refund"
            else:
                assert expected == "0000", (expected, kind, order, self.balance(currency))
                assert reply.transaction.type == "REFUND" and reply.transaction.order_id == order_id
                assert reply.transaction.amount == self.text(units, currency)
                assert reply.transaction.masked_pan == PANS[order["method"]]
                assert reply.order.status == ("REFUNDED" if units == amount else "PARTIALLY_REFUNDED")
                order["refund"] = (reply.transaction.id, units)
                self.refunds[currency] += units
            self.check_order(order_id)
            self.steps += 1

        def expect(self, order, units, kind) -> str:
            """docs/api.md section 3, in the order the rules apply."""
            if kind == "decimals":
                return "1002"
            if order["refund"]:
                return "3003"
            if METHODS[order["method"]] == "NONE":
                return "4001"
            if units > order["amount"]:
                return "4003"
            if units < order["amount"] and METHODS[order["method"]] == "FULL_ONLY":
                return "4002"
            if units > self.balance(order["currency"]):
                return "4004"
            return "0000"

        @rule(order_id=orders)
        def refund_as_another_merchant(self, order_id):
            order = self.model[order_id]
            request = refund_pb2.RefundRequest(merchant_id=str(self.other), order_id=order_id,
                                               amount=self.text(order["amount"], order["currency"]))
            with pytest.raises(grpc.RpcError) as raised:
                stub.Refund(request, timeout=10)
            info, decline = error_info(raised.value)
            assert info.metadata["responseCode"] == "3001" and decline is None  # exactly like a missing order
            self.steps += 1

        @rule()
        def refund_a_missing_order(self):
            with pytest.raises(grpc.RpcError) as raised:
                stub.Refund(refund_pb2.RefundRequest(merchant_id=str(self.merchant), order_id=self.merchant * 1000 + 999,
                                                     amount="1.00"), timeout=10)
            info, decline = error_info(raised.value)
            assert info.metadata["responseCode"] == "3001" and decline is None
            self.steps += 1

        @rule(currency=st.sampled_from(CURRENCIES), share=st.integers(1, 120))
        def settle(self, currency, share):
            units = max(1, self.balance(currency) * share // 100)  # up to 20% more than there is
            request = refund_pb2.SettleRequest(merchant_id=str(self.merchant), currency=currency,
                                               amount=self.text(units, currency),
                                               settlement_id=f"{self.merchant}-{currency}-{self.steps}")
            if units <= self.balance(currency):
                reply = stub.Settle(request, timeout=10)
                self.settled[currency] += units
                assert reply.unsettled_balance == self.text(self.balance(currency), currency)
            else:
                with pytest.raises(grpc.RpcError) as raised:
                    stub.Settle(request, timeout=10)
                assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert error_info(raised.value)[0].reason == "INSUFFICIENT_BALANCE"
            self.steps += 1

        def check_order(self, order_id):
            order = self.model[order_id]
            reply = stub.GetOrder(refund_pb2.GetOrderRequest(merchant_id=str(self.merchant), order_id=order_id),
                                  timeout=10)
            refund = order["refund"]
            assert reply.order.status == ("SUCCESS" if not refund else
                                          "REFUNDED" if refund[1] == order["amount"] else "PARTIALLY_REFUNDED")
            assert [t.type for t in reply.transactions] == ["SALE"] + (["REFUND"] if refund else [])

        # -- after every step --------------------------------------------------------

        @invariant()
        def the_database_agrees_with_the_model(self):
            if not hasattr(self, "merchant"):
                return
            with engine.connect() as connection:
                per_order = connection.execute(sa.text(
                    "SELECT order_id, COUNT(*) FROM transactions WHERE merchant_id = :m AND type = 'REFUND' "
                    "GROUP BY order_id"), {"m": self.merchant}).all()
                balances = dict(connection.execute(sa.text(
                    "SELECT currency, unsettled FROM balances WHERE merchant_id = :m"), {"m": self.merchant}).all())
                others = connection.execute(sa.text(
                    "SELECT COUNT(*) FROM transactions WHERE merchant_id = :m"), {"m": self.other}).scalar()
            assert all(count == 1 for _, count in per_order), per_order  # at most one refund per order
            assert {o for o, _ in per_order} == {o for o, v in self.model.items() if v["refund"]}
            for currency in CURRENCIES:
                stored = balances.get(currency, 0)
                assert stored >= 0
                assert stored == self.balance(currency) == \
                    self.sales[currency] - self.refunds[currency] - self.settled[currency], (currency, stored)
            assert others == 0  # nothing was ever written for the other merchant

        def teardown(self):
            FIGURES.setdefault("examples", 0)
            FIGURES["examples"] += 1
            FIGURES["steps"] = FIGURES.get("steps", 0) + getattr(self, "steps", 0)

    return RefundModel


def _fresh_merchant_pairs(engine: sa.Engine):
    """Two new merchants per example (written straight into the table: cheap)."""
    for first in itertools.count(FIRST_MERCHANT, 2):
        with engine.begin() as connection:
            connection.execute(sa.text("INSERT INTO merchants (id, name, status) VALUES (:id, :name, 'ACTIVE')"),
                               [{"id": m, "name": f"Model merchant {m}"} for m in (first, first + 1)])
        yield first, first + 1


def test_the_service_behaves_like_the_model_of_the_rules_after_every_step(database_url):
    data.load(database_url, [], [])  # the payment methods
    service = InProcessService(database_url)
    engine = sa.create_engine(database_url)
    pairs = _fresh_merchant_pairs(engine)
    FIGURES.clear()
    CODES.clear()
    try:
        run_state_machine_as_test(
            _machine(service, engine, pairs),
            settings=settings(max_examples=60, stateful_step_count=30, deadline=None,
                              suppress_health_check=list(HealthCheck)))
    finally:
        engine.dispose()
        service.close()
    print(f"\nstateful model ({database_url.split(':')[0]}): {FIGURES.get('examples')} examples, "
          f"{FIGURES.get('steps')} steps; refund answers {dict(CODES)}")
