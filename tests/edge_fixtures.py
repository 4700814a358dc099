"""Helpers for the edge's end-to-end tests: seed data, a real `refund-edge`
process on a free port, fake gRPC back ends (slow, broken), signing, HTTP.

Data are loaded with `refund-admin load` from documents shaped like
`fixtures.example.json`; merchants are suspended and keys deactivated with
`refund-admin` too.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import re
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from refund.v1 import refund_pb2, refund_pb2_grpc
from service import admin as admin_command
from refund_wire import strict_json
from service import db, domain, schema
from tests.conftest import FIXTURES_DIR, LoggedProcess

EXAMPLE_KEY_PEM = FIXTURES_DIR / "example-merchant.key.pem"
EXAMPLE_PUB_PEM = FIXTURES_DIR / "example-merchant.pub.pem"
BACKEND_SERVICE = "refund.v1.RefundService"


# -- keys and signing -----------------------------------------------------------


@lru_cache(maxsize=None)
def example_key() -> rsa.RSAPrivateKey:
    return serialization.load_pem_private_key(EXAMPLE_KEY_PEM.read_bytes(), password=None)


@lru_cache(maxsize=None)
def generated_key(name: str, bits: int = 2048) -> rsa.RSAPrivateKey:
    """A fresh RSA key per name, made once per test session."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def signature_bytes(key: rsa.RSAPrivateKey, request: str | bytes) -> bytes:
    data = request.encode("utf-8") if isinstance(request, str) else request
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def sign(key: rsa.RSAPrivateKey, request: str | bytes, *, double: bool = False) -> str:
    text = base64.b64encode(signature_bytes(key, request))
    return base64.b64encode(text).decode("ascii") if double else text.decode("ascii")


def envelope(request: str, signature: str) -> bytes:
    return json.dumps({"request": request, "signature": signature}).encode("utf-8")


def signed_body(key: rsa.RSAPrivateKey, request: str, *, double: bool = False) -> bytes:
    return envelope(request, sign(key, request, double=double))


# -- seeding (through refund-admin, as an operator would) -------------------------


def admin(url: str, *args: str) -> str:
    """Run `refund-admin --database-url URL ARGS...` in this process; its output, or fail."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = admin_command.main(["--database-url", url, *args])
    assert code == 0, f"refund-admin {' '.join(args)} exited {code}:\n{output.getvalue()}"
    return output.getvalue()


def load_document(url: str, document: dict) -> None:
    """`refund-admin load` a fixtures.example.json-shaped document."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(document, file)
    try:
        admin(url, "load", file.name)
    finally:
        Path(file.name).unlink()


def set_merchant_status(url: str, merchant_id: int, status: str) -> None:
    admin(url, "merchant", {"SUSPENDED": "suspend", "ACTIVE": "activate"}[status], str(merchant_id))


def deactivate_key(url: str, merchant_id: int, key_id: str) -> None:
    admin(url, "key", "deactivate", str(merchant_id), key_id)


def insert_key_directly(url: str, merchant_id: int, key_id: str, pem: str) -> None:
    """A key refund-admin would refuse (not RSA), written straight into the table."""
    engine = db.make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(schema.merchant_keys.insert().values(
                merchant_id=merchant_id, key_id=key_id, public_key_pem=pem, active=True,
                created_at=datetime.now(timezone.utc)))
    finally:
        engine.dispose()


def balance_of(url: str, merchant_id: int, currency: str) -> int:
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.select(schema.balances.c.unsettled).where(
                schema.balances.c.merchant_id == merchant_id, schema.balances.c.currency == currency)).scalar_one()
    finally:
        engine.dispose()


def refund_count(url: str, order_id: int) -> int:
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.select(sa.func.count()).select_from(schema.transactions).where(
                schema.transactions.c.order_id == order_id, schema.transactions.c.type == "REFUND")).scalar_one()
    finally:
        engine.dispose()


# -- the edge process ---------------------------------------------------------


