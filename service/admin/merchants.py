"""The merchant and key commands: `merchant add|suspend|activate|show|timestamp`,
`key add|deactivate`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from service import domain, schema
from service.admin import values
from service.admin.database import connect, utc
from service.admin.errors import EXIT_BAD_INPUT, AdminError
from service.admin.values import Invalid


def parse_merchant_id(text: str) -> int:
    """A MERCHANT_ID argument; bad input (2) unless a positive integer."""
    try:
        return values.positive_id(text, "MERCHANT_ID")
    except Invalid as exc:
        raise AdminError(str(exc), EXIT_BAD_INPUT) from None


def find_merchant(conn, merchant_id: int):
    """The merchant's row; refused (1) if there is none."""
    merchant = conn.execute(sa.select(schema.merchants).where(schema.merchants.c.id == merchant_id)).first()
    if merchant is None:
        raise AdminError(f"no merchant {merchant_id}")
    return merchant


def balances(conn, merchant_id: int) -> list:
    return conn.execute(sa.select(schema.balances).where(schema.balances.c.merchant_id == merchant_id)
                        .order_by(schema.balances.c.currency)).all()


def print_balances(rows) -> None:
    if not rows:
        print("  none")
    for balance in rows:
        print(f"  {balance.currency} {domain.format_minor(balance.unsettled, balance.currency)}")


def cmd_merchant_add(args, url: str) -> None:
    merchant_id = parse_merchant_id(args.id)
    try:
        name = values.text(args.name, "NAME", 200)
    except Invalid as exc:
        raise AdminError(str(exc), EXIT_BAD_INPUT) from None
    with connect(url) as engine, engine.begin() as conn:
        old = conn.execute(sa.select(schema.merchants).where(schema.merchants.c.id == merchant_id)).first()
        if old is not None:
            raise AdminError(f"merchant {merchant_id} already exists ({old.name!r}, {old.status})")
        conn.execute(schema.merchants.insert().values(id=merchant_id, name=name, status=args.status))
    print(f"merchant {merchant_id} {name!r} added, {args.status}; "
          f"register its public key with: refund-admin key add {merchant_id} KEY_ID PEM_FILE")


def _set_merchant_status(url: str, text_id: str, status: str) -> None:
    merchant_id = parse_merchant_id(text_id)
    with connect(url) as engine, engine.begin() as conn:
        merchant = find_merchant(conn, merchant_id)
        if merchant.status == status:
            print(f"merchant {merchant_id} was already {status}")
            return
        conn.execute(schema.merchants.update().where(schema.merchants.c.id == merchant_id).values(status=status))
    print(f"merchant {merchant_id} is now {status}")


def cmd_merchant_suspend(args, url: str) -> None:
    _set_merchant_status(url, args.id, "SUSPENDED")


def cmd_merchant_activate(args, url: str) -> None:
    _set_merchant_status(url, args.id, "ACTIVE")


def cmd_merchant_show(args, url: str) -> None:
    merchant_id = parse_merchant_id(args.id)
    keys = schema.merchant_keys
    with connect(url) as engine, engine.connect() as conn:
        merchant = find_merchant(conn, merchant_id)
        rows = conn.execute(sa.select(keys).where(keys.c.merchant_id == merchant_id)
                            .order_by(keys.c.created_at, keys.c.key_id)).all()
        merchant_balances = balances(conn, merchant_id)
    print(f"merchant {merchant.id} {merchant.name!r} {merchant.status}")
    print(f"signed timestamp: {'required' if merchant.require_timestamp else 'optional'}")
    print("keys:")
    if not rows:
        print("  none")
    for key in rows:
        created = utc(key.created_at).isoformat(timespec="seconds")
        print(f"  {key.key_id}  {'active' if key.active else 'inactive'}  created {created}  "
              f"sha256 {values.short_fingerprint(key.public_key_pem)}")
    print("unsettled balances:")
    print_balances(merchant_balances)


def cmd_merchant_timestamp(args, url: str) -> None:
    merchant_id = parse_merchant_id(args.id)
    required = args.setting == "required"
    with connect(url) as engine, engine.begin() as conn:
        find_merchant(conn, merchant_id)
        conn.execute(schema.merchants.update().where(schema.merchants.c.id == merchant_id)
                     .values(require_timestamp=required))
    if required:
        print(f"merchant {merchant_id}: signed requests without a timestamp are now refused (1001)")
    else:
        print(f"merchant {merchant_id}: a signed timestamp is now optional")


def cmd_key_add(args, url: str) -> None:
    merchant_id = parse_merchant_id(args.merchant_id)
    try:
        key_id = values.text(args.key_id, "KEY_ID", 64)
        pem = values.public_key_pem(Path(args.pem_file).read_text(encoding="utf-8"), args.pem_file)
    except (OSError, UnicodeDecodeError) as exc:
        raise AdminError(f"cannot read {args.pem_file}: {getattr(exc, 'strerror', None) or exc}",
                         EXIT_BAD_INPUT) from None
    except Invalid as exc:
        raise AdminError(str(exc), EXIT_BAD_INPUT) from None
    keys = schema.merchant_keys
    with connect(url) as engine, engine.begin() as conn:
        find_merchant(conn, merchant_id)
        exists = conn.execute(sa.select(keys.c.key_id).where(keys.c.merchant_id == merchant_id,
                                                             keys.c.key_id == key_id)).first()
        if exists:
            raise AdminError(f"merchant {merchant_id} already has a key {key_id}; give the new key a new KEY_ID")
        conn.execute(keys.insert().values(merchant_id=merchant_id, key_id=key_id, public_key_pem=pem, active=True,
                                          created_at=datetime.now(UTC)))
    print(f"key {key_id} of merchant {merchant_id} added, active (sha256 {values.fingerprint(pem)[:16]})")


def cmd_key_deactivate(args, url: str) -> None:
    merchant_id = parse_merchant_id(args.merchant_id)
    keys = schema.merchant_keys
    with connect(url) as engine, engine.begin() as conn:
        find_merchant(conn, merchant_id)
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
