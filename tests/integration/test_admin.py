"""refund-admin: migrate, load, demo, merchant and key commands, on SQLite and PostgreSQL.

`database_url` (tests/conftest.py) is a migrated, empty database: a SQLite
file, then a PostgreSQL database of its own.

Long (about 610 lines) on purpose: every refund-admin command's cases, each short, kept beside the shared fixtures of the load files.
"""

from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from service import db, schema
from service.admin import main
from tests.support import FIXTURES_DIR

FIXTURES = FIXTURES_DIR / "fixtures.example.json"
EXAMPLE_PUBLIC_KEY = FIXTURES_DIR / "example-merchant.pub.pem"
# The columns a merchant is loaded with (require_timestamp is set by `merchant timestamp`).
MERCHANT_ROW = tuple(schema.merchants.c[name] for name in ("id", "name", "status"))
EXAMPLE_PRIVATE_KEY = FIXTURES_DIR / "example-merchant.key.pem"


def admin(url: str, *args: str) -> int:
    return main(["--database-url", url, *args])


def query(url: str, statement) -> list:
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(statement).all()
    finally:
        engine.dispose()


def execute(url: str, *statements) -> None:
    engine = db.make_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(statement)
    finally:
        engine.dispose()


def dump(url: str) -> dict[str, list[tuple]]:
    """Every row of every table, in primary-key order."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            return {table.name: [tuple(row) for row in conn.execute(
                        sa.select(table).order_by(*table.primary_key.columns))]
                    for table in schema.metadata.sorted_tables}
    finally:
        engine.dispose()


def utc(moment: datetime) -> datetime:
    """SQLite gives back naive UTC datetimes, PostgreSQL aware ones."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def write(tmp_path: Path, text: str, name: str = "load.json") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def fixtures_text() -> str:
    return FIXTURES.read_text()


def edited(change) -> str:
    """The example fixtures with `change(document)` applied."""
    document = json.loads(fixtures_text())
    change(document)
    return json.dumps(document, indent=1)


def replaced(old: str, new: str) -> str:
    text = fixtures_text()
    assert old in text
    return text.replace(old, new, 1)


def rsa_public_pem(bits: int) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def set_field(section: str, index: int, name: str, value):
    def change(document):
        document[section][index][name] = value
    return change


# -- migrate -----------------------------------------------------------------