class EdgeProcess(LoggedProcess):
    """A real `refund-edge` process on a free port."""

    def __init__(self, grpc_target: str, *args: str, deadline: float | None = None, env: dict | None = None):
        # No rate limit unless a test sets one: storms and hostile runs send far more than one merchant's rate.
        environment = {**os.environ, "REFUND_HTTP_LISTEN": "127.0.0.1:0", "REFUND_GRPC_TARGET": grpc_target,
                       "PYTHONUNBUFFERED": "1", "REFUND_EDGE_RATE_LIMIT": "off", **(env or {})}
        if deadline is not None:
            environment["REFUND_EDGE_DEADLINE"] = str(deadline)
        super().__init__("refund-edge", "gateway_edge.server", args, environment)
        host, port = self.address.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.url = f"http://{self.address}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 30.0) -> "Reply":
        return http_request(self.host, self.port, method, path, body, headers, timeout)

    def post_refund(self, body: bytes, content_type: str = "application/json", **kwargs) -> "Reply":
        return self.request("POST", "/direct/refund", body, {"Content-Type": content_type}, **kwargs)

@pytest.fixture
def start_edge():
    """Start `refund-edge` processes; all are stopped at the end of the test."""
    started = []

    def start(grpc_target: str, *args: str, deadline: float | None = None, env: dict | None = None) -> EdgeProcess:
        edge = EdgeProcess(grpc_target, *args, deadline=deadline, env=env)
        started.append(edge)
        return edge

    yield start
    for edge in started:
        edge.stop()
        edge.log_path.unlink(missing_ok=True)


# -- HTTP ---------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes
    elapsed: float
    _json: object = field(default=None, repr=False)

    @property
    def json(self):
        """The body parsed strictly: every number a Decimal, so types and precision show."""
        if self._json is None:
            self._json = strict_json.loads(self.body)
        return self._json


def http_request(host: str, port: int, method: str, path: str, body: bytes | None = None,
                 headers: dict | None = None, timeout: float = 30.0) -> Reply:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    started = time.monotonic()
    try:
        headers = headers or {}
        chunked = headers.get("Transfer-Encoding") == "chunked"
        connection.request(method, path, body=body, headers=headers, encode_chunked=chunked)
        response = connection.getresponse()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data,
                     time.monotonic() - started)
    finally:
        connection.close()


# -- fake back ends -----------------------------------------------------------


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class FakeRefundService(refund_pb2_grpc.RefundServiceServicer):
    """MerchantRefund answers as `behaviour` says: "slow" (waits until released),
    "internal" (INTERNAL, no ErrorInfo), "rich_system_error", "rich_unavailable",
    "unknown_reason", "foreign_domain" (an ErrorInfo of another domain),
    "bad_amount" (a success the edge cannot show exactly), "resource_exhausted"."""

    SECRET = "db password hunter2 at /srv/refund/store.py line 42"

    def __init__(self, behaviour: str):
        self.behaviour = behaviour
        self.release = threading.Event()
        self.calls = 0

    def MerchantRefund(self, request, context):
        self.calls += 1
        behaviour = self.behaviour
        if behaviour == "slow":
            self.release.wait(30)
            context.abort(grpc.StatusCode.INTERNAL, "too late")
        if behaviour == "internal":
            context.abort(grpc.StatusCode.INTERNAL, self.SECRET)
        if behaviour == "resource_exhausted":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self.SECRET)
        rich = {"rich_system_error": ("SYSTEM_ERROR", code_pb2.INTERNAL),
                "rich_unavailable": ("SERVICE_UNAVAILABLE", code_pb2.UNAVAILABLE),
                "unknown_reason": ("DISK_ON_FIRE", code_pb2.INTERNAL),
                "foreign_domain": ("ORDER_NOT_FOUND", code_pb2.NOT_FOUND)}
        if behaviour in rich:
            reason, code = rich[behaviour]
            info = error_details_pb2.ErrorInfo(
                reason=reason, domain="elsewhere.example" if behaviour == "foreign_domain" else "refund.gateway")
            context.abort_with_status(rpc_status.to_status(
                status_pb2.Status(code=code, message=self.SECRET, details=[_pack(info)])))
        if behaviour == "bad_amount":
            return refund_pb2.MerchantRefundResponse(
                response_code="0000",
                order=refund_pb2.Order(id=1, merchant_id="1", merchant_reference="r", currency="HKD", amount="76.1",
                                       status="REFUNDED"),
                transaction=refund_pb2.Transaction(id=2, merchant_id="1", type="REFUND", currency="HKD",
                                                   amount="7.619e1", status="SUCCESS", stan="000001"))
        raise AssertionError(f"unknown behaviour {behaviour}")


class FakeBackend:
    """A gRPC server in this test process with a fake RefundService and a
    health service whose status the test sets."""

    def __init__(self, behaviour: str, serving: bool = True):
        self.servicer = FakeRefundService(behaviour)
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        refund_pb2_grpc.add_RefundServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.set_serving(serving)
        self.server.start()

    def set_serving(self, serving: bool):
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", BACKEND_SERVICE):
            self.health.set(name, status)

    def stop(self):
        self.servicer.release.set()
        self.server.stop(0).wait(5)


