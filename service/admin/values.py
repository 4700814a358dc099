"""One value checked, from a load file or the command line: each function returns
the value as stored (an int id, minor units, an aware UTC time, a canonical PEM)
or raises Invalid with a short message that the caller prefixes with where it was."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from service import domain, signing

MERCHANT_STATUSES = ("ACTIVE", "SUSPENDED")


class Invalid(ValueError):
    """One bad value; the caller says which entry it is in."""


def show(value) -> str:
    """The value as JSON, cut to 40 characters, for a message."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def json_kind(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, Decimal)):
        return "a JSON number"
    return {list: "an array", dict: "an object", str: "a string"}.get(type(value), "an object")


def json_object(value, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """A JSON object with exactly these fields (the optional ones may be missing)."""
    if not isinstance(value, dict):
        raise Invalid(f"must be a JSON object, not {json_kind(value)}")
    duplicates = getattr(value, "duplicate_keys", ())  # recorded by load_file.read_document
    if duplicates:
        raise Invalid(f"duplicate key {show(duplicates[0])}")
    unknown = [name for name in value if name not in required and name not in optional]
    if unknown:
        raise Invalid(f"unknown field {show(unknown[0])}")
    missing = [name for name in required if name not in value]
    if missing:
        raise Invalid(f"missing field {missing[0]}")
    return value


def json_array(value, name: str) -> list:
    if not isinstance(value, list):
        raise Invalid(f"{name} must be a JSON array, not {json_kind(value)}")
    return value


def positive_id(value, name: str) -> int:
    """A positive integer id, as a JSON integer or a string of digits."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise Invalid(f"{name} must be a positive integer, not {json_kind(value)}")
    digits = str(value)
    if not (digits.isascii() and digits.isdigit()) or not 0 < int(digits) <= domain.MAX_ID:
        raise Invalid(f"{name} {show(value)} is not a positive integer")
    return int(digits)


def text(value, name: str, max_length: int) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{name} must be a string, not {json_kind(value)}")
    if not value.strip():
        raise Invalid(f"{name} must not be empty")
    if len(value) > max_length:
        raise Invalid(f"{name} is longer than {max_length} characters")
    return value


def choice(value, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise Invalid(f"{name} {show(value)} is not one of {', '.join(choices)}")
    return value


def currency_code(value) -> str:
    if value not in domain.KNOWN_CURRENCIES:
        raise Invalid(f"currency {show(value)} is not an ISO 4217 currency code")
    return value


def _is_zero(value: str) -> bool:
    try:
        return Decimal(value.strip()).is_zero()
    except InvalidOperation:
        return False


def amount(value, name: str, currency: str, allow_zero: bool = False) -> int:
    """Integer minor units of a decimal string such as "76.19"; never via float."""
    if not isinstance(value, str):
        raise Invalid(f'{name} must be a decimal string such as "76.19", not {json_kind(value)}')
    if allow_zero and _is_zero(value):
        decimals = -Decimal(value.strip()).as_tuple().exponent
        if decimals > domain.minor_units(currency):
            raise Invalid(f"{name} {show(value)} has more than {domain.minor_units(currency)} decimals for {currency}")
        return 0
    try:
        return domain.to_minor(value, currency)
    except domain.DomainError as exc:  # "amount has more than 2 decimals for HKD"
        raise Invalid(f"{name} {show(value)} {exc.message.removeprefix('amount ')}") from None


def utc_time(value, name: str) -> datetime:
    """An ISO 8601 time with an offset, as an aware UTC datetime."""
    if not isinstance(value, str):
        raise Invalid(f"{name} must be an ISO 8601 string, not {json_kind(value)}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise Invalid(f"{name} {show(value)} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise Invalid(f"{name} {show(value)} has no UTC offset (write e.g. 2026-11-20T08:15:00+08:00)")
    return moment.astimezone(UTC)


def masked_pan(value) -> str:
    # The value is never echoed: it may be a full card number.
    if not isinstance(value, str):
        raise Invalid(f"maskedPan must be a string, not {json_kind(value)}")
    try:
        return domain.check_masked_pan(value)
    except domain.DomainError as exc:
        raise Invalid(exc.message) from None


def stan(value) -> str:
    if not isinstance(value, str):
        raise Invalid(f"stan must be a string of 6 digits, not {json_kind(value)}")
    try:
        return domain.check_stan(value)
    except domain.DomainError:
        raise Invalid(f"stan {show(value)} is not 6 digits") from None


def public_key_pem(pem, name: str = "publicKeyPem") -> str:
    """The canonical PEM (SubjectPublicKeyInfo) of a public key that can verify merchant
    signatures (signing.public_key_problem: RSA of at least signing.MIN_KEY_BITS), given
    as PEM (any line ends) or as bare base64 of its DER, SubjectPublicKeyInfo or PKCS#1,
    the form the vendor's plugin shows merchants (lines and white space ignored)."""
    if not isinstance(pem, str):
        raise Invalid(f"{name} must be a string, not {json_kind(pem)}")
    if "PRIVATE KEY" in pem:
        raise Invalid(f"{name} holds a private key: register the public key only")
    try:
        if "-----BEGIN" in pem:
            key = serialization.load_pem_public_key(pem.strip().encode("utf-8"))
        else:
            key = serialization.load_der_public_key(base64.b64decode("".join(pem.split()), validate=True))
    except (ValueError, UnsupportedAlgorithm, binascii.Error):
        raise Invalid(f"{name} is not a public key in PEM or base64 DER") from None
    problem = signing.public_key_problem(key)
    if problem is not None:
        raise Invalid(f"{name} {problem}")
    return canonical_pem(key)


def canonical_pem(key: rsa.RSAPublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def fingerprint(pem: str) -> str:
    """SHA-256 of the key's DER encoding, in hex: for operators to compare keys."""
    key = serialization.load_pem_public_key(pem.encode())
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def short_fingerprint(pem: str) -> str:
    """The first 16 hex digits of the fingerprint of a stored key, which may be unreadable."""
    try:
        return fingerprint(pem)[:16]
    except (ValueError, UnsupportedAlgorithm):
        return "(not a readable PEM key)"
