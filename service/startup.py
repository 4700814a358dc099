"""What refund-service and refund-edge check before they serve, and how they say no.

A process that cannot do its job must not look healthy: it stops at start with
one JSON log line naming the cause and an exit status an orchestrator can act
on (docs/operations.md, "Exit status"):

    0  stopped after a drain (SIGTERM/SIGINT)
    1  cannot listen on the address, or an unexpected fault
    2  a bad flag or environment value (e.g. REFUND_LOG_LEVEL=verbose, a mysql:// URL)
    3  the database is unreachable, missing or refuses us (no SQLite file, no such
       PostgreSQL database, authentication failed)
    4  the database has no refund schema, or one behind this version's migrations
    5  a TLS or key file that is unreadable or unusable: not PEM, a key that does not
       match its certificate, an expired certificate (unless --allow-expired-certificate)

The schema check compares the database's `alembic_version` with the heads of
this version's migration scripts (read from service/migrations at run time,
never a hard-coded revision). A revision this version does not know (the
database was migrated by a newer version) is served with a warning: our
migrations only add, so an older version can keep serving during a rollout.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import sqlite3
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import NoReturn, TypeVar

from service import config

EXIT_STOPPED = 0
EXIT_FAULT = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3
EXIT_SCHEMA = 4
EXIT_TLS = 5

LOG_LEVELS = ("debug", "info", "warning", "error")

T = TypeVar("T")


class StartupError(Exception):
    """The process cannot serve: `message` is logged, `exit_code` returned.
    `transient`: the database may come back by itself (unreachable, not refused)."""

    def __init__(self, message: str, exit_code: int, *, transient: bool = False):
        super().__init__(message)
        self.exit_code = exit_code
        self.transient = transient


# -- flags and environment values ---------------------------------------------------


class JsonArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one JSON log line and exit status 2
    (argparse would print a multi-line usage text). --help still prints text."""

    def error(self, message: str) -> NoReturn:
        logging.getLogger(self.prog).error("bad setting: %s (see %s --help)", message, self.prog,
                                           extra={"fields": {"exit_code": EXIT_USAGE}})
        sys.exit(EXIT_USAGE)


def from_env(parser: argparse.ArgumentParser, variable: str, convert: Callable[[str], T], default: T) -> T:
    """The value of environment `variable` converted, `default` when unset or
    empty; a bad value stops the process naming the variable."""
    text = os.environ.get(variable)
    if not text:
        return default
    try:
        return convert(text)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(f"{variable}={text!r}: {exc}")


def seconds(text: str) -> float:
    """A number of seconds, zero or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds (0 or more), got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def lanes(text: str) -> int:
    """A number of group-commit lanes: a whole number from 1 to 64."""
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 64):
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 64, got {text!r}")
    return int(text)


def log_level(text: str) -> str:
    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return text.lower()


def database_url(text: str) -> str:
    try:
        return config.check_database_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_log_level(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--log-level", type=log_level, default=from_env(parser, "REFUND_LOG_LEVEL", log_level, "info"),
                        help=f"debug, info ({what}), warning or error (env REFUND_LOG_LEVEL, default info)")


# -- failing and announcing -------------------------------------------------------------


def refuse(log: logging.Logger, error: StartupError) -> int:
    """Log why the process cannot start (one line) and return its exit status."""
    log.error("cannot start: %s", error, extra={"fields": {"exit_code": error.exit_code}})
    return error.exit_code


def announce(name: str, message: str, **fields) -> None:
    """One JSON line on stdout, e.g. `refund-service listening on 127.0.0.1:50051 (...)`:
    the address a supervisor or test reads, in the same shape as the log lines."""
    now = time.time()
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z",
             "level": "INFO", "logger": name, "message": message, **fields}
    sys.stdout.write(json.dumps(entry, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def install_json_excepthooks(log: logging.Logger) -> None:
    """An exception nobody caught is one JSON line (its type and where it was
    raised, as the log formatter shows errors), never a traceback on stderr."""

    def on_exception(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            return
        log.critical("unexpected fault", exc_info=(kind, value, tb),
                     extra={"fields": {"exit_code": EXIT_FAULT}})

    sys.excepthook = on_exception
    import threading

    threading.excepthook = lambda hook: on_exception(hook.exc_type, hook.exc_value, hook.exc_traceback)
    logging.captureWarnings(True)


# -- the database ---------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def code_heads_and_known() -> tuple[frozenset[str], frozenset[str]]:
    """This version's migration heads and every revision it knows, from service/migrations."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # no "setup plugin" lines
    from alembic.script import ScriptDirectory

    from service import db

    script = ScriptDirectory.from_config(db.alembic_config("sqlite://"))
    return frozenset(script.get_heads()), frozenset(revision.revision for revision in script.walk_revisions())


