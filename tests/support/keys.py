"""Keys and signatures: the example merchant's key pair (tests/fixtures), keys
made in the test, the merchant's signature and the signed envelope
(docs/api.md section 2)."""

from __future__ import annotations

import base64
import json
from functools import cache

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.support import FIXTURES_DIR

EXAMPLE_KEY_PEM = FIXTURES_DIR / "example-merchant.key.pem"
EXAMPLE_PUB_PEM = FIXTURES_DIR / "example-merchant.pub.pem"


@cache
def example_key() -> rsa.RSAPrivateKey:
    return serialization.load_pem_private_key(EXAMPLE_KEY_PEM.read_bytes(), password=None)


@cache
def generated_key(name: str, bits: int = 2048) -> rsa.RSAPrivateKey:
    """A fresh RSA key per name, made once per test session."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def signature_bytes(key: rsa.RSAPrivateKey, request: str | bytes) -> bytes:
    data = request.encode("utf-8") if isinstance(request, str) else request
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def sign(key: rsa.RSAPrivateKey, request: str | bytes, *, double: bool = False) -> str:
    text = base64.b64encode(signature_bytes(key, request))
    return base64.b64encode(text).decode("ascii") if double else text.decode("ascii")


def envelope(request: str, signature: str) -> bytes:
    return json.dumps({"request": request, "signature": signature}).encode("utf-8")


def signed_body(key: rsa.RSAPrivateKey, request: str, *, double: bool = False) -> bytes:
    return envelope(request, sign(key, request, double=double))

