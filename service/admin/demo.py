"""`refund-admin demo`: a demo merchant with a key pair kept in --dir, loaded like a
load file (service/admin/load.py), and the commands to refund one of its orders."""

from __future__ import annotations

import os
import shlex
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from service import config, domain, schema
from service.admin import values
from service.admin.database import connect
from service.admin.errors import AdminError, BadFile
from service.admin.load import load_document, print_report
from service.signing import MIN_KEY_BITS

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
    start = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)
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
    orders, methods = schema.orders, schema.payment_methods
    return conn.execute(
        sa.select(orders.c.id, orders.c.merchant_reference, orders.c.currency, orders.c.amount,
                  orders.c.payment_method, methods.c.refund_capability, orders.c.status)
        .join(methods, methods.c.code == orders.c.payment_method)
        .where(orders.c.merchant_id == DEMO_MERCHANT_ID)
        .order_by(orders.c.id)).all()


def _is_refundable(order) -> bool:
    return (order.status in domain.REFUNDABLE_STATUSES
            and order.refund_capability != domain.RefundCapability.NONE.value)


def _script(name: str) -> str:
    """A command of this installation (e.g. .venv/bin/refund-client), as a path to paste."""
    path = Path(sys.executable).parent / name
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def cmd_demo(args, url: str) -> None:
    directory = Path(args.dir)
    key, created = demo_key(directory)
    public_pem = values.canonical_pem(key.public_key())
    (directory / DEMO_PUBLIC_KEY_FILE).write_text(public_pem)
    key_id = "demo-" + values.fingerprint(public_pem)[:12]
    with connect(url) as engine:
        try:
            report = load_document(engine, demo_document(public_pem, key_id))
        except BadFile as exc:
            raise AdminError(f"the demo data was {exc}", exc.exit_code) from None
        with engine.connect() as conn:
            orders = _demo_orders(conn)
    key_path = directory / DEMO_KEY_FILE
    print(f"demo loaded into {config.redact(url)}:")
    print_report(report)
    print(f"merchant {DEMO_MERCHANT_ID} {DEMO_MERCHANT_NAME!r}, key {key_id}")
    print(f"private key: {key_path} ({'created' if created else 'kept'}); "
          f"public key: {directory / DEMO_PUBLIC_KEY_FILE}")
    print(f"balances: {', '.join(f'{c} {v}' for c, v in DEMO_BALANCES.items())} when first loaded "
          f"(see refund-admin balance {DEMO_MERCHANT_ID})")
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
    partial = domain.RefundCapability.FULL_AND_PARTIAL.value
    example = next((o for o in refundable if o.refund_capability == partial), refundable[0])
    amount = domain.format_minor(example.amount, example.currency)
    ids = f"--merchant-id {DEMO_MERCHANT_ID} --order-id {example.id} --amount {amount}"
    print("refund it as the merchant (signed, through the HTTP edge):")
    print(f"  {_script('refund-client')} --key {shlex.quote(str(key_path))} {ids}")
    print("or as an internal service (gRPC):")
    print(f"  {_script('python')} -m service.grpc_client refund {ids}")
