"""ISO 4217 currencies and their decimals (minor units).

Codes not in KNOWN_CURRENCIES are refused; known codes not listed in
_DECIMALS_EXCEPTIONS have 2 decimals. The tests check both against ISO 4217's
published list (BGN, withdrawn on 2026-01-01, stays for refunds of earlier
orders).
"""

from __future__ import annotations

_DECIMALS_EXCEPTIONS = {
    **dict.fromkeys(
        "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF".split(), 0
    ),
    **dict.fromkeys("BHD IQD JOD KWD LYD OMR TND".split(), 3),
    **dict.fromkeys("CLF UYW".split(), 4),
}
KNOWN_CURRENCIES = frozenset(
    """AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD
    BTN BWP BYN BZD CAD CDF CHF CLF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN
    ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR
    ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL
    MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN
    PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP
    STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYI UYU UYW UZS VED
    VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG""".split()
)

# The most decimals any known currency has.
MAX_DECIMALS = max(2, *_DECIMALS_EXCEPTIONS.values())


def decimals(currency: str) -> int | None:
    """The currency's decimals, or None for a code that is not known."""
    if currency not in KNOWN_CURRENCIES:
        return None
    return _DECIMALS_EXCEPTIONS.get(currency, 2)
