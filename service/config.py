"""Settings shared by the processes: flags fall back to environment variables."""

import os

DEFAULT_DATABASE_URL = "sqlite:///refund.db"
DEFAULT_GRPC_LISTEN = "127.0.0.1:50051"


def database_url(flag: str | None = None) -> str:
    return flag or os.environ.get("REFUND_DATABASE_URL") or DEFAULT_DATABASE_URL


def grpc_listen(flag: str | None = None) -> str:
    return flag or os.environ.get("REFUND_GRPC_LISTEN") or DEFAULT_GRPC_LISTEN


def redact(url: str) -> str:
    """A database URL without its password, for logs and messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


POSTGRES_FORM = "postgresql+psycopg://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
SQLITE_FORM = "sqlite:///PATH (e.g. sqlite:///refund.db, or sqlite:////var/lib/refund/refund.db)"
EXPECTED_FORMS = f"{SQLITE_FORM} or {POSTGRES_FORM}"


def check_database_url(url: str) -> str:
    """`url` when it is a database URL we can use; else ValueError naming the
    expected form (never quoting the URL, which may hold a password)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ValueError(f"the database URL is not a URL; expected {EXPECTED_FORMS}") from None
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise ValueError(f"the SQLite driver {driver!r} is not supported; expected {SQLITE_FORM}")
        if not parsed.database or parsed.database == ":memory:" or parsed.database.startswith("file:"):
            raise ValueError(f"the SQLite URL must name a file; expected {SQLITE_FORM}")
        return url
    if backend in ("postgresql", "postgres"):
        if backend == "postgresql" and driver == "psycopg":
            if not parsed.database:
                raise ValueError(f"the PostgreSQL URL must name a database; expected {POSTGRES_FORM}")
            return url
        raise ValueError(f"{parsed.drivername}:// is not supported: write PostgreSQL URLs as {POSTGRES_FORM}")
    raise ValueError(f"{parsed.drivername}:// databases are not supported; expected {EXPECTED_FORMS}")