def judge_schema(versions: list[str] | None, where: str) -> str | None:
    """None when the database is at this version's head; a warning when it is at a
    revision this version does not know; StartupError (exit 4) when unmigrated or behind."""
    if not versions:
        raise StartupError(f"the database {where} has no refund schema: run `refund-admin migrate` first",
                           EXIT_SCHEMA)
    heads, known = code_heads_and_known()
    if set(versions) == heads:
        return None
    shown, expected = ", ".join(sorted(versions)), ", ".join(sorted(heads))
    if set(versions) - known:
        return (f"the database {where} is at schema revision {shown}, which this version does not know "
                f"(its newest is {expected}): a newer version migrated it; serving anyway")
    raise StartupError(f"the database {where} is at schema revision {shown}, behind this version's {expected}: "
                       f"run `refund-admin migrate` first", EXIT_SCHEMA)


def _sqlite_versions(path: str, timeout: float) -> list[str] | None:
    """alembic_version of an existing SQLite file (never creating one), None without the table."""
    if not os.path.isfile(path):
        raise StartupError(f"no SQLite database file at {path} (the service never creates one: "
                           f"create it with `refund-admin migrate`)", EXIT_DATABASE)
    try:
        connection = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=rw", uri=True, timeout=timeout)
        try:
            if connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
                                  ).fetchone() is None:
                return None
            return [row[0] for row in connection.execute("SELECT version_num FROM alembic_version")]
        finally:
            connection.close()
    except sqlite3.OperationalError as exc:
        transient = "locked" in str(exc)
        raise StartupError(f"cannot use the SQLite database {path}: {exc}", EXIT_DATABASE,
                           transient=transient) from None
    except sqlite3.DatabaseError as exc:  # e.g. "file is not a database"
        raise StartupError(f"cannot use the SQLite database {path}: {exc}", EXIT_DATABASE) from None


async def _postgres_versions(url: str, timeout: float) -> list[str] | None:
    import asyncpg
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    host, port = parsed.host or "127.0.0.1", parsed.port or 5432
    where = f"{host}:{port}"
    try:
        connection = await asyncpg.connect(host=host, port=port, user=parsed.username, password=parsed.password,
                                           database=parsed.database, timeout=timeout,
                                           server_settings={"application_name": "refund-service"})
    except asyncpg.InvalidCatalogNameError:
        raise StartupError(f"PostgreSQL at {where} has no database {parsed.database!r}: create it and run "
                           f"`refund-admin migrate`", EXIT_DATABASE) from None
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
        raise StartupError(f"PostgreSQL at {where} refused user {parsed.username!r}: {type(exc).__name__}",
                           EXIT_DATABASE) from None
    except (TimeoutError, OSError, asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
            asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
        raise StartupError(f"the database at {where} is unreachable: {_reason(exc)}", EXIT_DATABASE,
                           transient=True) from None
    except asyncpg.PostgresError as exc:
        raise StartupError(f"PostgreSQL at {where} refused the connection: {type(exc).__name__}",
                           EXIT_DATABASE) from None
    try:
        return [row[0] for row in await connection.fetch("SELECT version_num FROM alembic_version")]
    except asyncpg.UndefinedTableError:
        return None
    except (TimeoutError, OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
        raise StartupError(f"the database at {where} is unreachable: {_reason(exc)}", EXIT_DATABASE,
                           transient=True) from None
    finally:
        await connection.close(timeout=timeout)


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or next(iter(str(exc).splitlines()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def check_database(url: str, timeout: float) -> str | None:
    """Connect once (never creating a SQLite file) and judge the schema: None
    when all is well, a warning to log, or StartupError (exit 3 or 4)."""
    where = config.redact(url)
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        versions = await asyncio.to_thread(_sqlite_versions, make_url(url).database, timeout)
    else:
        versions = await _postgres_versions(url, timeout)
    return judge_schema(versions, where)


def flag(text: str) -> bool:
    """An on/off environment value: 1/true/yes or 0/false/no."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1 or 0, got {text!r}")
