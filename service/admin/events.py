"""`refund-admin events`: the journal in sequence order (docs/events.md) and how far
each relay has published it."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from service import domain, schema
from service.admin.database import connect, utc
from service.admin.errors import EXIT_BAD_INPUT, AdminError
from service.admin.merchants import parse_merchant_id
from service.events import COLUMNS as EVENT_COLUMNS


def _moment(value) -> datetime:
    """A time read through sa.text: SQLite gives it as text."""
    return utc(datetime.fromisoformat(value) if isinstance(value, str) else value)


def cmd_events(args, url: str) -> None:
    """The events after --after (journal entries in sequence order) and each relay's position."""
    if args.type and args.type not in schema.JOURNAL_KINDS:
        raise AdminError(f"unknown event type {args.type!r}; known: {', '.join(schema.JOURNAL_KINDS)}",
                         EXIT_BAD_INPUT)
    if args.after < 0 or not 1 <= args.limit <= 10_000:
        raise AdminError("--after must be 0 or more and --limit 1 to 10000", EXIT_BAD_INPUT)
    merchant_id = parse_merchant_id(args.merchant) if args.merchant is not None else None
    conditions, params = ["seq > :after"], {"after": args.after, "limit": args.limit}
    if merchant_id is not None:
        conditions.append("merchant_id = :merchant")
        params["merchant"] = merchant_id
    if args.type:
        conditions.append("kind = :kind")
        params["kind"] = args.type
    with connect(url) as engine, engine.connect() as conn:
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
    now = datetime.now(UTC)
    for name, last, updated, oldest in relays:
        lag = f", oldest unpublished {(now - _moment(oldest)).total_seconds():.1f}s old" if oldest else ""
        print(f"relay {name}: published through {last} ({head - last} unpublished{lag}), "
              f"position updated {_moment(updated).isoformat(timespec='seconds')}")
    for row in rows:
        (seq, entry_id, merchant, currency, kind, amount, after, order_id, transaction_id, settlement_id,
         adjustment_id, request_id, created) = row
        cause = (f"order {order_id} transaction {transaction_id}" if transaction_id else
                 f"settlement {settlement_id}" if settlement_id else
                 f"adjustment {adjustment_id}" if adjustment_id else "")
        print(f"{seq}  evt-{entry_id}  {kind:<10}  merchant {merchant}  {currency} "
              f"{domain.format_minor(amount, currency)}  balance after {domain.format_minor(after, currency)}  "
              f"{cause + '  ' if cause else ''}{'request ' + request_id + '  ' if request_id else ''}"
              f"{_moment(created).isoformat(timespec='seconds')}")
