"""`refund-relay`: publishes the event outbox to NATS JetStream (docs/events.md).

Each event (a journal entry, numbered by service/outbox.py) is published
twice, in sequence order:
- as the protobuf `refund.v1.Event` on `PREFIX.events.TYPE.MERCHANT`, stream
  PREFIX_EVENTS (header Content-Type: application/protobuf);
- as a CloudEvents 1.0 JSON document (structured mode) on
  `PREFIX.cloudevents.TYPE.MERCHANT`, stream PREFIX_CLOUDEVENTS, for
  consumers that are not protobuf-aware.
Both carry `Nats-Msg-Id: <event id>`: JetStream drops a message whose id it
has stored within the stream's duplicate window (DUPLICATE_WINDOW), so a
relay that dies between the broker's acknowledgement and recording its
position re-publishes nothing twice.

Each publish waits for JetStream's acknowledgement (the message is stored)
before the next, so the stream holds the events in sequence order; the
relay's position (`event_relays.last_sequence`) moves only past events the
broker acknowledged, after each batch. Several relays may run: the one that
holds the PostgreSQL advisory lock of its name publishes, the others stand
by and take over when its session ends (the process died or lost the
database). Each relay also runs the outbox's sequencer loop (one process in
the cluster numbers events at a time).

With --metrics-listen it serves Prometheus metrics: the outbox lag
(`refund_outbox_oldest_unpublished_age_seconds`, alert rule in
ops/prometheus/events_alerts.yml), unpublished events, leadership, published
events and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from datetime import UTC

import nats
import nats.errors
import nats.js.errors
from google.protobuf import json_format
from prometheus_client import Counter, Gauge

from service import config, events, metrics, outbox, startup, telemetry
from service.startup import StartupError

log = logging.getLogger("refund-relay")

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_PREFIX = "refund"
BATCH = 200
# JetStream's duplicate window: a re-publish within it is dropped by the broker.
DUPLICATE_WINDOW = 15 * 60
PUBLISH_TIMEOUT = 5.0
IDLE_POLL = 0.05
RETRY_PAUSE = 0.5
LAG_EVERY = 1.0

OLDEST_UNPUBLISHED_AGE = Gauge("refund_outbox_oldest_unpublished_age_seconds",
                               "Age of the oldest event the relay has not published (0: none)", ["relay"])
UNPUBLISHED = Gauge("refund_outbox_unpublished_events", "Events not yet published by the relay", ["relay"])
LEADER = Gauge("refund_relay_leader", "1 while this relay holds its lock and publishes", ["relay"])
PUBLISHED = Counter("refund_relay_published_events_total", "Events published and acknowledged (both forms)",
                    ["relay"])
DUPLICATES = Counter("refund_relay_duplicate_acks_total", "Publishes the broker acknowledged as duplicates",
                     ["relay"])
ERRORS = Counter("refund_relay_errors_total", "Publish or database errors (the relay retries)", ["relay", "kind"])

READ = f"SELECT {events.COLUMNS} FROM events WHERE seq > $1 ORDER BY seq LIMIT {BATCH}"
POSITION = """
INSERT INTO event_relays (name, last_sequence, updated_at) VALUES ($1, 0, now())
ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING last_sequence"""
ADVANCE = """
UPDATE event_relays SET last_sequence = $3, updated_at = now() WHERE name = $1 AND last_sequence = $2"""
# The outbox lag for a relay: (age in seconds of its oldest unpublished event, how many are unpublished).
LAG = """
SELECT COALESCE(EXTRACT(EPOCH FROM now() - (SELECT e.created_at FROM events e WHERE e.seq > p.last ORDER BY e.seq
                                             LIMIT 1)), 0)::float8,
       GREATEST((SELECT COALESCE(MAX(seq), 0) FROM event_sequence) - p.last, 0)
