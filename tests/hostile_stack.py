"""A live stack for the hostile-input proofs (tests/test_prove_hostile*.py):
one `refund-service` and one `refund-edge` on a SQLite file or a PostgreSQL
database of its own, seeded with a merchant (M) and its orders and another
merchant (OTHER) with a key of its own, and the check every answer of the
edge must pass."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from decimal import Decimal

from gateway_edge.answers import HTTP_STATUS
from service import db, domain
from tests import data

from tests.conftest import ServiceProcess, fresh_postgres_database
from tests.edge_fixtures import (
    FORBIDDEN_IN_BODIES,
    EdgeProcess,
    Reply,
    generated_key,
    public_pem,
)

M, OTHER = 7600001, 7600002
FIRST_ORDER = 760_100
ORDERS = 300  # M's orders: 760100..760399, 100.00 HKD each; a few JPY, BHD, ALIPAY, OCTOPUS
INITIAL_HKD = 1_000_000  # 10,000.00 HKD: covers 100 full refunds

NAMES = {code.value: code.name for code in domain.ResponseCode}
# HTTP-level refusals: their own status, code 1001.
HTTP_REFUSALS = {404, 405, 408, 413, 415}


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


@dataclass
class HostileStack:
    url: str
    service: ServiceProcess
    edge: EdgeProcess
    replies: list = field(default_factory=list)

    def send(self, body: bytes, content_type: str = "application/json", **kwargs) -> Reply:
        reply = self.edge.post_refund(body, content_type, **kwargs)
        self.replies.append(reply)
        return reply

    def query(self, body: bytes) -> Reply:
        reply = self.edge.request("POST", "/direct/query", body, {"Content-Type": "application/json"})
        self.replies.append(reply)
        return reply

    def close(self):
        for process in (self.edge, self.service):
            process.stop()


@contextlib.contextmanager
def database(kind: str, directory):
    """The URL of a migrated, empty database: a SQLite file in `directory`, or a
    PostgreSQL database of its own, dropped afterwards."""
    if kind == "sqlite":
        url = f"sqlite:///{directory / 'hostile.db'}"
        db.migrate(url)
        yield url
        return
    with fresh_postgres_database("refund_hostile") as url:
        db.migrate(url)
        yield url


def start_stack(url: str) -> HostileStack:
    """Seed the migrated database at `url` and start a service and an edge on it."""
    data.load(url, [data.merchant(M, public_pem(key_m()), balances={"HKD": "10000.00", "JPY": "100000",
                                                                    "BHD": "100.000"}),
                    data.merchant(OTHER, public_pem(key_other()), balances={"HKD": "10000.00"})], seed_orders())
    service = ServiceProcess(url)
    try:
        edge = EdgeProcess(service.address)
    except Exception:
        service.stop()
        raise
    return HostileStack(url, service, edge)


def check_reply(reply: Reply, allowed: set[str] | None = None, expected: str | None = None,
                status: int | None = None) -> str:
    """Any answer of the edge: JSON with a documented code and its name, the
    HTTP status of that code (or an HTTP-level refusal with 1001), never a 5xx
    while the back end is up, nothing internal in the body. Returns the code."""
    assert reply.status < 500, (reply.status, reply.body)
    assert reply.headers.get("content-type") == "application/json", reply.headers
    body = json.loads(reply.body, parse_float=Decimal)
    assert isinstance(body, dict) and set(body) <= {"responseCode", "message", "detail", "order", "transaction",
                                                      "transactions"}, body
    code = body["responseCode"]
    assert body["message"] == NAMES[code], body
    if reply.status in HTTP_REFUSALS:
        assert code == "1001", body
    else:
        assert reply.status == HTTP_STATUS[domain.ResponseCode(code)], (reply.status, body)
    if code != "0000":
        assert isinstance(body.get("detail"), str) and body["detail"], body
    text = reply.body.decode("utf-8")
    for forbidden in FORBIDDEN_IN_BODIES:
        assert forbidden not in text, (forbidden, text)
    if allowed is not None:
        assert code in allowed, (code, body)
    if expected is not None:
        assert code == expected, (code, expected, body)
    if status is not None:
        assert reply.status == status, (reply.status, status, body)
    return code
