"""`refund-admin`: the operator's command (docs/api.md section 6).

    refund-admin migrate
    refund-admin load FILE.json
    refund-admin demo [--dir DIR]
    refund-admin merchant add ID NAME [--status ACTIVE|SUSPENDED]
    refund-admin merchant suspend|activate|show ID
    refund-admin merchant timestamp ID required|optional
    refund-admin key add MERCHANT_ID KEY_ID PEM_FILE
    refund-admin key deactivate MERCHANT_ID KEY_ID
    refund-admin balance MERCHANT_ID
    refund-admin balance adjust MERCHANT_ID CURRENCY AMOUNT --reason TEXT [--id ID]
    refund-admin settlements [MERCHANT_ID]
    refund-admin verify
    refund-admin events [--after SEQ] [--limit N] [--merchant ID] [--type TYPE]
    refund-admin gateway-key create --out FILE
    refund-admin gateway-key public [--all]
    refund-admin purge-idempotency [--older-than 48h]

The database is `--database-url`, else REFUND_DATABASE_URL, else
sqlite:///refund.db; its password is never printed.

`load` checks the whole file before it touches the database, then applies it
in one transaction: a bad file is refused whole, with one line per bad entry,
and nothing is written. It creates what is missing and never overwrites money
or status; reloading the same file changes nothing:

- payment methods are added, or their refund capability set to the file's;
  merchants are added with the file's status, and an existing merchant keeps
  its status (only `merchant suspend|activate` change it; its name is set);
- a balance is created with its opening journal entry; an existing balance
  is never changed (it moves only by journaled commands: refunds, sales,
  settlements, `balance adjust`). What the file says differently of a
  merchant's status or a balance is reported as left alone;
- keys are added, active; a key already registered keeps its active flag and
  its created_at (a reload never reactivates a key an operator deactivated),
  and a keyId registered with a different public key is refused;
- orders are added with their SALE transaction. An order already in the
  database is never changed: one whose sale differs from the file (merchant,
  reference, currency, amount, payment method, create time, masked PAN,
  STAN) is refused; one whose status alone differs keeps the database's
  status (a refund since the last load is not undone) and is reported.

Exit status: 0 done; 1 refused (unknown merchant or key, a conflict);
2 bad input (usage, a bad load file); 3 database unavailable or not migrated;
4 `verify` found discrepancies (each is named).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import shlex
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path

import sqlalchemy as sa
from alembic.util import CommandError
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from service import config, db, domain, ledger, schema
from service.events import COLUMNS as EVENT_COLUMNS
from service.signing import MIN_KEY_BITS

EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2
EXIT_DATABASE = 3
EXIT_DISCREPANCIES = 4

MERCHANT_STATUSES = ("ACTIVE", "SUSPENDED")
CAPABILITIES = tuple(c.value for c in domain.RefundCapability)
ORDER_STATUSES = tuple(s.value for s in domain.OrderStatus)
MAX_ID = domain.MAX_ID
MAX_PROBLEMS_SHOWN = 50


class AdminError(Exception):
    """A command refused; its message is printed on stderr and nothing is written."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED):
        super().__init__(message)
        self.exit_code = exit_code


class BadFile(AdminError):
    """A load file refused whole; one problem per bad entry."""

    def __init__(self, problems: list[str]):
        shown = problems[:MAX_PROBLEMS_SHOWN]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        super().__init__("refused, nothing written:\n" + "\n".join("  " + p for p in shown), EXIT_BAD_INPUT)
        self.problems = problems


class Invalid(ValueError):
    """One bad value; the caller says which entry it is in."""


# -- reading values ----------------------------------------------------------


def _show(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _json_kind(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, Decimal)):
        return "a JSON number"
    return {list: "an array", dict: "an object", str: "a string"}.get(type(value), "an object")


