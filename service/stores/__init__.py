"""The stores: the storage port (`port`) and its two adapters, `postgres`
(asyncpg) and `sqlite` (sqlite3 on one writer thread), plus the SQL text both
build from the domain's rules (`sql`)."""

from __future__ import annotations

from service.stores.port import Store


async def open_store(url: str, **options) -> Store:
    """The store for a SQLAlchemy-style database URL."""
    if url.startswith("sqlite"):
        from service.stores.sqlite import SqliteStore

        return SqliteStore.open(url, **options)
    if url.startswith("postgresql"):
        from service.stores.postgres import PostgresStore

        return await PostgresStore.open(url, **options)
    raise ValueError("REFUND_DATABASE_URL must be a sqlite:// or postgresql+psycopg:// URL")
