"""The money commands: `balance [show]`, `balance adjust`, `settlements` and `verify`
(the journal recomputed); the ledger's rules are in service/ledger.py."""

from __future__ import annotations

from service import config, domain, ledger
from service.admin import values
from service.admin.database import connect, utc
from service.admin.errors import EXIT_BAD_INPUT, EXIT_DISCREPANCIES, AdminError
from service.admin.merchants import balances, find_merchant, parse_merchant_id, print_balances
from service.admin.values import Invalid


def cmd_balance(args, url: str) -> None:
    merchant_id = parse_merchant_id(args.merchant_id)
    with connect(url) as engine, engine.connect() as conn:
        find_merchant(conn, merchant_id)
        rows = balances(conn, merchant_id)
    print(f"unsettled balances of merchant {merchant_id}:")
    print_balances(rows)


def cmd_balance_adjust(args, url: str) -> None:
    """Credit or debit an unsettled balance by a journaled adjustment."""
    merchant_id = parse_merchant_id(args.merchant_id)
    try:
        currency = values.currency_code(args.currency)
        amount = ledger.parse_signed_amount(args.amount, currency)
        reason = values.text(args.reason, "--reason", 500)
        adjustment_id = values.text(args.id, "--id", 64) if args.id is not None else None
    except Invalid as exc:
        raise AdminError(str(exc), EXIT_BAD_INPUT) from None
    except domain.DomainError as exc:
        raise AdminError(f"AMOUNT {args.amount!r}: {exc.message}", EXIT_BAD_INPUT) from None
    with connect(url) as engine:
        try:
            made, new = ledger.adjust_balance(engine, merchant_id, currency, amount, reason, adjustment_id)
        except ledger.LedgerRefused as exc:
            raise AdminError(str(exc)) from None
    change = domain.format_minor(made.amount, currency)
    after = domain.format_minor(made.balance_after, currency)
    if new:
        print(f"adjustment {made.adjustment_id}: merchant {merchant_id} {currency} {change}, balance now {after}")
    else:
        print(f"adjustment {made.adjustment_id} was made before ({made.created_at.isoformat(timespec='seconds')}): "
              f"{currency} {change}, balance after it {after}; nothing changed")


def cmd_settlements(args, url: str) -> None:
    merchant_id = parse_merchant_id(args.merchant_id) if args.merchant_id is not None else None
    with connect(url) as engine:
        rows = ledger.settlements(engine, merchant_id, args.limit)
    if not rows:
        print("no settlements")
    for row in rows:
        created = utc(row.created_at).isoformat(timespec="seconds")
        print(f"{row.settlement_id}  merchant {row.merchant_id}  {row.currency} "
              f"{domain.format_minor(row.amount, row.currency)}  balance after "
              f"{domain.format_minor(row.balance_after, row.currency)}  {created}")


def cmd_verify(args, url: str) -> None:
    """Recompute every balance from the journal and check every link; exit 4 naming each discrepancy."""
    result = ledger.verify(url)
    print(f"verified {config.redact(url)}: " + ", ".join(f"{n} {name}" for name, n in result.counts.items()))
    for check, found in result.discrepancies.items():
        if not found:
            print(f"  ok    {check}")
            continue
        more = "+" if len(found) > ledger.EXAMPLES else ""
        print(f"  FAIL  {check}: {min(len(found), ledger.EXAMPLES)}{more} discrepancies")
        for line in found[:ledger.EXAMPLES]:
            print(f"        {line}")
    if not result.holds:
        raise AdminError("the ledger does not hold: see the discrepancies above", EXIT_DISCREPANCIES)
    print("the ledger holds")
