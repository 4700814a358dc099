"""Issue 4, items 1 and 2: storms of signed refunds through real `refund-edge`
processes in front of real `refund-service` processes.

1,000 concurrent signed refunds over 200 orders of one merchant whose balance
covers 120 of them: exactly 120 approvals, no order refunded twice, every
other answer 3003 or 4004, and balance = initial - approved = what the audit
trail and the transactions add up to. On PostgreSQL with two services and two
edges, on the SQLite default with one of each. Then 100 identical refunds of
one order: one approval, 99 x 3003 each carrying that same refund.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tests.support import data
from tests.support.cards import assert_no_card_data
from tests.support.data import refund_text
from tests.support.http import latency_summary, post_many
from tests.support.keys import example_key, generated_key, public_pem, signed_body
from tests.support.ledger import check_ledger

MERCHANT = 7100001
ORDERS = 200
COVERED = 120
CALLS = 1000
ORDER_AMOUNT = "100.00"
FIRST_ORDER = 710_000


def _stack(url, start_service, start_edge, count: int):
    """`count` services on `url`, each with its own edge in front; the edges' addresses."""
    services = [start_service(url, "--db-timeout", "30") for _ in range(count)]
    # All CALLS at once: beyond the edge's default caps on requests in flight and connections (which would
    # answer the excess 9001 at once, tests/e2e/test_edge_limits.py); here the refunds themselves are storming.
    storm_limits = {"REFUND_EDGE_MAX_IN_FLIGHT": str(2 * CALLS), "REFUND_EDGE_MAX_CONNECTIONS": str(2 * CALLS)}
    edges = [start_edge(s.address, deadline=60, env=storm_limits) for s in services]
    return services, edges


def _storm(url, services, edges):
    key = generated_key("storm-merchant")
    data.load(url, [data.merchant(MERCHANT, public_pem(key), balances={"HKD": f"{COVERED * 100}.00"})],
              [data.order(FIRST_ORDER + i, MERCHANT, ORDER_AMOUNT) for i in range(ORDERS)])
    bodies = {o: signed_body(key, refund_text(MERCHANT, ORDER_AMOUNT, order_id=o))
              for o in range(FIRST_ORDER, FIRST_ORDER + ORDERS)}
    order_ids = list(bodies) * (CALLS // ORDERS)
    random.Random(4).shuffle(order_ids)

    answers = post_many([e.address for e in edges], [bodies[o] for o in order_ids], timeout=90)

    codes = Counter(a.code for a in answers)
    assert codes["0000"] == COVERED, codes
    assert set(codes) <= {"0000", "3003", "4004"}, codes
    assert all(a.status == 200 for a in answers)
    approved = {}
    for order_id, answer in zip(order_ids, answers, strict=False):
        if answer.code == "0000":
            assert order_id not in approved, f"order {order_id} approved twice"
            approved[order_id] = answer.json["transaction"]
    for order_id, answer in zip(order_ids, answers, strict=False):
        if answer.code == "3003":  # carries the one refund of that order
            assert answer.json["transaction"] == approved[order_id], order_id

    ledger = check_ledger(url, {(MERCHANT, "HKD"): COVERED * 10000})
    assert ledger.balances[(MERCHANT, "HKD")] == COVERED * 10000 - COVERED * 10000 == 0
    assert len(ledger.refunds) == COVERED and set(ledger.refunds) == set(approved)
    assert ledger.codes == codes  # every decided attempt is in the audit trail with its code
    assert_no_card_data(url, [a.body for a in answers],
                        [p.output() for p in services] + [e.output() for e in edges])
    return codes, latency_summary(answers)


@pytest.mark.postgres
@pytest.mark.slow
def test_storm_through_two_edges_and_two_services_on_postgresql_approves_exactly_what_the_balance_covers(
        postgres_url, start_service, start_edge):
    services, edges = _stack(postgres_url, start_service, start_edge, 2)
    codes, latency = _storm(postgres_url, services, edges)
    print(f"\nedge storm, PostgreSQL, 2 services + 2 edges: {dict(codes)}; {latency}")


@pytest.mark.slow
def test_storm_through_one_edge_and_one_service_on_sqlite_approves_exactly_what_the_balance_covers(
        sqlite_url, start_service, start_edge):
    services, edges = _stack(sqlite_url, start_service, start_edge, 1)
    codes, latency = _storm(sqlite_url, services, edges)
    print(f"\nedge storm, SQLite, 1 service + 1 edge: {dict(codes)}; {latency}")


def test_hundred_identical_refunds_through_the_edge_give_one_approval_and_99_times_that_refund(
        database_url, start_service, start_edge):
    count = 1 if database_url.startswith("sqlite") else 2
    _, edges = _stack(database_url, start_service, start_edge, count)
    key = example_key()
    data.load(database_url, [data.merchant(MERCHANT, public_pem(key), balances={"HKD": "1000.00"})],
              [data.order(42, MERCHANT, "100.00")])
    body = signed_body(key, refund_text(MERCHANT, "100.00", order_id=42))

    answers = post_many([e.address for e in edges], [body] * 100)

    codes = Counter(a.code for a in answers)
    assert codes == {"0000": 1, "3003": 99}, codes
    (approval,) = [a.json for a in answers if a.code == "0000"]
    for answer in answers:
        assert answer.json["transaction"] == approval["transaction"]
        assert answer.json["order"]["status"] == "REFUNDED"
    ledger = check_ledger(database_url, {(MERCHANT, "HKD"): 100000})
    assert ledger.refunds == {42: [(int(approval["transaction"]["id"]), 10000)]}
    assert ledger.balances[(MERCHANT, "HKD")] == 90000
    print(f"\nstampede ({database_url.split(':')[0]}, {count} edges): {dict(codes)}; {latency_summary(answers)}")
