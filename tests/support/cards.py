"""Card numbers: the Luhn check, a scan of any text or any database for card
numbers, and the masked PAN shape (at most the first six and the last four
digits). The service has its own Luhn check (service/telemetry.py, the log
scrubber); this one is the tests' independent oracle, not a copy to share."""

from __future__ import annotations

import re

import sqlalchemy as sa

from service import db

# A run of digits standing alone: not part of a longer number, nor of a
# token such as a hex request id ("...9b11b0370468844755" is not a card).
_DIGIT_RUN = re.compile(r"(?<![0-9A-Za-z])[0-9]{13,19}(?![0-9A-Za-z])")
# The same, written in groups of four: 4111 1111 1111 1111, 4111-1111-1111-1111.
_GROUPED = re.compile(r"(?<![0-9A-Za-z-])[0-9]{4}(?:([ -])[0-9]{4}){2}\1[0-9]{1,7}(?![0-9A-Za-z])")
# A masked PAN never shows more than the first six and the last four digits.
MASKED_PAN = re.compile(r"(?:[0-9]{0,6}[*X]{1,15}[0-9]{0,4})?")


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def card_numbers(text: str) -> list[str]:
    """Luhn-valid runs of 13 to 19 digits standing alone in `text`."""
    runs = _DIGIT_RUN.findall(text) + [re.sub("[ -]", "", m.group(0)) for m in _GROUPED.finditer(text)]
    return [run for run in runs if 13 <= len(run) <= 19 and luhn_valid(run)]


def database_card_numbers(url: str) -> list[tuple[str, str, str]]:
    """(table, column, number) for every card number in any text or binary
    column of any table (tables added by later migrations included)."""
    engine = db.make_engine(url)
    found = []
    try:
        with engine.connect() as connection:
            inspector = sa.inspect(connection)
            for table in inspector.get_table_names():
                for column in inspector.get_columns(table):
                    kind = column["type"]
                    if not isinstance(kind, (sa.String, sa.Text, sa.LargeBinary, sa.JSON)) and \
                            type(kind).__name__ not in ("JSONB", "BYTEA", "NullType"):
                        continue
                    name = column["name"]
                    quoted = engine.dialect.identifier_preparer.quote
                    for (value,) in connection.execute(sa.text(f"SELECT {quoted(name)} FROM {quoted(table)}")):
                        if value is None:
                            continue
                        text = value.decode("latin-1") if isinstance(value, (bytes, memoryview)) else str(value)
                        found += [(table, name, n) for n in card_numbers(text)]
    finally:
        engine.dispose()
    return found


def masked_pans_in_database(url: str) -> list[str]:
    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            return [p for (p,) in connection.execute(sa.text("SELECT masked_pan FROM transactions"))]
    finally:
        engine.dispose()


def assert_no_card_data(url: str | None, bodies: list[bytes] = (), logs: list[str] = ()) -> dict:
    """No card number in the answers, the process logs or the database, and
    every masked PAN shows at most the first six and last four digits."""
    for body in bodies:
        text = body.decode("utf-8", "replace")
        assert not card_numbers(text), (card_numbers(text), text[:300])
        for pan in re.findall(r'"maskedPan":"([^"]*)"', text):
            assert MASKED_PAN.fullmatch(pan), pan
    for log in logs:
        assert not card_numbers(log), [line for line in log.splitlines() if card_numbers(line)][:5]
    scanned = {"bodies": len(bodies), "log_bytes": sum(len(log) for log in logs)}
    if url is not None:
        assert database_card_numbers(url) == []
        pans = masked_pans_in_database(url)
        assert all(MASKED_PAN.fullmatch(p) for p in pans), [p for p in pans if not MASKED_PAN.fullmatch(p)]
        scanned["masked_pans"] = len(pans)
    return scanned
