"""The documented shape of the edge's answers (docs/api.md sections 2 to 4):
status, JSON content type, responseCode and its name, JSON types of every field,
nothing internal in a body; and the JSON log lines the processes write."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from decimal import Decimal

from gateway_edge.answers import HTTP_STATUS
from service import domain
from tests.support.cards import MASKED_PAN
from tests.support.http import Reply

ISO_WITH_OFFSET = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?([+-]\d{2}:\d{2}|Z)\Z")
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
    assert isinstance(txn["maskedPan"], str) and MASKED_PAN.fullmatch(txn["maskedPan"]), txn["maskedPan"]
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

# HTTP-level refusals: their own status, code 1001.
HTTP_REFUSALS = {404, 405, 408, 413, 415}


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


# -- logs --------------------------------------------------------------------------

# The lines a process prints on stdout for people and tests (everything else is a JSON log line).
ANNOUNCEMENTS = re.compile(r"(refund-service listening on|refund-service metrics on|refund-edge listening on"
                           r"|refund-edge metrics on) ")


def log_lines(output: str) -> list[dict]:
    """Every log line of a process's output, each parsed as one JSON object."""
    entries = []
    for line in output.splitlines():
        if not line.strip() or ANNOUNCEMENTS.match(line):
            continue
        entry = json.loads(line)
        assert isinstance(entry, dict) and {"time", "level", "logger", "message"} <= set(entry), line
        entries.append(entry)
    return entries


def wait_for_log(process, predicate, timeout: float = 5.0) -> list[dict]:
    """The process's log entries once one satisfies `predicate` (log lines are written after the answer)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = log_lines(process.output())
        if any(predicate(entry) for entry in entries) or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)
