"""The database's upkeep: `migrate` (create or upgrade the schema) and
`purge-idempotency` (old Idempotency-Key answers and expired replay hashes)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from service import config, db, schema
from service.admin.database import connect
from service.admin.errors import EXIT_BAD_INPUT, AdminError

MIN_IDEMPOTENCY_RETENTION = timedelta(hours=24)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def cmd_migrate(args, url: str) -> None:
    db.migrate(url)
    print(f"migrated {config.redact(url)} to the latest schema")


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
    now = datetime.now(UTC)
    with connect(url) as engine, engine.begin() as conn:
        keys = conn.execute(schema.idempotency_keys.delete().where(
            schema.idempotency_keys.c.created_at < now - age)).rowcount
        replays = conn.execute(schema.request_replays.delete().where(
            schema.request_replays.c.expires_at < now)).rowcount
    print(f"purged {keys} idempotency key(s) older than {args.older_than} and {replays} expired replay hash(es)")
