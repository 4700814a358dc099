"""Text formats on the wire."""

from __future__ import annotations

import re

# The Idempotency-Key header, and MerchantRefundRequest.idempotency_key
# (docs/api.md section 7): 1 to 64 printable ASCII characters.
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,64}\Z")

# The one grammar of amount text that callers send (gRPC fields, load files):
# ASCII digits, an optional fraction, nothing else: "76.19", "0.50", "500".
# No sign, exponent, blank, leading zero, bare point or "_"
# ("+5", "1e1", " 5", "05", ".5", "5."). Signed JSON requests carry JSON numbers instead.
AMOUNT_TEXT = re.compile(r"(0|[1-9][0-9]*)(\.[0-9]+)?\Z")

# Amount text as the service writes it in its answers: AMOUNT_TEXT with at most
# 19 integer digits and 4 decimals (the currency says exactly how many).
ANSWER_AMOUNT = re.compile(r"(?:0|[1-9][0-9]{0,18})(?:\.([0-9]{1,4}))?\Z")
