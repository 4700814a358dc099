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
Both first take their merchant's advisory lock (MERCHANT_LOCK, held to the
commit: no deadlock between refunds). Both guard themselves the same way: if
the order was marked but the balance no longer covers the amount, the refund
row's amount is NULL, which NOT NULL refuses, so the statement fails as a
whole and an order is never marked without its debit nor debited without its
refund row. Behind them stand the unique index `uq_one_refund_per_order` and
the check `unsettled >= 0`.
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

# Both statements first take their merchant's advisory lock, held to the commit
# (two int4 keys: the sequencer's and the relay's bigint keys are another key
# space). So a refund changes an order or a balance of merchant M only while
# no other refund transaction can, and a batch (group_commit.py, in merchant
# order) takes the locks of several merchants in increasing order: no two refund
# transactions wait for each other in a cycle. Without it, a batch holding a
# balance row waited for an order that a refund of another process had marked
# and that waited for the balance row (one order asked of two processes at
# once), or two batches took one merchant's balance rows in two currencies in
# opposite orders; PostgreSQL broke each cycle only after deadlock_timeout.
# A refund of one merchant already waited for the other's balance row; only
# declines of one merchant, in two processes at once, now wait too.
MERCHANT_LOCK = "SELECT pg_advisory_xact_lock(($1::bigint >> 32)::int, ($1::bigint::bit(32))::int)"

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
WITH serialized AS MATERIALIZED ({MERCHANT_LOCK}
), marked AS (
    UPDATE orders SET status = $5, update_time = $6
    WHERE id = $2 AND merchant_id = $1 AND status = $9 AND {sql.refundable("status")}
      AND ($10::text IS NULL OR {{credentials_hold}}) AND EXISTS (SELECT 1 FROM serialized)
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
# $9 the request id (for the journal entry, i.e. the event),
# $10 the statement's lock_timeout ('250ms'; '0': none, only --db-timeout), set
# before its first lock (the merchant's) for its transaction alone (group_commit.py:
# a lane's statements wait for a lock only so long)
_IN_ONE_STATEMENT = f"""
WITH bounded AS MATERIALIZED (SELECT set_config('lock_timeout', $10::text, true)
), serialized AS MATERIALIZED ({MERCHANT_LOCK} FROM bounded
), credentials AS (
    SELECT $7::text IS NULL OR {{credentials_hold}} AS hold FROM serialized
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
