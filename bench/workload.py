"""The bench's data: merchants with fresh RSA keys, paid orders cut into slices
(every measured run gets orders no other run touches), and the signed request
bodies the edge is driven with, signed up front before any clock starts.

Order `o` of an ordinary slice belongs to `MERCHANTS[o % len(MERCHANTS)]`; every
order of a storm slice (`Layout.add(..., storm=True)`) belongs to the one
`STORM_MERCHANT`, so a storm puts every refund on one balance row.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

MERCHANTS = [8_000_001 + i for i in range(32)]  # `make bench --merchants` changes it in place
STORM_MERCHANT = 8_000_000  # the one merchant of every storm slice (not in MERCHANTS)
ORDER_BASE = 10_000_000
STORM_ORDER_BASE = 500_000_000  # storm slices' orders: far above the ordinary ones
AMOUNT = "10.00"
BALANCE = "1000000000.00"
# Orders per measured run: duration x this rate (the bodies wrap, and say so, past it).
EDGE_RATE_CAP = 2600
GRPC_RATE_CAP = 4000


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Slice:
    name: str
    first: int
    count: int
    signed: bool
    storm: bool = False


@dataclass
class Layout:
    slices: dict[str, Slice] = field(default_factory=dict)
    next_order: int = ORDER_BASE
    next_storm_order: int = STORM_ORDER_BASE

    def add(self, name: str, count: int, signed: bool, storm: bool = False) -> Slice:
        count = -(-count // len(MERCHANTS)) * len(MERCHANTS)  # slices start on a multiple of len(MERCHANTS)
        if storm:
            piece = Slice(name, self.next_storm_order, count, signed, storm=True)
            self.next_storm_order += count
        else:
            piece = Slice(name, self.next_order, count, signed)
            self.next_order += count
        self.slices[name] = piece
        return piece


def merchant_of(order_id: int) -> int:
    if order_id >= STORM_ORDER_BASE:
        return STORM_MERCHANT
    return MERCHANTS[order_id % len(MERCHANTS)]


def all_merchants() -> list[int]:
    return [STORM_MERCHANT, *MERCHANTS]


def check_alignment(piece: Slice) -> None:
    """The load generators give order first+i to merchants[i % n]; the data give order o to
    merchants[o % n]: slices start on a multiple of n so the two agree (storm slices have one merchant)."""
    assert piece.storm or piece.first % len(MERCHANTS) == 0


def request_text(order_id: int) -> str:
    return json.dumps({"merchantId": str(merchant_of(order_id)), "orderId": order_id}, separators=(",", ":"))[:-1] \
        + f',"amount":{AMOUNT}}}'


# -- keys and signatures ---------------------------------------------------------

_SIGNING_KEYS = {}


def _init_signer(pems: dict[int, bytes]) -> None:
    from cryptography.hazmat.primitives import serialization

    for merchant, pem in pems.items():
        _SIGNING_KEYS[merchant] = serialization.load_pem_private_key(pem, password=None)


def _sign_range(bounds: tuple[int, int]) -> list[str]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    lines = []
    for order_id in range(*bounds):
        request = request_text(order_id)
        signature = _SIGNING_KEYS[merchant_of(order_id)].sign(request.encode(), padding.PKCS1v15(), hashes.SHA256())
        lines.append(json.dumps({"request": request, "signature": base64.b64encode(signature).decode("ascii")}))
    return lines


def signed_body(private_pem: bytes, order_id: int) -> tuple[bytes, str]:
    """(request bytes, base64 signature) of one order, for the floors."""
    _init_signer({merchant_of(order_id): private_pem})
    line = json.loads(_sign_range((order_id, order_id + 1))[0])
    return line["request"].encode(), line["signature"]


def make_keys(merchants: list[int] | None = None) -> tuple[dict[int, bytes], dict[int, str]]:
    """(private PEM, public PEM) of each of `merchants`, by default every merchant, the storm merchant included."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private, public = {}, {}
    for merchant in merchants or all_merchants():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private[merchant] = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())
        public[merchant] = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")
    return private, public


def sign_bodies(private: dict[int, bytes], slices: list[Slice], directory: Path) -> dict[str, Path]:
    """One file of signed envelopes per slice, one per line; signed on every core."""
    files = {}
    with multiprocessing.get_context("fork").Pool(os.cpu_count(), _init_signer, (private,)) as pool:
        for piece in slices:
            step = 500
            chunks = [(start, min(start + step, piece.first + piece.count))
                      for start in range(piece.first, piece.first + piece.count, step)]
            path = directory / f"bodies-{piece.name}.txt"
            with open(path, "w") as out:
                for lines in pool.imap(_sign_range, chunks):
                    out.write("\n".join(lines) + "\n")
            files[piece.name] = path
    return files


def split_file(path: Path, ways: int) -> list[Path]:
    lines = path.read_text().splitlines()
    parts = []
    for k in range(ways):
        part = path.with_name(f"{path.stem}-part{k}.txt")
        part.write_text("\n".join(lines[k::ways]) + "\n")
        parts.append(part)
    return parts


# -- loading a database -------------------------------------------------------------


def load_document(public: dict[int, str], slices: list[Slice]) -> dict:
    """The `refund-admin load` document of these slices' orders and every merchant."""
    from tests.support import data  # the test suite's builders of fixtures.example.json-shaped documents

    merchants = [data.merchant(m, public[m], {"HKD": BALANCE}) for m in all_merchants()]
    orders = [data.order(order_id, merchant_of(order_id), AMOUNT, reference=f"bench-{order_id}")
              for piece in slices for order_id in range(piece.first, piece.first + piece.count)]
    return {"paymentMethods": data.PAYMENT_METHODS, "merchants": merchants, "orders": orders}


def prepare_database(url: str, document_path: Path, admin: list[str] | None = None, cwd: Path = ROOT,
                     env: dict | None = None) -> subprocess.Popen:
    """migrate + load with refund-admin (`admin`: its argv, default this tree's), as an operator
    would; returns the running process."""
    argv = admin or [str(BIN / "refund-admin")]
    quoted = " ".join(f"'{part}'" for part in argv)
    script = f"{quoted} --database-url '{url}' migrate >/dev/null && {quoted} --database-url '{url}' load " \
             f"'{document_path}' >/dev/null"
    return subprocess.Popen(["sh", "-c", script], cwd=cwd, env={**os.environ, **(env or {})})


def settle_database(url: str) -> None:
    """VACUUM ANALYZE a loaded PostgreSQL database, as the bare chain and the peer do
    after their loads: every chain starts with its tables' statistics, visibility map
    and hint bits in place, as autovacuum keeps them in service, instead of whenever
    autovacuum reaches that database during the runs. SQLite: nothing."""
    if not url.startswith("postgresql"):
        return
    import sqlalchemy as sa

    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("VACUUM ANALYZE"))
    finally:
        engine.dispose()
