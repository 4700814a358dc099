"""Strict JSON for money: duplicate keys, NaN and Infinity are errors; every
number is a Decimal (never a float); nesting and size are bounded by the caller."""

from __future__ import annotations

import json
from decimal import Decimal


class StrictJSONError(ValueError):
    """The text is not JSON this gateway accepts; the message says why."""


def _no_duplicates(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise StrictJSONError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name):
    raise StrictJSONError(f"{name} is not a number")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_float=Decimal, parse_int=Decimal,
                            parse_constant=_no_constants)


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
