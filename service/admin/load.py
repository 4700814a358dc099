"""`refund-admin load FILE`: a checked Plan (service/admin/load_file.py) applied in
one transaction. What the database contradicts refuses the file whole; what
exists is never overwritten in money or status (service/admin/__init__.py)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from cryptography.exceptions import UnsupportedAlgorithm

from service import config, domain, schema
from service.admin import values
from service.admin.database import connect, utc
from service.admin.errors import AdminError, BadFile
from service.admin.load_file import Entry, Plan, check_document, read_document

# What a loaded sale fixed; a reload never changes it.
SALE_COLUMNS = ("merchant_id", "merchant_reference", "currency", "amount", "payment_method", "create_time")


def _rows_in(conn, table: sa.Table, column: sa.Column, keys, *criteria) -> dict[tuple, dict]:
    """Rows of `table` whose `column` is in `keys`, by primary key."""
    keys = sorted(set(keys))
    primary_key = [c.name for c in table.primary_key]
    rows = {}
    for start in range(0, len(keys), 500):
        query = sa.select(table).where(column.in_(keys[start:start + 500]), *criteria)
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
    if utc(order["create_time"]) != new["create_time"]:
        differences.append("create_time")
    if sale is not None:
        differences += [c for c in ("masked_pan", "stan") if sale[c] != entry.sale[c]]
    return differences


def _same_key(pem: str, other: str) -> bool:
    try:
        return values.fingerprint(pem) == values.fingerprint(other)
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
            problems.append(f"{entry.label}: paymentMethod {values.show(row['payment_method'])} is neither in the "
                            "file nor in the database")
        owner = existing.references.get((row["merchant_id"], row["merchant_reference"]))
        if owner is not None and owner != row["id"]:
            problems.append(f"{entry.label}: merchantReference {values.show(row['merchant_reference'])} already "
                            f"belongs to order {owner}")
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
            where = [table.c[c] == v for c, v in zip(primary_key, key, strict=False)]
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


def _write_merchants(conn, plan: Plan, existing: Existing, report: LoadReport) -> None:
    """A merchant's status changes only by `merchant suspend|activate`; its name is set."""
    merchants = []
    for entry in plan.merchants:
        old = existing.merchants.get((entry.row["id"],))
        if old is not None and old["status"] != entry.row["status"]:
            report.notes.append(f"merchant {old['id']} left {old['status']} (the file says {entry.row['status']}; "
                                "use refund-admin merchant suspend|activate)")
            entry = Entry(entry.label, {**entry.row, "status": old["status"]})
        merchants.append(entry)
    _upsert(conn, schema.merchants, merchants, existing.merchants, report.counts["merchants"])


def _write_keys(conn, plan: Plan, existing: Existing, report: LoadReport, now: datetime) -> None:
    """New keys are added, active; a registered one (the same public key: checked) keeps
    its active flag and created_at."""
    new_keys = []
    for entry in plan.keys:
        if (entry.row["merchant_id"], entry.row["key_id"]) in existing.keys:
            report.counts["keys"]["unchanged"] += 1
        else:
            new_keys.append({**entry.row, "active": True, "created_at": now})
            report.counts["keys"]["added"] += 1
    if new_keys:
        conn.execute(schema.merchant_keys.insert(), new_keys)


def _write_balances(conn, plan: Plan, existing: Existing, report: LoadReport, now: datetime) -> None:
    """A new balance with its opening journal entry; a live balance moves only by journaled commands."""
    counts = report.counts["balances"]
    new_balances, openings = [], []
    for entry in plan.balances:
        row = entry.row
        old = existing.balances.get((row["merchant_id"], row["currency"]))
        if old is None:
            new_balances.append(row)
            if row["unsettled"]:
                openings.append({"merchant_id": row["merchant_id"], "currency": row["currency"], "kind": "OPENING",
                                 "amount": row["unsettled"], "balance_after": row["unsettled"], "created_at": now})
            counts["added"] += 1
        elif old["unsettled"] != row["unsettled"]:
            report.notes.append(
                f"balance {row['currency']} of merchant {row['merchant_id']} left at "
                f"{domain.format_minor(old['unsettled'], row['currency'])} (the file says "
                f"{domain.format_minor(row['unsettled'], row['currency'])}; use refund-admin balance adjust)")
            counts["kept"] += 1
        else:
            counts["unchanged"] += 1
    if new_balances:
        conn.execute(schema.balances.insert(), new_balances)
    if openings:
        conn.execute(schema.ledger_entries.insert(), openings)


def _write_orders(conn, plan: Plan, existing: Existing, report: LoadReport) -> None:
    """A new order with its SALE transaction; a loaded order keeps its status (a refund is not undone)."""
    counts = report.counts["orders"]
    new_orders, sales = [], []
    for entry in plan.orders:
        old = existing.orders.get((entry.row["id"],))
        if old is None:
            new_orders.append(entry.row)
            sales.append({"order_id": entry.row["id"], "merchant_id": entry.row["merchant_id"], "type": "SALE",
                          "currency": entry.row["currency"], "amount": entry.row["amount"], "status": "SUCCESS",
                          "create_time": entry.row["create_time"], **entry.sale})
            counts["added"] += 1
        elif old["status"] != entry.row["status"]:
            report.notes.append(f"order {old['id']} kept as {old['status']} (the file says {entry.row['status']})")
            counts["kept"] += 1
        else:
            counts["unchanged"] += 1
    if new_orders:
        conn.execute(schema.orders.insert(), new_orders)
        conn.execute(schema.transactions.insert(), sales)


def _write(conn, plan: Plan, existing: Existing) -> LoadReport:
    now = datetime.now(UTC)
    report = LoadReport({name: Counter() for name in ("payment methods", "merchants", "keys", "balances", "orders")},
                        [])
    _upsert(conn, schema.payment_methods, plan.payment_methods, existing.payment_methods,
            report.counts["payment methods"])
    _write_merchants(conn, plan, existing, report)
    _write_keys(conn, plan, existing, report, now)
    _write_balances(conn, plan, existing, report, now)
    _write_orders(conn, plan, existing, report)
    return report


def load_document(engine: sa.Engine, document) -> LoadReport:
    """Check a load document whole, then apply it in one transaction."""
    plan = check_document(document)
    with engine.begin() as conn:
        existing = _existing(conn, plan)
        problems = _conflicts(plan, existing)
        if problems:
            raise BadFile(problems)  # leaving the block rolls back: nothing written
        return _write(conn, plan, existing)


def print_report(report: LoadReport) -> None:
    for name, counts in report.counts.items():
        parts = [f"{counts[outcome]} {outcome}" for outcome in ("added", "updated", "unchanged", "kept")
                 if counts[outcome]]
        print(f"  {name}: {', '.join(parts) or 'none'}")
    for note in report.notes:
        print(f"  {note}")


def cmd_load(args, url: str) -> None:
    document = read_document(args.file)
    with connect(url) as engine:
        try:
            report = load_document(engine, document)
        except BadFile as exc:
            raise AdminError(f"{args.file} {exc}", exc.exit_code) from None
    print(f"loaded {args.file} into {config.redact(url)}:")
    print_report(report)
