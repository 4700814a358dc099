"""Honest health for refund-service (grpc.health.v1).

- Readiness, health names `""` and `refund.v1.RefundService`: SERVING only while
  the database answers (a probe every --readiness-interval seconds, bounded by
  --db-timeout) and the process is not draining. NOT_SERVING from the start
  until the first probe passes, while the database is unreachable, and from
  SIGTERM on. A load balancer or orchestrator routes calls by it.
- Liveness, health name `liveness`: SERVING while the process runs, whatever
  the database does, until the listener closes. Restart the process only when
  this fails (a restart does not bring a database back).

On SIGTERM readiness turns NOT_SERVING at once; after the pre-stop period the
open `Watch` streams are ended (each has seen NOT_SERVING) so that they cannot
hold the drain open, and then the listener closes.

Metrics: refund_service_ready (1 while readiness is SERVING) and
refund_service_database_unreachable_total (times readiness turned NOT_SERVING
because the database stopped answering).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from grpc_health.v1 import health, health_pb2
from prometheus_client import Counter, Gauge

from service import telemetry, tracing
from service.startup import StartupError
from service.stores.port import StoreUnavailable

log = logging.getLogger("refund-service")

LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

READY = Gauge("refund_service_ready", "1 while health (readiness) answers SERVING: the database answers and the "
                                      "process is not draining; else 0")
DATABASE_UNREACHABLE = Counter("refund_service_database_unreachable",
                               "Times readiness turned NOT_SERVING because the database stopped answering")


class ServiceHealth(health.aio.HealthServicer):
    """The health servicer: readiness names start NOT_SERVING, `liveness` SERVING;
    a graceful shutdown keeps liveness; `end_watches` ends every open Watch."""

    def __init__(self, readiness_names=("",)):
        super().__init__()
        self.readiness_names = tuple(readiness_names)
        self._server_status = {name: NOT_SERVING for name in self.readiness_names}
        self._server_status[LIVENESS] = SERVING
        self._watches_ended = False
        READY.set(0)

    @property
    def ready(self) -> bool:
        return all(self._server_status.get(name) == SERVING for name in self.readiness_names)

    async def set_ready(self, ready: bool) -> None:
        if self._gracefully_shutting_down:
            return
        for name in self.readiness_names:
            await self.set(name, SERVING if ready else NOT_SERVING)
        READY.set(1 if ready else 0)

    async def enter_graceful_shutdown(self) -> None:
        """Readiness NOT_SERVING for good (later `set` calls are ignored); liveness stays SERVING."""
        if self._gracefully_shutting_down:
            return
        for name in list(self._server_status):
            if name != LIVENESS:
                await self._set(name, NOT_SERVING)
        self._gracefully_shutting_down = True
        READY.set(0)

    async def end_watches(self) -> None:
        """End every open Watch stream (each returns OK after its last status)."""
        self._watches_ended = True
        for condition in list(self._server_watchers.values()):
            async with condition:
                condition.notify_all()

    async def Watch(self, request, context) -> None:
        # grpc_health's Watch, except that it returns once end_watches was called.
        condition = self._server_watchers[request.service]
        self._watcher_count_by_service[request.service] += 1
        last_status = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(request.service, UNKNOWN)
                    if status != last_status:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last_status = status
                    if self._watches_ended:
                        return
                    await condition.wait()
        finally:
            self._watcher_count_by_service[request.service] -= 1
            if self._watcher_count_by_service[request.service] == 0:
                del self._server_watchers[request.service]
                del self._watcher_count_by_service[request.service]


async def follow_database(health_servicer: ServiceHealth, probe: Callable[[], Awaitable[None]], *,
                          interval: float, timeout: float) -> None:
    """Run `probe` every `interval` seconds and set readiness from it, until
    cancelled. A StartupError that is not transient (the schema is behind, the
    database was dropped) is raised: the process cannot serve and must say so."""
    reachable: bool | None = True if health_servicer.ready else None
    while True:
        reason = ""
        try:
            with tracing.untraced():  # a probe is no request: it makes no trace
                await asyncio.wait_for(probe(), timeout)
            ok = True
        except StartupError as exc:
            if not exc.transient:
                raise
            ok, reason = False, str(exc)
        except (TimeoutError, StoreUnavailable, OSError) as exc:
            ok, reason = False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except Exception as exc:  # a probe must never end readiness tracking
            ok, reason = False, telemetry.describe_exception(exc)
        if ok != reachable:
            if ok:
                log.info("the database answers: health SERVING")
            else:
                if reachable is not None:
                    DATABASE_UNREACHABLE.inc()
                log.warning("the database does not answer: health NOT_SERVING (%s)", reason)
            reachable = ok
            await health_servicer.set_ready(ok)
        await asyncio.sleep(interval)
