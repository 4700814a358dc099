"""How fast `refund-admin verify` checks a large ledger: builds a PostgreSQL
database of its own with N orders (a third of them refunded, with their
journal entries and approved audit rows, plus sales and settlements), runs
ledger.verify on it and prints orders per second. The database is dropped
afterwards.

    python -m bench.verify_rate --orders 1000000
"""

from __future__ import annotations

import argparse
import time
import uuid

import sqlalchemy as sa

from service import db, ledger

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

# Merchants 1..100, each with an HKD balance; orders i = 1..N of merchant i % 100 + 1.
_FILL = """
INSERT INTO payment_methods VALUES ('VISA', 'FULL_AND_PARTIAL');
INSERT INTO merchants (id, name, status) SELECT m, 'm' || m, 'ACTIVE' FROM generate_series(1, 100) m;
INSERT INTO orders SELECT i, i % 100 + 1, 'r' || i, 'HKD', 10000,
       CASE WHEN i % 3 = 0 THEN 'PARTIALLY_REFUNDED' ELSE 'SUCCESS' END, 'VISA', now(), now()
FROM generate_series(1, :n) i;
INSERT INTO transactions (id, order_id, merchant_id, type, currency, amount, status, masked_pan, stan, create_time)
SELECT i, i, i % 100 + 1, 'SALE', 'HKD', 10000, 'SUCCESS', '411111******1111', '000001', now()
FROM generate_series(1, :n) i;
INSERT INTO transactions (id, order_id, merchant_id, type, currency, amount, status, masked_pan, stan, create_time)
SELECT :n + i, i, i % 100 + 1, 'REFUND', 'HKD', 100, 'SUCCESS', '411111******1111', '000002', now()
FROM generate_series(3, :n, 3) i;
SELECT setval(pg_get_serial_sequence('transactions', 'id'), 2 * :n + 1);
INSERT INTO refund_attempts (merchant_id, order_id, merchant_reference, amount, response_code, transaction_id,
                             created_at)
SELECT i % 100 + 1, i, NULL, '1.00', '0000', :n + i, now() FROM generate_series(3, :n, 3) i;
INSERT INTO ledger_entries (merchant_id, currency, kind, amount, balance_after, order_id, transaction_id, created_at)
SELECT merchant, 'HKD', kind, amount, SUM(amount) OVER (PARTITION BY merchant ORDER BY seq), order_id, seq, now()
FROM (SELECT i % 100 + 1 AS merchant, 'SALE' AS kind, 10000 AS amount, i AS order_id, i AS seq
      FROM generate_series(1, :n) i
      UNION ALL
      SELECT i % 100 + 1, 'REFUND', -100, i, :n + i FROM generate_series(3, :n, 3) i) entries
ORDER BY seq;
INSERT INTO balances SELECT merchant_id, currency, SUM(amount) FROM ledger_entries GROUP BY merchant_id, currency;
ANALYZE;
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=1_000_000)
    args = parser.parse_args()
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"refund_verify_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        db.migrate(url)
        engine = sa.create_engine(url)
        started = time.monotonic()
        with engine.begin() as connection:
            for statement in filter(str.strip, _FILL.split(";\n")):
                connection.execute(sa.text(statement), {"n": args.orders})
        engine.dispose()
        print(f"built {args.orders} orders in {time.monotonic() - started:.1f} s")
        started = time.monotonic()
        result = ledger.verify(url)
        elapsed = time.monotonic() - started
        assert result.holds, result.discrepancies
        print(f"verify: {result.counts}")
        print(f"verify took {elapsed:.1f} s: {args.orders / elapsed:,.0f} orders/s "
              f"({sum(result.counts.values()) / elapsed:,.0f} rows/s)")
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