def _fields(value, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """A JSON object with exactly these fields (the optional ones may be missing)."""
    if not isinstance(value, dict):
        raise Invalid(f"must be a JSON object, not {_json_kind(value)}")
    duplicates = getattr(value, "duplicate_keys", ())
    if duplicates:
        raise Invalid(f"duplicate key {_show(duplicates[0])}")
    unknown = [name for name in value if name not in required and name not in optional]
    if unknown:
        raise Invalid(f"unknown field {_show(unknown[0])}")
    missing = [name for name in required if name not in value]
    if missing:
        raise Invalid(f"missing field {missing[0]}")
    return value


def _array(value, name: str) -> list:
    if not isinstance(value, list):
        raise Invalid(f"{name} must be a JSON array, not {_json_kind(value)}")
    return value


def _positive_id(value, name: str) -> int:
    """A positive integer id, as a JSON integer or a string of digits."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise Invalid(f"{name} must be a positive integer, not {_json_kind(value)}")
    text = str(value)
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= MAX_ID:
        raise Invalid(f"{name} {_show(value)} is not a positive integer")
    return int(text)


def _text(value, name: str, max_length: int) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{name} must be a string, not {_json_kind(value)}")
    if not value.strip():
        raise Invalid(f"{name} must not be empty")
    if len(value) > max_length:
        raise Invalid(f"{name} is longer than {max_length} characters")
    return value


def _choice(value, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise Invalid(f"{name} {_show(value)} is not one of {', '.join(choices)}")
    return value


def _currency(value) -> str:
    if value not in domain.KNOWN_CURRENCIES:
        raise Invalid(f"currency {_show(value)} is not an ISO 4217 currency code")
    return value


def _is_zero(text: str) -> bool:
    try:
        return Decimal(text.strip()).is_zero()
    except InvalidOperation:
        return False


def _amount(value, name: str, currency: str, allow_zero: bool = False) -> int:
    """Integer minor units of a decimal string such as "76.19"; never via float."""
    if not isinstance(value, str):
        raise Invalid(f'{name} must be a decimal string such as "76.19", not {_json_kind(value)}')
    if allow_zero and _is_zero(value):
        decimals = -Decimal(value.strip()).as_tuple().exponent
        if decimals > domain.minor_units(currency):
            raise Invalid(f"{name} {_show(value)} has more than {domain.minor_units(currency)} decimals for {currency}")
        return 0
    try:
        return domain.to_minor(value, currency)
    except domain.DomainError as exc:  # "amount has more than 2 decimals for HKD"
        raise Invalid(f"{name} {_show(value)} {exc.message.removeprefix('amount ')}") from None


def _time(value, name: str) -> datetime:
    """An ISO 8601 time with an offset, as an aware UTC datetime."""
    if not isinstance(value, str):
        raise Invalid(f"{name} must be an ISO 8601 string, not {_json_kind(value)}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise Invalid(f"{name} {_show(value)} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise Invalid(f"{name} {_show(value)} has no UTC offset (write e.g. 2026-11-20T08:15:00+08:00)")
    return moment.astimezone(timezone.utc)


def _masked_pan(value) -> str:
    # The value is never echoed: it may be a full card number.
    if not isinstance(value, str):
        raise Invalid(f"maskedPan must be a string, not {_json_kind(value)}")
    try:
        return domain.check_masked_pan(value)
    except domain.DomainError as exc:
        raise Invalid(exc.message) from None


def _stan(value) -> str:
    if not isinstance(value, str):
        raise Invalid(f"stan must be a string of 6 digits, not {_json_kind(value)}")
    try:
        return domain.check_stan(value)
    except domain.DomainError:
        raise Invalid(f"stan {_show(value)} is not 6 digits") from None


def public_key_pem(pem, name: str = "publicKeyPem") -> str:
    """The canonical PEM (SubjectPublicKeyInfo) of an RSA public key of at least MIN_KEY_BITS,
    given as PEM (any line ends) or as bare base64 of its DER, SubjectPublicKeyInfo or
    PKCS#1, the form the vendor's plugin shows merchants (lines and white space ignored)."""
    if not isinstance(pem, str):
        raise Invalid(f"{name} must be a string, not {_json_kind(pem)}")
    if "PRIVATE KEY" in pem:
        raise Invalid(f"{name} holds a private key: register the public key only")
    try:
        if "-----BEGIN" in pem:
            key = serialization.load_pem_public_key(pem.strip().encode("utf-8"))
        else:
            key = serialization.load_der_public_key(base64.b64decode("".join(pem.split()), validate=True))
    except (ValueError, UnsupportedAlgorithm, binascii.Error):
        raise Invalid(f"{name} is not a public key in PEM or base64 DER") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise Invalid(f"{name} is not an RSA key")
    if key.key_size < MIN_KEY_BITS:
        raise Invalid(f"{name} is a {key.key_size}-bit RSA key; at least {MIN_KEY_BITS} bits are required")
    return _pem(key)


def _pem(key: rsa.RSAPublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def fingerprint(pem: str) -> str:
    """SHA-256 of the key's DER encoding, in hex: for operators to compare keys."""
    key = serialization.load_pem_public_key(pem.encode())
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


# -- the load file -----------------------------------------------------------


class _JSONObject(dict):
    """A JSON object that remembers the keys it was given more than once."""

    duplicate_keys: tuple[str, ...] = ()


def _object_pairs(pairs) -> _JSONObject:
    result = _JSONObject()
    duplicates = []
    for key, value in pairs:
        if key in result:
            duplicates.append(key)
        result[key] = value
    result.duplicate_keys = tuple(duplicates)
    return result


def _no_constant(name: str):
    raise Invalid(f"{name} is not a number")


def read_document(path: str):
    """The parsed JSON of a load file: numbers as Decimal or int, never float.

    Duplicate keys are recorded on each object rather than raised here, so
    that the check can name the entry that holds them."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise AdminError(f"cannot read {path}: {exc.strerror}", EXIT_BAD_INPUT) from None
    except UnicodeDecodeError:
        raise AdminError(f"{path} is not UTF-8 text", EXIT_BAD_INPUT) from None
    try:
        return json.loads(text, object_pairs_hook=_object_pairs, parse_float=Decimal, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise AdminError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                         EXIT_BAD_INPUT) from None
    except Invalid as exc:
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
    fields = _fields(item, ("code", "refund"))
    row = {"code": _text(fields["code"], "code", 32),
           "refund_capability": _choice(fields["refund"], "refund", CAPABILITIES)}
    plan.payment_methods.append(Entry(label, row))


def _check_merchant(item, label: str, plan: Plan) -> None:
    fields = _fields(item, ("id", "name", "status"), ("keys", "balances"))
    merchant_id = _positive_id(fields["id"], "id")
    row = {"id": merchant_id, "name": _text(fields["name"], "name", 200),
           "status": _choice(fields["status"], "status", MERCHANT_STATUSES)}
    keys, balances = [], []
    for index, key in enumerate(_array(fields.get("keys", []), "keys")):
        where = _label("keys", index, key, "keyId")
        try:
            key = _fields(key, ("keyId", "publicKeyPem"))
            keys.append(Entry(f"{label}: {where}", {"merchant_id": merchant_id,
                                                    "key_id": _text(key["keyId"], "keyId", 64),
                                                    "public_key_pem": public_key_pem(key["publicKeyPem"])}))
        except Invalid as exc:
            raise Invalid(f"{where}: {exc}") from None
    for index, balance in enumerate(_array(fields.get("balances", []), "balances")):
        where = _label("balances", index, balance, "currency")
        try:
            balance = _fields(balance, ("currency", "unsettled"))
            currency = _currency(balance["currency"])
            balances.append(Entry(f"{label}: {where}", {
                "merchant_id": merchant_id, "currency": currency,
                "unsettled": _amount(balance["unsettled"], "unsettled", currency, allow_zero=True)}))
        except Invalid as exc:
            raise Invalid(f"{where}: {exc}") from None
    plan.merchants.append(Entry(label, row))
    plan.keys += keys
    plan.balances += balances


ORDER_FIELDS = ("id", "merchantId", "merchantReference", "currency", "amount", "status", "paymentMethod",
                "maskedPan", "stan", "createTime")


def _check_order(item, label: str, plan: Plan) -> None:
    fields = _fields(item, ORDER_FIELDS)
    row = {"id": _positive_id(fields["id"], "id"),
           "merchant_id": _positive_id(fields["merchantId"], "merchantId"),
           "merchant_reference": _text(fields["merchantReference"], "merchantReference", 128),
           "currency": _currency(fields["currency"])}
    row["amount"] = _amount(fields["amount"], "amount", row["currency"])
    row["status"] = _choice(fields["status"], "status", ORDER_STATUSES)
    row["payment_method"] = _text(fields["paymentMethod"], "paymentMethod", 32)
    row["create_time"] = row["update_time"] = _time(fields["createTime"], "createTime")
    sale = {"masked_pan": _masked_pan(fields["maskedPan"]), "stan": _stan(fields["stan"])}
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
        top = _fields(document, (), ("paymentMethods", "merchants", "orders"))
    except Invalid as exc:
        raise BadFile([f"top level: {exc}"]) from None
    plan, problems = Plan(), []
    sections = (("paymentMethods", "code", _check_payment_method), ("merchants", "id", _check_merchant),
                ("orders", "id", _check_order))
    for section, id_field, check in sections:
        try:
            items = _array(top.get(section, []), section)
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


# -- applying it -------------------------------------------------------------

# What a loaded sale fixed; a reload never changes it.
SALE_COLUMNS = ("merchant_id", "merchant_reference", "currency", "amount", "payment_method", "create_time")


def _utc(moment: datetime) -> datetime:
    """SQLite gives back naive UTC datetimes, PostgreSQL aware ones."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _rows_in(conn, table: sa.Table, column: sa.Column, values, *criteria) -> dict[tuple, dict]:
    """Rows of `table` whose `column` is in `values`, by primary key."""
    values = sorted(set(values))
    primary_key = [c.name for c in table.primary_key]
    rows = {}
    for start in range(0, len(values), 500):
        query = sa.select(table).where(column.in_(values[start:start + 500]), *criteria)
        for row in conn.execute(query).mappings():
            rows[tuple(row[c] for c in primary_key)] = dict(row)
    return rows


@dataclass
class Existing:
    """What the database already holds of what a plan names."""

    payment_methods: dict
    merchants: dict
    keys: dict
    balances: dict
    orders: dict
    references: dict  # (merchant_id, merchant_reference) -> order id
    sales: dict  # order id -> SALE transaction row


def _existing(conn, plan: Plan) -> Existing:
    merchant_ids = [e.row["id"] for e in plan.merchants] + [e.row["merchant_id"] for e in plan.orders]
    codes = [e.row["code"] for e in plan.payment_methods] + [e.row["payment_method"] for e in plan.orders]
    order_ids = [e.row["id"] for e in plan.orders]
    by_reference = _rows_in(conn, schema.orders, schema.orders.c.merchant_reference,
                            [e.row["merchant_reference"] for e in plan.orders])
    sales = _rows_in(conn, schema.transactions, schema.transactions.c.order_id, order_ids,
                     schema.transactions.c.type == "SALE")
    return Existing(
        payment_methods=_rows_in(conn, schema.payment_methods, schema.payment_methods.c.code, codes),
        merchants=_rows_in(conn, schema.merchants, schema.merchants.c.id, merchant_ids),
        keys=_rows_in(conn, schema.merchant_keys, schema.merchant_keys.c.merchant_id, merchant_ids),
        balances=_rows_in(conn, schema.balances, schema.balances.c.merchant_id, merchant_ids),
        orders=_rows_in(conn, schema.orders, schema.orders.c.id, order_ids),
        references={(r["merchant_id"], r["merchant_reference"]): r["id"] for r in by_reference.values()},
        sales={r["order_id"]: r for r in sales.values()},
    )


def _sale_differences(entry: Entry, order: dict, sale: dict | None) -> list[str]:
    new = entry.row
    differences = [c for c in SALE_COLUMNS if c != "create_time" and order[c] != new[c]]
    if _utc(order["create_time"]) != new["create_time"]:
        differences.append("create_time")
    if sale is not None:
        differences += [c for c in ("masked_pan", "stan") if sale[c] != entry.sale[c]]
    return differences


def _same_key(pem: str, other: str) -> bool:
    try:
        return fingerprint(pem) == fingerprint(other)
    except (ValueError, UnsupportedAlgorithm):
        return pem == other


def _conflicts(plan: Plan, existing: Existing) -> list[str]:
    """What in the plan the database contradicts."""
    merchants_in_file = {e.row["id"] for e in plan.merchants}
    codes_in_file = {e.row["code"] for e in plan.payment_methods}
    problems = []
    for entry in plan.keys:
        old = existing.keys.get((entry.row["merchant_id"], entry.row["key_id"]))
        if old is not None and not _same_key(old["public_key_pem"], entry.row["public_key_pem"]):
            problems.append(f"{entry.label}: keyId {entry.row['key_id']} is already registered with a different "
                            "public key; give the new key a new keyId")
    for entry in plan.orders:
        row = entry.row
        if row["merchant_id"] not in merchants_in_file and (row["merchant_id"],) not in existing.merchants:
            problems.append(f"{entry.label}: merchantId {row['merchant_id']} is neither in the file "
                            "nor in the database")
        if row["payment_method"] not in codes_in_file and (row["payment_method"],) not in existing.payment_methods:
            problems.append(f"{entry.label}: paymentMethod {_show(row['payment_method'])} is neither in the file "
                            "nor in the database")
        owner = existing.references.get((row["merchant_id"], row["merchant_reference"]))
        if owner is not None and owner != row["id"]:
            problems.append(f"{entry.label}: merchantReference {_show(row['merchant_reference'])} already belongs "
                            f"to order {owner}")
        old = existing.orders.get((row["id"],))
        if old is not None:
            differences = _sale_differences(entry, old, existing.sales.get(row["id"]))
            if differences:
                problems.append(f"{entry.label}: order {row['id']} is already loaded with a different "
                                f"{', '.join(differences)}; a loaded sale is never changed")
    return problems


def _upsert(conn, table: sa.Table, entries: list[Entry], existing: dict, counts: Counter) -> None:
    """Insert the new rows, update the changed ones, leave the rest."""
    primary_key = [c.name for c in table.primary_key]
    new_rows = []
    for entry in entries:
        key = tuple(entry.row[c] for c in primary_key)
        old = existing.get(key)
        if old is None:
            new_rows.append(entry.row)
            counts["added"] += 1
        elif any(old[c] != v for c, v in entry.row.items()):
            where = [table.c[c] == v for c, v in zip(primary_key, key)]
            conn.execute(table.update().where(*where).values(entry.row))
            counts["updated"] += 1
        else:
            counts["unchanged"] += 1
    if new_rows:
        conn.execute(table.insert(), new_rows)


@dataclass
class LoadReport:
    counts: dict[str, Counter]
    notes: list[str]


def _write(conn, plan: Plan, existing: Existing) -> LoadReport:
    now = datetime.now(timezone.utc)
    counts = {name: Counter() for name in ("payment methods", "merchants", "keys", "balances", "orders")}
    notes = []
    _upsert(conn, schema.payment_methods, plan.payment_methods, existing.payment_methods, counts["payment methods"])
    merchants = []
    for entry in plan.merchants:  # a merchant's status changes only by `merchant suspend|activate`
        old = existing.merchants.get((entry.row["id"],))
        if old is not None and old["status"] != entry.row["status"]:
            notes.append(f"merchant {old['id']} left {old['status']} (the file says {entry.row['status']}; "
                         "use refund-admin merchant suspend|activate)")
            entry = Entry(entry.label, {**entry.row, "status": old["status"]})
        merchants.append(entry)
    _upsert(conn, schema.merchants, merchants, existing.merchants, counts["merchants"])

    new_keys = []
    for entry in plan.keys:
        if (entry.row["merchant_id"], entry.row["key_id"]) in existing.keys:
            counts["keys"]["unchanged"] += 1  # same public key (checked); active flag and created_at kept
        else:
            new_keys.append({**entry.row, "active": True, "created_at": now})
            counts["keys"]["added"] += 1
    if new_keys:
        conn.execute(schema.merchant_keys.insert(), new_keys)

    new_balances, openings = [], []
    for entry in plan.balances:  # a live balance moves only by journaled commands
        row = entry.row
        old = existing.balances.get((row["merchant_id"], row["currency"]))
        if old is None:
            new_balances.append(row)
            if row["unsettled"]:
                openings.append({"merchant_id": row["merchant_id"], "currency": row["currency"], "kind": "OPENING",
                                 "amount": row["unsettled"], "balance_after": row["unsettled"], "created_at": now})
            counts["balances"]["added"] += 1
        elif old["unsettled"] != row["unsettled"]:
            notes.append(f"balance {row['currency']} of merchant {row['merchant_id']} left at "
                         f"{domain.format_minor(old['unsettled'], row['currency'])} (the file says "
                         f"{domain.format_minor(row['unsettled'], row['currency'])}; use refund-admin balance adjust)")
            counts["balances"]["kept"] += 1
        else:
            counts["balances"]["unchanged"] += 1
    if new_balances:
        conn.execute(schema.balances.insert(), new_balances)
    if openings:
        conn.execute(schema.ledger_entries.insert(), openings)

    new_orders, sales = [], []
    for entry in plan.orders:
        old = existing.orders.get((entry.row["id"],))
        if old is None:
            new_orders.append(entry.row)
            sales.append({"order_id": entry.row["id"], "merchant_id": entry.row["merchant_id"], "type": "SALE",
                          "currency": entry.row["currency"], "amount": entry.row["amount"], "status": "SUCCESS",
                          "create_time": entry.row["create_time"], **entry.sale})
            counts["orders"]["added"] += 1
        elif old["status"] != entry.row["status"]:
            notes.append(f"order {old['id']} kept as {old['status']} (the file says {entry.row['status']})")
            counts["orders"]["kept"] += 1
        else:
            counts["orders"]["unchanged"] += 1
    if new_orders:
        conn.execute(schema.orders.insert(), new_orders)
        conn.execute(schema.transactions.insert(), sales)
    return LoadReport(counts, notes)


def load_document(engine: sa.Engine, document) -> LoadReport:
    """Check a load document whole, then apply it in one transaction."""
    plan = check_document(document)
    with engine.begin() as conn:
        existing = _existing(conn, plan)
        problems = _conflicts(plan, existing)
        if problems:
            raise BadFile(problems)  # leaving the block rolls back: nothing written
        return _write(conn, plan, existing)


def _print_report(report: LoadReport) -> None:
    for name, counts in report.counts.items():
        parts = [f"{counts[outcome]} {outcome}" for outcome in ("added", "updated", "unchanged", "kept")
                 if counts[outcome]]
        print(f"  {name}: {', '.join(parts) or 'none'}")
    for note in report.notes:
        print(f"  {note}")


# -- demo --------------------------------------------------------------------

DEMO_MERCHANT_ID = 4000001
DEMO_MERCHANT_NAME = "Demo Shop"
DEMO_FIRST_ORDER_ID = 4100001
DEMO_KEY_FILE = "demo-merchant.key.pem"
DEMO_PUBLIC_KEY_FILE = "demo-merchant.pub.pem"
DEMO_PAYMENT_METHODS = {"VISA": "FULL_AND_PARTIAL", "MASTERCARD": "FULL_AND_PARTIAL", "ALIPAY": "FULL_ONLY",
                        "OCTOPUS": "NONE"}
DEMO_BALANCES = {"HKD": "10000.00", "JPY": "500000"}
DEMO_ORDERS = (  # currency, amount, payment method, masked PAN
    ("HKD", "76.19", "VISA", "411111******1111"),
    ("HKD", "250.00", "VISA", "400000******0002"),
    ("HKD", "1288.50", "MASTERCARD", "555555******4444"),
    ("HKD", "42.00", "MASTERCARD", "510510******5100"),
    ("HKD", "120.00", "ALIPAY", ""),
    ("HKD", "399.90", "ALIPAY", ""),
    ("HKD", "35.50", "OCTOPUS", ""),
    ("JPY", "4800", "VISA", "411111******1111"),
    ("JPY", "12500", "MASTERCARD", "555555******4444"),
    ("JPY", "3000", "ALIPAY", ""),
)


def demo_key(directory: Path) -> tuple[rsa.RSAPrivateKey, bool]:
    """The demo merchant's private key from DIRECTORY, made (mode 0600) if missing; and whether it was made."""
    path = directory / DEMO_KEY_FILE
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
            key = None
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < MIN_KEY_BITS:
            raise AdminError(f"{path} is not an unencrypted RSA private key of {MIN_KEY_BITS} bits or more; "
                             "move it away to make a new one")
        return key, False
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
        file.write(pem)
    return key, True


def demo_document(public_pem: str, key_id: str) -> dict:
    """The demo data, shaped like a load file."""
    start = datetime(2026, 11, 20, 2, 0, tzinfo=timezone.utc)
    orders = [{"id": DEMO_FIRST_ORDER_ID + i, "merchantId": DEMO_MERCHANT_ID, "merchantReference": f"demo-{i + 1:04d}",
               "currency": currency, "amount": amount, "status": "SUCCESS", "paymentMethod": method,
               "maskedPan": masked_pan, "stan": f"{900001 + i:06d}",
               "createTime": (start + timedelta(minutes=37 * i)).isoformat()}
              for i, (currency, amount, method, masked_pan) in enumerate(DEMO_ORDERS)]
    return {
        "paymentMethods": [{"code": code, "refund": refund} for code, refund in DEMO_PAYMENT_METHODS.items()],
        "merchants": [{"id": DEMO_MERCHANT_ID, "name": DEMO_MERCHANT_NAME, "status": "ACTIVE",
                       "keys": [{"keyId": key_id, "publicKeyPem": public_pem}],
                       "balances": [{"currency": c, "unsettled": v} for c, v in DEMO_BALANCES.items()]}],
        "orders": orders,
    }


def _demo_orders(conn) -> list:
    return conn.execute(
        sa.select(schema.orders.c.id, schema.orders.c.merchant_reference, schema.orders.c.currency,
                  schema.orders.c.amount, schema.orders.c.payment_method, schema.payment_methods.c.refund_capability,
                  schema.orders.c.status)
        .join(schema.payment_methods, schema.payment_methods.c.code == schema.orders.c.payment_method)
        .where(schema.orders.c.merchant_id == DEMO_MERCHANT_ID)
        .order_by(schema.orders.c.id)).all()


def _is_refundable(order) -> bool:
    return order.status in domain.REFUNDABLE_STATUSES and order.refund_capability != "NONE"


def cmd_demo(args, url: str) -> None:
    directory = Path(args.dir)
    key, created = demo_key(directory)
    public_pem = _pem(key.public_key())
    (directory / DEMO_PUBLIC_KEY_FILE).write_text(public_pem)
    key_id = "demo-" + fingerprint(public_pem)[:12]
    with _engine(url) as engine:
        try:
            report = load_document(engine, demo_document(public_pem, key_id))
        except BadFile as exc:
            raise AdminError(f"the demo data was {exc}", exc.exit_code) from None
        with engine.connect() as conn:
            orders = _demo_orders(conn)
    key_path = directory / DEMO_KEY_FILE
    print(f"demo loaded into {config.redact(url)}:")
    _print_report(report)
    print(f"merchant {DEMO_MERCHANT_ID} {DEMO_MERCHANT_NAME!r}, key {key_id}")
    print(f"private key: {key_path} ({'created' if created else 'kept'}); "
          f"public key: {directory / DEMO_PUBLIC_KEY_FILE}")
    print(f"balances: {', '.join(f'{c} {v}' for c, v in DEMO_BALANCES.items())} when first loaded "
          "(see refund-admin balance " + str(DEMO_MERCHANT_ID) + ")")
    print("orders:")
    for order in orders:
        amount = domain.format_minor(order.amount, order.currency)
        print(f"  {order.id}  {order.merchant_reference}  {order.currency} {amount:>9}  {order.payment_method:<10}  "
              f"{order.refund_capability:<16}  {order.status}")
    refundable = [order for order in orders if _is_refundable(order)]
    if not refundable:
        print("no demo order is refundable any more")
        return
    print(f"refundable now: {', '.join(str(order.id) for order in refundable)}")
    example = next((o for o in refundable if o.refund_capability == "FULL_AND_PARTIAL"), refundable[0])
    amount = domain.format_minor(example.amount, example.currency)
    ids = f"--merchant-id {DEMO_MERCHANT_ID} --order-id {example.id} --amount {amount}"
    print("refund it as the merchant (signed, through the HTTP edge):")
    print(f"  {_script('refund-client')} --key {shlex.quote(str(key_path))} {ids}")
    print("or as an internal service (gRPC):")
    print(f"  {_script('python')} -m service.grpc_client refund {ids}")


def _script(name: str) -> str:
    """A command of this installation (e.g. .venv/bin/refund-client), as a path to paste."""
    path = Path(sys.executable).parent / name
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# -- the other commands ------------------------------------------------------


@contextmanager
def _engine(url: str):
    engine = db.make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def cmd_migrate(args, url: str) -> None:
    db.migrate(url)
    print(f"migrated {config.redact(url)} to the latest schema")


def cmd_load(args, url: str) -> None:
    document = read_document(args.file)
    with _engine(url) as engine:
        try:
            report = load_document(engine, document)
        except BadFile as exc:
            raise AdminError(f"{args.file} {exc}", exc.exit_code) from None
    print(f"loaded {args.file} into {config.redact(url)}:")
    _print_report(report)


def _merchant_id(text: str) -> int:
    try:
        return _positive_id(text, "MERCHANT_ID")
    except Invalid as exc:
        raise AdminError(str(exc), EXIT_BAD_INPUT) from None


def _merchant(conn, merchant_id: int):
    merchant = conn.execute(sa.select(schema.merchants).where(schema.merchants.c.id == merchant_id)).first()
    if merchant is None:
        raise AdminError(f"no merchant {merchant_id}")
    return merchant


def cmd_merchant_add(args, url: str) -> None:
    merchant_id = _merchant_id(args.id)
    try:
        name = _text(args.name, "NAME", 200)
    except Invalid as exc:
        raise AdminError(str(exc), EXIT_BAD_INPUT) from None
    with _engine(url) as engine, engine.begin() as conn:
        old = conn.execute(sa.select(schema.merchants).where(schema.merchants.c.id == merchant_id)).first()
        if old is not None:
            raise AdminError(f"merchant {merchant_id} already exists ({old.name!r}, {old.status})")
        conn.execute(schema.merchants.insert().values(id=merchant_id, name=name, status=args.status))
    print(f"merchant {merchant_id} {name!r} added, {args.status}; "
          f"register its public key with: refund-admin key add {merchant_id} KEY_ID PEM_FILE")


def _set_merchant_status(url: str, text_id: str, status: str) -> None:
    merchant_id = _merchant_id(text_id)
    with _engine(url) as engine, engine.begin() as conn:
        merchant = _merchant(conn, merchant_id)
        if merchant.status == status:
            print(f"merchant {merchant_id} was already {status}")
            return
        conn.execute(schema.merchants.update().where(schema.merchants.c.id == merchant_id).values(status=status))
    print(f"merchant {merchant_id} is now {status}")


def cmd_merchant_suspend(args, url: str) -> None:
    _set_merchant_status(url, args.id, "SUSPENDED")


def cmd_merchant_activate(args, url: str) -> None:
    _set_merchant_status(url, args.id, "ACTIVE")


def _balances(conn, merchant_id: int) -> list:
    return conn.execute(sa.select(schema.balances).where(schema.balances.c.merchant_id == merchant_id)
                        .order_by(schema.balances.c.currency)).all()


def _print_balances(balances) -> None:
    if not balances:
        print("  none")
    for balance in balances:
        print(f"  {balance.currency} {domain.format_minor(balance.unsettled, balance.currency)}")


def _short_fingerprint(pem: str) -> str:
    try:
        return fingerprint(pem)[:16]
    except (ValueError, UnsupportedAlgorithm):
        return "(not a readable PEM key)"


def cmd_merchant_show(args, url: str) -> None:
    merchant_id = _merchant_id(args.id)
    with _engine(url) as engine, engine.connect() as conn:
        merchant = _merchant(conn, merchant_id)
        keys = conn.execute(sa.select(schema.merchant_keys).where(schema.merchant_keys.c.merchant_id == merchant_id)
                            .order_by(schema.merchant_keys.c.created_at, schema.merchant_keys.c.key_id)).all()
        balances = _balances(conn, merchant_id)
    print(f"merchant {merchant.id} {merchant.name!r} {merchant.status}")
    print(f"signed timestamp: {'required' if merchant.require_timestamp else 'optional'}")
    print("keys:")
    if not keys:
        print("  none")
    for key in keys:
        created = _utc(key.created_at).isoformat(timespec="seconds")
        print(f"  {key.key_id}  {'active' if key.active else 'inactive'}  created {created}  "
              f"sha256 {_short_fingerprint(key.public_key_pem)}")
    print("unsettled balances:")
    _print_balances(balances)


def cmd_balance(args, url: str) -> None:
    merchant_id = _merchant_id(args.merchant_id)
    with _engine(url) as engine, engine.connect() as conn:
        _merchant(conn, merchant_id)
        balances = _balances(conn, merchant_id)
    print(f"unsettled balances of merchant {merchant_id}:")
    _print_balances(balances)


def cmd_balance_adjust(args, url: str) -> None:
    """Credit or debit an unsettled balance by a journaled adjustment."""
    merchant_id = _merchant_id(args.merchant_id)
    try:
        currency = _currency(args.currency)
        amount = ledger.parse_signed_amount(args.amount, currency)
        reason = _text(args.reason, "--reason", 500)
        adjustment_id = _text(args.id, "--id", 64) if args.id is not None else None
    except Invalid as exc:
        raise AdminError(str(exc), EXIT_BAD_INPUT) from None
    except domain.DomainError as exc:
        raise AdminError(f"AMOUNT {args.amount!r}: {exc.message}", EXIT_BAD_INPUT) from None
    with _engine(url) as engine:
        try:
            made, new = ledger.adjust_balance(engine, merchant_id, currency, amount, reason, adjustment_id)
        except ledger.LedgerRefused as exc:
            raise AdminError(str(exc)) from None
    change = domain.format_minor(made.amount, currency)
    after = domain.format_minor(made.balance_after, currency)
    if new:
        print(f"adjustment {made.adjustment_id}: merchant {merchant_id} {currency} {change}, balance now {after}")
    else:
        print(f"adjustment {made.adjustment_id} was made before ({made.created_at.isoformat(timespec='seconds')}): "
              f"{currency} {change}, balance after it {after}; nothing changed")


def cmd_settlements(args, url: str) -> None:
    merchant_id = _merchant_id(args.merchant_id) if args.merchant_id is not None else None
    with _engine(url) as engine:
        rows = ledger.settlements(engine, merchant_id, args.limit)
    if not rows:
        print("no settlements")
    for row in rows:
        created = _utc(row.created_at).isoformat(timespec="seconds")
        print(f"{row.settlement_id}  merchant {row.merchant_id}  {row.currency} "
              f"{domain.format_minor(row.amount, row.currency)}  balance after "
              f"{domain.format_minor(row.balance_after, row.currency)}  {created}")


def cmd_verify(args, url: str) -> None:
    """Recompute every balance from the journal and check every link; exit 4 naming each discrepancy."""
    result = ledger.verify(url)
    print(f"verified {config.redact(url)}: " + ", ".join(f"{n} {name}" for name, n in result.counts.items()))
    for check, found in result.discrepancies.items():
        if not found:
            print(f"  ok    {check}")
            continue
        more = "+" if len(found) > ledger.EXAMPLES else ""
        print(f"  FAIL  {check}: {min(len(found), ledger.EXAMPLES)}{more} discrepancies")
        for line in found[:ledger.EXAMPLES]:
            print(f"        {line}")
    if not result.holds:
        raise AdminError("the ledger does not hold: see the discrepancies above", EXIT_DISCREPANCIES)
    print("the ledger holds")


def cmd_key_add(args, url: str) -> None:
    merchant_id = _merchant_id(args.merchant_id)
    try:
        key_id = _text(args.key_id, "KEY_ID", 64)
        pem = public_key_pem(Path(args.pem_file).read_text(encoding="utf-8"), args.pem_file)
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminError(f"cannot read {args.pem_file}: {getattr(exc, 'strerror', None) or exc}",
                         EXIT_BAD_INPUT) from None
    except Invalid as exc:
        raise AdminError(str(exc), EXIT_BAD_INPUT) from None
    with _engine(url) as engine, engine.begin() as conn:
        _merchant(conn, merchant_id)
        exists = conn.execute(sa.select(schema.merchant_keys.c.key_id).where(
            schema.merchant_keys.c.merchant_id == merchant_id, schema.merchant_keys.c.key_id == key_id)).first()
        if exists:
            raise AdminError(f"merchant {merchant_id} already has a key {key_id}; give the new key a new KEY_ID")
        conn.execute(schema.merchant_keys.insert().values(merchant_id=merchant_id, key_id=key_id, public_key_pem=pem,
                                                          active=True, created_at=datetime.now(timezone.utc)))
    print(f"key {key_id} of merchant {merchant_id} added, active (sha256 {fingerprint(pem)[:16]})")


def cmd_key_deactivate(args, url: str) -> None:
    merchant_id = _merchant_id(args.merchant_id)
    keys = schema.merchant_keys
    with _engine(url) as engine, engine.begin() as conn:
        _merchant(conn, merchant_id)
        key = conn.execute(sa.select(keys).where(keys.c.merchant_id == merchant_id,
                                                 keys.c.key_id == args.key_id)).first()
        if key is None:
            raise AdminError(f"merchant {merchant_id} has no key {args.key_id}")
        if key.active:
            conn.execute(keys.update().where(keys.c.merchant_id == merchant_id, keys.c.key_id == args.key_id)
                         .values(active=False))
        still_active = conn.execute(sa.select(sa.func.count()).select_from(keys).where(
            keys.c.merchant_id == merchant_id, keys.c.active == sa.true())).scalar_one()
    print(f"key {args.key_id} of merchant {merchant_id} {'is now' if key.active else 'was already'} inactive")
    if not still_active:
        print(f"merchant {merchant_id} has no active key left: its signed requests will fail authentication")


def cmd_merchant_timestamp(args, url: str) -> None:
    merchant_id = _merchant_id(args.id)
    required = args.setting == "required"
    with _engine(url) as engine, engine.begin() as conn:
        _merchant(conn, merchant_id)
        conn.execute(schema.merchants.update().where(schema.merchants.c.id == merchant_id)
                     .values(require_timestamp=required))
    if required:
        print(f"merchant {merchant_id}: signed requests without a timestamp are now refused (1001)")
    else:
        print(f"merchant {merchant_id}: a signed timestamp is now optional")


# -- the gateway's response-signing key -----------------------------------------


def cmd_gateway_key_create(args, url: str) -> None:
    """A new RSA key: the private key into --out (mode 0600, never overwritten)
    for refund-edge --signing-key, the public key into the database."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=args.bits)
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public = _pem(key.public_key())
    out = Path(args.out)
    with _engine(url) as engine, engine.begin() as conn:
        conn.execute(schema.gateway_keys.insert().values(public_key_pem=public, created_at=datetime.now(timezone.utc)))
        try:
            descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise AdminError(f"{out} exists; choose another file (a key file is never overwritten)") from None
        except OSError as exc:
            raise AdminError(f"cannot create {out}: {exc.strerror}", EXIT_BAD_INPUT) from None
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(private_pem)
        except OSError as exc:
            out.unlink(missing_ok=True)
            raise AdminError(f"cannot write {out}: {exc.strerror}", EXIT_BAD_INPUT) from None
    print(f"gateway key written to {out} (mode 0600, RSA {args.bits}, sha256 {fingerprint(public)[:16]})")
    print(f"start refund-edge with --signing-key {out} (or REFUND_EDGE_SIGNING_KEY={out});")
    print("give merchants the public key printed by: refund-admin gateway-key public")


def cmd_gateway_key_public(args, url: str) -> None:
    """The public key(s) merchants verify X-Signature with, newest first."""
    with _engine(url) as engine, engine.connect() as conn:
        rows = conn.execute(sa.select(schema.gateway_keys).order_by(schema.gateway_keys.c.id.desc())).all()
    if not rows:
        raise AdminError("no gateway key yet; create one with: refund-admin gateway-key create --out FILE")
    for row in rows if args.all else rows[:1]:
        if args.all:
            created = _utc(row.created_at).isoformat(timespec="seconds")
            print(f"# gateway key {row.id}, created {created}, sha256 {fingerprint(row.public_key_pem)[:16]}")
        sys.stdout.write(row.public_key_pem if row.public_key_pem.endswith("\n") else row.public_key_pem + "\n")


# -- housekeeping ------------------------------------------------------------

MIN_IDEMPOTENCY_RETENTION = timedelta(hours=24)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """`48h`, `2d`, `90m`, `3600s`."""
    number, unit = text[:-1], text[-1:]
    if unit not in _DURATION_UNITS or not (number.isascii() and number.isdigit()):
        raise AdminError(f"--older-than {text!r} is not a duration such as 48h, 2d or 90m", EXIT_BAD_INPUT)
    return timedelta(seconds=int(number) * _DURATION_UNITS[unit])


def cmd_purge_idempotency(args, url: str) -> None:
    """Delete Idempotency-Key answers older than --older-than (at least 24 h:
    docs/api.md promises 24 h), and replay-guard hashes whose timestamp has left
    the window. Safe to run at any time, from cron, while the service runs."""
    age = parse_duration(args.older_than)
    if age < MIN_IDEMPOTENCY_RETENTION:
        raise AdminError("--older-than must be at least 24h: merchants are promised their keys for 24 hours",
                         EXIT_BAD_INPUT)
    now = datetime.now(timezone.utc)
    with _engine(url) as engine, engine.begin() as conn:
        keys = conn.execute(schema.idempotency_keys.delete().where(
            schema.idempotency_keys.c.created_at < now - age)).rowcount
        replays = conn.execute(schema.request_replays.delete().where(
            schema.request_replays.c.expires_at < now)).rowcount
    print(f"purged {keys} idempotency key(s) older than {args.older_than} and {replays} expired replay hash(es)")


# -- command line ------------------------------------------------------------

def cmd_events(args, url: str) -> None:
    """The events after --after (journal entries in sequence order) and each relay's position."""
    from service.schema import JOURNAL_KINDS

    if args.type and args.type not in JOURNAL_KINDS:
        raise AdminError(f"unknown event type {args.type!r}; known: {', '.join(JOURNAL_KINDS)}", EXIT_BAD_INPUT)
    if args.after < 0 or not 1 <= args.limit <= 10_000:
        raise AdminError("--after must be 0 or more and --limit 1 to 10000", EXIT_BAD_INPUT)
    merchant_id = _merchant_id(args.merchant) if args.merchant is not None else None
    conditions, params = ["seq > :after"], {"after": args.after, "limit": args.limit}
    if merchant_id is not None:
        conditions.append("merchant_id = :merchant")
        params["merchant"] = merchant_id
    if args.type:
        conditions.append("kind = :kind")
        params["kind"] = args.type
    with _engine(url) as engine, engine.connect() as conn:
        head = conn.execute(sa.text("SELECT COALESCE(MAX(seq), 0) FROM events")).scalar()
        entries = conn.execute(sa.text("SELECT COUNT(*) FROM ledger_entries")).scalar()
        relays = conn.execute(sa.text(
            "SELECT r.name, r.last_sequence, r.updated_at, (SELECT MIN(e.created_at) FROM events e "
            "WHERE e.seq = r.last_sequence + 1) AS oldest FROM event_relays r ORDER BY r.name")).all()
        rows = conn.execute(sa.text(f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(conditions)} "
                                    "ORDER BY seq LIMIT :limit"), params).all()
    unnumbered = entries - head if not url.startswith("sqlite") else 0
    print(f"events: {head} (last sequence {head})" + (f", {unnumbered} journal entries not numbered yet"
                                                      if unnumbered else ""))
    if not relays:
        print("relays: none has run")
    now = datetime.now(timezone.utc)
    def moment(value) -> datetime:  # SQLite gives text through sa.text
        return _utc(datetime.fromisoformat(value) if isinstance(value, str) else value)

    for name, last, updated, oldest in relays:
        lag = f", oldest unpublished {(now - moment(oldest)).total_seconds():.1f}s old" if oldest else ""
        print(f"relay {name}: published through {last} ({head - last} unpublished{lag}), "
              f"position updated {moment(updated).isoformat(timespec='seconds')}")
    for row in rows:
        (seq, entry_id, merchant, currency, kind, amount, after, order_id, transaction_id, settlement_id,
         adjustment_id, request_id, created) = row
        cause = (f"order {order_id} transaction {transaction_id}" if transaction_id else
                 f"settlement {settlement_id}" if settlement_id else
                 f"adjustment {adjustment_id}" if adjustment_id else "")
        print(f"{seq}  evt-{entry_id}  {kind:<10}  merchant {merchant}  {currency} "
              f"{domain.format_minor(amount, currency)}  balance after {domain.format_minor(after, currency)}  "
              f"{cause + '  ' if cause else ''}{'request ' + request_id + '  ' if request_id else ''}"
              f"{moment(created).isoformat(timespec='seconds')}")


class _OneLineParser(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit status 2 (not argparse's usage text)."""

    def error(self, message: str):
        print(f"refund-admin: bad input: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _check_url(url: str, command: str) -> None:
    """A URL of the expected form (else bad input, 2); for any command but `migrate`, an
    existing SQLite file (else 3): only `refund-admin migrate` creates a database file."""
    try:
        config.check_database_url(url)
    except ValueError as exc:
        raise AdminError(str(exc), EXIT_BAD_INPUT) from None
    if url.startswith("sqlite") and command != "migrate":
        path = sa.make_url(url).database
        if not os.path.isfile(path):
            raise AdminError(f"no SQLite database file at {path}: run `refund-admin migrate` first "
                             "(it creates the file)", EXIT_DATABASE)


def build_parser() -> argparse.ArgumentParser:
    # --database-url is accepted before or after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", default=argparse.SUPPRESS, metavar="URL",
                        help="SQLAlchemy database URL (default: $REFUND_DATABASE_URL, else sqlite:///refund.db)")
    parser = _OneLineParser(prog="refund-admin", parents=[common],
                                     description="Operate the refund service: schema, data, merchants and keys.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(group, name, run, help):
        sub = group.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    command(commands, "migrate", cmd_migrate, "create or upgrade the database schema")
    load = command(commands, "load", cmd_load, "create the payment methods, merchants, keys, balances and orders "
                                               "that are missing (never changing a live balance or a status) "
                                               "from a JSON file shaped like fixtures.example.json")
    load.add_argument("file", metavar="FILE")
    demo = command(commands, "demo", cmd_demo, "load a demo merchant with a fresh key pair and orders")
    demo.add_argument("--dir", default="demo", help="where the demo key pair is kept (default: ./demo)")

    merchant = commands.add_parser("merchant", parents=[common], help="add, suspend, activate or show a merchant")
    merchants = merchant.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = command(merchants, "add", cmd_merchant_add, "add a merchant")
    add.add_argument("id", metavar="ID")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--status", choices=MERCHANT_STATUSES, default="ACTIVE")
    for name, run, help in (("suspend", cmd_merchant_suspend, "suspend a merchant: its refunds are refused"),
                            ("activate", cmd_merchant_activate, "activate a suspended merchant"),
                            ("show", cmd_merchant_show, "show a merchant, its keys and balances")):
        command(merchants, name, run, help).add_argument("id", metavar="ID")

    timestamp = command(merchants, "timestamp", cmd_merchant_timestamp,
                        "require a signed timestamp in the merchant's requests, or make it optional again")
    timestamp.add_argument("id", metavar="ID")
    timestamp.add_argument("setting", choices=("required", "optional"))

    key = commands.add_parser("key", parents=[common], help="add or deactivate a merchant's public key")
    keys = key.add_subparsers(dest="action", required=True, metavar="ACTION")
    key_add = command(keys, "add", cmd_key_add, "register a merchant's RSA public key (PEM), active")
    key_add.add_argument("merchant_id", metavar="MERCHANT_ID")
    key_add.add_argument("key_id", metavar="KEY_ID")
    key_add.add_argument("pem_file", metavar="PEM_FILE")
    key_off = command(keys, "deactivate", cmd_key_deactivate, "stop accepting signatures made with a key")
    key_off.add_argument("merchant_id", metavar="MERCHANT_ID")
    key_off.add_argument("key_id", metavar="KEY_ID")

    balance = commands.add_parser("balance", parents=[common], help="show or adjust a merchant's unsettled balances "
                                  "(`balance MERCHANT_ID` shows them)")
    balance_actions = balance.add_subparsers(dest="action", required=True, metavar="ACTION")
    command(balance_actions, "show", cmd_balance, "show a merchant's unsettled balances").add_argument(
        "merchant_id", metavar="MERCHANT_ID")
    adjust = command(balance_actions, "adjust", cmd_balance_adjust,
                     "credit (AMOUNT 12.50) or debit (AMOUNT -12.50) an unsettled balance, journaled with its reason")
    adjust.add_argument("merchant_id", metavar="MERCHANT_ID")
    adjust.add_argument("currency", metavar="CURRENCY")
    adjust.add_argument("amount", metavar="AMOUNT")
    adjust.add_argument("--reason", required=True, help="why, for the auditor (kept with the adjustment)")
    adjust.add_argument("--id", help="your id for this adjustment (default: a new one); the same id again "
                                     "changes nothing")

    listing = command(commands, "settlements", cmd_settlements, "list the newest settlements (Settle)")
    listing.add_argument("merchant_id", metavar="MERCHANT_ID", nargs="?")
    listing.add_argument("--limit", type=int, default=100)
    command(commands, "verify", cmd_verify, "recompute every balance from the journal and check orders, refunds, "
                                            "settlements and audit rows against it; exit 4 on any discrepancy")
    listed = command(commands, "events", cmd_events, "list the events (the journal in sequence order, "
                                                     "docs/events.md) and each relay's position")
    listed.add_argument("--after", type=int, default=0, metavar="SEQ", help="the events after this sequence")
    listed.add_argument("--limit", type=int, default=100)
    listed.add_argument("--merchant", metavar="ID")
    listed.add_argument("--type", metavar="TYPE", help="SALE, REFUND, SETTLEMENT, ADJUSTMENT or OPENING")

    gateway = commands.add_parser("gateway-key", parents=[common],
                                  help="the key refund-edge signs its responses with (X-Signature)")
    gateway_keys = gateway.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = command(gateway_keys, "create", cmd_gateway_key_create,
                     "make a new key: private key into --out (mode 0600) for refund-edge --signing-key, "
                     "public key into the database")
    create.add_argument("--out", required=True, metavar="FILE", help="where to write the private key (must not exist)")
    create.add_argument("--bits", type=int, choices=(2048, 3072, 4096), default=2048)
    public = command(gateway_keys, "public", cmd_gateway_key_public,
                     "print the newest gateway public key (PEM), for merchants to verify X-Signature")
    public.add_argument("--all", action="store_true", help="every gateway key ever created, newest first")

    purge = command(commands, "purge-idempotency", cmd_purge_idempotency,
                    "delete stored Idempotency-Key answers older than --older-than and expired replay hashes")
    purge.add_argument("--older-than", default="48h", metavar="DURATION",
                       help="e.g. 48h, 7d; at least 24h (default 48h)")
    return parser


def _without_password(text: str, url: str) -> str:
    try:
        password = sa.make_url(url).password
    except sa.exc.ArgumentError:
        return text
    return text.replace(str(password), "***") if password else text


def _database_error(exc: sa.exc.DBAPIError, url: str) -> AdminError:
    lines = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
    reason = _without_password(lines[0] if lines else type(exc).__name__, url)
    where = config.redact(url)
    if "no such table" in reason or ('relation "' in reason and "does not exist" in reason):
        return AdminError(f"the database {where} has no refund schema ({reason}); run `refund-admin migrate` first",
                          EXIT_DATABASE)
    if isinstance(exc, sa.exc.IntegrityError):
        return AdminError(f"refused by the database {where}: {reason}")
    return AdminError(f"database unavailable: {where}: {reason}", EXIT_DATABASE)


def _with_balance_show(argv: list[str]) -> list[str]:
    """`balance MERCHANT_ID` is `balance show MERCHANT_ID`."""
    if "balance" in argv:
        at = argv.index("balance") + 1
        if at < len(argv) and argv[at] not in ("show", "adjust") and not argv[at].startswith("-"):
            return argv[:at] + ["show"] + argv[at:]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_with_balance_show(list(sys.argv[1:] if argv is None else argv)))
    url = config.database_url(getattr(args, "database_url", None))
    try:
        _check_url(url, args.command)
        args.run(args, url)
        sys.stdout.flush()  # a closed pipe shows here, inside the try
        return 0
    except BrokenPipeError:  # the reader left (`refund-admin merchant show ... | head -1`): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except AdminError as exc:
        message, code = str(exc), exc.exit_code
    except sa.exc.ArgumentError:  # its message would show the URL, password included
        message, code = "the database URL is not a valid SQLAlchemy URL (see --database-url)", EXIT_BAD_INPUT
    except sa.exc.DBAPIError as exc:
        error = _database_error(exc, url)
        message, code = str(error), error.exit_code
    except CommandError as exc:  # alembic
        message, code = f"migration failed: {_without_password(str(exc), url)}", EXIT_DATABASE
    except KeyboardInterrupt:
        message, code = "interrupted", 130
    except Exception as exc:  # never a stack trace for an operator
        first_line = next(iter(str(exc).splitlines()), "")
        message, code = f"unexpected error ({type(exc).__name__}): {_without_password(first_line, url)}", EXIT_REFUSED
    print(f"refund-admin: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
