"""Helpers for the proofs of issue 4 (tests/test_prove_*.py): a stack of real
`refund-service` and `refund-edge` processes, an asyncio HTTP client that can
keep a thousand signed requests in flight, the ledger invariants read from the
database, a scanner for card numbers, and a private PostgreSQL cluster that a
test may stop and start at will (the machine's shared PostgreSQL is never
touched).
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
from decimal import Decimal
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

from service import db, domain
from tests.conftest import REQUIRE_POSTGRES, free_port

PG_BIN = Path(os.environ.get("REFUND_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


# -- signed requests ------------------------------------------------------------


def refund_text(merchant: int | str, amount: str, order_id: int | None = None, reference: str | None = None,
                **extra) -> str:
    """The signed `request` text; the amount is written verbatim as a JSON number."""
    fields = [f'"merchantId":{json.dumps(str(merchant))}']
    if order_id is not None:
        fields.append(f'"orderId":{order_id}')
    if reference is not None:
        fields.append(f'"merchantReference":{json.dumps(reference)}')
    fields += [f'{json.dumps(k)}:{json.dumps(v)}' for k, v in extra.items()]
    fields.append(f'"amount":{amount}')
    return "{" + ",".join(fields) + "}"


# -- HTTP from asyncio ------------------------------------------------------------


@dataclass
class Answer:
    """One HTTP exchange with the edge: `status` 0 when no HTTP answer came."""

    status: int
    body: bytes
    elapsed: float
    error: str = ""
    request: bytes = b""
    tag: object = None
    headers: dict = field(default_factory=dict)

    @property
    def code(self) -> str:
        if self.status == 0:
            return "no-answer:" + self.error
        try:
            return json.loads(self.body)["responseCode"]
        except (ValueError, KeyError, TypeError):
            return f"unparsable:{self.status}"

    @property
    def json(self) -> dict:
        return json.loads(self.body)


async def post(address: str, body: bytes, *, path: str = "/direct/refund", timeout: float = 60.0,
               content_type: str = "application/json", tag=None) -> Answer:
    """POST `body` on a fresh connection and read the whole answer."""
    host, port = address.rsplit(":", 1)
    started = time.monotonic()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, int(port))
            head = (f"POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1")
            writer.write(head + body)
            await writer.drain()
            status_line = await reader.readline()
            headers = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            payload = await reader.readexactly(length)
            status = int(status_line.split()[1])
            return Answer(status, payload, time.monotonic() - started, request=body, tag=tag, headers=headers)
    except (OSError, asyncio.IncompleteReadError, TimeoutError, IndexError, ValueError) as exc:
        return Answer(0, b"", time.monotonic() - started, type(exc).__name__, request=body, tag=tag)
    finally:
        if writer is not None:
            writer.close()


async def post_all(addresses: list[str], bodies: list[bytes], *, timeout: float = 60.0, tags=None,
                   concurrency: int | None = None) -> list[Answer]:
    """Every body at once (or at most `concurrency` at a time), round-robin
    over the edges; answers in order."""
    tags = tags or [None] * len(bodies)
    limit = asyncio.Semaphore(concurrency or len(bodies) or 1)

    async def one(i: int, body: bytes) -> Answer:
        async with limit:
            return await post(addresses[i % len(addresses)], body, timeout=timeout, tag=tags[i])

    return await asyncio.gather(*(one(i, body) for i, body in enumerate(bodies)))


def post_many(addresses: list[str], bodies: list[bytes], **kwargs) -> list[Answer]:
    return asyncio.run(post_all(addresses, bodies, **kwargs))


def latency_summary(answers: list[Answer]) -> str:
    times = sorted(a.elapsed for a in answers)
    if not times:
        return "no calls"
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    return f"p50 {pick(0.5) * 1000:.0f} ms, p99 {pick(0.99) * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms"


# -- the ledger ---------------------------------------------------------------------


@dataclass
class Ledger:
    """What the database says after a run, and the invariants it must keep."""

    orders: dict = field(default_factory=dict)        # id -> (merchant, currency, amount, status)
    refunds: dict = field(default_factory=dict)       # order id -> [ (txn id, amount) ]
    audit: list = field(default_factory=list)         # (merchant, order, amount text, code, txn id)
    balances: dict = field(default_factory=dict)      # (merchant, currency) -> unsettled

    @property
    def codes(self) -> Counter:
        return Counter(code for _, _, _, code, _ in self.audit)


def read_ledger(url: str) -> Ledger:
    engine = db.make_engine(url)
    ledger = Ledger()
    try:
        with engine.connect() as connection:
            for oid, merchant, currency, amount, status in connection.execute(sa.text(
                    "SELECT id, merchant_id, currency, amount, status FROM orders")):
                ledger.orders[oid] = (merchant, currency, amount, status)
            for oid, tid, amount in connection.execute(sa.text(
                    "SELECT order_id, id, amount FROM transactions WHERE type = 'REFUND'")):
                ledger.refunds.setdefault(oid, []).append((tid, amount))
            ledger.audit = [tuple(row) for row in connection.execute(sa.text(
                "SELECT merchant_id, order_id, amount, response_code, transaction_id FROM refund_attempts"))]
            for merchant, currency, unsettled in connection.execute(sa.text(
                    "SELECT merchant_id, currency, unsettled FROM balances")):
                ledger.balances[(merchant, currency)] = unsettled
    finally:
        engine.dispose()
    return ledger


def check_ledger(url: str, initial: dict[tuple[int, str], int]) -> Ledger:
    """No order refunded twice; no partial write (an order is marked refunded
    exactly when it has one REFUND transaction and one approved audit row
    naming it); balance = initial - refunds = initial - approved audit amounts."""
    ledger = read_ledger(url)
    approved = defaultdict(list)
    for merchant, order_id, amount_text, code, txn in ledger.audit:
        if code == "0000":
            approved[order_id].append((txn, amount_text))
        else:
            assert txn is None, ("a declined attempt names a transaction", order_id, code, txn)
    refunded_sum = defaultdict(int)
    audited_sum = defaultdict(int)
    for oid, (merchant, currency, amount, status) in ledger.orders.items():
        refunds = ledger.refunds.get(oid, [])
        assert len(refunds) <= 1, f"order {oid} refunded {len(refunds)} times"
        marked = status in domain.REFUNDED_STATUSES
        assert marked == (len(refunds) == 1) == (len(approved.get(oid, [])) == 1), \
            f"partial write on order {oid}: status {status}, refunds {refunds}, approvals {approved.get(oid)}"
        assert len(approved.get(oid, [])) <= 1, f"order {oid} approved {approved[oid]}"
        if refunds:
            (txn_id, refund_amount), = refunds
            (audit_txn, audit_amount), = approved[oid]
            assert audit_txn == txn_id, (oid, audit_txn, txn_id)
            # The audit row keeps the amount as asked: text over gRPC, a JSON number's text when signed.
            assert domain.to_minor(Decimal(audit_amount), currency) == refund_amount, (oid, audit_amount,
                                                                                       refund_amount)
            assert (status == "REFUNDED") == (refund_amount == amount), (oid, status, refund_amount, amount)
            refunded_sum[(merchant, currency)] += refund_amount
            audited_sum[(merchant, currency)] += domain.to_minor(Decimal(audit_amount), currency)
    assert set(approved) <= set(ledger.refunds), "an approval in the audit trail without its refund"
    for key, start in initial.items():
        assert ledger.balances.get(key, 0) >= 0
        assert ledger.balances.get(key, 0) == start - refunded_sum[key] == start - audited_sum[key], \
            (key, ledger.balances.get(key), start, refunded_sum[key], audited_sum[key])
    return ledger


# -- card numbers ---------------------------------------------------------------------

# A run of digits standing alone: not part of a longer number, nor of a
# token such as a hex request id ("...9b11b0370468844755" is not a card).
_DIGIT_RUN = re.compile(r"(?<![0-9A-Za-z])[0-9]{13,19}(?![0-9A-Za-z])")
# The same, written in groups of four: 4111 1111 1111 1111, 4111-1111-1111-1111.
_GROUPED = re.compile(r"(?<![0-9A-Za-z-])[0-9]{4}(?:([ -])[0-9]{4}){2}\1[0-9]{1,7}(?![0-9A-Za-z])")
# A masked PAN never shows more than the first six and the last four digits.
MASKED_PAN = re.compile(r"(?:[0-9]{0,6}[*X]{1,15}[0-9]{0,4})?")


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def card_numbers(text: str) -> list[str]:
    """Luhn-valid runs of 13 to 19 digits standing alone in `text`."""
    runs = _DIGIT_RUN.findall(text) + [re.sub("[ -]", "", m.group(0)) for m in _GROUPED.finditer(text)]
    return [run for run in runs if 13 <= len(run) <= 19 and luhn_valid(run)]


def database_card_numbers(url: str) -> list[tuple[str, str, str]]:
    """(table, column, number) for every card number in any text or binary
    column of any table (tables added by later migrations included)."""
    engine = db.make_engine(url)
    found = []
    try:
        with engine.connect() as connection:
            inspector = sa.inspect(connection)
            for table in inspector.get_table_names():
                for column in inspector.get_columns(table):
                    kind = column["type"]
                    if not isinstance(kind, (sa.String, sa.Text, sa.LargeBinary, sa.JSON)) and \
                            type(kind).__name__ not in ("JSONB", "BYTEA", "NullType"):
                        continue
                    name = column["name"]
                    quoted = engine.dialect.identifier_preparer.quote
                    for (value,) in connection.execute(sa.text(f"SELECT {quoted(name)} FROM {quoted(table)}")):
                        if value is None:
                            continue
                        text = value.decode("latin-1") if isinstance(value, (bytes, memoryview)) else str(value)
                        found += [(table, name, n) for n in card_numbers(text)]
    finally:
        engine.dispose()
    return found


def masked_pans_in_database(url: str) -> list[str]:
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            return [p for (p,) in connection.execute(sa.text("SELECT masked_pan FROM transactions"))]
    finally:
        engine.dispose()


def assert_no_card_data(url: str | None, bodies: list[bytes] = (), logs: list[str] = ()) -> dict:
    """No card number in the answers, the process logs or the database, and
    every masked PAN shows at most the first six and last four digits."""
    for body in bodies:
        text = body.decode("utf-8", "replace")
        assert not card_numbers(text), (card_numbers(text), text[:300])
        for pan in re.findall(r'"maskedPan":"([^"]*)"', text):
            assert MASKED_PAN.fullmatch(pan), pan
    for log in logs:
        assert not card_numbers(log), [line for line in log.splitlines() if card_numbers(line)][:5]
    scanned = {"bodies": len(bodies), "log_bytes": sum(len(log) for log in logs)}
    if url is not None:
        assert database_card_numbers(url) == []
        pans = masked_pans_in_database(url)
        assert all(MASKED_PAN.fullmatch(p) for p in pans), [p for p in pans if not MASKED_PAN.fullmatch(p)]
        scanned["masked_pans"] = len(pans)
    return scanned


# -- a private PostgreSQL cluster -------------------------------------------------------


def skip_or_fail(reason: str):
    if REQUIRE_POSTGRES:
        pytest.fail(reason + " (REFUND_REQUIRE_POSTGRES=1)")
    pytest.skip(reason)


class PrivatePostgres:
    """A PostgreSQL cluster of this test alone, in a temporary directory, on a
    free port: it can be stopped in immediate mode (a crash: no checkpoint,
    recovery at the next start) and started again without disturbing anyone.
    Runs as the `postgres` OS user when the test runs as root."""

    def __init__(self):
        if not (PG_BIN / "initdb").exists():
            skip_or_fail(f"PostgreSQL server binaries not found in {PG_BIN} (REFUND_TEST_PG_BIN)")
        self.as_user: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="refund-pg-"))
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                skip_or_fail("running as root without a postgres OS user to run a private cluster")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = free_port()
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.starts = 0
        self.stops = 0

    def _run(self, tool: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.as_user, str(PG_BIN / tool), *args], capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result

    def start(self) -> float:
        """Start (or restart after a crash) and wait until it accepts connections; seconds taken."""
        began = time.monotonic()
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=60 -c shared_buffers=16MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        self.starts += 1
        return time.monotonic() - began

    def crash(self) -> None:
        """`pg_ctl stop -m immediate`: every backend killed, no checkpoint."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self.stops += 1

    def create_database(self, name: str = "refund") -> str:
        engine = sa.create_engine(self.url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"
        db.migrate(url)
        return url

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


# -- processes ---------------------------------------------------------------------------


def kill_hard(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
