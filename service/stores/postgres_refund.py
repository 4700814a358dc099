"""The refund statements of the PostgreSQL store, written from the domain's
rules (service/stores/sql.py).

Each statement runs on its own, so each is atomic (no BEGIN/COMMIT):
- IN_ONE_STATEMENT (by order id or by merchant reference) reads the order, its
  payment method's capability, the balance and any earlier refund, and
  applies the refund when every one of domain.decide's conditions for
  approval holds. Its one row: whether a signed request's credentials still
  hold, the order's snapshot as it read it when it did not apply (NULLs: no
  such order, or applied: the caller then needs no snapshot, and PostgreSQL
  skips reading it), and the refunded order and refund when it applied (NULLs
  when not).
- APPLY applies an approval that `decide` made on a snapshot. It re-checks in
  the database what the decision assumed: the order is marked only in the
  status that was read (so two attempts on one order cannot both pass), the
  balance is debited only `WHERE unsettled >= amount`.
Both guard themselves the same way: if the order was marked but the balance no
longer covers the amount, the refund row's amount is NULL, which NOT NULL
refuses, so the statement fails as a whole and an order is never marked
without its debit nor debited without its refund row. Behind them stand the
unique index `uq_one_refund_per_order` and the check `unsettled >= 0`.
"""

from __future__ import annotations

from service.stores import sql

_SNAPSHOT = f"""
SELECT {sql.ORDER_COLUMNS}, pm.refund_capability, COALESCE(b.unsettled, 0) AS unsettled, {sql.TRANSACTION_COLUMNS}
FROM orders o
JOIN payment_methods pm ON pm.code = o.payment_method
LEFT JOIN balances b ON b.merchant_id = o.merchant_id AND b.currency = o.currency
LEFT JOIN transactions t ON t.order_id = o.id AND t.type = {sql.REFUND}
WHERE o.merchant_id = $1 AND """
SNAPSHOT_BY_ID = _SNAPSHOT + "o.id = $2"
SNAPSHOT_BY_REFERENCE = _SNAPSHOT + "o.merchant_reference = $2"
SNAPSHOT_COLUMNS = 21  # order (9), capability, balance, refund transaction (10)


def credentials_hold(key: str, timestamped: str) -> str:
    """SQL: the key `key` (a parameter) of merchant $1 is active, the merchant
    ACTIVE and, unless `timestamped`, not requiring a timestamp."""
    return f"""EXISTS (
        SELECT 1 FROM merchants m JOIN merchant_keys k ON k.merchant_id = m.id
        WHERE m.id = $1 AND m.status = 'ACTIVE' AND (NOT m.require_timestamp OR {timestamped}::boolean)
          AND k.key_id = {key}::text AND k.active)"""


CREDENTIALS_STILL_HOLD = "SELECT " + credentials_hold(key="$2", timestamped="$3")

# The refund transaction's insert, shared by both statements: its amount is
# NULL (and the statement fails) when the order was marked but not debited.
_INSERT_REFUND = f"""
    INSERT INTO transactions (id, order_id, merchant_id, type, currency, amount, status, masked_pan, stan, create_time)
    SELECT new_id.id, {{order}}, $1, {sql.REFUND}, {{currency}},
           CASE WHEN EXISTS (SELECT 1 FROM debit) THEN {{units}} END,  -- NULL: marked but not debited, abort all
           {sql.SUCCEEDED},
           COALESCE((SELECT s.masked_pan FROM transactions s WHERE s.order_id = {{order}} AND s.type = {sql.SALE}
                     LIMIT 1), ''),
           lpad((new_id.id % 1000000)::text, 6, '0'), {{now}}"""

