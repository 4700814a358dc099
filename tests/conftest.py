"""Shared fixtures: databases (SQLite file and a fresh PostgreSQL database per
test), and real `refund-service` processes on free ports.

PostgreSQL tests use REFUND_TEST_PG_URL (default: postgres@127.0.0.1:5432).
Without a reachable PostgreSQL they skip, saying so, unless
REFUND_REQUIRE_POSTGRES=1 (set by .ci/run), where they fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from service import db

ROOT = Path(__file__).resolve().parents[1]
# The example merchant's key pair, the example load file and the endpoint as first published to merchants.
FIXTURES_DIR = ROOT / "tests" / "fixtures"
PG_ADMIN_URL = os.environ.get("REFUND_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REQUIRE_POSTGRES = os.environ.get("REFUND_REQUIRE_POSTGRES") == "1"


def _postgres_or_skip() -> sa.Engine:
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        engine.dispose()
        reason = f"PostgreSQL not reachable at {sa.make_url(PG_ADMIN_URL).render_as_string()}: {type(exc.orig).__name__}"
        if REQUIRE_POSTGRES:
            pytest.fail(reason + " (REFUND_REQUIRE_POSTGRES=1)")
        pytest.skip(reason)
    return engine


@contextlib.contextmanager
def fresh_postgres_database(prefix: str = "refund_test"):
    """The URL of a PostgreSQL database of its own, with no schema yet, dropped afterwards."""
    engine = _postgres_or_skip()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with engine.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture
def postgres_url():
    """A migrated, empty PostgreSQL database of its own, dropped afterwards."""
    with fresh_postgres_database() as url:
        db.migrate(url)
        yield url


@pytest.fixture
def sqlite_url(tmp_path):
    """A migrated, empty SQLite file."""
    url = f"sqlite:///{tmp_path / 'refund.db'}"
    db.migrate(url)
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request):
    """Each test using it runs on SQLite and on PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_url")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoggedProcess:
    """A real process of ours (`python -m MODULE`) that prints `NAME listening on
    HOST:PORT`; `address` is what it printed. Its output goes to a file, never
    to a pipe nobody reads (a full pipe would block the process under load)."""

    def __init__(self, name: str, module: str, args, environment: dict):
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", module, *args], env=environment, cwd=ROOT,
                                            stdout=log, stderr=subprocess.STDOUT)
        self.address = self._wait_for_address()

    def _wait_for_address(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(rf"{self.name} listening on (\S+)", self.output())
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.process.kill()
        raise RuntimeError(f"{self.name} did not start:\n" + self.output())

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class ServiceProcess(LoggedProcess):
    """A real `refund-service` process on a free port."""

    def __init__(self, database_url: str, *extra_args: str, env: dict | None = None):
        environment = {**os.environ, "REFUND_DATABASE_URL": database_url, "REFUND_GRPC_LISTEN": "127.0.0.1:0",
                       "PYTHONUNBUFFERED": "1", **(env or {})}
        super().__init__("refund-service", "service.server", extra_args, environment)


@pytest.fixture
def start_service():
    """Start `refund-service` processes; all are stopped at the end of the test."""
    started = []

    def start(database_url: str, *args: str, env: dict | None = None) -> ServiceProcess:
        service = ServiceProcess(database_url, *args, env=env)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()
        service.log_path.unlink(missing_ok=True)
