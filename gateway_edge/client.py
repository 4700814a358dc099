"""`refund-client`: sign a refund request as a merchant and send it to the edge;
and `RefundClient`, the same as a Python library.

    refund-client --key merchant.key.pem --merchant-id 3000001 --order-id 1076 --amount 76.19
    refund-client ... --idempotency-key refund-1076-1 --timestamp
    refund-client --url https://edge.internal:8443 --cacert private-ca.pem ...

Builds the `request` JSON text (the amount written as a raw JSON number, never
through a float), signs its UTF-8 bytes with RSASSA-PKCS1-v1_5 / SHA-256,
base64-encodes the signature (twice with --double-base64, like the published
example), POSTs the envelope to URL/direct/refund and prints the HTTP status
and the response body as received. Exit status: 0 for responseCode 0000,
1 for any other answer, 2 when no answer was received.

As a library (the README shows more):

    from gateway_edge.client import RefundClient

    client = RefundClient("http://127.0.0.1:8080", merchant_id="3000001", key="merchant.key.pem")
    answer = client.refund(order_id=1076, amount="76.19", idempotency_key="refund-1076")
    answer.response_code, answer.json["transaction"]["id"]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import ssl
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

DEFAULT_URL = "http://127.0.0.1:8080"
REFUND_PATH = "/direct/refund"
QUERY_PATH = "/direct/query"
# A JSON number literal: what --amount may be (zero and negative numbers are
# allowed on purpose, so that a merchant can see the gateway's 1002 answer).
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")


def request_text(merchant_id: str, amount: str | None, order_id: str | None = None,
                 merchant_reference: str | None = None, timestamp: str | None = None) -> str:
    """The `request` JSON object as text; `amount` is inserted verbatim (None: no amount, as for a query)."""
    if amount is not None and not _JSON_NUMBER.match(amount):
        raise ValueError(f"amount must be a decimal number such as 76.19, got {amount!r}")
    fields = [f'"merchantId":{json.dumps(merchant_id)}']
    if order_id is not None:
        if not (order_id.isascii() and order_id.isdigit()):
            raise ValueError(f"order id must be digits, got {order_id!r}")
        fields.append(f'"orderId":{int(order_id)}')
    if merchant_reference is not None:
        fields.append(f'"merchantReference":{json.dumps(merchant_reference, ensure_ascii=False)}')
    if amount is not None:
        fields.append(f'"amount":{amount}')
    if timestamp is not None:
        fields.append(f'"timestamp":{json.dumps(timestamp)}')
    return "{" + ",".join(fields) + "}"


def sign(private_key: rsa.RSAPrivateKey, request: str, double_base64: bool = False) -> str:
    """base64 of the SHA256withRSA signature of the UTF-8 bytes of `request`."""
    raw = private_key.sign(request.encode("utf-8"), padding.PKCS1v15(), hashes.SHA256())
    text = base64.b64encode(raw)
    if double_base64:
        text = base64.b64encode(text)
    return text.decode("ascii")


def envelope(request: str, signature: str) -> bytes:
    return json.dumps({"request": request, "signature": signature}, ensure_ascii=False).encode("utf-8")


def load_private_key(path: str) -> rsa.RSAPrivateKey:
    with open(path, "rb") as pem:
        key = serialization.load_pem_private_key(pem.read(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} is not an RSA private key")
    return key


def post(url: str, body: bytes, timeout: float, idempotency_key: str | None = None,
         context: ssl.SSLContext | None = None) -> tuple[int, str, bytes]:
    """(status, reason, body) of the answer, whatever its status; `context` verifies an https:// edge."""
    answer = _post(url, body, timeout, idempotency_key, context)
    return answer.status, answer.reason, answer.body


def _post(url: str, body: bytes, timeout: float, idempotency_key: str | None = None,
          context: ssl.SSLContext | None = None) -> Answer:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return Answer(response.status, response.reason, response.read(), dict(response.headers.items()))
    except urllib.error.HTTPError as error:
        with error:
            return Answer(error.code, error.reason, error.read(), dict(error.headers.items()))


