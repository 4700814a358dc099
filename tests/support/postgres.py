"""PostgreSQL for tests: a database of its own per test, and a private cluster.

Tests use REFUND_TEST_PG_URL (default: postgres@127.0.0.1:5432). Without a
reachable PostgreSQL they skip, saying so, unless REFUND_REQUIRE_POSTGRES=1
(set by .ci/run), where they fail.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from service import db
from service.stores.sql import literal as sql_literal
from tests.support.processes import free_port

PG_ADMIN_URL = os.environ.get("REFUND_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REQUIRE_POSTGRES = os.environ.get("REFUND_REQUIRE_POSTGRES") == "1"
PG_BIN = Path(os.environ.get("REFUND_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def skip_or_fail(reason: str):
    """Skip the test, or fail it under REFUND_REQUIRE_POSTGRES=1."""
    if REQUIRE_POSTGRES:
        pytest.fail(reason + " (REFUND_REQUIRE_POSTGRES=1)")
    pytest.skip(reason)


def postgres_or_skip() -> sa.Engine:
    """An AUTOCOMMIT engine on the administration database, or skip (fail) the test."""
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        engine.dispose()
        skip_or_fail(f"PostgreSQL not reachable at {sa.make_url(PG_ADMIN_URL).render_as_string()}: "
                     f"{type(exc.orig).__name__}")
    return engine


@contextlib.contextmanager
def fresh_postgres_database(prefix: str = "refund_test"):
    """The URL of a PostgreSQL database of its own, with no schema yet, dropped afterwards."""
    engine = postgres_or_skip()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with engine.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


def look_for_deadlocks_after(url: str, timeout: str) -> None:
    """Sessions opened on the database of `url` from now on look for deadlocks
    after `timeout` (e.g. '20ms') instead of 1 s: a test sees one at once."""
    engine = db.make_engine(url)
    try:
        with engine.begin() as connection:
            database = connection.execute(sa.text("SELECT current_database()")).scalar()
            connection.execute(sa.text(f'ALTER DATABASE "{database}" SET deadlock_timeout = {sql_literal(timeout)}'))
    finally:
        engine.dispose()


@contextlib.contextmanager
def migrated_database(kind: str, directory: Path, prefix: str = "refund_test"):
    """The URL of a migrated, empty database: a SQLite file in `directory`, or a
    PostgreSQL database of its own, dropped afterwards."""
    if kind == "sqlite":
        url = f"sqlite:///{directory / 'refund.db'}"
        db.migrate(url)
        yield url
        return
    with fresh_postgres_database(prefix) as url:
        db.migrate(url)
        yield url


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