def test_migrate_creates_the_schema_in_a_fresh_sqlite_file(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"

    assert admin(url, "migrate") == 0

    assert {"orders", "transactions", "merchants", "merchant_keys", "balances", "payment_methods",
            "refund_attempts"} <= set(sa.inspect(sa.create_engine(url)).get_table_names())
    assert f"migrated {url}" in capsys.readouterr().out


def test_migrate_builds_the_schema_from_nothing_and_can_run_again(database_url):
    command.downgrade(db.alembic_config(database_url), "base")
    assert query(database_url, sa.text("SELECT 1")) == [(1,)]

    assert admin(database_url, "migrate") == 0
    assert admin(database_url, "migrate") == 0

    assert query(database_url, sa.select(sa.func.count()).select_from(schema.orders)) == [(0,)]


def test_database_url_comes_from_the_environment(tmp_path, monkeypatch, capsys):
    url = f"sqlite:///{tmp_path / 'from-env.db'}"
    monkeypatch.setenv("REFUND_DATABASE_URL", url)

    assert main(["migrate"]) == 0

    assert (tmp_path / "from-env.db").exists()
    assert url in capsys.readouterr().out


# -- load --------------------------------------------------------------------


def test_load_writes_the_example_fixtures_in_minor_units(database_url, capsys):
    assert admin(database_url, "load", str(FIXTURES)) == 0

    assert "orders: 4 added" in capsys.readouterr().out
    assert query(database_url, sa.select(schema.payment_methods).order_by("code")) == [
        ("ALIPAY", "FULL_ONLY"), ("MASTERCARD", "FULL_AND_PARTIAL"), ("OCTOPUS", "NONE"),
        ("VISA", "FULL_AND_PARTIAL")]
    assert query(database_url, sa.select(*MERCHANT_ROW)) == [(3000001, "Example Shop Ltd", "ACTIVE")]
    keys = query(database_url, sa.select(schema.merchant_keys))
    assert [(k.merchant_id, k.key_id, k.active) for k in keys] == [(3000001, "2026-11", True)]
    assert keys[0].public_key_pem == EXAMPLE_PUBLIC_KEY.read_text()
    assert query(database_url, sa.select(schema.balances).order_by("currency")) == [
        (3000001, "HKD", 100000), (3000001, "JPY", 50000)]
    orders = query(database_url, sa.select(schema.orders).order_by("id"))
    assert [(o.id, o.merchant_reference, o.currency, o.amount, o.status, o.payment_method) for o in orders] == [
        (1076, "s22tring", "HKD", 7619, "SUCCESS", "VISA"),
        (1077, "alipay-0001", "HKD", 12000, "SUCCESS", "ALIPAY"),
        (1078, "octopus-0001", "HKD", 3550, "SETTLED", "OCTOPUS"),
        (1079, "jp-0001", "JPY", 4800, "SUCCESS", "MASTERCARD")]
    sold = datetime(2026, 11, 20, 8, 15, tzinfo=UTC)
    assert utc(orders[0].create_time) == utc(orders[0].update_time) == sold
    sales = query(database_url, sa.select(schema.transactions).order_by("order_id"))
    assert [(t.order_id, t.merchant_id, t.type, t.currency, t.amount, t.status, t.masked_pan, t.stan)
            for t in sales] == [
        (1076, 3000001, "SALE", "HKD", 7619, "SUCCESS", "411111******1111", "000417"),
        (1077, 3000001, "SALE", "HKD", 12000, "SUCCESS", "", "000418"),
        (1078, 3000001, "SALE", "HKD", 3550, "SUCCESS", "", "000419"),
        (1079, 3000001, "SALE", "JPY", 4800, "SUCCESS", "555555******4444", "000420")]
    assert [utc(t.create_time) for t in sales] == [utc(o.create_time) for o in orders]


def test_times_are_stored_in_utc(database_url, tmp_path):
    text = replaced('"2026-11-20T08:15:00+00:00"', '"2026-11-20T16:15:00+08:00"')

    assert admin(database_url, "load", write(tmp_path, text)) == 0

    [(create_time,)] = query(database_url, sa.select(schema.orders.c.create_time).where(schema.orders.c.id == 1076))
    assert utc(create_time) == datetime(2026, 11, 20, 8, 15, tzinfo=UTC)
    if database_url.startswith("sqlite"):  # the text the SQLite store reads
        assert query(database_url, sa.text("SELECT create_time FROM orders WHERE id = 1076")) == [
            ("2026-11-20 08:15:00.000000",)]


def test_loading_the_same_file_twice_changes_nothing(database_url, capsys):
    assert admin(database_url, "load", str(FIXTURES)) == 0
    before = dump(database_url)

    assert admin(database_url, "load", str(FIXTURES)) == 0

    assert dump(database_url) == before
    out = capsys.readouterr().out
    assert "orders: 4 unchanged" in out and "balances: 2 unchanged" in out


def test_reload_never_overwrites_a_live_balance_or_a_merchant_status(database_url, capsys):
    """Was a finding (issue 10): reloading the onboarding file set balances back
    to the file's (refunds already paid forgotten) and reactivated a suspended
    merchant. Now load creates what is missing and reports what it left alone."""
    assert admin(database_url, "load", str(FIXTURES)) == 0
    assert admin(database_url, "balance", "adjust", "3000001", "HKD", "-5.00", "--reason", "refund paid") == 0
    assert admin(database_url, "merchant", "suspend", "3000001") == 0
    execute(database_url, schema.merchants.update().values(name="Renamed"))
    capsys.readouterr()

    assert admin(database_url, "load", str(FIXTURES)) == 0

    assert query(database_url, sa.select(schema.balances.c.unsettled).order_by("currency")) == [(99500,), (50000,)]
    assert query(database_url, sa.select(*MERCHANT_ROW)) == [(3000001, "Example Shop Ltd", "SUSPENDED")]
    out = capsys.readouterr().out
    assert "balance HKD of merchant 3000001 left at 995.00 (the file says 1000.00" in out
    assert "merchant 3000001 left SUSPENDED (the file says ACTIVE" in out
    assert "balances: 1 unchanged, 1 kept" in out
    assert admin(database_url, "verify") == 0


def test_reload_keeps_a_refund_made_since_and_adds_no_second_sale(database_url, capsys):
    assert admin(database_url, "load", str(FIXTURES)) == 0
    execute(database_url,
            schema.orders.update().where(schema.orders.c.id == 1076).values(status="REFUNDED"),
            schema.transactions.insert().values(order_id=1076, merchant_id=3000001, type="REFUND", currency="HKD",
                                                amount=7619, status="SUCCESS", masked_pan="411111******1111",
                                                stan="000005", create_time=datetime.now(UTC)))

    assert admin(database_url, "load", str(FIXTURES)) == 0

    assert query(database_url, sa.select(schema.orders.c.status).where(schema.orders.c.id == 1076)) == [("REFUNDED",)]
    assert query(database_url, sa.select(schema.transactions.c.type).where(
        schema.transactions.c.order_id == 1076).order_by("id")) == [("SALE",), ("REFUND",)]
    assert "order 1076 kept as REFUNDED (the file says SUCCESS)" in capsys.readouterr().out


def test_reload_does_not_reactivate_a_deactivated_key(database_url):
    assert admin(database_url, "load", str(FIXTURES)) == 0
    assert admin(database_url, "key", "deactivate", "3000001", "2026-11") == 0
    before = dump(database_url)

    assert admin(database_url, "load", str(FIXTURES)) == 0

    assert dump(database_url) == before
    assert query(database_url, sa.select(schema.merchant_keys.c.active)) == [(False,)]


BAD_FILES = {
    "too many decimals": (
        edited(set_field("orders", 2, "amount", "35.555")),
        'orders[2] (id 1078): amount "35.555" has more than 2 decimals for HKD'),
    "decimals in JPY": (
        edited(set_field("orders", 3, "amount", "48.5")),
        'orders[3] (id 1079): amount "48.5" has more than 0 decimals for JPY'),
    "zero amount": (
        edited(set_field("orders", 1, "amount", "0.00")),
        'orders[1] (id 1077): amount "0.00" must be greater than zero'),
    "full card number": (
        edited(set_field("orders", 0, "maskedPan", "4111111111111111")),
        "orders[0] (id 1076): maskedPan must show at most the first six and last four digits"),
    "unknown payment method": (
        edited(set_field("orders", 0, "paymentMethod", "DISCOVER")),
        'orders[0] (id 1076): paymentMethod "DISCOVER" is neither in the file nor in the database'),
    "unknown merchant": (
        edited(set_field("orders", 1, "merchantId", 3000002)),
        "orders[1] (id 1077): merchantId 3000002 is neither in the file nor in the database"),
    "duplicate JSON key": (
        replaced('"stan": "000418"', '"stan": "000418", "stan": "000999"'),
        'orders[1] (id 1077): duplicate key "stan"'),
    "float amount": (
        replaced('"amount": "76.19"', '"amount": 76.19'),
        'orders[0] (id 1076): amount must be a decimal string such as "76.19", not a JSON number'),
    "integer balance": (
        replaced('"unsettled": "50000"', '"unsettled": 50000'),
        "merchants[0] (id 3000001): balances[1] (currency JPY): unsettled must be a decimal string"),
    "bad PEM": (
        edited(lambda d: d["merchants"][0]["keys"][0].update(publicKeyPem="-----BEGIN PUBLIC KEY-----\nAAAA\n")),
        "merchants[0] (id 3000001): keys[0] (keyId 2026-11): publicKeyPem is not a public key in PEM or base64 DER"),
    "1024-bit key": (
        edited(lambda d: d["merchants"][0]["keys"][0].update(publicKeyPem=rsa_public_pem(1024))),
        "keys[0] (keyId 2026-11): publicKeyPem is a 1024-bit RSA key; at least 2048 bits are required"),
    "private key": (
        edited(lambda d: d["merchants"][0]["keys"][0].update(publicKeyPem=EXAMPLE_PRIVATE_KEY.read_text())),
        "keys[0] (keyId 2026-11): publicKeyPem holds a private key"),
    "unknown currency": (
        edited(set_field("orders", 0, "currency", "HKX")),
        'orders[0] (id 1076): currency "HKX" is not an ISO 4217 currency code'),
    "unknown order status": (
        edited(set_field("orders", 0, "status", "PAID")),
        'orders[0] (id 1076): status "PAID" is not one of OPEN, SUCCESS'),
    "unknown merchant status": (
        edited(set_field("merchants", 0, "status", "CLOSED")),
        'merchants[0] (id 3000001): status "CLOSED" is not one of ACTIVE, SUSPENDED'),
    "unknown refund capability": (
        edited(set_field("paymentMethods", 1, "refund", "PARTIAL")),
        'paymentMethods[1] (code MASTERCARD): refund "PARTIAL" is not one of NONE, FULL_ONLY, FULL_AND_PARTIAL'),
    "short stan": (
        edited(set_field("orders", 0, "stan", "417")),
        'orders[0] (id 1076): stan "417" is not 6 digits'),
    "time without offset": (
        edited(set_field("orders", 0, "createTime", "2026-11-20T08:15:00")),
        'orders[0] (id 1076): createTime "2026-11-20T08:15:00" has no UTC offset'),
    "duplicate order id": (
        edited(set_field("orders", 3, "id", 1076)),
        "orders[3] (id 1076): this id is already given in orders[0] (id 1076)"),
    "duplicate merchant reference": (
        edited(set_field("orders", 1, "merchantReference", "s22tring")),
        "orders[1] (id 1077): this merchantReference is already given in orders[0] (id 1076)"),
    "unknown field": (
        replaced('"maskedPan": "555555******4444"', '"maskedPAN": "555555******4444"'),
        'orders[3] (id 1079): unknown field "maskedPAN"'),
    "missing field": (
        edited(lambda d: d["orders"][2].pop("stan")),
        "orders[2] (id 1078): missing field stan"),
    "not JSON": (
        fixtures_text().rstrip().removesuffix("}") + ",}",
        "is not valid JSON"),
    "NaN": (
        replaced('"amount": "76.19"', '"amount": NaN'),
        "NaN is not a number"),
}


@pytest.mark.parametrize("text, message", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_file_is_refused_whole_and_nothing_is_written(database_url, tmp_path, capsys, text, message):
    before = dump(database_url)

    assert admin(database_url, "load", write(tmp_path, text)) == 2

    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert "4111111111111111" not in err  # a card number is never echoed
    assert dump(database_url) == before


def test_a_bad_file_names_every_bad_entry(database_url, tmp_path, capsys):
    def change(document):
        document["orders"][0]["amount"] = "76.191"
        document["orders"][3]["stan"] = "x"

    assert admin(database_url, "load", write(tmp_path, edited(change))) == 2

    err = capsys.readouterr().err
    assert "refused, nothing written" in err
    assert "orders[0] (id 1076): amount" in err and "orders[3] (id 1079): stan" in err


def test_a_bad_file_changes_nothing_already_loaded(database_url, tmp_path):
    assert admin(database_url, "load", str(FIXTURES)) == 0
    before = dump(database_url)

    def change(document):
        document["merchants"][0]["name"] = "Renamed"
        document["merchants"][0]["balances"][0]["unsettled"] = "1.00"
        document["orders"].append({**document["orders"][0], "id": 2001, "merchantReference": "new-one"})
        document["orders"][1]["paymentMethod"] = "DISCOVER"

    assert admin(database_url, "load", write(tmp_path, edited(change))) == 2

    assert dump(database_url) == before


@pytest.mark.parametrize("change, message", [
    (set_field("orders", 0, "amount", "80.00"),
     "orders[0] (id 1076): order 1076 is already loaded with a different amount; a loaded sale is never changed"),
    (set_field("orders", 0, "maskedPan", "400000******0002"),
     "order 1076 is already loaded with a different masked_pan"),
    (set_field("orders", 0, "createTime", "2026-11-20T08:16:00+00:00"),
     "order 1076 is already loaded with a different create_time"),
    (lambda d: d.update(orders=[{**d["orders"][0], "id": 2001}]),
     'orders[0] (id 2001): merchantReference "s22tring" already belongs to order 1076'),
    (lambda d: d["merchants"][0]["keys"][0].update(publicKeyPem=rsa_public_pem(2048)),
     "keyId 2026-11 is already registered with a different public key"),
], ids=["amount", "masked PAN", "create time", "reference", "key"])
def test_a_file_that_contradicts_the_database_is_refused(database_url, tmp_path, capsys, change, message):
    assert admin(database_url, "load", str(FIXTURES)) == 0
    before = dump(database_url)

    assert admin(database_url, "load", write(tmp_path, edited(change))) == 2

    assert message in capsys.readouterr().err
    assert dump(database_url) == before


def test_an_order_may_use_a_merchant_and_payment_method_already_in_the_database(database_url, tmp_path):
    assert admin(database_url, "load", str(FIXTURES)) == 0
    order = {**json.loads(fixtures_text())["orders"][0], "id": 2001, "merchantReference": "later-1"}

    assert admin(database_url, "load", write(tmp_path, json.dumps({"orders": [order]}))) == 0

    assert query(database_url, sa.select(sa.func.count()).select_from(schema.transactions)) == [(5,)]


def test_a_missing_file_is_a_clear_error(database_url, tmp_path, capsys):
    assert admin(database_url, "load", str(tmp_path / "nope.json")) == 2
    assert "cannot read" in capsys.readouterr().err


# -- demo --------------------------------------------------------------------


def test_demo_creates_a_merchant_with_a_key_and_prints_a_refund_command(database_url, tmp_path, capsys):
    directory = tmp_path / "demo"

    assert admin(database_url, "demo", "--dir", str(directory)) == 0

    key_file = directory / "demo-merchant.key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    private_key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert private_key.key_size == 2048
    [key] = query(database_url, sa.select(schema.merchant_keys))
    assert key.merchant_id == 4000001 and key.active
    assert serialization.load_pem_public_key(key.public_key_pem.encode()).public_numbers() == \
        private_key.public_key().public_numbers()
    assert query(database_url, sa.select(*MERCHANT_ROW)) == [(4000001, "Demo Shop", "ACTIVE")]
    assert query(database_url, sa.select(schema.balances).order_by("currency")) == [
        (4000001, "HKD", 1000000), (4000001, "JPY", 500000)]
    assert query(database_url, sa.select(schema.payment_methods.c.refund_capability).where(
        schema.payment_methods.c.code == "OCTOPUS")) == [("NONE",)]
    orders = query(database_url, sa.select(schema.orders).order_by("id"))
    assert len(orders) == 10 and {o.status for o in orders} == {"SUCCESS"}
    assert {o.payment_method for o in orders} == {"VISA", "MASTERCARD", "ALIPAY", "OCTOPUS"}
    assert {o.currency for o in orders} == {"HKD", "JPY"}
    assert query(database_url, sa.select(sa.func.count()).select_from(schema.transactions)) == [(10,)]
    out = capsys.readouterr().out
    assert (f"refund-client --key {key_file} --merchant-id 4000001 --order-id 4100001 --amount 76.19") in out
    assert "python -m service.grpc_client refund --merchant-id 4000001 --order-id 4100001 --amount 76.19" in out
    assert "refundable now: 4100001, 4100002, 4100003, 4100004, 4100005, 4100006, 4100008," in out


def test_demo_twice_keeps_its_key_and_changes_nothing(database_url, tmp_path, capsys):
    directory = tmp_path / "demo"
    assert admin(database_url, "demo", "--dir", str(directory)) == 0
    key_bytes = (directory / "demo-merchant.key.pem").read_bytes()
    before = dump(database_url)

    assert admin(database_url, "demo", "--dir", str(directory)) == 0

    assert (directory / "demo-merchant.key.pem").read_bytes() == key_bytes
    assert dump(database_url) == before
    assert "(kept)" in capsys.readouterr().out


def test_demo_offers_only_orders_still_refundable(database_url, tmp_path, capsys):
    assert admin(database_url, "demo", "--dir", str(tmp_path)) == 0
    execute(database_url, schema.orders.update().where(schema.orders.c.id == 4100001).values(status="REFUNDED"))
    capsys.readouterr()

    assert admin(database_url, "demo", "--dir", str(tmp_path)) == 0

    out = capsys.readouterr().out
    assert "refundable now: 4100002, 4100003, 4100004, 4100005, 4100006, 4100008, 4100009, 4100010" in out
    assert "--order-id 4100002 --amount 250.00" in out


# -- merchants, keys, balances -----------------------------------------------


def test_merchant_add_show_suspend_activate(database_url, capsys):
    assert admin(database_url, "merchant", "add", "5000001", "New Shop") == 0
    assert admin(database_url, "merchant", "add", "5000001", "Again") == 1
    assert "already exists" in capsys.readouterr().err

    assert admin(database_url, "merchant", "suspend", "5000001") == 0
    assert query(database_url, sa.select(schema.merchants.c.status)) == [("SUSPENDED",)]
    assert admin(database_url, "merchant", "activate", "5000001") == 0
    assert query(database_url, sa.select(schema.merchants.c.status)) == [("ACTIVE",)]
    capsys.readouterr()

    assert admin(database_url, "merchant", "show", "5000001") == 0
    assert "merchant 5000001 'New Shop' ACTIVE" in capsys.readouterr().out


def test_merchant_add_suspended(database_url):
    assert admin(database_url, "merchant", "add", "5000002", "Later Shop", "--status", "SUSPENDED") == 0
    assert query(database_url, sa.select(*MERCHANT_ROW)) == [(5000002, "Later Shop", "SUSPENDED")]


@pytest.mark.parametrize("args, code, message", [
    (["merchant", "show", "99"], 1, "no merchant 99"),
    (["merchant", "suspend", "99"], 1, "no merchant 99"),
    (["balance", "99"], 1, "no merchant 99"),
    (["key", "deactivate", "99", "k1"], 1, "no merchant 99"),
    (["merchant", "show", "abc"], 2, 'MERCHANT_ID "abc" is not a positive integer'),
])
def test_unknown_or_bad_merchants_are_clear_errors(database_url, capsys, args, code, message):
    assert admin(database_url, *args) == code
    assert capsys.readouterr().err.strip() == f"refund-admin: {message}"


def test_merchant_show_lists_keys_and_balances(database_url, capsys):
    assert admin(database_url, "load", str(FIXTURES)) == 0
    capsys.readouterr()

    assert admin(database_url, "merchant", "show", "3000001") == 0

    out = capsys.readouterr().out
    assert "merchant 3000001 'Example Shop Ltd' ACTIVE" in out
    assert "2026-11  active" in out
    assert "HKD 1000.00" in out and "JPY 50000" in out


def test_output_into_a_closed_pipe_is_no_error(sqlite_url):
    """`refund-admin merchant show ID | head -1`: the reader leaves early; no traceback, no
    "unexpected error (BrokenPipeError)", exit 0. Here the pipe is closed before anything is written."""
    assert admin(sqlite_url, "load", str(FIXTURES)) == 0
    command = [str(Path(sys.executable).parent / "refund-admin"), "--database-url", sqlite_url,
               "merchant", "show", "3000001"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    errors = process.stderr.read().decode()
    assert process.wait(60) == 0, errors
    assert errors == ""


def test_balance_shows_unsettled_balances(database_url, capsys):
    assert admin(database_url, "load", str(FIXTURES)) == 0
    capsys.readouterr()

    assert admin(database_url, "balance", "3000001") == 0

    assert capsys.readouterr().out.splitlines()[1:] == ["  HKD 1000.00", "  JPY 50000"]


def test_key_add_and_deactivate(database_url, tmp_path, capsys):
    assert admin(database_url, "merchant", "add", "5000001", "New Shop") == 0

    assert admin(database_url, "key", "add", "5000001", "k1", str(EXAMPLE_PUBLIC_KEY)) == 0
    assert admin(database_url, "key", "add", "5000001", "k1", str(EXAMPLE_PUBLIC_KEY)) == 1
    assert "already has a key k1" in capsys.readouterr().err
    assert query(database_url, sa.select(schema.merchant_keys.c.key_id, schema.merchant_keys.c.active)) == [
        ("k1", True)]

    assert admin(database_url, "key", "deactivate", "5000001", "k1") == 0
    assert "no active key left" in capsys.readouterr().out
    assert query(database_url, sa.select(schema.merchant_keys.c.active)) == [(False,)]
    assert admin(database_url, "merchant", "show", "5000001") == 0
    assert "k1  inactive" in capsys.readouterr().out

    assert admin(database_url, "key", "deactivate", "5000001", "k2") == 1
    assert "has no key k2" in capsys.readouterr().err


@pytest.mark.parametrize("pem, message", [
    (EXAMPLE_PRIVATE_KEY.read_text(), "holds a private key"),
    (rsa_public_pem(1024), "is a 1024-bit RSA key"),
    ("hello", "is not a public key in PEM or base64 DER"),
    ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "is not a public key in PEM or base64 DER"),
    ("QUJD\x00", "is not a public key in PEM or base64 DER"),
], ids=["private key", "short key", "garbage", "a PEM of nothing", "base64 with a NUL"])
def test_key_add_refuses_what_is_not_a_strong_public_key(database_url, tmp_path, capsys, pem, message):
    assert admin(database_url, "merchant", "add", "5000001", "New Shop") == 0
    pem_file = write(tmp_path, pem, "key.pem")

    assert admin(database_url, "key", "add", "5000001", "k1", pem_file) == 2

    assert message in capsys.readouterr().err
    assert query(database_url, sa.select(schema.merchant_keys)) == []


def _bare_base64(der: bytes, line_end: str | None) -> str:
    text = base64.b64encode(der).decode("ascii")
    return text if line_end is None else line_end.join(text[i:i + 64] for i in range(0, len(text), 64)) + line_end


@pytest.mark.parametrize("form", ["PEM with CRLF", "bare base64", "bare base64 in CRLF lines",
                                  "bare base64 of PKCS#1", "PEM with surrounding blank lines"])
def test_key_add_accepts_pem_with_any_line_ends_and_bare_base64_as_the_vendors_plugin_shows_it(
        database_url, tmp_path, capsys, form):
    pem = EXAMPLE_PUBLIC_KEY.read_text()
    key = serialization.load_pem_public_key(pem.encode())
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    text = {"PEM with CRLF": pem.replace("\n", "\r\n"),
            "bare base64": _bare_base64(spki, None),
            "bare base64 in CRLF lines": _bare_base64(spki, "\r\n"),
            "bare base64 of PKCS#1": _bare_base64(key.public_bytes(serialization.Encoding.DER,
                                                                   serialization.PublicFormat.PKCS1), "\n"),
            "PEM with surrounding blank lines": "\r\n\n" + pem + "\n\r\n"}[form]
    path = tmp_path / "key.txt"
    path.write_bytes(text.encode("ascii"))
    assert admin(database_url, "merchant", "add", "5000001", "New Shop") == 0

    assert admin(database_url, "key", "add", "5000001", "k1", str(path)) == 0, capsys.readouterr().err

    stored = query(database_url, sa.select(schema.merchant_keys.c.public_key_pem))
    assert stored == [(pem,)]  # the canonical PEM, the same whatever form it was given in


# -- errors ------------------------------------------------------------------


def test_an_unreachable_database_is_one_line_without_the_password(capsys):
    url = "postgresql+psycopg://postgres:s3cret-pw@127.0.0.1:1/refund"

    assert admin(url, "balance", "3000001") == 3

    out, err = capsys.readouterr()
    assert err.startswith("refund-admin: database unavailable: postgresql+psycopg://postgres:***@127.0.0.1:1/refund")
    assert len(err.strip().splitlines()) == 1
    assert "s3cret-pw" not in out + err


def test_an_unmigrated_database_says_to_migrate(tmp_path, capsys):
    assert admin(f"sqlite:///{tmp_path / 'empty.db'}", "merchant", "show", "1") == 3
    assert "run `refund-admin migrate` first" in capsys.readouterr().err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as exit_info:
        main(["merchant"])
    assert exit_info.value.code == 2
