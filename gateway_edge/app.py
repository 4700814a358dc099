"""The edge as a raw ASGI application.

    POST /direct/refund   the merchant endpoint (docs/api.md sections 2 and 4)
    POST /direct/query    the order and its transactions (docs/api.md section 7)
    GET  /healthz         200 only while the back end's grpc.health.v1 says SERVING
    GET  /openapi.json    the OpenAPI 3 document of this edge
    GET  /metrics         Prometheus metrics, only on the metrics listener (--metrics-listen), never
                          on the merchant port
    (HEAD wherever GET works)

The edge checks only the HTTP envelope: method, content type, body size, and
that the body is a JSON object with the strings `request` and `signature`. It
forwards the UTF-8 bytes of `request` exactly as decoded, with the signature,
to RefundService.MerchantRefund; the service verifies the signature over those
bytes and parses those same bytes. Every answer is JSON; nothing internal
(exception, back-end message, stack trace) reaches the merchant.

Before any call to the service: at most `max_in_flight` requests are answered
at once (beyond: 9001 at once), and a merchant over its rate limit gets 9002
with HTTP 429 and Retry-After (gateway_edge.policy). The merchant is the one
the request claims, read here only for the rate limit and the per-merchant
status mode; answers are HTTP 200 throughout for merchants in the vendor's
compatibility mode (StatusMode.ALWAYS_200).

Every response carries `X-Request-Id` (the client's, when sane, else a new
one; the service gets it as gRPC metadata) and, with a gateway key
configured, `X-Signature` over the exact body bytes. An `Idempotency-Key`
header on /direct/refund is checked here and passed on; the service keeps the
answers (the edge keeps no state).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway_edge import answers, envelope
from gateway_edge import metrics as edge_metrics
from gateway_edge.answers import Answer
from gateway_edge.limits import DEFAULT_MAX_IN_FLIGHT
from gateway_edge.policy import RateLimiter, StatusMode, StatusModes, claimed_merchant
from gateway_edge.signer import ResponseSigner
from refund.v1 import refund_pb2, refund_pb2_grpc
from refund_wire.codes import ResponseCode
from service import telemetry, tracing

log = logging.getLogger("refund-edge")

MAX_BODY_BYTES = 64 * 1024
DEFAULT_DEADLINE = 3.0
DEFAULT_BODY_TIMEOUT = 10.0
HEALTH_DEADLINE = 1.0
REFUND_PATH = "/direct/refund"
QUERY_PATH = "/direct/query"
METRICS_PATH = "/metrics"
# Routes polled by machines: their requests are logged at DEBUG only.
QUIET_PATHS = frozenset({"/healthz", METRICS_PATH})
_BACKEND_FAILURES = frozenset({ResponseCode.SERVICE_UNAVAILABLE, ResponseCode.SYSTEM_ERROR})
OPENAPI_PATH = Path(__file__).with_name("openapi.json")
BACKEND_SERVICE = refund_pb2.DESCRIPTOR.services_by_name["RefundService"].full_name

# Reconnect quickly after the back end restarts (gRPC's default backoff grows to 120 s).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Spread the calls over every address of the target, so that one edge can use several
    # refund-service processes ("ipv4:127.0.0.1:50051,127.0.0.1:50052"); one address: as before.
    ("grpc.lb_policy_name", "round_robin"),
)

_NO_STORE = (b"cache-control", b"no-store")
_RETRY_SOON = ((b"retry-after", b"1"),)
class _BodyTooLarge(Exception):
    pass


class _BodyTooSlow(Exception):
    pass


class _ClientGone(Exception):
    pass


class EdgeApp:
    """ASGI 3 application; one gRPC channel per process, opened at lifespan startup."""

    def __init__(self, grpc_target: str, *, deadline: float = DEFAULT_DEADLINE,
                 health_deadline: float = HEALTH_DEADLINE, max_body_bytes: int = MAX_BODY_BYTES,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT, signer: ResponseSigner | None = None,
                 grpc_credentials: grpc.ChannelCredentials | None = None,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, rate_limiter: RateLimiter | None = None,
                 status_modes: StatusModes | None = None, metrics_port: int | None = None):
        self.grpc_target = grpc_target
        self.max_in_flight = max_in_flight
        self.rate_limiter = rate_limiter if rate_limiter is not None and rate_limiter.active else None
        self.status_modes = status_modes or StatusModes()
        self._in_flight = 0
        self.metrics_port = metrics_port  # the local port of the metrics listener, if any
        self.signer = signer
        self.grpc_credentials = grpc_credentials
        self.deadline = deadline
        self.body_timeout = body_timeout
        self.health_deadline = min(health_deadline, deadline)
        self.max_body_bytes = max_body_bytes
        self.openapi = OPENAPI_PATH.read_bytes()
        self._channel: grpc.aio.Channel | None = None
        self._refunds: refund_pb2_grpc.RefundServiceStub | None = None
        self._health: health_pb2_grpc.HealthStub | None = None
        self._routes = {
            REFUND_PATH: {"POST": self._refund},
            QUERY_PATH: {"POST": self._query},
            "/healthz": {"GET": self._healthz, "HEAD": self._healthz},
            "/openapi.json": {"GET": self._openapi, "HEAD": self._openapi},
        }
        self._metrics_routes = {METRICS_PATH: {"GET": self._metrics, "HEAD": self._metrics}}
        self._durations = {path: edge_metrics.DURATION.labels(path)
                           for path in [*self._routes, *self._metrics_routes, "other"]}
        self._requests = telemetry.MetricChildren(lambda key: edge_metrics.REQUESTS.labels(key[0], str(key[1])))
        self._answers = {REFUND_PATH: telemetry.MetricChildren(edge_metrics.REFUNDS.labels),
                         QUERY_PATH: telemetry.MetricChildren(edge_metrics.QUERIES.labels)}
        self._backend_failures = telemetry.MetricChildren(edge_metrics.BACKEND_FAILURES.labels)

    # -- ASGI ---------------------------------------------------------------

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._open_channel()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _open_channel(self):
        if self._channel is None:
            if self.grpc_credentials is not None:
                self._channel = grpc.aio.secure_channel(self.grpc_target, self.grpc_credentials,
                                                        options=CHANNEL_OPTIONS)
            else:
                self._channel = grpc.aio.insecure_channel(self.grpc_target, options=CHANNEL_OPTIONS)
            self._refunds = refund_pb2_grpc.RefundServiceStub(self._channel)
            self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self):
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close(grace=1.0)

    async def _http(self, scope, receive, send):
        request_id = telemetry.sane_request_id(envelope.header(scope, b"x-request-id")) or telemetry.new_request_id()
        token = telemetry.REQUEST_ID.set(request_id)
        responder = _Responder(send, request_id, self.signer,
                               always_200=self.status_modes.default is StatusMode.ALWAYS_200)
        started = time.perf_counter()
        if self._in_flight >= self.max_in_flight:  # overloaded: answer at once, read nothing
            edge_metrics.OVERLOAD.inc()
            try:
                await responder.answer(answers.overloaded())
            finally:
                self._observe(scope, responder, time.perf_counter() - started)
                telemetry.REQUEST_ID.reset(token)
            return
        self._in_flight += 1
        edge_metrics.IN_FLIGHT.inc()
        try:
            await self._route(scope, receive, responder)
        finally:
            self._in_flight -= 1
            edge_metrics.IN_FLIGHT.dec()
            self._observe(scope, responder, time.perf_counter() - started)
            telemetry.REQUEST_ID.reset(token)

    def _observe(self, scope, responder: _Responder, elapsed: float) -> None:
        """Metrics and the log line of one request (never its body or headers)."""
        path = scope["path"] if scope["path"] in self._routes or scope["path"] in self._metrics_routes else "other"
        self._durations[path].observe(elapsed)
        status = responder.status or 499  # 499: the client went away before an answer
        self._requests[path, status].inc()
        code = responder.response_code
        if code is not None:
            answers_of_path = self._answers.get(path)
            if answers_of_path is not None:
                answers_of_path[code.value].inc()
            if code in _BACKEND_FAILURES:
                self._backend_failures[code.value].inc()
        level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
        if log.isEnabledFor(level):
            fields = {"method": scope["method"], "path": path, "status": status,
                      "duration_ms": round(elapsed * 1000, 3)}
            if code is not None:
                fields["response_code"] = code.value
            log.log(level, "%s %s %s", scope["method"], path, status, extra={"fields": fields})

    async def _route(self, scope, receive, responder: _Responder):
        try:
            routes = self._routes
            if self.metrics_port is not None and (scope.get("server") or (None, None))[1] == self.metrics_port:
                routes = self._metrics_routes
            methods = routes.get(scope["path"])
            if methods is None:
                await responder.answer(answers.invalid_request("no such endpoint", 404))
                return
            handler = methods.get(scope["method"])
            if handler is None:
                allow = ", ".join(methods).encode("ascii")
                await responder.answer(
                    answers.invalid_request(f"method {scope['method']} is not allowed here", 405),
                    ((b"allow", allow),))
                return
            await handler(scope, receive, responder)
        except _ClientGone:
            return
        except Exception:
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if not responder.started:
                await responder.answer(answers.system_error())

    # -- POST /direct/refund, POST /direct/query --------------------------------

    async def _refund(self, scope, receive, responder: _Responder):
        key = envelope.idempotency_key(scope)
        if isinstance(key, Answer):
            await responder.answer(key)
            return
        await self._forward(scope, receive, responder, "MerchantRefund", refund_pb2.MerchantRefundRequest,
                            answers.from_reply, idempotency_key=key)

    async def _query(self, scope, receive, responder: _Responder):
        await self._forward(scope, receive, responder, "MerchantGetOrder", refund_pb2.MerchantGetOrderRequest,
                            answers.from_order_reply)

    async def _forward(self, scope, receive, responder: _Responder, method: str, request_type, to_answer,
                       **fields):
        """Read the signed envelope, call `method` of RefundService with it as a
        `request_type` message (and the request id), and answer what the service
        replied."""
        envelope = await self._signed_envelope(scope, receive, responder)
        if envelope is None:
            return
        request, signature = envelope
        merchant = None
        if self.rate_limiter is not None or self.status_modes.per_merchant:
            merchant = claimed_merchant(request)
            responder.always_200 = self.status_modes.of(merchant) is StatusMode.ALWAYS_200
        if merchant is not None and self.rate_limiter is not None:
            wait = self.rate_limiter.take(merchant)
            if wait is not None:
                edge_metrics.RATE_LIMITED.inc()
                retry_after = max(1, math.ceil(wait))
                await responder.answer(answers.rate_limited(retry_after),
                                       ((b"retry-after", str(retry_after).encode("ascii")),))
                return
        self._open_channel()
        try:
            reply = await getattr(self._refunds, method)(
                request_type(request=request, signature=signature, **fields),
                timeout=self.deadline, metadata=((telemetry.METADATA_KEY, responder.request_id),))
        except grpc.RpcError as error:
            answer = answers.from_rpc_error(error)
        else:
            answer = to_answer(reply)
        if merchant is not None and self.rate_limiter is not None \
                and answer.code is ResponseCode.AUTHENTICATION_FAILED:
            self.rate_limiter.give_back(merchant)  # not this merchant's request: a forger spends nothing of its budget
        await self._answer(responder, answer)

    @staticmethod
    async def _answer(responder: _Responder, answer: Answer):
        try:
            await responder.answer(answer)
        except answers.UnrenderableAnswer as exc:
            log.error("cannot render the back end's answer (%s): %s", answer.code.name, exc)
            await responder.answer(answers.system_error())

    async def _signed_envelope(self, scope, receive, responder: _Responder) -> tuple[bytes, str] | None:
        """(request bytes, signature) of the signed envelope; None once the
        request has been answered with what is wrong with it."""
        if not envelope.is_json(envelope.header(scope, b"content-type")):
            await responder.answer(answers.invalid_request("Content-Type must be application/json", 415))
            return None
        try:
            body = await self._read_body(scope, receive)
        except _BodyTooLarge:
            await responder.answer(answers.invalid_request(
                f"the body is larger than {self.max_body_bytes} bytes", 413))
            return None
        except _BodyTooSlow:
            await responder.answer(answers.invalid_request(
                f"the body did not arrive within {self.body_timeout:g} seconds", 408), ((b"connection", b"close"),))
            return None
        parsed = envelope.parse(body)
        if isinstance(parsed, Answer):
            await responder.answer(parsed)
            return None
        return parsed

    async def _read_body(self, scope, receive) -> bytes:
        """The whole body, refusing it as soon as it is known to exceed the cap,
        or when it does not arrive within the body timeout (a trickling client)."""
        declared = envelope.header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _BodyTooLarge()
        try:
            async with asyncio.timeout(self.body_timeout):
                return await self._receive_body(receive)
        except TimeoutError:
            raise _BodyTooSlow() from None

    async def _receive_body(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _BodyTooLarge()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    # -- GET /healthz, GET /openapi.json --------------------------------------

    async def _healthz(self, scope, receive, responder: _Responder):
        self._open_channel()
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=BACKEND_SERVICE),
                                             timeout=self.health_deadline)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as error:
            serving, state = False, "UNREACHABLE"
            log.warning("health check of the back end: %s", error.code().name)
        body = b'{"status":"%s"}' % state.encode("ascii")
        await responder.send(200 if serving else 503, body)

    async def _openapi(self, scope, receive, responder: _Responder):
        await responder.send(200, self.openapi)

    async def _metrics(self, scope, receive, responder: _Responder):
        content_type = edge_metrics.CONTENT_TYPE.encode("ascii")
        await responder.send(200, edge_metrics.exposition(), content_type=content_type)


class _Responder:
    """Sends one response (JSON unless told otherwise), with X-Request-Id and,
    with a signer, X-Signature; remembers its status and response code."""

    def __init__(self, send, request_id: str, signer: ResponseSigner | None = None, *, always_200: bool = False):
        self._send = send
        self.always_200 = always_200  # the vendor's compatibility mode: every answer with a code is HTTP 200
        self.request_id = request_id
        self._request_id_header = (b"x-request-id", request_id.encode("ascii"))
        self._signer = signer
        self.started = False
        self.status: int | None = None
        self.response_code: ResponseCode | None = None

    async def answer(self, answer: Answer, extra_headers=()):
        body = answers.render(answer)
        self.response_code = answer.code
        if answer.code is ResponseCode.SERVICE_UNAVAILABLE and not extra_headers:
            extra_headers = _RETRY_SOON  # safe to retry: say when
        await self.send(200 if self.always_200 else answer.status, body, extra_headers)

    async def send(self, status: int, body: bytes, extra_headers=(), content_type: bytes = b"application/json"):
        headers = [(b"content-type", content_type), _NO_STORE, (b"content-length", str(len(body)).encode("ascii")),
                   *extra_headers, self._request_id_header]
        if self._signer is not None:
            headers.append((b"x-signature", self._signer.signature(body)))
        self.started = True
        self.status = status
        if tracing.ENABLED:  # on the request's span, which ends with the response
            tracing.annotate(self.request_id, self.response_code.value if self.response_code is not None else None)
        await self._send({"type": "http.response.start", "status": status, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})
