"""Per-merchant settings of the edge, from flags and environment variables (no
database): the rate limit (a token bucket per merchant) and the HTTP status
mode (the documented statuses, or HTTP 200 for every answer as the vendor's
published plugin expects).

The merchant is the `merchantId` the signed request claims: the edge does not
verify signatures (the service does), so both settings act on a claim. That is
harmless for the status mode; for the rate limit see `RateLimiter`.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

from refund_wire import strict_json


class StatusMode(Enum):
    DOCUMENTED = "documented"  # API.md section 4: 400, 401, 403, 409, 413, 415, 429, 503, ...
    ALWAYS_200 = "always-200"  # every answer with a response code is HTTP 200, the code in the body


@dataclass(frozen=True)
class Rate:
    """A token bucket: `per_second` tokens added each second, at most `burst` kept."""

    per_second: float
    burst: int

    def __str__(self) -> str:
        return f"{self.per_second:g}/s, burst {self.burst}"


def parse_rate(text: str) -> Rate | None:
    """"RATE" or "RATE/BURST" (requests per second, bucket size; BURST defaults
    to twice RATE, at least 1), or "off" (None: no limit)."""
    text = text.strip()
    if text.lower() == "off":
        return None
    rate_text, _, burst_text = text.partition("/")
    try:
        per_second = float(rate_text)
        if not (per_second > 0 and math.isfinite(per_second)):
            raise ValueError()
        burst = int(burst_text) if burst_text else max(1, math.ceil(2 * per_second))
    except ValueError:
        raise ValueError(f"a rate limit is RATE or RATE/BURST (a positive number of requests per second, a "
                         f"bucket size of at least 1) or off, not {text!r}") from None
    if burst < 1:
        raise ValueError(f"a rate limit needs a positive RATE and a BURST of at least 1, not {text!r}")
    return Rate(per_second, burst)


def parse_overrides(items, parse_value) -> dict[int, object]:
    """{merchant id: value} from "ID=VALUE" items (flags given several times, or
    comma-separated lists from the environment)."""
    overrides = {}
    for item in items:
        for part in item.split(","):
            if not part.strip():
                continue
            merchant, sep, value = part.partition("=")
            merchant = merchant.strip()
            if not sep or not (merchant.isascii() and merchant.isdigit()) or len(merchant) > 18:
                raise ValueError(f"expected MERCHANT_ID=VALUE, not {part.strip()!r}")
            overrides[int(merchant)] = parse_value(value)
    return overrides


def parse_status_mode(text: str) -> StatusMode:
    try:
        return StatusMode(text.strip())
    except ValueError:
        raise ValueError(f"a status mode is {' or '.join(m.value for m in StatusMode)}, not {text.strip()!r}") from None


def claimed_merchant(request: bytes) -> int | None:
    """The merchant id a signed request claims (unverified), or None when it
    names none the service would accept (the service then answers 1001)."""
    try:
        fields = strict_json.loads(request)
    except strict_json.StrictJSONError:
        return None
    merchant = fields.get("merchantId") if isinstance(fields, dict) else None
    if isinstance(merchant, str) and merchant.isascii() and merchant.isdigit() and len(merchant) <= 18:
        return int(merchant)
    return None


class RateLimiter:
    """A token bucket per merchant, in this process only (several edges share
    nothing: with N edges behind a load balancer a merchant gets up to N times
    its rate; see docs/edge.md).

    `take` spends a token or says how long until one is there. A request the
    service answers 2001 (the signature did not verify) gets its token back
    (`give_back`): whoever merely knows a merchant's id cannot spend that
    merchant's budget beyond the requests it has in flight at that moment.
    At most `max_tracked` buckets are kept; the least recently used is
    forgotten first (it comes back full, i.e. the limit errs on the lenient
    side), so that made-up merchant ids cannot grow memory without bound."""

    def __init__(self, default: Rate | None, overrides: dict[int, Rate | None] | None = None, *,
                 max_tracked: int = 100_000, clock=time.monotonic):
        self.default = default
        self.overrides = dict(overrides or {})
        self.max_tracked = max_tracked
        self._clock = clock
        self._buckets: OrderedDict[int, list[float]] = OrderedDict()  # merchant -> [tokens, updated at]

    @property
    def active(self) -> bool:
        return self.default is not None or any(rate is not None for rate in self.overrides.values())

    def rate_of(self, merchant_id: int) -> Rate | None:
        return self.overrides.get(merchant_id, self.default)

    def take(self, merchant_id: int) -> float | None:
        """None when a token was spent (go ahead), else the seconds until one is there."""
        rate = self.rate_of(merchant_id)
        if rate is None:
            return None
        now = self._clock()
        bucket = self._buckets.get(merchant_id)
        if bucket is None:
            bucket = self._buckets[merchant_id] = [float(rate.burst), now]
            if len(self._buckets) > self.max_tracked:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(merchant_id)
            bucket[0] = min(float(rate.burst), bucket[0] + (now - bucket[1]) * rate.per_second)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return None
        return (1.0 - bucket[0]) / rate.per_second

    def give_back(self, merchant_id: int) -> None:
        rate = self.rate_of(merchant_id)
        bucket = self._buckets.get(merchant_id)
        if rate is not None and bucket is not None:
            bucket[0] = min(float(rate.burst), bucket[0] + 1.0)


@dataclass(frozen=True)
class StatusModes:
    default: StatusMode = StatusMode.DOCUMENTED
    overrides: dict | None = None

    @property
    def per_merchant(self) -> bool:
        return bool(self.overrides)

    def of(self, merchant_id: int | None) -> StatusMode:
        if merchant_id is None or not self.overrides:
            return self.default
        return self.overrides.get(merchant_id, self.default)
