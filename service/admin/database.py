"""The database as the commands see it: an engine per command, its URL checked
first, its errors as one line that never shows the password."""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import UTC, datetime

import sqlalchemy as sa

from service import config, db
from service.admin.errors import EXIT_BAD_INPUT, EXIT_DATABASE, AdminError


@contextmanager
def connect(url: str):
    """An engine for one command, disposed of afterwards."""
    engine = db.make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def utc(moment: datetime) -> datetime:
    """SQLite gives back naive UTC datetimes, PostgreSQL aware ones."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def check_url(url: str, command: str) -> None:
    """A URL of the expected form (else bad input, 2); for any command but `migrate`, an
    existing SQLite file (else 3): only `refund-admin migrate` creates a database file."""
    try:
        config.check_database_url(url)
    except ValueError as exc:
        raise AdminError(str(exc), EXIT_BAD_INPUT) from None
    if url.startswith("sqlite") and command != "migrate":
        path = sa.make_url(url).database
        if not os.path.isfile(path):
            raise AdminError(f"no SQLite database file at {path}: run `refund-admin migrate` first "
                             "(it creates the file)", EXIT_DATABASE)


def without_password(text: str, url: str) -> str:
    """`text` (a driver's or alembic's message) with the URL's password replaced by ***;
    config.redact does the same for the URL itself."""
    try:
        password = sa.make_url(url).password
    except sa.exc.ArgumentError:
        return text
    return text.replace(str(password), "***") if password else text


def database_error(exc: sa.exc.DBAPIError, url: str) -> AdminError:
    lines = str(exc.orig if exc.orig is not None else exc).strip().splitlines()
    reason = without_password(lines[0] if lines else type(exc).__name__, url)
    where = config.redact(url)
    if "no such table" in reason or ('relation "' in reason and "does not exist" in reason):
        return AdminError(f"the database {where} has no refund schema ({reason}); run `refund-admin migrate` first",
                          EXIT_DATABASE)
    if isinstance(exc, sa.exc.IntegrityError):
        return AdminError(f"refused by the database {where}: {reason}")
    return AdminError(f"database unavailable: {where}: {reason}", EXIT_DATABASE)
