"""Merchant signatures: SHA256withRSA (RSASSA-PKCS1-v1_5) over the exact bytes
of the `request` string, verified before anything in it is acted on.

The same bytes that were verified are the bytes parsed: `authenticate` parses
the request only to learn whose keys to use and verifies the signature over
those bytes; the command is then built from that one parse (`command_from`).

A failed check costs the same work whoever the request names, so that timing
does not tell whether a merchant exists: every check that fails runs one RSA
verification per candidate signature for each of at least KEY_SLOTS keys,
using a fixed dummy key (service.dummy_keys) of the candidate's size where
the merchant is unknown, has fewer keys, or has no key of that size.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
from dataclasses import dataclass
from decimal import Decimal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from refund_wire import strict_json
from service import domain
from service.domain import ResponseCode
from service.dummy_keys import DUMMY_PUBLIC_KEYS_PEM
from service.stores.port import MerchantCredentials

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 16 * 1024
MIN_KEY_BITS = 2048
# A failed check verifies against this many keys at least (a merchant rotating
# its key has two), padding with the dummy key.
KEY_SLOTS = 2


class AuthenticationFailed(domain.DomainError):
    code = ResponseCode.AUTHENTICATION_FAILED


class MerchantInactive(domain.DomainError):
    code = ResponseCode.MERCHANT_INACTIVE


def _strict_b64decode(text: str) -> bytes | None:
    """Standard base64 with padding, and only its canonical form (the unused
    bits of the last character must be zero), or None."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if base64.b64encode(raw).decode("ascii") == text else None


def signature_candidates(signature: str) -> list[bytes]:
    """The signature bytes under each documented encoding: base64 once (the
    SDKs) and base64 twice (the published example)."""
    if not isinstance(signature, str) or not signature.isascii() or len(signature) > 4096:
        return []
    once = _strict_b64decode(signature)
    if once is None:
        return []
    candidates = [once]
    try:
        twice = _strict_b64decode(once.decode("ascii"))
    except UnicodeDecodeError:
        twice = None
    if twice is not None:
        candidates.append(twice)
    return candidates


def public_key_problem(key) -> str | None:
    """Why a public key cannot verify merchant signatures, or None when it can (an RSA
    key of at least MIN_KEY_BITS); also what `refund-admin` says of a key it refuses."""
    if not isinstance(key, rsa.RSAPublicKey):
        return "is not an RSA key"
    if key.key_size < MIN_KEY_BITS:
        return f"is a {key.key_size}-bit RSA key; at least {MIN_KEY_BITS} bits are required"
    return None


@functools.lru_cache(maxsize=4096)
def load_public_key(pem: str) -> rsa.RSAPublicKey:
    key = serialization.load_pem_public_key(pem.encode("ascii"))
    if public_key_problem(key) is not None:
        raise ValueError(f"an RSA public key of at least {MIN_KEY_BITS} bits is required")
    return key


def verify(request: bytes, signature: str, public_keys_pem) -> bool:
    """True when any of the keys verifies the signature over `request`."""
    return _verifying_key(request, signature, public_keys_pem) is not None


def verifying_key_id(request: bytes, signature: str, credentials: MerchantCredentials | None) -> str | None:
    """The key_id of the first of the merchant's keys that verifies the signature,
    or None (after the same work when `credentials` is None: an unknown merchant)."""
    keys = credentials.public_keys_pem if credentials is not None else ()
    index = _verifying_key(request, signature, keys)
    return None if index is None or index >= len(credentials.key_ids) else credentials.key_ids[index]


def _verifying_key(request: bytes, signature: str, public_keys_pem) -> int | None:
    """The index of the first key that verifies the signature, or None after one
    verification per candidate and key slot (at least KEY_SLOTS of them)."""
    candidates = signature_candidates(signature)
    slots = max(len(public_keys_pem), KEY_SLOTS)
    for index in range(slots):
        key = None
        if index < len(public_keys_pem):
            try:
                key = load_public_key(public_keys_pem[index])
            except (ValueError, UnsupportedAlgorithm) as exc:  # an unusable stored key verifies nothing
                log.warning("skipping an unusable merchant key: %s", exc)
        for candidate in candidates:
            # A signature not below the modulus is refused before any arithmetic: do the
            # arithmetic anyway (on a dummy), or the time would tell the modulus apart.
            if key is not None and len(candidate) == key.key_size // 8 \
                    and int.from_bytes(candidate, "big") < _modulus(public_keys_pem[index]):
                try:
                    key.verify(candidate, request, padding.PKCS1v15(), hashes.SHA256())
                    return index
                except InvalidSignature:
                    continue
            _dummy_verification(candidate, request)
    return None


@functools.lru_cache(maxsize=4096)
def _modulus(pem: str) -> int:
    return load_public_key(pem).public_numbers().n


