"""The one HTTP client of the tests.

`http_request` is one exchange over http.client (TLS when given a CA file);
`post` / `post_many` are its asyncio twin for storms, keeping a thousand
requests in flight on fresh connections. Both answer with a `Reply`.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from refund_wire import strict_json


@dataclass
class Reply:
    """One HTTP exchange: `status` 0 when no HTTP answer came (`error` says why)."""

    status: int
    headers: dict
    body: bytes
    elapsed: float
    error: str = ""
    request: bytes = b""
    tag: object = None
    _json: object = field(default=None, repr=False)

    @property
    def json(self):
        """The body parsed strictly: every number a Decimal, so types and precision show."""
        if self._json is None:
            self._json = strict_json.loads(self.body)
        return self._json

    @property
    def code(self) -> str:
        """The answer's responseCode, or what stood in the way of reading one."""
        if self.status == 0:
            return "no-answer:" + self.error
        try:
            return json.loads(self.body)["responseCode"]
        except (ValueError, KeyError, TypeError):
            return f"unparsable:{self.status}"


def http_request(host: str, port: int, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None, timeout: float = 30.0, *, ca_path: Path | None = None) -> Reply:
    """One request on a fresh connection (HTTPS checked against `ca_path` when given)."""
    if ca_path is None:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    else:
        context = ssl.create_default_context(cafile=str(ca_path))
        connection = http.client.HTTPSConnection(host, port, context=context, timeout=timeout)
    started = time.monotonic()
    try:
        headers = headers or {}
        chunked = headers.get("Transfer-Encoding") == "chunked"
        connection.request(method, path, body=body, headers=headers, encode_chunked=chunked)
        response = connection.getresponse()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data,
                     time.monotonic() - started)
    finally:
        connection.close()


async def post(address: str, body: bytes, *, path: str = "/direct/refund", timeout: float = 60.0,
               content_type: str = "application/json", tag=None) -> Reply:
    """POST `body` on a fresh connection and read the whole answer."""
    host, port = address.rsplit(":", 1)
    started = time.monotonic()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, int(port))
            head = (f"POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("latin-1")
            writer.write(head + body)
            await writer.drain()
            status_line = await reader.readline()
            headers = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            payload = await reader.readexactly(length)
            status = int(status_line.split()[1])
            return Reply(status, headers, payload, time.monotonic() - started, request=body, tag=tag)
    except (OSError, asyncio.IncompleteReadError, TimeoutError, IndexError, ValueError) as exc:
        return Reply(0, {}, b"", time.monotonic() - started, type(exc).__name__, request=body, tag=tag)
    finally:
        if writer is not None:
            writer.close()


async def post_all(addresses: list[str], bodies: list[bytes], *, timeout: float = 60.0, tags=None,
                   concurrency: int | None = None) -> list[Reply]:
    """Every body at once (or at most `concurrency` at a time), round-robin
    over the edges; answers in order."""
    tags = tags or [None] * len(bodies)
    limit = asyncio.Semaphore(concurrency or len(bodies) or 1)

    async def one(i: int, body: bytes) -> Reply:
        async with limit:
            return await post(addresses[i % len(addresses)], body, timeout=timeout, tag=tags[i])

    return await asyncio.gather(*(one(i, body) for i, body in enumerate(bodies)))


def post_many(addresses: list[str], bodies: list[bytes], **kwargs) -> list[Reply]:
    return asyncio.run(post_all(addresses, bodies, **kwargs))


def latency_summary(answers: list[Reply]) -> str:
    times = sorted(a.elapsed for a in answers)
    if not times:
        return "no calls"
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return f"p50 {pick(0.5) * 1000:.0f} ms, p99 {pick(0.99) * 1000:.0f} ms, max {times[-1] * 1000:.0f} ms"