FROM (SELECT COALESCE((SELECT last_sequence FROM event_relays WHERE name = $1), 0) AS last) p"""
LOCK = "SELECT pg_try_advisory_lock(hashtextextended('refund-relay:' || $1, 0))"


def stream_names(prefix: str) -> tuple[str, str]:
    base = prefix.upper().replace(".", "_").replace("-", "_")
    return f"{base}_EVENTS", f"{base}_CLOUDEVENTS"


def subjects(prefix: str, event) -> tuple[str, str]:
    tail = f"{event.type.lower()}.{event.merchant_id}"
    return f"{prefix}.events.{tail}", f"{prefix}.cloudevents.{tail}"


def cloudevent(event, source: str) -> bytes:
    """The event as a CloudEvents 1.0 JSON document (structured content mode)."""
    moment = event.time.ToDatetime(tzinfo=UTC)
    document = {
        "specversion": "1.0",
        "id": event.event_id,
        "source": source,
        "type": f"refund.v1.{event.type.lower()}",
        "subject": f"merchants/{event.merchant_id}",
        "time": moment.isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "sequence": str(event.sequence),
        "data": json_format.MessageToDict(event, preserving_proto_field_name=True),
    }
    return json.dumps(document, separators=(",", ":")).encode()


class Relay:
    def __init__(self, database_url: str, nats_url: str, prefix: str = DEFAULT_PREFIX, name: str = "nats",
                 source: str = "/refund-gateway/refund-service", db_timeout: float = 5.0):
        self.database_url, self.nats_url, self.prefix, self.name = database_url, nats_url, prefix, name
        self.source = source
        self._connect = outbox.connector(database_url, db_timeout, application_name="refund-relay",
                                         settings={"plan_cache_mode": "force_custom_plan"})
        self._stop = asyncio.Event()
        self.leader = False
        LEADER.labels(name).set(0)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        sequencer = outbox.Sequencer(outbox.connector(self.database_url, application_name="refund-relay-sequencer"))
        sequencer.start()
        lag = asyncio.get_running_loop().create_task(self._report_lag())
        try:
            while not self._stop.is_set():
                try:
                    await self._lead()
                except (*outbox.RECONNECT_ON, nats.errors.Error, nats.js.errors.Error) as exc:
                    ERRORS.labels(self.name, type(exc).__name__).inc()
                    log.warning("relay: %s; retrying", type(exc).__name__)
                    await self._pause(RETRY_PAUSE)
        finally:
            lag.cancel()
            await sequencer.stop()

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass

    async def _lead(self) -> None:
        """Take the lock of this relay's name, then publish until stopped or an error."""
        conn = await self._connect()
        broker = None
        try:
            while not await conn.fetchval(LOCK, self.name):
                if self._stop.is_set():
                    return
                await self._pause(RETRY_PAUSE)
            broker = await nats.connect(self.nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                        connect_timeout=2, allow_reconnect=True, name=f"refund-relay-{self.name}")
            stream = broker.jetstream(timeout=PUBLISH_TIMEOUT)
            await self._ensure_streams(stream)
            self.leader = True
            LEADER.labels(self.name).set(1)
            log.info("relay %s: publishing to %s", self.name, self.nats_url)
            position = await conn.fetchval(POSITION, self.name)
            while not self._stop.is_set():
                rows = await conn.fetch(READ, position)
                for row in rows:
                    await self._publish(stream, events.event_message(tuple(row)))
                if rows:
                    last = rows[-1]["seq"]
                    if await conn.execute(ADVANCE, self.name, position, last) != "UPDATE 1":
                        raise RuntimeError("another relay moved this relay's position")  # cannot happen under the lock
                    position = last
                if len(rows) < BATCH:
                    await self._pause(IDLE_POLL)
        finally:
            self.leader = False
            LEADER.labels(self.name).set(0)
            if broker is not None:
                try:
                    await asyncio.wait_for(broker.close(), 2)
                except Exception:  # noqa: BLE001 - a broker that went away
                    pass
            conn.terminate()  # the advisory lock goes with the session

    async def _ensure_streams(self, stream) -> None:
        proto_name, cloud_name = stream_names(self.prefix)
        for name, subject in ((proto_name, f"{self.prefix}.events.>"), (cloud_name, f"{self.prefix}.cloudevents.>")):
            try:
                await stream.stream_info(name)
            except nats.js.errors.NotFoundError:
                await stream.add_stream(name=name, subjects=[subject], duplicate_window=DUPLICATE_WINDOW)

    async def _publish(self, stream, event) -> None:
        proto_subject, cloud_subject = subjects(self.prefix, event)
        acks = [
            await stream.publish(proto_subject, event.SerializeToString(), timeout=PUBLISH_TIMEOUT,
                                 headers={"Nats-Msg-Id": event.event_id, "Content-Type": "application/protobuf",
                                          "Refund-Event-Type": event.type,
                                          "Refund-Event-Sequence": str(event.sequence)}),
            await stream.publish(cloud_subject, cloudevent(event, self.source), timeout=PUBLISH_TIMEOUT,
                                 headers={"Nats-Msg-Id": event.event_id,
                                          "Content-Type": "application/cloudevents+json"}),
        ]
        PUBLISHED.labels(self.name).inc()
        if any(ack.duplicate for ack in acks):
            DUPLICATES.labels(self.name).inc()

    async def _report_lag(self) -> None:
        conn = None
        while True:
            try:
                if conn is None:
                    conn = await self._connect()
                age, unpublished = await conn.fetchrow(LAG, self.name)
                OLDEST_UNPUBLISHED_AGE.labels(self.name).set(age)
                UNPUBLISHED.labels(self.name).set(unpublished)
            except outbox.RECONNECT_ON:
                if conn is not None:
                    conn.terminate()
                conn = None
            await asyncio.sleep(LAG_EVERY)