def endpoint(url: str, path: str = REFUND_PATH) -> str:
    url = url.rstrip("/")
    return url if url.endswith(path) else url + path


# -- the library ---------------------------------------------------------------


class AnswerNotGenuine(Exception):
    """The answer's X-Signature is missing or does not verify with the gateway's public key."""


@dataclass(frozen=True)
class Answer:
    """One answer of the edge, as received."""

    status: int  # the HTTP status, e.g. 200
    reason: str  # e.g. "OK"
    body: bytes  # the body exactly as received (what X-Signature signs)
    headers: dict = field(default_factory=dict, repr=False)

    @property
    def json(self) -> dict:
        """The body parsed, amounts as Decimal (never float)."""
        return json.loads(self.body, parse_float=Decimal)

    @property
    def response_code(self) -> str | None:
        """`responseCode` ("0000", "3003", ...), or None when the body is not the gateway's JSON."""
        try:
            answer = self.json
        except ValueError:
            return None
        return answer.get("responseCode") if isinstance(answer, dict) else None

    @property
    def request_id(self) -> str | None:
        """`X-Request-Id`: quote it when asking the operator about this request."""
        return _header(self.headers, "X-Request-Id")


def _header(headers: dict, name: str) -> str | None:
    return next((value for key, value in headers.items() if key.lower() == name.lower()), None)


def _amount_text(amount) -> str:
    if isinstance(amount, bool) or isinstance(amount, float):
        raise TypeError("amount must be a str, Decimal or int (never a float): e.g. \"76.19\" or Decimal(\"76.19\")")
    if isinstance(amount, Decimal):
        if not amount.is_finite():
            raise ValueError(f"amount must be finite, got {amount}")
        return format(amount, "f")
    if isinstance(amount, int):
        return str(amount)
    if isinstance(amount, str):
        return amount
    raise TypeError(f"amount must be a str, Decimal or int, got {type(amount).__name__}")