def _dummy_verification(candidate: bytes, request: bytes) -> None:
    """The work of verifying `candidate` with a key of its size (all of the
    arithmetic), which never succeeds."""
    pem = DUMMY_PUBLIC_KEYS_PEM.get(len(candidate) * 8)
    if pem is None:  # no key of ours has this size: a real key of it would not verify either
        return
    if int.from_bytes(candidate, "big") >= _modulus(pem):
        candidate = b"\x00" + candidate[1:]  # below the modulus, whose top bit is set
    try:
        load_public_key(pem).verify(candidate, request, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        pass


def parse_request(request: bytes) -> dict:
    """The signed request: a JSON object with a digits-only merchantId string."""
    if len(request) > MAX_REQUEST_BYTES:
        raise domain.InvalidRequest("request is too long")
    try:
        fields = strict_json.loads(request)
    except strict_json.StrictJSONError as exc:
        raise domain.InvalidRequest(f"request is {exc}" if str(exc).startswith("not") else f"request: {exc}") from None
    if not isinstance(fields, dict):
        raise domain.InvalidRequest("request must be a JSON object")
    merchant_id = fields.get("merchantId")
    if not isinstance(merchant_id, str):
        raise domain.InvalidRequest("merchantId is required and must be a string of digits")
    domain.parse_merchant_id(merchant_id)
    return fields


def order_key(fields: dict) -> tuple[int | None, str | None]:
    """(orderId, merchantReference) of a verified request, each None when absent."""
    order_id = fields.get("orderId")
    if order_id is not None:
        if isinstance(order_id, str) and order_id.isascii() and order_id.isdigit() and len(order_id) <= 19:
            order_id = int(order_id)
        elif isinstance(order_id, Decimal) and order_id == order_id.to_integral_value() and order_id.adjusted() < 19 \
                and order_id.as_tuple().exponent == 0:
            order_id = int(order_id)
        else:
            raise domain.InvalidRequest("orderId must be an integer")
    reference = fields.get("merchantReference")
    if reference is not None and not isinstance(reference, str):
        raise domain.InvalidRequest("merchantReference must be a string")
    domain.check_order_key(order_id, reference or None)
    return order_id, reference or None


def command_from(fields: dict) -> domain.RefundCommand:
    """A RefundCommand from the fields of a verified request (docs/api.md section 2)."""
    order_id, reference = order_key(fields)
    if "amount" not in fields:
        raise domain.InvalidRequest("amount is required")
    amount = fields["amount"]
    if not isinstance(amount, Decimal):
        raise domain.InvalidRequest("amount must be a JSON number")
    domain.parse_decimal(amount)  # INVALID_AMOUNT for zero, negative, not finite
    return domain.RefundCommand(domain.parse_merchant_id(fields["merchantId"]), order_id, reference, amount)


@dataclass(frozen=True)
class Authenticated:
    """A signed request whose signature verified with one of the merchant's active keys."""

    request: bytes
    fields: dict
    merchant_id: int
    credentials: MerchantCredentials
    key_id: str | None = None  # the key that verified it (None for a key read without its id)


class KnownCredentials:
    """Merchants' credentials as last read from the store, by merchant id: what
    lets a signed refund verify its signature before any database call and then
    refund in one (guarded by stores.port.SignedBy). A hint, never trusted alone:
    the store checks in the refund's own transaction that the key is still
    active and the merchant still ACTIVE; when not, the request is
    authenticated afresh. Bounded: forgets everything when full."""

    def __init__(self, limit: int = 10_000):
        self._limit = limit
        self._credentials: dict[int, MerchantCredentials] = {}

    def get(self, merchant_id: int) -> MerchantCredentials | None:
        return self._credentials.get(merchant_id)

    def remember(self, merchant_id: int, credentials: MerchantCredentials | None) -> None:
        if credentials is None:
            self._credentials.pop(merchant_id, None)
            return
        if len(self._credentials) >= self._limit and merchant_id not in self._credentials:
            self._credentials.clear()
        self._credentials[merchant_id] = credentials


async def authenticate(store, request: bytes, signature: str, *, fields: dict | None = None,
                       known: KnownCredentials | None = None,
                       verified: tuple[str, str] | None = None) -> Authenticated:
    """Parse a signed request (unless its `fields` are given) and verify its
    signature (2001 otherwise) with the merchant's keys as the store has them
    now; they are remembered in `known`. `verified`: (key_id, PEM) of a key
    that already verified these bytes and this signature; when the store
    still has that key active, it is not verified again."""
    if fields is None:
        fields = parse_request(request)
    merchant_id = domain.parse_merchant_id(fields["merchantId"])
    credentials = await store.merchant_credentials(merchant_id)
    if known is not None:
        known.remember(merchant_id, credentials)
    if credentials is not None and verified is not None \
            and verified in zip(credentials.key_ids, credentials.public_keys_pem, strict=False):
        return Authenticated(request, fields, merchant_id, credentials, verified[0])
    keys = credentials.public_keys_pem if credentials is not None else ()  # unknown: the same work, on dummies
    index = _verifying_key(request, signature, keys)
    if index is None or credentials is None:
        raise AuthenticationFailed("authentication failed")
    key_id = credentials.key_ids[index] if index < len(credentials.key_ids) else None
    return Authenticated(request, fields, merchant_id, credentials, key_id)


def check_active(signed: Authenticated) -> None:
    if signed.credentials.status != "ACTIVE":
        raise MerchantInactive("merchant is not active")

