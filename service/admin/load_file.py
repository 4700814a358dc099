"""A load file read and checked whole, without the database, into a Plan of rows
(service/admin/load.py applies it). A bad file is BadFile: one line per bad entry."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from refund_wire import strict_json
from service import domain
from service.admin import values
from service.admin.errors import EXIT_BAD_INPUT, AdminError, BadFile
from service.admin.values import Invalid

CAPABILITIES = tuple(c.value for c in domain.RefundCapability)
ORDER_STATUSES = tuple(s.value for s in domain.OrderStatus)
ORDER_FIELDS = ("id", "merchantId", "merchantReference", "currency", "amount", "status", "paymentMethod",
                "maskedPan", "stan", "createTime")


class _JSONObject(dict):
    """A JSON object that remembers the keys it was given more than once."""

    duplicate_keys: tuple[str, ...] = ()


def _keeping_duplicates(pairs) -> _JSONObject:
    result = _JSONObject()
    duplicates = []
    for key, value in pairs:
        if key in result:
            duplicates.append(key)
        result[key] = value
    result.duplicate_keys = tuple(duplicates)
    return result


def read_document(path: str):
    """The parsed JSON of a load file: numbers as Decimal or int, never float;
    NaN and Infinity refused (service.strict_json's rules for numbers).

    Duplicate keys are recorded on each object rather than raised here, so
    that the check can name the entry that holds them."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise AdminError(f"cannot read {path}: {exc.strerror}", EXIT_BAD_INPUT) from None
    except UnicodeDecodeError:
        raise AdminError(f"{path} is not UTF-8 text", EXIT_BAD_INPUT) from None
    try:
        return json.loads(text, object_pairs_hook=_keeping_duplicates, **strict_json.NUMBER_RULES)
    except json.JSONDecodeError as exc:
        raise AdminError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                         EXIT_BAD_INPUT) from None
    except strict_json.StrictJSONError as exc:  # "NaN is not a number"
        raise AdminError(f"{path} is not valid JSON: {exc}", EXIT_BAD_INPUT) from None
    except RecursionError:
        raise AdminError(f"{path} is nested too deeply", EXIT_BAD_INPUT) from None


@dataclass(frozen=True)
class Entry:
    label: str  # where it is in the file, for messages: "orders[2] (id 1078)"
    row: dict  # its columns
    sale: dict | None = None  # an order's sale: masked_pan, stan


@dataclass
class Plan:
    """A checked load file, as rows."""

    payment_methods: list[Entry] = field(default_factory=list)
    merchants: list[Entry] = field(default_factory=list)
    keys: list[Entry] = field(default_factory=list)
    balances: list[Entry] = field(default_factory=list)
    orders: list[Entry] = field(default_factory=list)


def _label(section: str, index: int, item, id_field: str) -> str:
    label = f"{section}[{index}]"
    value = item.get(id_field) if isinstance(item, dict) else None
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        label += f" ({id_field} {str(value)[:40]})"
    return label


def _check_payment_method(item, label: str, plan: Plan) -> None:
    fields = values.json_object(item, ("code", "refund"))
    row = {"code": values.text(fields["code"], "code", 32),
           "refund_capability": values.choice(fields["refund"], "refund", CAPABILITIES)}
    plan.payment_methods.append(Entry(label, row))


def _check_merchant(item, label: str, plan: Plan) -> None:
    fields = values.json_object(item, ("id", "name", "status"), ("keys", "balances"))
    merchant_id = values.positive_id(fields["id"], "id")
    row = {"id": merchant_id, "name": values.text(fields["name"], "name", 200),
           "status": values.choice(fields["status"], "status", values.MERCHANT_STATUSES)}
    keys, balances = [], []
    for index, key in enumerate(values.json_array(fields.get("keys", []), "keys")):
        where = _label("keys", index, key, "keyId")
        try:
            key = values.json_object(key, ("keyId", "publicKeyPem"))
            keys.append(Entry(f"{label}: {where}", {"merchant_id": merchant_id,
                                                    "key_id": values.text(key["keyId"], "keyId", 64),
                                                    "public_key_pem": values.public_key_pem(key["publicKeyPem"])}))
        except Invalid as exc:
            raise Invalid(f"{where}: {exc}") from None
    for index, balance in enumerate(values.json_array(fields.get("balances", []), "balances")):
        where = _label("balances", index, balance, "currency")
        try:
            balance = values.json_object(balance, ("currency", "unsettled"))
            currency = values.currency_code(balance["currency"])
            balances.append(Entry(f"{label}: {where}", {
                "merchant_id": merchant_id, "currency": currency,
                "unsettled": values.amount(balance["unsettled"], "unsettled", currency, allow_zero=True)}))
        except Invalid as exc:
            raise Invalid(f"{where}: {exc}") from None
    plan.merchants.append(Entry(label, row))
    plan.keys += keys
    plan.balances += balances


def _check_order(item, label: str, plan: Plan) -> None:
    fields = values.json_object(item, ORDER_FIELDS)
    row = {"id": values.positive_id(fields["id"], "id"),
           "merchant_id": values.positive_id(fields["merchantId"], "merchantId"),
           "merchant_reference": values.text(fields["merchantReference"], "merchantReference", 128),
           "currency": values.currency_code(fields["currency"])}
    row["amount"] = values.amount(fields["amount"], "amount", row["currency"])
    row["status"] = values.choice(fields["status"], "status", ORDER_STATUSES)
    row["payment_method"] = values.text(fields["paymentMethod"], "paymentMethod", 32)
    row["create_time"] = row["update_time"] = values.utc_time(fields["createTime"], "createTime")
    sale = {"masked_pan": values.masked_pan(fields["maskedPan"]), "stan": values.stan(fields["stan"])}
    plan.orders.append(Entry(label, row, sale))


def _duplicates(entries: list[Entry], columns: tuple[str, ...], what: str) -> list[str]:
    first: dict[tuple, str] = {}
    problems = []
    for entry in entries:
        key = tuple(entry.row[c] for c in columns)
        if key in first:
            problems.append(f"{entry.label}: {what} already given in {first[key]}")
        else:
            first[key] = entry.label
    return problems


def check_document(document) -> Plan:
    """Every entry of a load file checked, without the database; BadFile if any is bad."""
    try:
        top = values.json_object(document, (), ("paymentMethods", "merchants", "orders"))
    except Invalid as exc:
        raise BadFile([f"top level: {exc}"]) from None
    plan, problems = Plan(), []
    sections = (("paymentMethods", "code", _check_payment_method), ("merchants", "id", _check_merchant),
                ("orders", "id", _check_order))
    for section, id_field, check in sections:
        try:
            items = values.json_array(top.get(section, []), section)
        except Invalid as exc:
            problems.append(str(exc))
            continue
        for index, item in enumerate(items):
            label = _label(section, index, item, id_field)
            try:
                check(item, label, plan)
            except Invalid as exc:
                problems.append(f"{label}: {exc}")
    problems += _duplicates(plan.payment_methods, ("code",), "this code is")
    problems += _duplicates(plan.merchants, ("id",), "this id is")
    problems += _duplicates(plan.keys, ("merchant_id", "key_id"), "this keyId is")
    problems += _duplicates(plan.balances, ("merchant_id", "currency"), "this currency is")
    problems += _duplicates(plan.orders, ("id",), "this id is")
    problems += _duplicates(plan.orders, ("merchant_id", "merchant_reference"), "this merchantReference is")
    if problems:
        raise BadFile(problems)
    return plan
