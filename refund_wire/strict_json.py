"""Strict JSON for money: duplicate keys, NaN and Infinity are errors; every
number is a Decimal (never a float); nesting and size are bounded by the caller."""

from __future__ import annotations

import json
import re
from decimal import Decimal


class StrictJSONError(ValueError):
    """The text is not JSON this gateway accepts; the message says why."""


# A key is named in the error only when it cannot be a card number (13 or more
# digits in a row) and is short: the message goes back to the caller and may be logged.
_MAY_BE_A_CARD_NUMBER = re.compile(r"[0-9]{13}")


def _no_duplicates(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            if len(key) > 64 or _MAY_BE_A_CARD_NUMBER.search(key):
                raise StrictJSONError("duplicate key")
            raise StrictJSONError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name):
    raise StrictJSONError(f"{name} is not a number")


# The rules for numbers alone (no float, no NaN or Infinity), for a reader that treats
# duplicate keys its own way: `refund-admin load` names the entry that holds one.
NUMBER_RULES = {"parse_float": Decimal, "parse_constant": _no_constants}

_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_int=Decimal, **NUMBER_RULES)


def loads(data: bytes | str):
    """Parse UTF-8 bytes or text strictly; raise StrictJSONError with a short reason."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return _DECODER.decode(text)
    except StrictJSONError:
        raise
    except UnicodeDecodeError:
        raise StrictJSONError("not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise StrictJSONError(f"not valid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise StrictJSONError("nested too deeply") from None