@pytest.fixture
def fake_backend():
    started = []

    def start(behaviour: str, serving: bool = True) -> FakeBackend:
        backend = FakeBackend(behaviour, serving)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


# -- checking answers -----------------------------------------------------------

ISO_WITH_OFFSET = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?([+-]\d{2}:\d{2}|Z)\Z")
MASKED_PAN = re.compile(r"(\d{0,6}[*X]{1,15}\d{0,4})?\Z")
NAMES = {code.value: code.name for code in domain.ResponseCode}
FORBIDDEN_IN_BODIES = ("Traceback", "File \"", ".py", "grpc", "sqlite", "postgres", "asyncpg", "Exception",
                       "hunter2", "StatusCode", "ipv4:", "failed to connect")


def assert_integer(value, name: str):
    assert isinstance(value, Decimal) and value == value.to_integral_value() and value.as_tuple().exponent == 0, \
        f"{name} must be a JSON integer, got {value!r}"


def assert_amount(value, currency: str, name: str):
    assert isinstance(value, Decimal), f"{name} must be a JSON number, got {value!r}"
    assert value.as_tuple().exponent == -domain.minor_units(currency), \
        f"{name} {value} must have {domain.minor_units(currency)} decimals for {currency}"


def assert_time(value, name: str):
    assert isinstance(value, str) and ISO_WITH_OFFSET.match(value), f"{name} must be ISO 8601 with offset: {value!r}"
    assert datetime.fromisoformat(value).tzinfo is not None


def check_order(order: dict, **expected) -> None:
    assert set(order) == {"id", "merchantReference", "currency", "amount", "status", "createTime", "updateTime"}
    assert_integer(order["id"], "order.id")
    assert isinstance(order["merchantReference"], str)
    assert isinstance(order["currency"], str) and re.fullmatch(r"[A-Z]{3}", order["currency"])
    assert_amount(order["amount"], order["currency"], "order.amount")
    assert order["status"] in {s.value for s in domain.OrderStatus}
    assert_time(order["createTime"], "order.createTime")
    assert_time(order["updateTime"], "order.updateTime")
    for name, value in expected.items():
        assert order[name] == value, (name, order[name], value)


def check_transaction(txn: dict, **expected) -> None:
    assert set(txn) == {"id", "merchantId", "type", "currency", "amount", "status", "maskedPan", "stan",
                        "createTime"}
    assert_integer(txn["id"], "transaction.id")
    assert_integer(txn["merchantId"], "transaction.merchantId")
    assert txn["type"] == "REFUND" and txn["status"] == "SUCCESS"
    assert_amount(txn["amount"], txn["currency"], "transaction.amount")
    assert isinstance(txn["maskedPan"], str) and MASKED_PAN.match(txn["maskedPan"]), txn["maskedPan"]
    assert isinstance(txn["stan"], str) and re.fullmatch(r"\d{6}", txn["stan"]), txn["stan"]
    assert_time(txn["createTime"], "transaction.createTime")
    for name, value in expected.items():
        assert txn[name] == value, (name, txn[name], value)


def check_answer(reply: Reply, code: str, http_status: int, *, order: bool | None = None,
                 transaction: bool | None = None) -> dict:
    """The documented answer shape: status, JSON content type, responseCode and
    its name as message, a detail on failures, nothing internal; returns the body."""
    assert reply.status == http_status, (reply.status, reply.body)
    assert reply.headers.get("content-type") == "application/json"
    assert "server" not in reply.headers
    body = reply.json
    assert isinstance(body, dict)
    assert set(body) <= {"responseCode", "message", "detail", "order", "transaction"}, body
    assert body["responseCode"] == code, body
    assert body["message"] == NAMES[code], body
    if code != "0000":
        assert isinstance(body.get("detail"), str) and body["detail"], body
    text = reply.body.decode("ascii")
    for forbidden in FORBIDDEN_IN_BODIES:
        assert forbidden not in text, (forbidden, text)
    if order is not None:
        assert ("order" in body) == order, body
    if transaction is not None:
        assert ("transaction" in body) == transaction, body
    if "order" in body:
        check_order(body["order"])
    if "transaction" in body:
        check_transaction(body["transaction"])
    return body
