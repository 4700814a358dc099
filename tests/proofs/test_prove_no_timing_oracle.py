"""No timing oracle: how long the service takes to refuse a request does not
tell whether a merchant exists, nor whether an order belongs to another
merchant or to nobody. On SQLite and PostgreSQL, through RefundService over
gRPC (what the edge calls; the edge adds the same work to every case).

Method. For each pair of cases that must look alike (A, B), the test sends
A, B and A again as a control (A'), in triples whose order is shuffled, after
a warm-up: SAMPLES triples. Interleaving puts every burst of load from other
processes on both cases alike. The statistic is the median of the paired
differences (A - B), and the same for the control (A - A'). The test fails
when |median(A - B)| exceeds the threshold

    max(FLOOR, RELATIVE * median(B), 3 * |median(A - A')|)

i.e. 40 us (about one RSA-2048 verification on this machine), 5 % of a call,
or three times the difference between a case and itself, whichever is
largest. A noisy machine widens only the third term; a leak is a shift that
every attempt sees. Up to ATTEMPTS attempts are made and the test passes on
the first one within the threshold, so a burst of load cannot fail it, while
a real difference fails every attempt. Before the fix (643d3c9), a known
merchant with a bad signature took 90-110 us longer than an unknown one for a
refund (two RSA verifications) and 55-65 us for a query (one), on both
databases; after it the shift is 10-20 us (the database returning the
merchant's row rather than none).
"""

from __future__ import annotations

import base64
import os
import random
import statistics
import time

import grpc
import pytest

from refund.v1 import refund_pb2
from tests.support import data
from tests.support.in_process import InProcessService
from tests.support.keys import generated_key, public_pem, sign

SAMPLES = 600
WARM_UP = 100
ATTEMPTS = 3
FLOOR = 40e-6
RELATIVE = 0.05

M, OTHER, UNKNOWN = 3300001, 3300002, 3399999
OTHERS_ORDER, MISSING_ORDER = 3300500, 3300999


@pytest.fixture
def service(database_url):
    data.load(database_url, [data.merchant(M, public_pem(generated_key("timing-m")), balances={"HKD": "1000.00"}),
                             data.merchant(OTHER, public_pem(generated_key("timing-o")), balances={"HKD": "1000.00"})],
              [data.order(OTHERS_ORDER, OTHER, "10.00"), data.order(3300100, M, "10.00")])
    running = InProcessService(database_url)
    yield running
    running.close()


def _timed(call, request, expected: grpc.StatusCode) -> float:
    started = time.perf_counter()
    try:
        call(request, timeout=10)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
    elapsed = time.perf_counter() - started
    assert code == expected, code
    return elapsed


def _compare(call, a, b, expected: grpc.StatusCode) -> dict:
    for _ in range(WARM_UP):
        _timed(call, a, expected)
        _timed(call, b, expected)
    shifts, controls, b_times = [], [], []
    for _ in range(SAMPLES):
        order = ["a", "b", "a2"]
        random.shuffle(order)
        times = {name: _timed(call, b if name == "b" else a, expected) for name in order}
        shifts.append(times["a"] - times["b"])
        controls.append(times["a"] - times["a2"])
        b_times.append(times["b"])
    shift, control = statistics.median(shifts), statistics.median(controls)
    threshold = max(FLOOR, RELATIVE * statistics.median(b_times), 3 * abs(control))
    return {"shift": shift, "control": control, "threshold": threshold, "median": statistics.median(b_times)}


def _assert_alike(name: str, call, a, b, expected: grpc.StatusCode) -> None:
    results = []
    for _ in range(ATTEMPTS):
        result = _compare(call, a, b, expected)
        results.append(result)
        print(f"\n{name}: median call {result['median'] * 1e6:.0f} us, A-B {result['shift'] * 1e6:+.1f} us, "
              f"A-A' {result['control'] * 1e6:+.1f} us, threshold {result['threshold'] * 1e6:.1f} us")
        if abs(result["shift"]) <= result["threshold"]:
            return
    pytest.fail(f"{name}: timing differs by more than the noise in {ATTEMPTS} attempts: "
                + "; ".join(f"{r['shift'] * 1e6:+.0f} us (threshold {r['threshold'] * 1e6:.0f})" for r in results))


def _signed(text: str, signature: str | None = None, request_type=refund_pb2.MerchantRefundRequest):
    """A MerchantRefundRequest, or with request_type=MerchantGetOrderRequest a query."""
    return request_type(request=text.encode(), signature=signature or sign(generated_key("timing-m"), text))


QUERY = refund_pb2.MerchantGetOrderRequest
BAD_SIGNATURE = base64.b64encode(os.urandom(256)).decode("ascii")  # key-sized: it reaches the RSA verification


def test_an_unknown_merchant_costs_the_same_as_a_known_merchant_with_a_bad_signature(service):
    known = _signed(f'{{"merchantId":"{M}","orderId":3300100,"amount":1.00}}', BAD_SIGNATURE)
    unknown = _signed(f'{{"merchantId":"{UNKNOWN}","orderId":3300100,"amount":1.00}}', BAD_SIGNATURE)
    _assert_alike("refund, known vs unknown merchant", service.stub.MerchantRefund, known, unknown,
                  grpc.StatusCode.UNAUTHENTICATED)


def test_the_order_query_costs_the_same_for_an_unknown_merchant(service):
    known = _signed(f'{{"merchantId":"{M}","orderId":3300100}}', BAD_SIGNATURE, QUERY)
    unknown = _signed(f'{{"merchantId":"{UNKNOWN}","orderId":3300100}}', BAD_SIGNATURE, QUERY)
    _assert_alike("query, known vs unknown merchant", service.stub.MerchantGetOrder, known, unknown,
                  grpc.StatusCode.UNAUTHENTICATED)


def test_another_merchants_order_costs_the_same_as_a_missing_one(service):
    others = _signed(f'{{"merchantId":"{M}","orderId":{OTHERS_ORDER},"amount":1.00}}')
    missing = _signed(f'{{"merchantId":"{M}","orderId":{MISSING_ORDER},"amount":1.00}}')
    _assert_alike("refund, another merchant's order vs a missing one", service.stub.MerchantRefund, others, missing,
                  grpc.StatusCode.NOT_FOUND)
    others = _signed(f'{{"merchantId":"{M}","orderId":{OTHERS_ORDER}}}', request_type=QUERY)
    missing = _signed(f'{{"merchantId":"{M}","orderId":{MISSING_ORDER}}}', request_type=QUERY)
    _assert_alike("query, another merchant's order vs a missing one", service.stub.MerchantGetOrder, others, missing,
                  grpc.StatusCode.NOT_FOUND)
