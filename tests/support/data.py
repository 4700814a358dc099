"""Test data: documents in the format of tests/fixtures/fixtures.example.json,
loaded through `refund-admin load` as an operator would; the operator's other
commands (merchant status, keys, balance adjustments) run in this process; the
merchant's request texts; small readers of the database."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import tempfile
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa

from service import admin as admin_command
from service import db, domain, schema
from tests.support import FIXTURES_DIR
from tests.support.keys import EXAMPLE_PUB_PEM, generated_key, public_pem

PAYMENT_METHODS = [
    {"code": "VISA", "refund": "FULL_AND_PARTIAL"},
    {"code": "MASTERCARD", "refund": "FULL_AND_PARTIAL"},
    {"code": "ALIPAY", "refund": "FULL_ONLY"},
    {"code": "OCTOPUS", "refund": "NONE"},
]


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


def example_fixtures() -> dict:
    """tests/fixtures/fixtures.example.json, the example load file as published."""
    return json.loads((FIXTURES_DIR / "fixtures.example.json").read_text())


def load(database_url: str, merchants: list[dict], orders: list[dict]) -> None:
    """Load merchants and orders (with the standard payment methods) via refund-admin."""
    document = {"paymentMethods": PAYMENT_METHODS, "merchants": merchants, "orders": orders}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(document, file)
    try:
        code = admin_command.main(["--database-url", database_url, "load", file.name])
    finally:
        Path(file.name).unlink()
    assert code == 0, "refund-admin load refused the test data"


# -- refund-admin, in this process ---------------------------------------------------


def admin(url: str, *args: str) -> str:
    """Run `refund-admin --database-url URL ARGS...` in this process; its output, or fail."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        code = admin_command.main(["--database-url", url, *args])
    assert code == 0, f"refund-admin {' '.join(args)} exited {code}:\n{output.getvalue()}"
    return output.getvalue()


def load_document(url: str, document: dict) -> None:
    """`refund-admin load` a fixtures.example.json-shaped document."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(document, file)
    try:
        admin(url, "load", file.name)
    finally:
        Path(file.name).unlink()


def set_merchant_status(url: str, merchant_id: int, status: str) -> None:
    admin(url, "merchant", {"SUSPENDED": "suspend", "ACTIVE": "activate"}[status], str(merchant_id))


def deactivate_key(url: str, merchant_id: int, key_id: str) -> None:
    admin(url, "key", "deactivate", str(merchant_id), key_id)


def set_balance(url: str, merchant_id: int, hkd: str) -> None:
    """Bring the HKD balance to `hkd` as an operator would: a journaled
    `refund-admin balance adjust` by the difference (load never changes a live balance)."""
    change = domain.to_minor(hkd, "HKD") - balance_of(url, merchant_id, "HKD")
    if change:
        text = ("-" if change < 0 else "") + domain.format_minor(abs(change), "HKD")
        admin(url, "balance", "adjust", str(merchant_id), "HKD", text, "--reason", "test top-up")


def make_gateway_key(url: str, directory: Path) -> tuple[Path, Path]:
    """`refund-admin gateway-key create --out`, then `gateway-key public`: (private key file, public key file)."""
    private = directory / "gateway.key.pem"
    admin(url, "gateway-key", "create", "--out", str(private))
    public = directory / "gateway.pub.pem"
    public.write_text(admin(url, "gateway-key", "public"))
    return private, public


def insert_key_directly(url: str, merchant_id: int, key_id: str, pem: str) -> None:
    """A key refund-admin would refuse (not RSA), written straight into the table."""
    engine = db.make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(schema.merchant_keys.insert().values(
                merchant_id=merchant_id, key_id=key_id, public_key_pem=pem, active=True,
                created_at=datetime.now(dt.UTC)))
    finally:
        engine.dispose()


# -- reading the database ----------------------------------------------------------------


def balance_of(url: str, merchant_id: int, currency: str) -> int:
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.select(schema.balances.c.unsettled).where(
                schema.balances.c.merchant_id == merchant_id, schema.balances.c.currency == currency)).scalar_one()
    finally:
        engine.dispose()


def refund_count(url: str, order_id: int) -> int:
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.select(sa.func.count()).select_from(schema.transactions).where(
                schema.transactions.c.order_id == order_id, schema.transactions.c.type == "REFUND")).scalar_one()
    finally:
        engine.dispose()


# -- the world of the api.md section 7 tests ----------------------------------------------

MERCHANT, OTHER = 3000001, 3000002


def seed(url: str) -> None:
    """Merchant 3000001 (the example key; HKD 1000.00) and 3000002 (its own key;
    HKD 500.00), each with a few paid VISA orders."""
    merchants = [merchant(MERCHANT, EXAMPLE_PUB_PEM.read_text(), {"HKD": "1000.00"}),
                 merchant(OTHER, public_pem(generated_key("other")), {"HKD": "500.00"})]
    orders = [order(order_id, MERCHANT, "100.00", reference=f"shop-{order_id}") for order_id in range(101, 121)]
    orders += [order(2000, MERCHANT, "5000.00", reference="big-2000"),
               order(201, OTHER, "99.00", reference="theirs-201")]
    load(url, merchants, orders)


# -- request texts (what the merchant signs) ---------------------------------------------


def now_iso(offset_seconds: float = 0, tz_hours: int = 8) -> str:
    """The current time (plus an offset) as ISO 8601 in a +08:00 zone, like a Hong Kong merchant."""
    zone = dt.timezone(dt.timedelta(hours=tz_hours))
    return (dt.datetime.now(zone) + dt.timedelta(seconds=offset_seconds)).isoformat(timespec="seconds")


def request_text(order_id=None, amount=None, merchant=MERCHANT, reference=None, timestamp=None, **extra) -> str:
    """A request text: merchantId, orderId, merchantReference, amount, timestamp, then `extra`."""
    fields = [f'"merchantId":"{merchant}"']
    if order_id is not None:
        fields.append(f'"orderId":{order_id}')
    if reference is not None:
        fields.append(f'"merchantReference":{json.dumps(reference)}')
    if amount is not None:
        fields.append(f'"amount":{amount}')
    if timestamp is not None:
        fields.append(f'"timestamp":{json.dumps(timestamp)}')
    fields += [f'{json.dumps(name)}:{json.dumps(value)}' for name, value in extra.items()]
    return "{" + ",".join(fields) + "}"


def refund_text(merchant: int | str, amount: str, order_id: int | None = None, reference: str | None = None,
                **extra) -> str:
    """A refund's request text with the amount last, written verbatim as a JSON number."""
    fields = [f'"merchantId":{json.dumps(str(merchant))}']
    if order_id is not None:
        fields.append(f'"orderId":{order_id}')
    if reference is not None:
        fields.append(f'"merchantReference":{json.dumps(reference)}')
    fields += [f'{json.dumps(k)}:{json.dumps(v)}' for k, v in extra.items()]
    fields.append(f'"amount":{amount}')
    return "{" + ",".join(fields) + "}"
