"""Test data in the fixtures format of tests/fixtures/fixtures.example.json,
loaded through `refund-admin load` like an operator would."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from service import admin

PAYMENT_METHODS = [
    {"code": "VISA", "refund": "FULL_AND_PARTIAL"},
    {"code": "MASTERCARD", "refund": "FULL_AND_PARTIAL"},
    {"code": "ALIPAY", "refund": "FULL_ONLY"},
    {"code": "OCTOPUS", "refund": "NONE"},
]


def new_key_pair() -> tuple[str, str]:
    """(private PEM, public PEM) of a fresh RSA-2048 key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


def merchant(merchant_id: int, public_pem: str | None = None, balances: dict[str, str] | None = None,
             status: str = "ACTIVE") -> dict:
    return {
        "id": merchant_id,
        "name": f"Merchant {merchant_id}",
        "status": status,
        "keys": [{"keyId": "k1", "publicKeyPem": public_pem}] if public_pem else [],
        "balances": [{"currency": c, "unsettled": v} for c, v in (balances or {}).items()],
    }


def order(order_id: int, merchant_id: int, amount: str, currency: str = "HKD", method: str = "VISA",
          status: str = "SUCCESS", reference: str | None = None, masked_pan: str = "411111******1111") -> dict:
    return {
        "id": order_id,
        "merchantId": merchant_id,
        "merchantReference": reference or f"ref-{order_id}",
        "currency": currency,
        "amount": amount,
        "status": status,
        "paymentMethod": method,
        "maskedPan": masked_pan if method in ("VISA", "MASTERCARD") else "",
        "stan": f"{order_id % 1_000_000:06d}",
        "createTime": "2026-11-20T08:15:00+00:00",
    }


def load(database_url: str, merchants: list[dict], orders: list[dict]) -> None:
    """Load merchants and orders (with the standard payment methods) via refund-admin."""
    document = {"paymentMethods": PAYMENT_METHODS, "merchants": merchants, "orders": orders}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(document, file)
    try:
        code = admin.main(["--database-url", database_url, "load", file.name])
    finally:
        Path(file.name).unlink()
    assert code == 0, "refund-admin load refused the test data"