class RefundClient:
    """A merchant's client of the gateway's edge: signs each request with the
    merchant's key and sends it.

    `key` is the merchant's RSA private key: a path to an unencrypted PEM file,
    or a loaded `RSAPrivateKey`. With `gateway_public_key` (a path to the PEM
    file `refund-admin gateway-key public` writes, or a loaded key), every
    answer's `X-Signature` is checked and an answer that is not genuine raises
    `AnswerNotGenuine`. Network failures raise `OSError` (`urllib.error.URLError`
    is one): the outcome of a refund is then unknown, and retrying it (with the
    same `idempotency_key`) is safe.
    """

    def __init__(self, url: str = DEFAULT_URL, *, merchant_id: str | int, key, timeout: float = 10.0,
                 double_base64: bool = False, gateway_public_key=None, cafile: str | None = None):
        self.url = url
        self._context = ssl.create_default_context(cafile=cafile) if cafile else None  # a private CA for https://
        self.merchant_id = str(merchant_id)
        self.timeout = timeout
        self.double_base64 = double_base64
        self._key = load_private_key(key) if isinstance(key, (str, os.PathLike)) else key
        if not isinstance(self._key, rsa.RSAPrivateKey):
            raise TypeError("key must be a path to a PEM RSA private key or an RSAPrivateKey")
        self._gateway_key = gateway_public_key
        if isinstance(gateway_public_key, (str, os.PathLike)):
            with open(gateway_public_key, "rb") as pem:
                self._gateway_key = serialization.load_pem_public_key(pem.read())

    def refund(self, *, amount, order_id: int | str | None = None, merchant_reference: str | None = None,
               idempotency_key: str | None = None, timestamp: bool = False) -> Answer:
        """POST /direct/refund: refund `amount` (str, Decimal or int, written as a JSON number exactly)
        of the order named by `order_id` and/or `merchant_reference`."""
        return self._send(REFUND_PATH, _amount_text(amount), order_id, merchant_reference, timestamp,
                          idempotency_key)

    def query(self, *, order_id: int | str | None = None, merchant_reference: str | None = None,
              timestamp: bool = False) -> Answer:
        """POST /direct/query: the order and all its transactions."""
        return self._send(QUERY_PATH, None, order_id, merchant_reference, timestamp, None)

    def signed_envelope(self, request: str) -> bytes:
        """The JSON envelope of the `request` text, signed with the merchant's key."""
        return envelope(request, sign(self._key, request, self.double_base64))

    def _send(self, path, amount, order_id, merchant_reference, timestamp, idempotency_key) -> Answer:
        if order_id is None and merchant_reference is None:
            raise ValueError("give order_id or merchant_reference (or both)")
        moment = datetime.now(UTC).isoformat(timespec="seconds") if timestamp else None
        request = request_text(self.merchant_id, amount, None if order_id is None else str(order_id),
                               merchant_reference, moment)
        answer = _post(endpoint(self.url, path), self.signed_envelope(request), self.timeout, idempotency_key,
                       self._context)
        if self._gateway_key is not None:
            self._check_genuine(answer)
        return answer

    def _check_genuine(self, answer: Answer) -> None:
        signature = _header(answer.headers, "X-Signature")
        try:
            self._gateway_key.verify(base64.b64decode(signature or "", validate=True), answer.body,
                                     padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError) as exc:
            raise AnswerNotGenuine(f"the answer's X-Signature does not verify (HTTP {answer.status})") from exc


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="refund-client", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("REFUND_EDGE_URL") or DEFAULT_URL,
                        help=f"the edge's base URL (env REFUND_EDGE_URL, default {DEFAULT_URL})")
    parser.add_argument("--cacert", default=os.environ.get("REFUND_EDGE_CACERT"),
                        help="PEM CA certificate(s) to verify an https:// edge with, e.g. a private CA "
                             "(env REFUND_EDGE_CACERT; default: the system's trusted CAs)")
    parser.add_argument("--key", required=True, help="the merchant's RSA private key (PEM, unencrypted)")
    parser.add_argument("--merchant-id", required=True, help="e.g. 3000001")
    parser.add_argument("--order-id", help="the gateway's order id")
    parser.add_argument("--merchant-reference", help="the merchant's reference of the order")
    parser.add_argument("--amount", required=True, help="decimal refund amount, e.g. 76.19 (sent as a JSON number)")
    parser.add_argument("--double-base64", action="store_true",
                        help="base64-encode the signature twice, like the published example")
    parser.add_argument("--idempotency-key", help="send this Idempotency-Key header (1-64 printable ASCII): "
                                                  "a retry with the same key gets the same answer")
    parser.add_argument("--timestamp", action="store_true",
                        help="sign the current time into the request (`timestamp`, for the replay window)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer (default 10)")
    parser.add_argument("--dry-run", action="store_true", help="print the signed envelope instead of sending it")
    args = parser.parse_args(argv)
    if args.order_id is None and args.merchant_reference is None:
        parser.error("give --order-id or --merchant-reference (or both)")
    return args, parser


def main(argv=None) -> int:
    args, parser = parse_args(argv)
    try:
        timestamp = datetime.now(UTC).isoformat(timespec="seconds") if args.timestamp else None
        request = request_text(args.merchant_id, args.amount, args.order_id, args.merchant_reference, timestamp)
        key = load_private_key(args.key)
        context = ssl.create_default_context(cafile=args.cacert) if args.cacert else None
    except ssl.SSLError as exc:
        parser.error(f"--cacert {args.cacert}: no usable PEM certificate ({exc.reason or exc})")
    except (OSError, ValueError, TypeError) as exc:
        parser.error(str(exc))
    body = envelope(request, sign(key, request, args.double_base64))
    if args.dry_run:
        sys.stdout.write(body.decode("utf-8") + "\n")
        return 0
    url = endpoint(args.url)
    try:
        status, reason, answer = post(url, body, args.timeout, args.idempotency_key, context)
    except (urllib.error.URLError, OSError) as exc:
        print(f"refund-client: no answer from {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 2
    print(f"HTTP {status} {reason}")
    print(answer.decode("utf-8", errors="replace"))
    try:
        code = json.loads(answer).get("responseCode")
    except (ValueError, AttributeError):
        code = None
    return 0 if code == "0000" else 1


if __name__ == "__main__":
    sys.exit(main())
