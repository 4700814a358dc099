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
