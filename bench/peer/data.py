"""The conventional peer's data: its tables made by SQLAlchemy's create_all, the merchants
(with their keys) and balances added as ORM objects, the orders bulk-inserted."""

from __future__ import annotations

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from bench.bare_chain.workload import CURRENCY, asyncpg_args, minor_units
from bench.peer.app import asyncpg_url
from bench.peer.models import Balance, Base, Merchant

ORDERS = text("INSERT INTO orders (id, merchant_id, currency, amount, status) "
              "SELECT o, (CAST(:merchants AS bigint[]))[o % cardinality(CAST(:merchants AS bigint[])) + 1], "
              ":currency, :amount, 'SUCCESS' FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS o")


async def setup(database_url: str, public_keys: dict[int, str], first_order: int, orders: int,
                amount: str, balance: str) -> None:
    """Tables in the (new, empty) database, loaded: order o belongs to merchants[o % n]."""
    merchants = list(public_keys)
    engine = create_async_engine(asyncpg_url(database_url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with async_sessionmaker(engine)() as session, session.begin():
            session.add_all(Merchant(id=m, public_key_pem=pem) for m, pem in public_keys.items())
            await session.flush()
            session.add_all(Balance(merchant_id=m, currency=CURRENCY, unsettled=minor_units(balance))
                            for m in merchants)
            await session.execute(ORDERS, {"merchants": merchants, "currency": CURRENCY,
                                           "amount": minor_units(amount), "first": first_order,
                                           "last": first_order + orders - 1})
    finally:
        await engine.dispose()
    conn = await asyncpg.connect(**asyncpg_args(database_url))
    try:
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
