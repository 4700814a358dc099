"""Shared fixtures: databases (a SQLite file, and a fresh PostgreSQL database
per test), and real processes on free ports, stopped at the end of the test.

PostgreSQL tests use REFUND_TEST_PG_URL (default: postgres@127.0.0.1:5432).
Without a reachable PostgreSQL they skip, saying so, unless
REFUND_REQUIRE_POSTGRES=1 (set by .ci/run), where they fail
(tests/support/postgres.py).
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.support")  # its check_* helpers assert: before it is imported

from service import db  # noqa: E402  (after register_assert_rewrite)
from tests.support.postgres import fresh_postgres_database  # noqa: E402
from tests.support.processes import Process  # noqa: E402


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


@pytest.fixture
def start_service():
    """Start `refund-service` processes (`Process.service`); all are stopped at the end of the test."""
    started = []

    def start(database_url: str, *args: str, env: dict | None = None) -> Process:
        service = Process.service(database_url, *args, env=env)
        started.append(service)
        return service

    yield start
    for service in started:
        service.close()


@pytest.fixture
def start_edge():
    """Start `refund-edge` processes (`Process.edge`); all are stopped at the end of the test."""
    started = []

    def start(grpc_target: str, *args: str, deadline: float | None = None, env: dict | None = None) -> Process:
        edge = Process.edge(grpc_target, *args, deadline=deadline, env=env)
        started.append(edge)
        return edge

    yield start
    for edge in started:
        edge.close()


@pytest.fixture
def fake_backend():
    """Start gRPC back ends whose RefundService misbehaves as asked (`FakeBackend`)."""
    from tests.support.in_process import FakeBackend

    started = []

    def start(behaviour: str, serving: bool = True):
        backend = FakeBackend(behaviour, serving)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


@pytest.fixture
def private_postgres():
    """A PostgreSQL cluster of this test alone, started; it may crash it (`PrivatePostgres`)."""
    from tests.support.postgres import PrivatePostgres

    cluster = PrivatePostgres()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pki(tmp_path):
    """A CA made for this test, in its temporary directory (`Pki`)."""
    from tests.support.tls import Pki

    return Pki.create(tmp_path / "pki")


@pytest.fixture
def nats_server():
    """A private JetStream server (skips the test when nats-server is not installed)."""
    from tests.support.events import NatsServer

    server = NatsServer()
    yield server
    server.close()
