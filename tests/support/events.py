"""Events (docs/events.md): a private nats-server that a test may SIGKILL and
restart on the same port and store, a WatchEvents consumer that reconnects from
its cursor, and readers of the JetStream streams. (`refund-relay` itself starts
as any of our processes: `Process.relay`.)"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc
import nats
import pytest

from refund.v1 import refund_pb2, refund_pb2_grpc
from service import relay
from tests.support.processes import free_port

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


class NatsServer:
    """A private JetStream server on a fixed port with a store of its own."""

    def __init__(self):
        if not os.path.exists(NATS_SERVER):
            pytest.skip("nats-server is not installed")
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.store = Path(tempfile.mkdtemp(prefix="nats-store-"))
        self.log = self.store.with_suffix(".log")
        self.process = None
        self.start()

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if "Server is ready" in self.log.read_text(errors="replace").split("Starting nats-server")[-1]:
                return
            time.sleep(0.05)
        raise RuntimeError("nats-server did not start:\n" + self.log.read_text(errors="replace"))

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.store, ignore_errors=True)
        self.log.unlink(missing_ok=True)


class WatchConsumer:
    """Reads WatchEvents from `addresses` (one at a time, in turn), and on any
    end or error reconnects to the next with the last sequence it received."""

    def __init__(self, addresses: list[str], **request):
        self.addresses = addresses
        self.request = request
        self.events: list[refund_pb2.Event] = []
        self.reconnects = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._call = None
        self.current = addresses[0]  # the address it reads from (or last tried)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def cursor(self) -> int:
        return self.events[-1].sequence if self.events else 0

    def _run(self) -> None:
        turn = 0
        while not self._stop.is_set():
            address = self.current = self.addresses[turn % len(self.addresses)]
            turn += 1
            with grpc.insecure_channel(address) as channel:
                stub = refund_pb2_grpc.RefundServiceStub(channel)
                try:
                    self._call = stub.WatchEvents(
                        refund_pb2.WatchEventsRequest(after_sequence=self.cursor, **self.request), timeout=600)
                    for response in self._call:
                        self.events.append(response.event)
                except grpc.RpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                          grpc.StatusCode.DEADLINE_EXCEEDED):
                        self.errors.append(f"{exc.code().name}: {exc.details()}")
            if not self._stop.is_set():
                self.reconnects += 1
                time.sleep(0.1)

    def wait_for(self, count: int, timeout: float = 60.0) -> list[refund_pb2.Event]:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.events

    def close(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self.thread.join(10)


def stream_messages(nats_url: str, stream: str) -> list:
    """Every message stored in `stream`, in stream order: (headers, data)."""
    async def read():
        connection = await nats.connect(nats_url)
        try:
            jetstream = connection.jetstream()
            info = await jetstream.stream_info(stream)
            messages = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                message = await jetstream.get_msg(stream, seq)
                messages.append((message.headers or {}, message.data))
            return messages
        finally:
            await connection.close()

    return asyncio.run(read())


def consume_with_redelivery(nats_url: str, stream: str, expected: int, timeout: float = 60.0) -> list:
    """A durable pull consumer that leaves its first batch unacknowledged, so
    that JetStream redelivers it (at-least-once): every delivery, in order, as
    (Nats-Msg-Id, data, delivery count)."""
    async def consume():
        connection = await nats.connect(nats_url)
        try:
            jetstream = connection.jetstream()
            subscription = await jetstream.pull_subscribe(
                "", durable="test-dedupe", stream=stream,
                config=nats.js.api.ConsumerConfig(ack_wait=1.0, max_deliver=-1))
            deliveries, acked, first = [], set(), True
            deadline = time.monotonic() + timeout
            while len(acked) < expected and time.monotonic() < deadline:
                try:
                    batch = await subscription.fetch(50, timeout=2)
                except nats.errors.TimeoutError:
                    continue
                for message in batch:
                    deliveries.append((message.headers["Nats-Msg-Id"], message.data,
                                       message.metadata.num_delivered))
                    if first:
                        continue  # not acknowledged: delivered again after ack_wait
                    await message.ack()
                    acked.add(message.headers["Nats-Msg-Id"])
                first = False
            return deliveries
        finally:
            await connection.close()

    return asyncio.run(consume())


def cloud_events(nats_url: str, prefix: str = relay.DEFAULT_PREFIX) -> list[dict]:
    return [json.loads(data) for _, data in stream_messages(nats_url, relay.stream_names(prefix)[1])]


def proto_events(nats_url: str, prefix: str = relay.DEFAULT_PREFIX) -> list[tuple[str, refund_pb2.Event]]:
    return [(headers.get("Nats-Msg-Id"), refund_pb2.Event.FromString(data))
            for headers, data in stream_messages(nats_url, relay.stream_names(prefix)[0])]
