"""Structured logs and request ids, shared by refund-service and refund-edge.

Every log line is one JSON object on stderr:

    {"time": "2026-11-26T11:41:19.123Z", "level": "INFO", "logger": "refund-edge",
     "message": "POST /direct/refund", "request_id": "5f0c...", ...fields}

`request_id` is the id of the request being served (a context variable):
the edge takes it from a sane `X-Request-Id` header or makes one, sends it to
the service as gRPC metadata `x-request-id`, and returns it in the response
header. Extra fields are passed as `log.info(..., extra={"fields": {...}})`.

What never reaches a log line: request bodies and signatures (no code logs
them), card numbers (any 13-19 digit run that passes the Luhn check is
replaced, as defence in depth), long base64 runs (a signature or a key), and
stack traces (an exception is shown as its type and the file and line where
it was raised, never its message, which might quote data).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import sys
import time

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
METADATA_KEY = "x-request-id"

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}\Z")
_CARD_CANDIDATE = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")
_LONG_BASE64 = re.compile(r"[A-Za-z0-9+/]{80,}={0,2}")
CARD_REDACTED = "[card number removed]"
BASE64_REDACTED = "[base64 removed]"


def new_request_id() -> str:
    return os.urandom(12).hex()


def sane_request_id(value: str | None) -> str | None:
    """The value when it is a usable request id (1-128 of A-Z a-z 0-9 . _ : -,
    and not a card number), else None."""
    if value is None or not _SANE_REQUEST_ID.match(value) or scrub(value) != value:
        return None
    return value


def _luhn(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card_or_keep(match: re.Match) -> str:
    digits = match.group(0).replace(" ", "").replace("-", "")
    return CARD_REDACTED if 13 <= len(digits) <= 19 and _luhn(digits) else match.group(0)


def scrub(text: str) -> str:
    """`text` without card numbers and long base64 runs."""
    if len(text) >= 13:
        text = _CARD_CANDIDATE.sub(_card_or_keep, text)
        if len(text) >= 80:
            text = _LONG_BASE64.sub(BASE64_REDACTED, text)
    return text


def describe_exception(exc: BaseException) -> str:
    """`KeyError at service/grpc_api.py:123`: the type and where it was raised."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return type(exc).__name__
    path = tb.tb_frame.f_code.co_filename.replace(os.sep, "/").split("/")
    return f"{type(exc).__name__} at {'/'.join(path[-2:])}:{tb.tb_lineno}"


class MetricChildren(dict):
    """A Prometheus metric's children by label value, each looked up once (`labels()`
    takes a lock and builds a key on every call): children[value].inc(). Only for
    label values from a fixed set (codes, paths, statuses), never from a request."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, key):
        child = self[key] = self._make(key)
        return child


class JsonFormatter(logging.Formatter):
    _encode = json.JSONEncoder(ensure_ascii=False, default=str).encode

    def __init__(self):
        super().__init__()
        self._second = (None, "")  # the last second formatted, and its text (one tuple: threads share it)

    def _time(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        second = self._second
        if second[0] != seconds:
            second = self._second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
        return f"{second[1]}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self._time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            entry["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if fields:
            for name, value in fields.items():
                entry[name] = scrub(value) if isinstance(value, str) else value
        if record.exc_info and record.exc_info[1] is not None:
            entry["error"] = describe_exception(record.exc_info[1])
        return self._encode(entry)


def configure_logging(level: str = "info", stream=None) -> None:
    """JSON lines on stderr for the root logger (and so for grpc and uvicorn)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    # A log record need not know the process, thread or multiprocessing name
    # (os.getpid() per record is measurable on a busy edge), nor the file and line
    # that logged it, which the JSON line does not show: without _srcfile logging
    # skips walking the stack for them (the logging HOWTO's "Optimization"; a line
    # 26.5 -> 22.5 us alone).
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
