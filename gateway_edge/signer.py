"""Signed responses (docs/api.md section 7): with a gateway key configured, every
edge response carries `X-Signature`, base64 of the RSASSA-PKCS1-v1_5 /
SHA-256 signature over the exact body bytes.

The private key is a PEM file given to refund-edge (--signing-key /
REFUND_EDGE_SIGNING_KEY), made by `refund-admin gateway-key create --out FILE`;
merchants get the public key from `refund-admin gateway-key public`.
PKCS#1 v1.5 is deterministic, so the same body always has the same signature:
a stored Idempotency-Key answer comes back with the same X-Signature too.
"""

from __future__ import annotations

import base64
import functools

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

MIN_KEY_BITS = 2048


class ResponseSigner:
    def __init__(self, key: rsa.RSAPrivateKey):
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size < MIN_KEY_BITS:
            raise ValueError(f"the gateway signing key must be an RSA key of at least {MIN_KEY_BITS} bits")
        self._key = key
        # Many answers repeat byte for byte (404, 3001, healthz): sign each once.
        self.signature = functools.lru_cache(maxsize=1024)(self._sign)

    @classmethod
    def from_file(cls, path: str) -> ResponseSigner:
        with open(path, "rb") as pem:
            key = serialization.load_pem_private_key(pem.read(), password=None)
        return cls(key)

    def _sign(self, body: bytes) -> bytes:
        """The X-Signature header value for `body`."""
        return base64.b64encode(self._key.sign(body, padding.PKCS1v15(), hashes.SHA256()))
