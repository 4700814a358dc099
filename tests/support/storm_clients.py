"""Clients of a storm (tests/proofs/test_prove_ledger_storm.py,
test_prove_events_storm.py): signed refunds through the edges, unsigned refunds,
sales and settlements over gRPC, each retried, as the proto says is safe
(UNAVAILABLE, 9001, no answer), until a final answer; what they were told is
their own record of the ledger."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import defaultdict
from decimal import Decimal

import grpc

from refund.v1 import refund_pb2, refund_pb2_grpc
from service import domain
from tests.support.data import refund_text
from tests.support.http import http_request
from tests.support.in_process import error_info
from tests.support.keys import signed_body


class Clients:
    """The clients' own record: what they were told, and nothing else."""

    def __init__(self, services: list[str], edges: list[str], give_up_after: float = 120.0):
        self.services, self.edges = services, edges
        self.give_up_after = give_up_after  # seconds a client keeps retrying one operation
        self.confirmed = defaultdict(int)  # (merchant, kind) -> minor units confirmed
        self.retries = defaultdict(int)
        self.lock = threading.Lock()

    def _note(self, merchant: int, kind: str, units: int) -> None:
        with self.lock:
            self.confirmed[(merchant, kind)] += units

    def _until_final(self, kind: str, attempt):
        """Call `attempt(i)` until it gives a final answer (not None)."""
        deadline = time.monotonic() + self.give_up_after
        i = 0
        while time.monotonic() < deadline:
            answer = attempt(i)
            if answer is not None:
                return answer
            i += 1
            with self.lock:
                self.retries[kind] += 1
            time.sleep(0.05)
        raise AssertionError(f"{kind} got no final answer in {self.give_up_after} s")

    def _grpc(self, i: int, method: str, request):
        channel = grpc.insecure_channel(self.services[i % len(self.services)])
        try:
            stub = refund_pb2_grpc.RefundServiceStub(channel)
            return getattr(stub, method)(request, timeout=10)
        finally:
            channel.close()

    def _grpc_final(self, method: str, request, i: int, finals: dict):
        """The reply, or the reason of a final error (in `finals`), or None to retry."""
        try:
            return self._grpc(i, method, request)
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            reason = error_info(error)[0].reason
            assert reason in finals, (method, reason, error.details())
            return finals[reason](error)

    def refund(self, merchant: int, order_id: int, amount: str, key=None) -> None:
        """A refund, signed through an edge (with `key`) or unsigned over gRPC."""
        if key is not None:
            body = signed_body(key, refund_text(merchant, amount, order_id=order_id))

            def attempt(i):
                host, port = self.edges[i % len(self.edges)].rsplit(":", 1)
                try:
                    reply = http_request(host, int(port), "POST", "/direct/refund", body,
                                         {"Content-Type": "application/json"}, timeout=15)
                except (OSError, http.client.HTTPException):  # the edge died mid-answer: no answer
                    return None
                answer = json.loads(reply.body, parse_float=Decimal, parse_int=Decimal)
                if answer["responseCode"] == "9001":
                    return None
                assert answer["responseCode"] in ("0000", "3003"), answer
                return answer["transaction"]["amount"]
        else:
            request = refund_pb2.RefundRequest(merchant_id=str(merchant), order_id=order_id, amount=amount)

            def attempt(i):
                reply = self._grpc_final("Refund", request, i, {
                    "ALREADY_REFUNDED": lambda error: error_info(error)[1].transaction.amount})
                return reply if reply is None or isinstance(reply, str) else reply.transaction.amount

        refunded = self._until_final("refund", attempt)
        self._note(merchant, "refunds", domain.to_minor(str(refunded), "HKD"))

    def sale(self, merchant: int, order_id: int, amount: str) -> None:
        """A sale, sent until answered and then once more: credited once."""
        request = refund_pb2.RecordSaleRequest(
            order_id=order_id, merchant_id=str(merchant), merchant_reference=f"storm-sale-{order_id}",
            currency="HKD", amount=amount, payment_method="VISA", masked_pan="400000******0002", stan="654321")
        for _ in range(2):
            reply = self._until_final("sale", lambda i: self._grpc_final("RecordSale", request, i, {}))
            assert reply.order.amount == amount
        self._note(merchant, "sales", domain.to_minor(amount, "HKD"))

    def settle(self, merchant: int, settlement_id: str, amount: str) -> None:
        request = refund_pb2.SettleRequest(merchant_id=str(merchant), currency="HKD", amount=amount,
                                           settlement_id=settlement_id)
        reply = self._until_final("settle", lambda i: self._grpc_final("Settle", request, i, {}))
        assert (reply.settlement.settlement_id, reply.settlement.amount) == (settlement_id, amount)
        self._note(merchant, "settlements", domain.to_minor(amount, "HKD"))