# $1 merchant, $2 order, $3 currency, $4 amount, $5 new status, $6 now,
# $7 requested reference, $8 requested amount text, $9 status the decision read,
# $10 key id of a signed request (NULL: unsigned), $11 whether it is timestamped,
# $12 the request id (for the journal entry, i.e. the event)
_APPLY = f"""
WITH marked AS (
    UPDATE orders SET status = $5, update_time = $6
    WHERE id = $2 AND merchant_id = $1 AND status = $9 AND {sql.refundable("status")}
      AND ($10::text IS NULL OR {{credentials_hold}})
    RETURNING id
), debit AS (
    UPDATE balances SET unsettled = unsettled - $4
    WHERE merchant_id = $1 AND currency = $3 AND unsettled >= $4 AND EXISTS (SELECT 1 FROM marked)
    RETURNING unsettled
), new_id AS (
    SELECT nextval({{sequence}}) AS id FROM marked
), refund AS ({{insert_refund}}
    FROM new_id
    RETURNING id, masked_pan, stan, amount
), audit AS (
    INSERT INTO refund_attempts (merchant_id, order_id, merchant_reference, amount, response_code,
        transaction_id, created_at)
    SELECT $1, $2, $7, $8, '0000', refund.id, $6 FROM refund
), entry AS (
    INSERT INTO ledger_entries (merchant_id, currency, kind, amount, balance_after, order_id, transaction_id,
        created_at,
                                request_id)
    SELECT $1, $3, 'REFUND', -refund.amount, debit.unsettled, $2, refund.id, $6, $12::text FROM refund, debit
)
SELECT id, masked_pan, stan FROM refund"""

# $1 merchant, $2 order id (NULL: by reference), $3 requested reference,
# $4 the amount in minor units for 0, 1, 2, ... decimals, $5 now,
# $6 requested amount text, $7 key id or NULL, $8 whether the request is timestamped,
# $9 the request id (for the journal entry, i.e. the event)
_IN_ONE_STATEMENT = f"""
WITH credentials AS (
    SELECT $7::text IS NULL OR {{credentials_hold}} AS hold
), target AS (
    SELECT o.id, o.amount, o.currency, o.status, pm.refund_capability,
           ($4::bigint[])[({sql.decimals_of_currency("o.currency")}) + 1] AS units
    FROM orders o
    JOIN payment_methods pm ON pm.code = o.payment_method
    WHERE o.merchant_id = $1 AND {{order}}
      AND {sql.refundable("o.status")} AND {sql.refund_allowed("pm.refund_capability")}
      AND NOT EXISTS (SELECT 1 FROM transactions x WHERE x.order_id = o.id AND x.type = {sql.REFUND})
      AND (SELECT hold FROM credentials)
), approvable AS (
    SELECT t.* FROM target t
    WHERE t.units > 0 AND t.units <= t.amount
      AND (t.units = t.amount OR {sql.partial_allowed("t.refund_capability")})
      AND EXISTS (SELECT 1 FROM balances b WHERE b.merchant_id = $1 AND b.currency = t.currency
                  AND b.unsettled >= t.units)
), marked AS (
    UPDATE orders o SET status = {sql.refunded_status("a.units", "a.amount")}, update_time = $5
    FROM approvable a
    WHERE o.id = a.id AND o.status = a.status
    RETURNING {sql.ORDER_COLUMNS}, a.units
), debit AS (
    UPDATE balances b SET unsettled = b.unsettled - m.units
    FROM marked m
    WHERE b.merchant_id = $1 AND b.currency = m.currency AND b.unsettled >= m.units
    RETURNING b.unsettled
), new_id AS (
    SELECT nextval({{sequence}}) AS id FROM marked
), refund AS ({{insert_refund}}
    FROM marked m, new_id
    RETURNING id, order_id, masked_pan, stan, currency, amount
), audit AS (
    INSERT INTO refund_attempts (merchant_id, order_id, merchant_reference, amount, response_code,
        transaction_id, created_at)
    SELECT $1, refund.order_id, $3, $6, '0000', refund.id, $5 FROM refund
), entry AS (
    INSERT INTO ledger_entries (merchant_id, currency, kind, amount, balance_after, order_id, transaction_id,
        created_at,
                                request_id)
    SELECT $1, refund.currency, 'REFUND', -refund.amount, debit.unsettled, refund.order_id, refund.id, $5, $9::text
    FROM refund, debit
)
SELECT credentials.hold, snapshot.*, applied.*
FROM credentials
LEFT JOIN ({{snapshot}} AND NOT EXISTS (SELECT 1 FROM marked)) snapshot ON true
LEFT JOIN (SELECT marked.*, refund.id, refund.masked_pan, refund.stan FROM marked, refund) applied ON true"""
_BY_ID = "o.id = $2 AND (COALESCE($3, '') = '' OR o.merchant_reference = $3)"
_BY_REFERENCE = "$2::bigint IS NULL AND o.merchant_reference = $3"

