"""The currency table of service/domain.py against ISO 4217 as a whole (issue 17).

The reference is the `iso4217` package (pinned in pyproject.toml's dev
extra): it ships the ISO 4217 maintenance agency's own published list (list
one, the current currencies, with each code's minor units) and is versioned by
that list's publication date. A table written into this test would be checked
against nothing but itself; the package's list is the standard's, and a newer
list is one pin bump away, after which these tests name every code that
changed. Amounts in a currency whose minor units are wrong are read at a
tenth or ten times their value, so every code is checked, not samples.
"""

from __future__ import annotations

import iso4217
import pytest

from service import domain

ISO = {currency.code: currency.exponent for currency in iso4217.Currency}

# ISO codes the service does not take, each for a reason: not money a card
# payment is made in. Funds codes (units of account beside a currency), the
# IMF's and bond markets' units, precious metals, the testing code and "no
# currency". (CLF, UYI and UYW are funds codes too but are taken: the service
# took them before this test; they are checked like any other code.)
NOT_TAKEN = {
    "BOV", "CHE", "CHW", "COU", "MXV", "USN",           # funds codes
    "XAD",                                              # Arab Accounting Dinar (Arab Monetary Fund)
    "XDR", "XSU", "XUA",                                # SDR, SUCRE, ADB unit of account
    "XBA", "XBB", "XBC", "XBD",                         # bond market units
    "XAG", "XAU", "XPD", "XPT",                         # precious metals
    "XTS", "XXX",                                       # testing, no currency
}
# Codes taken although ISO 4217's current list no longer has them: orders made
# in them before they were withdrawn can still be refunded. Each with the
# minor units ISO 4217 gave it (list three, historic denominations).
WITHDRAWN = {
    "BGN": 2,   # Bulgarian lev, replaced by the euro on 2026-01-01
}


def test_the_reference_is_the_iso_list_the_test_was_written_for():
    """Bumping the pin is a deliberate change: read what this file says, then update the date."""
    assert str(iso4217.__published__) == "2026-01-01"
    assert len(ISO) > 170


def test_every_known_currency_has_the_minor_units_iso_4217_gives_it():
    wrong = {code: (domain.minor_units(code), ISO.get(code, WITHDRAWN.get(code)))
             for code in sorted(domain.KNOWN_CURRENCIES)
             if domain.minor_units(code) != ISO.get(code, WITHDRAWN.get(code))}
    assert wrong == {}, "currency: (domain, ISO 4217)"


def test_every_iso_currency_is_known_or_left_out_for_a_stated_reason():
    assert sorted(set(ISO) - domain.KNOWN_CURRENCIES - NOT_TAKEN) == []
    assert sorted(NOT_TAKEN - set(ISO)) == [], "a code left out that ISO 4217 no longer lists: drop it here"
    assert sorted(NOT_TAKEN & domain.KNOWN_CURRENCIES) == []


def test_every_known_currency_is_in_iso_4217_or_a_documented_withdrawn_one():
    assert sorted(domain.KNOWN_CURRENCIES - set(ISO)) == sorted(WITHDRAWN)
    assert sorted(set(WITHDRAWN) & set(ISO)) == [], "back in ISO 4217: drop it from WITHDRAWN"


@pytest.mark.parametrize(("code", "digits"), [
    ("KWD", 3), ("OMR", 3), ("TND", 3), ("LYD", 3), ("IQD", 3), ("JOD", 3), ("BHD", 3),
    ("ISK", 0), ("KRW", 0), ("VND", 0), ("XAF", 0), ("XOF", 0), ("XPF", 0), ("CLP", 0), ("JPY", 0),
    ("CLF", 4), ("UYW", 4), ("HKD", 2), ("USD", 2), ("EUR", 2), ("XCG", 2),
])
def test_an_amount_is_read_in_the_currency_s_own_minor_units(code, digits):
    """The issue's examples, end to end: one unit of each currency is 1 minor unit."""
    assert domain.minor_units(code) == ISO[code] == digits
    one_unit = "1" if digits == 0 else "0." + "0" * (digits - 1) + "1"
    assert domain.to_minor(one_unit, code) == 1
    assert domain.format_minor(1, code) == one_unit
    assert domain.to_minor("1", code) == 10**digits


# --------------------------------------------------------------------------- currencies_by_minor_units


def test_currencies_by_minor_units_groups_every_known_currency_once_by_its_minor_units():
    groups = domain.currencies_by_minor_units()
    assert list(groups) == sorted(groups) == [0, 2, 3, 4]
    codes = [code for group in groups.values() for code in group]
    assert sorted(codes) == sorted(domain.KNOWN_CURRENCIES) and len(codes) == len(set(codes))
    for digits, group in groups.items():
        assert list(group) == sorted(group) and isinstance(group, tuple)
        assert all(domain.minor_units(code) == digits for code in group)


def test_currencies_by_minor_units_matches_iso_4217():
    expected: dict[int, list[str]] = {}
    for code in sorted(domain.KNOWN_CURRENCIES):
        expected.setdefault(ISO.get(code, WITHDRAWN.get(code)), []).append(code)
    assert domain.currencies_by_minor_units() == {digits: tuple(codes) for digits, codes in sorted(expected.items())}


def test_the_groups_are_those_iso_4217_gives_the_exceptions():
    groups = domain.currencies_by_minor_units()
    assert groups[0] == ("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX", "UYI", "VND",
                         "VUV", "XAF", "XOF", "XPF")
    assert groups[3] == ("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND")
    assert groups[4] == ("CLF", "UYW")
