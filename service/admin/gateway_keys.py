"""`refund-admin gateway-key create|public`: the key refund-edge signs its responses
with (X-Signature); its private key goes to a file, its public key to the database."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from service import schema
from service.admin import values
from service.admin.database import connect, utc
from service.admin.errors import EXIT_BAD_INPUT, AdminError


def cmd_gateway_key_create(args, url: str) -> None:
    """A new RSA key: the private key into --out (mode 0600, never overwritten)
    for refund-edge --signing-key, the public key into the database."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=args.bits)
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public = values.canonical_pem(key.public_key())
    out = Path(args.out)
    with connect(url) as engine, engine.begin() as conn:
        conn.execute(schema.gateway_keys.insert().values(public_key_pem=public, created_at=datetime.now(UTC)))
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
    print(f"gateway key written to {out} (mode 0600, RSA {args.bits}, sha256 {values.fingerprint(public)[:16]})")
    print(f"start refund-edge with --signing-key {out} (or REFUND_EDGE_SIGNING_KEY={out});")
    print("give merchants the public key printed by: refund-admin gateway-key public")


def cmd_gateway_key_public(args, url: str) -> None:
    """The public key(s) merchants verify X-Signature with, newest first."""
    with connect(url) as engine, engine.connect() as conn:
        rows = conn.execute(sa.select(schema.gateway_keys).order_by(schema.gateway_keys.c.id.desc())).all()
    if not rows:
        raise AdminError("no gateway key yet; create one with: refund-admin gateway-key create --out FILE")
    for row in rows if args.all else rows[:1]:
        if args.all:
            created = utc(row.created_at).isoformat(timespec="seconds")
            print(f"# gateway key {row.id}, created {created}, sha256 {values.fingerprint(row.public_key_pem)[:16]}")
        sys.stdout.write(row.public_key_pem if row.public_key_pem.endswith("\n") else row.public_key_pem + "\n")
