"""The replay window of signed requests (docs/api.md section 7).

A signed request may carry `timestamp` (ISO 8601 with an offset). When it
does, the timestamp must be within WINDOW of the service's clock, and the
same signed bytes are accepted only once: their SHA-256 is inserted into
`request_replays` (primary key), so every service process sharing the
database agrees. A hash is kept until its timestamp has left the window
(`expires_at`), after which the window alone refuses the bytes. A merchant
can be configured to require the field (`refund-admin merchant timestamp ID
required`). A request without `timestamp`, for a merchant that does not
require it, costs nothing here: no clock read, no database call.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta

from service import domain
from service.domain import ResponseCode
from service.signing import Authenticated

WINDOW = timedelta(seconds=300)

# 2026-11-26T19:41:19+08:00, 2026-11-26T11:41:19.5Z: date, time to the second
# (fraction optional), and an offset.
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
                        r"(Z|[+-][0-9]{2}:[0-9]{2})\Z")
_FORMAT_HINT = "timestamp must be ISO 8601 with an offset, e.g. 2026-11-26T19:41:19+08:00"


class RequestExpired(domain.DomainError):
    code = ResponseCode.REQUEST_EXPIRED


def signed_time(fields: dict, required: bool) -> datetime | None:
    """The request's `timestamp` as an aware datetime; None when absent and allowed."""
    value = fields.get("timestamp")
    if value is None:
        if required:
            raise domain.InvalidRequest("timestamp is required for this merchant; " + _FORMAT_HINT)
        return None
    if not isinstance(value, str) or not _TIMESTAMP.match(value):
        raise domain.InvalidRequest(_FORMAT_HINT)
    try:
        return datetime.fromisoformat(value)
    except ValueError:  # 2026-02-30T...
        raise domain.InvalidRequest(_FORMAT_HINT) from None


async def check(store, signed: Authenticated, now_fn) -> None:
    """2003 for a timestamp outside the window or bytes seen before; 1001 for a
    missing (when required) or malformed timestamp."""
    moment = signed_time(signed.fields, signed.credentials.require_timestamp)
    if moment is None:
        return
    if abs(now_fn() - moment) > WINDOW:
        raise RequestExpired(f"timestamp is more than {WINDOW.seconds} seconds away from the gateway's clock")
    digest = hashlib.sha256(signed.request).hexdigest()
    if not await store.remember_request(digest, signed.merchant_id, moment + WINDOW):
        raise RequestExpired("this signed request was received before; sign a new one with a new timestamp")
