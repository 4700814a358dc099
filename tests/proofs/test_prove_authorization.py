"""Issue 4, item 7: merchant A, signing correctly with its own key, asks
1,000 times for refunds of merchant B's orders (by id, by reference, by both,
the id as a string, full, partial, too much, too many decimals). Nothing is
refunded, and every answer is byte for byte the answer to the same request
naming an order that does not exist: "order not found" reveals nothing about
B's orders.
"""

from __future__ import annotations

import random
from collections import Counter

from tests.support import data
from tests.support.cards import assert_no_card_data
from tests.support.data import refund_text
from tests.support.http import post_many
from tests.support.keys import generated_key, public_pem, signed_body
from tests.support.ledger import check_ledger

A, B = 7500001, 7500002
B_FIRST = 750_000
B_ORDERS = 50
MISSING_FIRST = 759_000
TRIES = 1000
NOT_FOUND = b'{"responseCode":"3001","message":"ORDER_NOT_FOUND","detail":"order not found"}'


def _attempt(rng: random.Random, order_id: int, reference: str, amount: str) -> str:
    shape = rng.choice(["id", "reference", "both", "id-as-string"])
    if shape == "id":
        return refund_text(A, amount, order_id=order_id)
    if shape == "reference":
        return refund_text(A, amount, reference=reference)
    if shape == "both":
        return refund_text(A, amount, order_id=order_id, reference=reference)
    return refund_text(A, amount, orderId=str(order_id))


def test_merchant_a_can_never_refund_merchant_b_and_learns_nothing_about_b_orders(
        database_url, start_service, start_edge):
    key_a, key_b = generated_key("authz-a"), generated_key("authz-b")
    methods = ["VISA", "ALIPAY", "OCTOPUS", "MASTERCARD"]
    data.load(database_url, [data.merchant(A, public_pem(key_a), balances={"HKD": "100000.00"}),
                             data.merchant(B, public_pem(key_b), balances={"HKD": "100000.00"})],
              [data.order(B_FIRST + i, B, "100.00", method=methods[i % 4],
                          status="SETTLED" if i % 5 == 0 else "SUCCESS") for i in range(B_ORDERS)]
              + [data.order(760_001, A, "100.00")])
    service = start_service(database_url)
    edge = start_edge(service.address)

    rng = random.Random(7)
    theirs, missing = [], []
    for n in range(TRIES):
        i = rng.randrange(B_ORDERS)
        amount = rng.choice(["100.00", "100", "50.00", "0.01", "100.01", "5000.00", "1.001", "99.999"])
        seed = rng.random()
        theirs.append(signed_body(key_a, _attempt(random.Random(seed), B_FIRST + i, f"ref-{B_FIRST + i}", amount)))
        missing.append(signed_body(key_a, _attempt(random.Random(seed), MISSING_FIRST + n, f"ref-{MISSING_FIRST + n}",
                                                   amount)))

    answers = post_many([edge.address], theirs + missing, concurrency=32)
    for theirs_answer, missing_answer in zip(answers[:TRIES], answers[TRIES:], strict=False):
        assert theirs_answer.status == missing_answer.status == 200
        assert theirs_answer.body == missing_answer.body == NOT_FOUND, (theirs_answer.body, missing_answer.body)
        # Headers too, but for those that differ on every answer anyway (the time, a request id).
        def strip(h):
            return {k: v for k, v in h.items() if k not in ("date", "x-request-id")}
        assert strip(theirs_answer.headers) == strip(missing_answer.headers)

    ledger = check_ledger(database_url, {(A, "HKD"): 10_000_000, (B, "HKD"): 10_000_000})
    assert ledger.refunds == {}
    assert all(status in ("SUCCESS", "SETTLED") for (m, _, _, status) in ledger.orders.values())
    assert Counter((m, code) for m, _, _, code, _ in ledger.audit) == {(A, "3001"): 2 * TRIES}
    assert_no_card_data(database_url, [a.body for a in answers], [service.output(), edge.output()])
    print(f"\nauthorization ({database_url.split(':')[0]}): {TRIES} tries on B's orders -> "
          f"{dict(Counter(a.code for a in answers[:TRIES]))}, all byte-identical to a missing order; 0 refunds")
