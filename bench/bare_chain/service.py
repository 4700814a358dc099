"""The bare chain's data and service: a three-table schema, and a grpc.aio `Refund`
that verifies the signature with a key held in memory, json.loads the request and
runs ONE asyncpg statement.

The statement (REFUND below) locks and checks the order (the merchant's, paid,
amount within it) and the merchant's balance (it covers the amount), updates both
and inserts the refund transaction, returning it. When it returns no row the
refund is declined, answered 3002 whatever the reason: the bare chain reads
nothing else to tell which rule said no.

The merchants' public keys sit in a fourth table that the service reads once, at
start; a refund touches only balances, orders and transactions.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from decimal import Decimal

import asyncpg
import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from bench.bare_chain import wire
from bench.bare_chain.workload import CURRENCY, HUNDRED, asyncpg_args, minor_units

SCHEMA = """
CREATE TABLE merchant_keys (merchant_id bigint PRIMARY KEY, public_key_pem text NOT NULL);
CREATE TABLE balances (
    merchant_id bigint NOT NULL, currency char(3) NOT NULL, unsettled bigint NOT NULL,
    PRIMARY KEY (merchant_id, currency));
CREATE TABLE orders (
    id bigint PRIMARY KEY, merchant_id bigint NOT NULL, currency char(3) NOT NULL, amount bigint NOT NULL,
    status text NOT NULL, update_time timestamptz NOT NULL DEFAULT now());
CREATE TABLE transactions (
    id bigserial PRIMARY KEY, merchant_id bigint NOT NULL, order_id bigint NOT NULL, type text NOT NULL,
    currency char(3) NOT NULL, amount bigint NOT NULL, status text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now());
"""

# $1 order id, $2 merchant id, $3 amount in minor units.
REFUND = """
WITH o AS (
    SELECT id, merchant_id, currency, amount FROM orders
    WHERE id = $1 AND merchant_id = $2 AND status IN ('SUCCESS', 'SETTLED') AND amount >= $3
    FOR UPDATE
), b AS (
    UPDATE balances SET unsettled = balances.unsettled - $3 FROM o
    WHERE balances.merchant_id = o.merchant_id AND balances.currency = o.currency AND balances.unsettled >= $3
    RETURNING balances.merchant_id
), u AS (
    UPDATE orders SET status = CASE WHEN orders.amount = $3 THEN 'REFUNDED' ELSE 'PARTIALLY_REFUNDED' END,
                      update_time = now()
    FROM b WHERE orders.id = $1
    RETURNING orders.id, orders.status
), t AS (
    INSERT INTO transactions (merchant_id, order_id, type, currency, amount, status)
    SELECT o.merchant_id, o.id, 'REFUND', o.currency, $3, 'SUCCESS' FROM o JOIN u ON u.id = o.id
    RETURNING id, order_id, amount
)
SELECT t.id, t.order_id, t.amount, u.status FROM t JOIN u ON u.id = t.order_id
"""


async def setup(database_url: str, public_keys: dict[int, str], first_order: int, orders: int,
                amount: str, balance: str) -> None:
    """Create the schema in the (new, empty) database and load it: the merchants' keys and
    balances, `orders` paid orders from `first_order`, order o belonging to merchants[o % n]."""
    merchants = list(public_keys)
    conn = await asyncpg.connect(**asyncpg_args(database_url))
    try:
        await conn.execute(SCHEMA)
        await conn.executemany("INSERT INTO merchant_keys VALUES ($1, $2)", list(public_keys.items()))
        await conn.executemany("INSERT INTO balances VALUES ($1, $2, $3)",
                               [(m, CURRENCY, minor_units(balance)) for m in merchants])
        await conn.execute(
            "INSERT INTO orders (id, merchant_id, currency, amount, status) "
            "SELECT o, ($3::bigint[])[o % cardinality($3::bigint[]) + 1], $4, $5, 'SUCCESS' "
            "FROM generate_series($1::bigint, $2::bigint) AS o",
            first_order, first_order + orders - 1, merchants, CURRENCY, minor_units(amount))
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


class BareService:
    def __init__(self, pool: asyncpg.Pool, keys: dict[int, object]):
        self.pool, self.keys = pool, keys

    async def refund(self, request, context):
        fields = json.loads(request.request, parse_float=Decimal)
        merchant_id = int(fields["merchantId"])
        try:
            self.keys[merchant_id].verify(base64.b64decode(request.signature), request.request,
                                          padding.PKCS1v15(), hashes.SHA256())
        except (KeyError, InvalidSignature):
            return wire.RefundReply(response_code="2001")
        row = await self.pool.fetchrow(REFUND, int(fields["orderId"]), merchant_id, minor_units(fields["amount"]))
        if row is None:
            return wire.RefundReply(response_code="3002")
        whole, cents = divmod(row["amount"], HUNDRED)
        return wire.RefundReply(response_code="0000", order_id=row["order_id"], order_status=row["status"],
                                transaction_id=row["id"], amount=f"{whole}.{cents:02d}")


async def serve(database_url: str, address: str) -> None:
    """Serve until SIGTERM or SIGINT; prints "bare-service listening on HOST:PORT" when ready."""
    pool = await asyncpg.create_pool(**asyncpg_args(database_url), min_size=2, max_size=20)
    rows = await pool.fetch("SELECT merchant_id, public_key_pem FROM merchant_keys")
    keys = {r["merchant_id"]: serialization.load_pem_public_key(r["public_key_pem"].encode()) for r in rows}
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers([wire.handler(BareService(pool, keys).refund)])
    port = server.add_insecure_port(address)
    await server.start()
    print(f"bare-service listening on {address.rsplit(':', 1)[0]}:{port}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)
    await pool.close()
