"""Issue 4, item 8: no card data leaks.

Sales carry only masked PANs (at most the first six and last four digits):
full card numbers offered to RecordSale or to `refund-admin load` are refused
without being stored or repeated. Merchants who put a card number where it
does not belong (an unknown field of the signed request, the reference, the
amount, the signature, a JSON key) get their answer, and the number is not
kept. After a run of refunds (approved, already refunded, declined, refused),
no Luhn-valid 13-19-digit number appears in any answer, in the service's or
the edge's log, or in any text column of any table; every maskedPan shown or
stored hides all but the first six and last four digits. The storms, the
fault runs, the authorization run and the hostile-input runs scan the same
way (tests/support/cards.py: assert_no_card_data).
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections import Counter
from pathlib import Path

import grpc
import pytest

from refund.v1 import refund_pb2, refund_pb2_grpc
from service import admin
from tests.support import data
from tests.support.cards import MASKED_PAN, assert_no_card_data, card_numbers
from tests.support.data import refund_text
from tests.support.http import post_many
from tests.support.keys import generated_key, public_pem, sign, signed_body
from tests.support.ledger import check_ledger

MERCHANT = 7700001
# Test card numbers of the card schemes (all Luhn-valid), and how a sale shows them.
CARDS = {
    "4111111111111111": "411111******1111",     # Visa
    "5555555555554444": "555555******4444",     # Mastercard
    "378282246310005": "378282*****0005",       # American Express, 15 digits
    "30569309025904": "305693****5904",         # Diners, 14 digits
    "4000000000000000006": "400000*********0006",  # Visa, 19 digits
}
NOT_MASKED_ENOUGH = ["4111111111111111", "4111111*****1111", "411111******11111", "4111 1111 1111 1111",
                     "41111111111111******", "4111-1111-1111-1111"]


def test_no_card_number_is_answered_logged_or_stored_and_masked_pans_stay_masked(
        database_url, start_service, start_edge):
    key = generated_key("leak-merchant")
    pans = list(CARDS.values())
    data.load(database_url, [data.merchant(MERCHANT, public_pem(key), balances={"HKD": "1000.00"})],
              [data.order(770_000 + i, MERCHANT, "100.00", masked_pan=pans[i % len(pans)]) for i in range(20)])
    service = start_service(database_url)
    edge = start_edge(service.address)
    bodies: list[bytes] = []

    # Sales through the gRPC API: masked PANs only; full or badly masked PANs are refused and not repeated.
    with grpc.insecure_channel(service.address) as channel:
        stub = refund_pb2_grpc.RefundServiceStub(channel)
        for n, pan in enumerate(CARDS.values()):
            stub.RecordSale(refund_pb2.RecordSaleRequest(
                order_id=771_000 + n, merchant_id=str(MERCHANT), merchant_reference=f"sale-{n}", currency="HKD",
                amount="50.00", payment_method="VISA", masked_pan=pan, stan="000001"), timeout=10)
        for n, pan in enumerate(NOT_MASKED_ENOUGH):
            with pytest.raises(grpc.RpcError) as refused:
                stub.RecordSale(refund_pb2.RecordSaleRequest(
                    order_id=772_000 + n, merchant_id=str(MERCHANT), merchant_reference=f"bad-{n}", currency="HKD",
                    amount="50.00", payment_method="VISA", masked_pan=pan, stan="000001"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert not card_numbers(refused.value.details() or ""), refused.value.details()

    # An operator's load file with a full card number: refused whole, the number not printed.
    document = {"paymentMethods": data.PAYMENT_METHODS, "merchants": [],
                "orders": [data.order(773_000, MERCHANT, "10.00", masked_pan="4111111111111111")]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(document, file)
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = admin.main(["--database-url", database_url, "load", file.name])
    Path(file.name).unlink()
    assert code == 2 and "maskedPan" in output.getvalue()
    assert not card_numbers(output.getvalue()), output.getvalue()

    # Refunds through the edge: approvals, 3003 with the earlier refund, declines, and
    # requests carrying a card number where it does not belong.
    requests = []
    for i in range(20):
        requests += [refund_text(MERCHANT, "100.00", order_id=770_000 + i)] * 2
    for n in range(len(CARDS)):
        requests.append(refund_text(MERCHANT, "20.00", reference=f"sale-{n}", cardNumber=list(CARDS)[n]))
    sent = [signed_body(key, r) for r in requests]
    pan = "4111111111111111"
    sent += [
        signed_body(key, refund_text(MERCHANT, "1.00", order_id=770_001, pan=pan, note=f"card {pan}")),
        signed_body(key, refund_text(MERCHANT, "1.00", order_id=770_001, **{pan: "x"})),
        signed_body(key, '{"merchantId":"%s","orderId":770001,"amount":1.00,"%s":1,"%s":2}' % (MERCHANT, pan, pan)),
        json.dumps({"request": refund_text(MERCHANT, "1.00", order_id=770_001), "signature": pan}).encode(),
        json.dumps({"request": refund_text(MERCHANT, "1.00", order_id=770_001),
                    "signature": sign(key, refund_text(MERCHANT, "1.00", order_id=770_001)),
                    "cardNumber": pan}).encode(),
        json.dumps({"request": pan, "signature": pan}).encode(),
    ]
    answers = post_many([edge.address], sent, concurrency=8)
    bodies += [a.body for a in answers]
    codes = Counter(a.code for a in answers)
    assert codes["0000"] >= 5 and codes["3003"] >= 5, codes

    for answer in answers:
        body = answer.json
        if "transaction" in body:
            assert MASKED_PAN.fullmatch(body["transaction"]["maskedPan"])
            assert body["transaction"]["maskedPan"] in set(CARDS.values()) | {""}

    ledger = check_ledger(database_url, {(MERCHANT, "HKD"): 100_000 + 5 * 5000})
    scanned = assert_no_card_data(database_url, bodies, [service.output(), edge.output()])
    print(f"\ncard data ({database_url.split(':')[0]}): answers {dict(codes)}; scanned {scanned}; "
          f"refunds {len(ledger.refunds)}; no card number anywhere")