def parse_args(argv=None):
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="refund-relay", description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="PostgreSQL database URL (env REFUND_DATABASE_URL)")
    parser.add_argument("--nats-url", default=env("REFUND_NATS_URL", DEFAULT_NATS_URL),
                        help=f"NATS server (env REFUND_NATS_URL, default {DEFAULT_NATS_URL})")
    parser.add_argument("--prefix", default=env("REFUND_EVENTS_PREFIX", DEFAULT_PREFIX),
                        help="subject prefix; the streams are PREFIX_EVENTS and PREFIX_CLOUDEVENTS "
                             f"(env REFUND_EVENTS_PREFIX, default {DEFAULT_PREFIX})")
    parser.add_argument("--name", default=env("REFUND_RELAY_NAME", "nats"),
                        help="the relay's name: relays of one name share one position and one lock (default nats)")
    parser.add_argument("--source", default=env("REFUND_EVENTS_SOURCE", "/refund-gateway/refund-service"),
                        help="CloudEvents `source` attribute")
    parser.add_argument("--metrics-listen", default=env("REFUND_RELAY_METRICS_LISTEN"),
                        help="HOST:PORT to serve Prometheus metrics on at /metrics (default off)")
    parser.add_argument("--log-level", default=env("REFUND_LOG_LEVEL") or "info",
                        choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


async def serve(args) -> int:
    url = config.database_url(args.database_url)
    if url.startswith("sqlite"):
        return startup.refuse(log, StartupError(f"refund-relay needs PostgreSQL (the database is "
                                                f"{config.redact(url)}); on SQLite consume WatchEvents",
                                                startup.EXIT_USAGE))
    relay = Relay(url, args.nats_url, args.prefix, args.name, args.source)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, relay.stop)
    if args.metrics_listen:
        try:
            address = metrics.serve_metrics(args.metrics_listen)
        except (OSError, ValueError) as exc:
            return startup.refuse(log, StartupError(f"cannot serve metrics on {args.metrics_listen}: {exc}",
                                                    startup.EXIT_USAGE))
        startup.announce("refund-relay", f"refund-relay metrics on http://{address}/metrics")
    # "listening on" as the other processes say it (what supervisors and tests wait for): the broker it feeds.
    startup.announce("refund-relay", f"refund-relay listening on {args.nats_url} (relay {args.name}, "
                                     f"database {config.redact(url)})")
    await relay.run()
    log.info("stopped")
    return startup.EXIT_STOPPED


def main(argv=None) -> int:
    telemetry.configure_logging("info")
    startup.install_json_excepthooks(log)
    args = parse_args(argv)
    telemetry.configure_logging(args.log_level)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
