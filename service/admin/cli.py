"""The command line of `refund-admin`: its parser, and `main`, which runs one command
and turns every failure into one line on stderr and an exit status."""

from __future__ import annotations

import argparse
import os
import sys

import sqlalchemy as sa
from alembic.util import CommandError

from service import config
from service.admin import demo, events, gateway_keys, housekeeping, load, merchants, money, values
from service.admin.database import check_url, database_error, without_password
from service.admin.errors import EXIT_BAD_INPUT, EXIT_DATABASE, EXIT_REFUSED, AdminError


class _OneLineParser(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit status 2 (not argparse's usage text)."""

    def error(self, message: str):
        print(f"refund-admin: bad input: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    # --database-url is accepted before or after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", default=argparse.SUPPRESS, metavar="URL",
                        help="SQLAlchemy database URL (default: $REFUND_DATABASE_URL, else sqlite:///refund.db)")
    parser = _OneLineParser(prog="refund-admin", parents=[common],
                            description="Operate the refund service: schema, data, merchants and keys.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(group, name, run, help):
        sub = group.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    def group(name, help):
        sub = commands.add_parser(name, parents=[common], help=help)
        return sub.add_subparsers(dest="action", required=True, metavar="ACTION")

    command(commands, "migrate", housekeeping.cmd_migrate, "create or upgrade the database schema")
    command(commands, "load", load.cmd_load, "create the payment methods, merchants, keys, balances and orders "
                                             "that are missing (never changing a live balance or a status) "
                                             "from a JSON file shaped like fixtures.example.json"
            ).add_argument("file", metavar="FILE")
    command(commands, "demo", demo.cmd_demo, "load a demo merchant with a fresh key pair and orders").add_argument(
        "--dir", default="demo", help="where the demo key pair is kept (default: ./demo)")

    merchant = group("merchant", "add, suspend, activate or show a merchant")
    add = command(merchant, "add", merchants.cmd_merchant_add, "add a merchant")
    add.add_argument("id", metavar="ID")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--status", choices=values.MERCHANT_STATUSES, default="ACTIVE")
    for name, run, help in (("suspend", merchants.cmd_merchant_suspend, "suspend a merchant: its refunds are refused"),
                            ("activate", merchants.cmd_merchant_activate, "activate a suspended merchant"),
                            ("show", merchants.cmd_merchant_show, "show a merchant, its keys and balances")):
        command(merchant, name, run, help).add_argument("id", metavar="ID")
    timestamp = command(merchant, "timestamp", merchants.cmd_merchant_timestamp,
                        "require a signed timestamp in the merchant's requests, or make it optional again")
    timestamp.add_argument("id", metavar="ID")
    timestamp.add_argument("setting", choices=("required", "optional"))

    key = group("key", "add or deactivate a merchant's public key")
    key_add = command(key, "add", merchants.cmd_key_add, "register a merchant's RSA public key (PEM), active")
    key_add.add_argument("merchant_id", metavar="MERCHANT_ID")
    key_add.add_argument("key_id", metavar="KEY_ID")
    key_add.add_argument("pem_file", metavar="PEM_FILE")
    key_off = command(key, "deactivate", merchants.cmd_key_deactivate, "stop accepting signatures made with a key")
    key_off.add_argument("merchant_id", metavar="MERCHANT_ID")
    key_off.add_argument("key_id", metavar="KEY_ID")

    balance = group("balance", "show or adjust a merchant's unsettled balances (`balance MERCHANT_ID` shows them)")
    command(balance, "show", money.cmd_balance, "show a merchant's unsettled balances").add_argument(
        "merchant_id", metavar="MERCHANT_ID")
    adjust = command(balance, "adjust", money.cmd_balance_adjust,
                     "credit (AMOUNT 12.50) or debit (AMOUNT -12.50) an unsettled balance, journaled with its reason")
    adjust.add_argument("merchant_id", metavar="MERCHANT_ID")
    adjust.add_argument("currency", metavar="CURRENCY")
    adjust.add_argument("amount", metavar="AMOUNT")
    adjust.add_argument("--reason", required=True, help="why, for the auditor (kept with the adjustment)")
    adjust.add_argument("--id", help="your id for this adjustment (default: a new one); the same id again "
                                     "changes nothing")

    settlements = command(commands, "settlements", money.cmd_settlements, "list the newest settlements (Settle)")
    settlements.add_argument("merchant_id", metavar="MERCHANT_ID", nargs="?")
    settlements.add_argument("--limit", type=int, default=100)
    command(commands, "verify", money.cmd_verify, "recompute every balance from the journal and check orders, "
                                                  "refunds, settlements and audit rows against it; exit 4 on any "
                                                  "discrepancy")
    listed = command(commands, "events", events.cmd_events, "list the events (the journal in sequence order, "
                                                            "docs/events.md) and each relay's position")
    listed.add_argument("--after", type=int, default=0, metavar="SEQ", help="the events after this sequence")
    listed.add_argument("--limit", type=int, default=100)
    listed.add_argument("--merchant", metavar="ID")
    listed.add_argument("--type", metavar="TYPE", help="SALE, REFUND, SETTLEMENT, ADJUSTMENT or OPENING")

    gateway_key = group("gateway-key", "the key refund-edge signs its responses with (X-Signature)")
    create = command(gateway_key, "create", gateway_keys.cmd_gateway_key_create,
                     "make a new key: private key into --out (mode 0600) for refund-edge --signing-key, "
                     "public key into the database")
    create.add_argument("--out", required=True, metavar="FILE", help="where to write the private key (must not exist)")
    create.add_argument("--bits", type=int, choices=(2048, 3072, 4096), default=2048)
    public = command(gateway_key, "public", gateway_keys.cmd_gateway_key_public,
                     "print the newest gateway public key (PEM), for merchants to verify X-Signature")
    public.add_argument("--all", action="store_true", help="every gateway key ever created, newest first")

    purge = command(commands, "purge-idempotency", housekeeping.cmd_purge_idempotency,
                    "delete stored Idempotency-Key answers older than --older-than and expired replay hashes")
    purge.add_argument("--older-than", default="48h", metavar="DURATION",
                       help="e.g. 48h, 7d; at least 24h (default 48h)")
    return parser


def _with_balance_show(argv: list[str]) -> list[str]:
    """`balance MERCHANT_ID` is `balance show MERCHANT_ID`."""
    if "balance" in argv:
        at = argv.index("balance") + 1
        if at < len(argv) and argv[at] not in ("show", "adjust") and not argv[at].startswith("-"):
            return argv[:at] + ["show"] + argv[at:]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_with_balance_show(list(sys.argv[1:] if argv is None else argv)))
    url = config.database_url(getattr(args, "database_url", None))
    try:
        check_url(url, args.command)
        args.run(args, url)
        sys.stdout.flush()  # a closed pipe shows here, inside the try
        return 0
    except BrokenPipeError:  # the reader left (`refund-admin merchant show ... | head -1`): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except AdminError as exc:
        message, code = str(exc), exc.exit_code
    except sa.exc.ArgumentError:  # its message would show the URL, password included
        message, code = "the database URL is not a valid SQLAlchemy URL (see --database-url)", EXIT_BAD_INPUT
    except sa.exc.DBAPIError as exc:
        error = database_error(exc, url)
        message, code = str(error), error.exit_code
    except CommandError as exc:  # alembic
        message, code = f"migration failed: {without_password(str(exc), url)}", EXIT_DATABASE
    except KeyboardInterrupt:
        message, code = "interrupted", 130
    except Exception as exc:  # never a stack trace for an operator
        first_line = next(iter(str(exc).splitlines()), "")
        message, code = f"unexpected error ({type(exc).__name__}): {without_password(first_line, url)}", EXIT_REFUSED
    print(f"refund-admin: {message}", file=sys.stderr)
    return code
