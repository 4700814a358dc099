"""`refund-admin`: the operator's command (docs/api.md section 6).

    refund-admin migrate
    refund-admin load FILE.json
    refund-admin demo [--dir DIR]
    refund-admin merchant add ID NAME [--status ACTIVE|SUSPENDED]
    refund-admin merchant suspend|activate|show ID
    refund-admin merchant timestamp ID required|optional
    refund-admin key add MERCHANT_ID KEY_ID PEM_FILE
    refund-admin key deactivate MERCHANT_ID KEY_ID
    refund-admin balance MERCHANT_ID
    refund-admin balance adjust MERCHANT_ID CURRENCY AMOUNT --reason TEXT [--id ID]
    refund-admin settlements [MERCHANT_ID]
    refund-admin verify
    refund-admin events [--after SEQ] [--limit N] [--merchant ID] [--type TYPE]
    refund-admin gateway-key create --out FILE
    refund-admin gateway-key public [--all]
    refund-admin purge-idempotency [--older-than 48h]

The database is `--database-url`, else REFUND_DATABASE_URL, else
sqlite:///refund.db; its password is never printed.

`load` checks the whole file before it touches the database, then applies it
in one transaction: a bad file is refused whole, with one line per bad entry,
and nothing is written. It creates what is missing and never overwrites money
or status; reloading the same file changes nothing:

- payment methods are added, or their refund capability set to the file's;
  merchants are added with the file's status, and an existing merchant keeps
  its status (only `merchant suspend|activate` change it; its name is set);
- a balance is created with its opening journal entry; an existing balance
  is never changed (it moves only by journaled commands: refunds, sales,
  settlements, `balance adjust`). What the file says differently of a
  merchant's status or a balance is reported as left alone;
- keys are added, active; a key already registered keeps its active flag and
  its created_at (a reload never reactivates a key an operator deactivated),
  and a keyId registered with a different public key is refused;
- orders are added with their SALE transaction. An order already in the
  database is never changed: one whose sale differs from the file (merchant,
  reference, currency, amount, payment method, create time, masked PAN,
  STAN) is refused; one whose status alone differs keeps the database's
  status (a refund since the last load is not undone) and is reported.

Exit status: 0 done; 1 refused (unknown merchant or key, a conflict);
2 bad input (usage, a bad load file); 3 database unavailable or not migrated;
4 `verify` found discrepancies (each is named).

One module per job:

    cli.py           the parser and `main`: one line on stderr and an exit status per failure
    errors.py        AdminError, BadFile and the exit statuses
    database.py      an engine per command; the URL checked; database errors without the password
    values.py        one value of a load file or an argument checked (ids, amounts, times, keys)
    load_file.py     a load file read and checked whole into a Plan, without the database
    load.py          `load`: a Plan applied in one transaction
    demo.py          `demo`
    merchants.py     `merchant ...` and `key ...`
    money.py         `balance`, `balance adjust`, `settlements`, `verify`
    events.py        `events`
    gateway_keys.py  `gateway-key create|public`
    housekeeping.py  `migrate`, `purge-idempotency`
"""

from service.admin.cli import main
from service.admin.errors import EXIT_BAD_INPUT, EXIT_DATABASE, EXIT_DISCREPANCIES, EXIT_REFUSED, AdminError

__all__ = ["main", "AdminError", "EXIT_REFUSED", "EXIT_BAD_INPUT", "EXIT_DATABASE", "EXIT_DISCREPANCIES"]
