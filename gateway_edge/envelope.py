"""What the edge reads of a request before anything else: the signed
envelope, the Idempotency-Key header, headers and the content type. Bad input
gets the 1001 answer saying what is wrong."""

from __future__ import annotations

from gateway_edge import answers
from gateway_edge.answers import Answer
from refund_wire import strict_json
from refund_wire.formats import IDEMPOTENCY_KEY

ENVELOPE_SHAPE = "the body must be a JSON object with the string fields request and signature"




def parse(body: bytes) -> tuple[bytes, str] | Answer:
    """(request bytes, signature) from the envelope, or the 1001 answer saying what is wrong."""
    try:
        envelope = strict_json.loads(body)
    except strict_json.StrictJSONError as exc:
        reason = str(exc)
        return answers.invalid_request(f"the body is {reason}" if reason.startswith("not") else f"the body: {reason}")
    if not isinstance(envelope, dict):
        return answers.invalid_request(ENVELOPE_SHAPE)
    request, signature = envelope.get("request"), envelope.get("signature")
    if not isinstance(request, str):
        return answers.invalid_request("request is required and must be a string holding the signed JSON object")
    if not isinstance(signature, str):
        return answers.invalid_request("signature is required and must be a base64 string")
    try:
        raw = request.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
        return answers.invalid_request("request is not valid Unicode text")
    if not signature.isascii():  # base64 is ASCII; anything else (a lone surrogate too) cannot be one
        return answers.invalid_request("signature must be a base64 string")
    return raw, signature


def idempotency_key(scope) -> str | Answer:
    """The Idempotency-Key header ("" without one), or the 1001 answer for a bad one."""
    values = [value for key, value in scope["headers"] if key == b"idempotency-key"]
    if not values:
        return ""
    key = values[0].decode("latin-1")
    if len(values) > 1 or not IDEMPOTENCY_KEY.match(key):
        return answers.invalid_request("Idempotency-Key must be one header of 1 to 64 printable ASCII characters")
    return key


def header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def is_json(content_type: str | None) -> bool:
    """application/json, any case, with parameters such as charset allowed."""
    if content_type is None:
        return False
    return content_type.split(";", 1)[0].strip().lower() == "application/json"