# A batch (group_commit.py) first locks the rows its statements will lock: its
# orders in id order, then their balance rows in (merchant, currency) order. A
# statement alone locks its order, then its balance. So every refund
# transaction takes orders before balances, each kind in one global order, and
# none can wait for another in a cycle: without this, a batch holding a balance
# row would wait for an order held by a statement of another process waiting
# for that balance row (the same order asked of two processes at once), or two
# batches would take one merchant's balance rows in two currencies in opposite
# orders; PostgreSQL broke each such cycle only after deadlock_timeout.
# $1 merchants, $2 order ids (by id) or merchant references (by reference).
_LOCK_BATCH = """
WITH locked_orders AS MATERIALIZED (
    SELECT o.merchant_id, o.currency FROM orders o
    JOIN unnest($1::bigint[], $2::{key_type}[]) AS r(merchant_id, key)
      ON o.merchant_id = r.merchant_id AND o.{key_column} = r.key
    ORDER BY o.id FOR NO KEY UPDATE OF o
), locked_balances AS MATERIALIZED (
    SELECT 1 FROM balances b
    WHERE (b.merchant_id, b.currency) IN (SELECT merchant_id, currency FROM locked_orders)
    ORDER BY b.merchant_id, b.currency FOR NO KEY UPDATE OF b
)
SELECT (SELECT count(*) FROM locked_orders), (SELECT count(*) FROM locked_balances)"""
LOCK_BATCH_BY_ID = _LOCK_BATCH.format(key_type="bigint", key_column="id")
LOCK_BATCH_BY_REFERENCE = _LOCK_BATCH.format(key_type="text", key_column="merchant_reference")

AUDIT = """
INSERT INTO refund_attempts (merchant_id, order_id, merchant_reference, amount, response_code, transaction_id,
    created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7)"""

# The transactions' id sequence, looked up per statement; a store resolves it
# once (sequence_constant) and builds the statements with the regclass constant.
SEQUENCE_LOOKUP = "pg_get_serial_sequence('transactions', 'id')"


def sequence_constant(sequence: str | None) -> str:
    """The sequence, e.g. 'public.transactions_id_seq', as a regclass constant; the lookup if unknown."""
    return sql.literal(sequence) + "::regclass" if sequence else SEQUENCE_LOOKUP


def apply_statement(sequence: str) -> str:
    """APPLY, naming the sequence with `sequence`."""
    return _APPLY.format(sequence=sequence, credentials_hold=credentials_hold(key="$10", timestamped="$11"),
                         insert_refund=_INSERT_REFUND.format(order="$2", currency="$3", units="$4::bigint", now="$6"))


def in_one_statement(sequence: str) -> tuple[str, str]:
    """IN_ONE_STATEMENT (by order id, by merchant reference), naming the sequence with `sequence`."""
    insert_refund = _INSERT_REFUND.format(order="m.id", currency="m.currency", units="m.units", now="$5")
    return tuple(_IN_ONE_STATEMENT.format(order=order, sequence=sequence, snapshot=snapshot,
                                          insert_refund=insert_refund,
                                          credentials_hold=credentials_hold(key="$7", timestamped="$8"))
                 for order, snapshot in ((_BY_ID, SNAPSHOT_BY_ID),
                                         (_BY_REFERENCE, _SNAPSHOT + "o.merchant_reference = $3")))
