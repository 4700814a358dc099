"""The world of the hostile-input proofs (tests/proofs/test_prove_hostile_input.py,
test_prove_schemathesis.py): a merchant (M) with its orders and another merchant
(OTHER) with a key of its own, seeded into a migrated database, with one
`refund-service` and one `refund-edge` on it (a `Gateway`)."""

from __future__ import annotations

from tests.support import data
from tests.support.keys import generated_key, public_pem
from tests.support.processes import Gateway, Process

M, OTHER = 7600001, 7600002
FIRST_ORDER = 760_100
ORDERS = 300  # M's orders: 760100..760399, 100.00 HKD each; a few JPY, BHD, ALIPAY, OCTOPUS
INITIAL_HKD = 1_000_000  # 10,000.00 HKD: covers 100 full refunds


def key_m():
    return generated_key("hostile-m")


def key_other():
    return generated_key("hostile-other")


def seed_orders() -> list[dict]:
    orders = []
    for i in range(ORDERS):
        oid = FIRST_ORDER + i
        if i % 10 == 1:
            orders.append(data.order(oid, M, "500", currency="JPY"))
        elif i % 10 == 2:
            orders.append(data.order(oid, M, "1.250", currency="BHD"))
        elif i % 10 == 3:
            orders.append(data.order(oid, M, "100.00", method="ALIPAY"))
        elif i % 10 == 4:
            orders.append(data.order(oid, M, "100.00", method="OCTOPUS"))
        elif i % 10 == 5:
            orders.append(data.order(oid, M, "100.00", status="VOIDED"))
        else:
            orders.append(data.order(oid, M, "100.00"))
    orders.append(data.order(769_001, OTHER, "100.00"))
    return orders


def start_stack(url: str) -> Gateway:
    """Seed the migrated database at `url` and start a service and an edge on it."""
    data.load(url, [data.merchant(M, public_pem(key_m()), balances={"HKD": "10000.00", "JPY": "100000",
                                                                    "BHD": "100.000"}),
                    data.merchant(OTHER, public_pem(key_other()), balances={"HKD": "10000.00"})], seed_orders())
    service = Process.service(url)
    try:
        edge = Process.edge(service.address)
    except Exception:
        service.stop()
        raise
    return Gateway(url, service, edge)
