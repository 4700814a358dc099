"""refund-admin: every error is one clear line on stderr with the documented exit
status (0 done, 1 refused, 2 bad input, 3 database unreachable or not migrated);
database URL mistakes name the expected form; only `migrate` creates a database file."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT


def admin(*args: str) -> tuple[int, str, str]:
    result = subprocess.run([sys.executable, "-m", "service.admin", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    return result.returncode, result.stdout, result.stderr


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refund-admin: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("url, says", [
    ("mysql://refund:s3cret-pw@db.internal/refund",
     "mysql:// databases are not supported; expected sqlite:///PATH"),
    ("postgres://refund:s3cret-pw@db.internal/refund", "write PostgreSQL URLs as postgresql+psycopg://"),
    ("postgresql://refund:s3cret-pw@db.internal/refund", "write PostgreSQL URLs as postgresql+psycopg://"),
    ("postgresql+asyncpg://refund:s3cret-pw@db.internal/refund", "write PostgreSQL URLs as postgresql+psycopg://"),
    ("sqlite:///:memory:", "the SQLite URL must name a file"),
])
@pytest.mark.parametrize("command", [["migrate"], ["balance", "3000001"]])
def test_a_database_url_of_the_wrong_form_is_bad_input_naming_the_expected_form(url, says, command):
    code, out, err = admin("--database-url", url, *command)
    assert code == 2, err
    line = one_line(err)
    assert says in line and ("postgresql+psycopg://USER" in line or "sqlite:///PATH" in line), line
    assert "s3cret-pw" not in out + err and "ModuleNotFoundError" not in err


def test_commands_other_than_migrate_never_create_a_sqlite_file(tmp_path):
    path = tmp_path / "typo.db"
    code, _, err = admin("--database-url", f"sqlite:///{path}", "merchant", "show", "1")
    assert code == 3 and "run `refund-admin migrate` first" in one_line(err)
    assert not path.exists()
    code, out, err = admin("--database-url", f"sqlite:///{path}", "migrate")
    assert code == 0 and path.exists(), err


@pytest.mark.parametrize("args", [["merchant"], ["merchant", "add", "1"], ["bogus"], ["balance", "1", "--what"]])
def test_usage_errors_are_one_line_with_exit_2(args):
    code, _, err = admin(*args)
    assert code == 2
    assert "bad input" in one_line(err)
