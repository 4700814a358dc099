"""What keeps refund-edge bounded when the open internet misbehaves: limits
at the HTTP connection level, below the ASGI application.

uvicorn's httptools protocol has no cap on connections (each takes a file
descriptor and memory until the client leaves), no limit on the size of a
request head (httptools keeps growing a header value until it ends) and no
timeout for a head that never ends. `guarded_protocol` adds them:

- at most `max_connections` open connections. A new one beyond that sheds the
  connection that has been idle longest: waiting for a first request, for the
  next request on a keep-alive connection, or still sending a head. A
  connection with a request being answered is never shed; when all are busy
  the new connection gets 503 with code 9001 at once and is closed;
- a request head (request line and headers) of at most `max_header_bytes`:
  beyond that 431 with code 1001 and the connection is closed. What is kept
  of a head is bounded by the limit plus one read of the socket;
- a head must be complete within `header_timeout` seconds of the connection
  opening or of its first byte: otherwise 408 with code 1001 (or a silent
  close when nothing at all was sent) and the connection is closed;
- an idle keep-alive connection is closed after `keep_alive_timeout` seconds
  (uvicorn's own timer).

The body timeout, the body size and the cap on requests in flight are the
application's (gateway_edge.app). Every refusal is counted in
refund_edge_connections_refused_total{reason} and logged at most once a
minute per reason.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway_edge import answers
from gateway_edge import metrics as edge_metrics
from gateway_edge.signer import ResponseSigner
from service import telemetry

log = logging.getLogger("refund-edge")

DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_IN_FLIGHT = 256
DEFAULT_MAX_HEADER_BYTES = 16 * 1024
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_KEEP_ALIVE_TIMEOUT = 5.0
WARNING_INTERVAL = 60.0


@dataclass(frozen=True)
class EdgeLimits:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT


class _Refusals:
    """The canned answers of the connection level, rendered (and signed) once."""

    def __init__(self, limits: EdgeLimits, signer: ResponseSigner | None, always_200: bool):
        self._signer = signer
        self._always_200 = always_200
        self.over_capacity = self._render(answers.Answer(
            answers.ResponseCode.SERVICE_UNAVAILABLE, "the gateway is at its connection limit; retry shortly "
            "(an order is never refunded twice)"), (b"retry-after", b"1"))
        self.header_too_large = self._render(answers.invalid_request(
            f"the request head is larger than {limits.max_header_bytes} bytes", 431))
        self.header_timeout = self._render(answers.invalid_request(
            f"the request head did not arrive within {limits.header_timeout:g} seconds", 408))

    def _render(self, answer: answers.Answer, *extra: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
        """(the response up to the request id header, the rest): the request id is new for each."""
        body = answers.render(answer)
        status = 200 if self._always_200 else answer.status
        head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"")),
                b"content-type: application/json\r\ncache-control: no-store\r\nconnection: close\r\n",
                b"content-length: %d\r\n" % len(body)]
        head += [name + b": " + value + b"\r\n" for name, value in extra]
        if self._signer is not None:
            head.append(b"x-signature: " + self._signer.signature(body) + b"\r\n")
        return b"".join(head), b"\r\n" + body


_REASONS = {200: b"OK", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}


class ConnectionGuard:
    """The open connections of one server, the idle ones ordered by how long
    they have been idle."""

    def __init__(self, limits: EdgeLimits, refusals: _Refusals):
        self.limits = limits
        self.refusals = refusals
        self.open = 0
        self._idle: OrderedDict[GuardedProtocol, None] = OrderedDict()
        self._warned: dict[str, float] = {}

    def opened(self, protocol: GuardedProtocol) -> bool:
        """Count a new connection; False when it must be refused (all others busy)."""
        self.open += 1
        self._idle[protocol] = None
        if self.open > self.limits.max_connections:
            victim = next(iter(self._idle))
            if victim is protocol:
                self.refused(protocol, "over_capacity")
                return False
            self.refused(victim, "shed_idle")
            victim.shed()
        edge_metrics.OPEN_CONNECTIONS.set(self.open)
        return True

    def closed(self, protocol: GuardedProtocol) -> None:
        self._idle.pop(protocol, None)
        if not protocol.uncounted:
            protocol.uncounted = True
            self.open -= 1
            edge_metrics.OPEN_CONNECTIONS.set(self.open)

    def busy(self, protocol: GuardedProtocol) -> None:
        self._idle.pop(protocol, None)

    def idle(self, protocol: GuardedProtocol) -> None:
        if not protocol.uncounted:
            self._idle[protocol] = None
            self._idle.move_to_end(protocol)

    def refused(self, protocol: GuardedProtocol, reason: str) -> None:
        edge_metrics.CONNECTIONS_REFUSED.labels(reason).inc()
        self.closed(protocol)
        now = time.monotonic()
        if now - self._warned.get(reason, -WARNING_INTERVAL) >= WARNING_INTERVAL:
            self._warned[reason] = now
            log.warning("connection refused (%s); %d open of at most %d (further refusals of this kind are only "
                        "counted, in refund_edge_connections_refused_total, for %gs)", reason, self.open,
                        self.limits.max_connections, WARNING_INTERVAL)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of this module. `guard` is
    set on the subclass that `guarded_protocol` makes."""

    guard: ConnectionGuard

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.uncounted = False
        self._refused = False
        self._in_head = True
        self._head_bytes = 0  # bytes received while the current head is not complete (an upper bound)
        self._head_size = 0  # the head as parsed so far: URL, names and values
        self._head_timer = None

    # -- connection -----------------------------------------------------------

    def connection_made(self, transport):
        super().connection_made(OneSendPerTick(transport, self.loop))
        if not self.guard.opened(self):
            self._refuse(self.guard.refusals.over_capacity)
            return
        self._arm_head_timer()

    def connection_lost(self, exc):
        self._cancel_head_timer()
        self.guard.closed(self)
        super().connection_lost(exc)

    def shed(self) -> None:
        """Closed to make room for a new connection (this one was idle the longest)."""
        self._refused = True
        self._cancel_head_timer()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        else:
            self.transport.close()

    def _refuse(self, canned: tuple[bytes, bytes], reason: str | None = None) -> None:
        if self._refused:
            return
        self._refused = True
        self._cancel_head_timer()
        if reason is not None:
            self.guard.refused(self, reason)
        if self.cycle is None or self.cycle.response_complete:
            head, rest = canned
            self.transport.write(head + b"x-request-id: " + telemetry.new_request_id().encode("ascii") + b"\r\n"
                                 + rest)
        self.transport.close()

    # -- the request head -------------------------------------------------------

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.guard.limits.header_timeout, self._head_too_slow)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._head_bytes:
            self._refuse(self.guard.refusals.header_timeout, "header_timeout")
        else:  # nothing sent at all: just close
            self.guard.refused(self, "idle_timeout")
            self._refused = True
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and not self._refused:
            if self._head_bytes > self.guard.limits.max_header_bytes:
                self._refuse(self.guard.refusals.header_too_large, "header_too_large")
            else:  # a head is still coming: from now on it has header_timeout to end
                self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        if self._head_size > self.guard.limits.max_header_bytes:
            self._refuse(self.guard.refusals.header_too_large, "header_too_large")
            return
        self.guard.busy(self)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.guard.idle(self)


class OneSendPerTick:
    """A transport whose writes within one turn of the event loop leave in one
    send: uvicorn writes a response's head and its body separately, and each
    send on a TCP socket is a system call and a trip through the network stack
    (of this machine's both ends, on loopback). Everything else is the transport's."""

    __slots__ = ("_transport", "_loop", "_pending")

    def __init__(self, transport, loop):
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self._flush)
        else:
            self._pending.append(data)

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def _flush(self) -> None:
        if self._pending is not None:
            data = b"".join(self._pending)
            self._pending = None
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def __getattr__(self, name):
        return getattr(self._transport, name)


def guarded_protocol(limits: EdgeLimits, signer: ResponseSigner | None = None, *,
                     always_200: bool = False) -> type[GuardedProtocol]:
    """A protocol class for uvicorn.Config(http=...) with `limits` (one guard per server)."""
    guard = ConnectionGuard(limits, _Refusals(limits, signer, always_200))
    return type("EdgeHttpProtocol", (GuardedProtocol,), {"guard": guard})
