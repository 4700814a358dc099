"""refund-service and refund-edge refuse to start when they cannot do their job:
one JSON log line naming the cause, the documented exit status
(docs/operations.md, "Exit status"), no traceback, nothing created, and
never a listener that reports SERVING while every call would fail."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys

import pytest
import sqlalchemy as sa

from service import db
from tests.support import ROOT
from tests.support.postgres import PG_ADMIN_URL, postgres_or_skip

# The documented exit statuses (docs/operations.md, "Exit status").
EXIT_USAGE, EXIT_DATABASE, EXIT_SCHEMA, EXIT_TLS = 2, 3, 4, 5


def migration_scripts():
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(db.alembic_config("sqlite://"))


def run(module: str, *args: str, env: dict | None = None, timeout: float = 30) -> tuple[int, list[dict], str]:
    """Run a process that is expected to stop by itself: (exit status, its output
    lines parsed as JSON objects, the raw output); fails if any line is not JSON."""
    environment = {**os.environ, "REFUND_GRPC_LISTEN": "127.0.0.1:0", "REFUND_HTTP_LISTEN": "127.0.0.1:0",
                   **(env or {})}
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=timeout)
    raw = result.stdout + result.stderr
    lines = []
    for line in raw.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"a line that is not JSON: {line!r}\n{raw}")
        assert isinstance(entry, dict), line
        lines.append(entry)
    return result.returncode, lines, raw


def refused(module: str, *args: str, exit_code: int, says: str, env: dict | None = None) -> dict:
    """The process exits `exit_code` having written exactly one line: an ERROR naming the cause."""
    code, lines, raw = run(module, *args, env=env)
    assert code == exit_code, raw
    assert len(lines) == 1, raw
    line = lines[0]
    assert line["level"] == "ERROR" and line["exit_code"] == exit_code, line
    assert says in line["message"], line
    assert "Traceback" not in raw and "listening" not in raw
    return line


def service_refused(url: str, *args: str, exit_code: int, says: str, env: dict | None = None) -> dict:
    return refused("service.server", "--database-url", url, *args, exit_code=exit_code, says=says, env=env)


# -- the database ---------------------------------------------------------------------------


def test_a_sqlite_file_in_a_missing_directory_stops_the_service_with_exit_3(tmp_path):
    path = tmp_path / "no" / "such" / "dir" / "refund.db"
    service_refused(f"sqlite:///{path}", exit_code=EXIT_DATABASE, says=f"no SQLite database file at {path}")


def test_a_mistyped_sqlite_path_stops_the_service_and_leaves_no_file_behind(tmp_path, sqlite_url):
    typo = tmp_path / "refnud.db"
    before = set(tmp_path.iterdir())
    line = service_refused(f"sqlite:///{typo}", exit_code=EXIT_DATABASE, says="refund-admin migrate")
    assert "never creates one" in line["message"]
    assert not typo.exists() and set(tmp_path.iterdir()) == before


def test_a_missing_postgresql_database_is_one_line_with_exit_3():
    postgres_or_skip().dispose()
    url = sa.make_url(PG_ADMIN_URL).set(database="refund_no_such_database").render_as_string(hide_password=False)
    service_refused(url, exit_code=EXIT_DATABASE, says="has no database 'refund_no_such_database'")


def test_an_unreachable_postgresql_is_one_line_with_exit_3():
    url = "postgresql+psycopg://refund:s3cret-pw@127.0.0.1:1/refund"
    line = service_refused(url, exit_code=EXIT_DATABASE, says="the database at 127.0.0.1:1 is unreachable")
    assert "s3cret-pw" not in json.dumps(line)


def test_a_database_without_the_refund_schema_exits_4(tmp_path):
    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE something_else (x)").connection.commit()
    service_refused(f"sqlite:///{path}", exit_code=EXIT_SCHEMA, says="has no refund schema")


def _head_and_the_revision_before() -> tuple[str, str]:
    scripts = migration_scripts()
    (head,) = scripts.get_heads()
    previous = scripts.get_revision(head).down_revision
    assert isinstance(previous, str), "the newest migration has one parent"
    return head, previous


def test_a_schema_behind_the_codes_alembic_head_exits_4(database_url):
    from alembic import command

    head, previous = _head_and_the_revision_before()
    command.downgrade(db.alembic_config(database_url), previous)
    service_refused(database_url, exit_code=EXIT_SCHEMA,
                    says=f"is at schema revision {previous}, behind this version's {head}")


def test_a_schema_newer_than_the_code_is_served_with_a_warning(sqlite_url, start_service):
    engine = db.make_engine(sqlite_url)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    engine.dispose()
    service = start_service(sqlite_url)
    assert "9999_from_the_future, which this version does not know" in service.output()


# -- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["service.server", "gateway_edge.server"])
def test_a_bad_log_level_in_the_environment_is_one_line_with_exit_2(module, sqlite_url):
    refused(module, env={"REFUND_LOG_LEVEL": "verbose", "REFUND_DATABASE_URL": sqlite_url}, exit_code=EXIT_USAGE,
            says="REFUND_LOG_LEVEL='verbose': expected one of debug, info, warning, error")


@pytest.mark.parametrize("variable, value", [("REFUND_DB_TIMEOUT", "soon"), ("REFUND_DB_TIMEOUT", "-1"),
                                             ("REFUND_SHUTDOWN_GRACE", "nan"), ("REFUND_PRE_STOP", "x"),
                                             ("REFUND_WAIT_FOR_DATABASE", "-5"), ("REFUND_DB_LANES", "0"),
                                             ("REFUND_DB_LANES", "65"), ("REFUND_DB_LANES", "2.5"),
                                             ("REFUND_DB_LANES", "\u0663"),
                                             ("REFUND_ALLOW_EXPIRED_CERTIFICATE", "maybe")])
def test_bad_service_environment_values_name_the_variable_with_exit_2(variable, value, sqlite_url):
    service_refused(sqlite_url, env={variable: value}, exit_code=EXIT_USAGE, says=f"{variable}={value!r}")


@pytest.mark.parametrize("variable, value", [("REFUND_EDGE_DEADLINE", "0"), ("REFUND_EDGE_BODY_TIMEOUT", "ten")])
def test_bad_edge_environment_values_name_the_variable_with_exit_2(variable, value):
    refused("gateway_edge.server", env={variable: value}, exit_code=EXIT_USAGE, says=f"{variable}={value!r}")


def test_a_bad_flag_is_one_json_line_not_a_usage_text(sqlite_url):
    service_refused(sqlite_url, "--grace", "forever", exit_code=EXIT_USAGE, says="argument --grace")
    service_refused(sqlite_url, "--db-lanes", "-1", exit_code=EXIT_USAGE,
                    says="argument --db-lanes: expected a whole number from 1 to 64, got '-1'")
    refused("gateway_edge.server", "--listen", "nowhere", exit_code=EXIT_USAGE, says="address must be HOST:PORT")


@pytest.mark.parametrize("url, says", [
    ("mysql://refund:pw@db/refund", "mysql:// databases are not supported; expected sqlite:///PATH"),
    ("postgres://refund@db/refund", "write PostgreSQL URLs as postgresql+psycopg://"),
    ("postgresql://refund@db/refund", "write PostgreSQL URLs as postgresql+psycopg://"),
    ("sqlite://", "the SQLite URL must name a file"),
])
def test_a_database_url_of_the_wrong_form_names_the_expected_form_with_exit_2(url, says):
    service_refused(url, exit_code=EXIT_USAGE, says=says)


# -- TLS files -------------------------------------------------------------------------------


def test_a_key_that_does_not_match_the_certificate_is_named_as_such_with_exit_5(sqlite_url, pki):
    cert, _ = pki.issue("refund-service", server=True)
    _, other_key = pki.issue("someone-else", server=True)
    for module, flags in (("service.server", ["--database-url", sqlite_url]), ("gateway_edge.server", [])):
        refused(module, *flags, "--tls-cert", str(cert), "--tls-key", str(other_key), exit_code=EXIT_TLS,
                says=f"the private key --tls-key {other_key} does not match the certificate --tls-cert {cert}")


def test_a_missing_certificate_file_is_named_with_exit_5(sqlite_url, pki, tmp_path):
    _, key = pki.issue("refund-edge", server=True)
    missing = tmp_path / "missing.crt.pem"
    for module, flags in (("service.server", ["--database-url", sqlite_url]), ("gateway_edge.server", [])):
        refused(module, *flags, "--tls-cert", str(missing), "--tls-key", str(key), exit_code=EXIT_TLS,
                says=f"cannot read --tls-cert {missing}: No such file or directory")


def test_a_file_that_is_not_a_certificate_is_named_with_exit_5(sqlite_url, pki):
    _, key = pki.issue("refund-service", server=True)
    refused("service.server", "--database-url", sqlite_url, "--tls-cert", str(key), "--tls-key", str(key),
            exit_code=EXIT_TLS, says=f"--tls-cert {key} holds no PEM certificate")


def test_an_expired_certificate_is_refused_unless_explicitly_allowed_with_a_warning(
        sqlite_url, pki, start_service, start_edge):
    cert, key = pki.issue("refund-service", server=True, valid_for=-dt.timedelta(hours=1))
    for module, flags in (("service.server", ["--database-url", sqlite_url]), ("gateway_edge.server", [])):
        refused(module, *flags, "--tls-cert", str(cert), "--tls-key", str(key), exit_code=EXIT_TLS,
                says="expired at")

    service = start_service(sqlite_url, "--tls-cert", str(cert), "--tls-key", str(key),
                            "--allow-expired-certificate")
    edge = start_edge(service.address, "--tls-cert", str(cert), "--tls-key", str(key),
                      env={"REFUND_ALLOW_EXPIRED_CERTIFICATE": "1"})
    for process in (service, edge):
        warnings = [json.loads(line) for line in process.output().splitlines() if "EXPIRED CERTIFICATE" in line]
        assert len(warnings) == 1 and warnings[0]["level"] == "WARNING", process.output()
