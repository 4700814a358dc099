"""The edge faces the open internet: its connections, request heads, time and
requests in flight are bounded (gateway_edge.limits, gateway_edge.app), and a
well-behaved client keeps being answered while others abuse it. Real
`refund-edge` processes, with a fake back end or the real service; the limits
are set by environment variables (which an edge without them ignores, so that
these tests show the finding on an edge without limits too)."""

from __future__ import annotations

import json
import os
import resource
import socket
import threading
import time

import pytest

from tests.support import data
from tests.support.answers import check_answer
from tests.support.keys import generated_key, public_pem, signed_body

REQUEST = '{"merchantId":"3000001","orderId":1076,"amount":76.19}'


def connect(edge, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection((edge.host, edge.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_answer(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one response read from a raw socket."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the edge has closed the connection (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def raise_open_file_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        pytest.skip(f"needs {wanted} open files")


# -- request heads -------------------------------------------------------------------


def test_a_request_head_larger_than_the_limit_gets_431_at_once_and_the_edge_keeps_none_of_it(
        fake_backend, start_edge):
    edge = start_edge(fake_backend("internal").address, env={"REFUND_EDGE_MAX_HEADER_BYTES": "8192"})
    before = rss_bytes(edge.process.pid)
    with connect(edge) as sock:
        sock.sendall(b"POST /direct/refund HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent, status = 0, None
        try:
            while sent < 64 * 1024 * 1024:  # a 64 MiB header, unless the edge stops it first
                sock.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            status, headers, body = read_answer(sock)
        except (ConnectionError, OSError):
            pass
    assert sent < 16 * 1024 * 1024, f"the edge read {sent} bytes of one header"
    if status is not None:  # the answer may be lost in the reset of the connection the client kept writing to
        assert status == 431 and json.loads(body)["responseCode"] == "1001", (status, body)
    assert rss_bytes(edge.process.pid) - before < 20 * 1024 * 1024
    # One header just over the limit, sent at once, gets the answer for sure.
    with connect(edge) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
        status, headers, body = read_answer(sock)
        assert status == 431 and json.loads(body)["responseCode"] == "1001"
        assert headers["connection"] == "close" and "x-request-id" in headers
        assert closed_by_peer(sock)
    # Within the limit: served.
    with connect(edge) as sock:
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\nX-Fine: " + b"a" * 7000 + b"\r\n\r\n")
        assert read_answer(sock)[0] == 200


def test_a_head_that_trickles_in_gets_408_after_the_header_timeout_and_a_silent_connection_is_closed(
        fake_backend, start_edge):
    edge = start_edge(fake_backend("internal").address, env={"REFUND_EDGE_HEADER_TIMEOUT": "1"})
    with connect(edge) as silent, connect(edge) as trickling:
        started = time.monotonic()
        trickling.sendall(b"GET /healthz HTTP/1.1\r\n")
        for _ in range(4):
            time.sleep(0.4)
            try:
                trickling.sendall(b"X-A: b\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
        status, _, body = read_answer(trickling)
        assert status == 408 and json.loads(body)["responseCode"] == "1001"
        assert closed_by_peer(silent, timeout=5)
        assert time.monotonic() - started < 5
    with connect(edge) as sock:  # a keep-alive connection: each head has its own timeout
        for _ in range(2):
            sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answer(sock)[0] == 200
            time.sleep(0.6)


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(fake_backend, start_edge):
    edge = start_edge(fake_backend("internal").address, env={"REFUND_EDGE_KEEP_ALIVE_TIMEOUT": "0.5"})
    with connect(edge) as sock:
        sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(sock)[0] == 200
        started = time.monotonic()
        assert closed_by_peer(sock, timeout=5)
        assert time.monotonic() - started < 3


# -- connections and requests in flight ----------------------------------------------------


def test_beyond_the_connection_cap_the_longest_idle_connection_makes_room_for_a_new_one(fake_backend, start_edge):
    edge = start_edge(fake_backend("internal").address, env={"REFUND_EDGE_MAX_CONNECTIONS": "4"})
    idle = [connect(edge) for _ in range(4)]
    time.sleep(0.3)
    try:
        with connect(edge) as newcomer:  # the fifth: the oldest idle one is closed, the newcomer served
            newcomer.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_answer(newcomer)[0] == 200
        assert closed_by_peer(idle[0], timeout=3)
        assert not closed_by_peer(idle[3], timeout=0.2)
    finally:
        for sock in idle:
            sock.close()


def test_when_every_connection_is_busy_a_new_one_gets_503_9001_at_once(fake_backend, start_edge):
    backend = fake_backend("slow")
    edge = start_edge(backend.address, deadline=10, env={"REFUND_EDGE_MAX_CONNECTIONS": "2"})
    busy = [connect(edge, timeout=15) for _ in range(2)]
    try:
        for sock in busy:
            body = signed_body(generated_key("limits"), REQUEST)
            sock.sendall(b"POST /direct/refund HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 10
        while backend.servicer.calls < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        with connect(edge) as third:
            started = time.monotonic()
            status, headers, body = read_answer(third)
            assert status == 503 and json.loads(body)["responseCode"] == "9001"
            assert headers["retry-after"] == "1"
            assert time.monotonic() - started < 2
    finally:
        backend.servicer.release.set()
        for sock in busy:
            sock.close()


def test_beyond_the_requests_in_flight_cap_the_answer_is_9001_at_once_without_calling_the_service(
        fake_backend, start_edge):
    backend = fake_backend("slow")
    edge = start_edge(backend.address, deadline=10, env={"REFUND_EDGE_MAX_IN_FLIGHT": "2"})
    results = []

    def slow_request():
        results.append(edge.post_refund(signed_body(generated_key("limits"), REQUEST), timeout=20))

    threads = [threading.Thread(target=slow_request) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while backend.servicer.calls < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        reply = edge.post_refund(signed_body(generated_key("limits"), REQUEST))
        check_answer(reply, "9001", 503)
        assert reply.headers["retry-after"] == "1" and reply.elapsed < 2
        assert backend.servicer.calls == 2
    finally:
        backend.servicer.release.set()
        for thread in threads:
            thread.join(20)
    assert len(results) == 2


# -- all of it at once, while a merchant refunds ----------------------------------------

IDLE_CONNECTIONS = 3000
SLOW_CONNECTIONS = 300
RSS_BOUND = 200 * 1024 * 1024  # the edge starts at about 60-75 MB


class Attackers:
    """Thousands of connections held open from one thread: idle ones, ones that
    send a header byte now and then, and one that sends a header without end."""

    def __init__(self, edge):
        self.edge = edge
        self.stop = threading.Event()
        self.sockets: list[socket.socket] = []
        self.header_bytes = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, count: int) -> list[socket.socket]:
        opened = []
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex((self.edge.host, self.edge.port))
            opened.append(sock)
        return opened

    def _run(self):
        idle = self._open(IDLE_CONNECTIONS)
        slow = self._open(SLOW_CONNECTIONS)
        big = socket.create_connection((self.edge.host, self.edge.port))
        big.setblocking(False)
        self.sockets = idle + slow + [big]
        time.sleep(0.2)
        for sock in slow:
            try:
                sock.send(b"POST /direct/refund HTTP/1.1\r\n")
            except OSError:
                pass
        try:
            big.send(b"GET /healthz HTTP/1.1\r\nX-Endless: ")
        except OSError:
            pass
        chunk = b"a" * 65536
        rounds = 0
        while not self.stop.is_set():
            rounds += 1
            try:
                self.header_bytes += big.send(chunk)
            except BlockingIOError:
                pass
            except OSError:  # refused: open another one and keep going
                big.close()
                big = socket.create_connection((self.edge.host, self.edge.port))
                big.setblocking(False)
                self.sockets.append(big)
                big.send(b"GET /healthz HTTP/1.1\r\nX-Endless: ")
            if rounds % 50 == 0:
                for sock in slow:
                    try:
                        sock.send(b"X")
                    except OSError:
                        pass
                idle += self._open(20)  # and new idle connections keep coming
                self.sockets += idle[-20:]
            time.sleep(0.005)

    def close(self):
        self.stop.set()
        self.thread.join(10)
        for sock in self.sockets:
            sock.close()


@pytest.mark.slow
def test_thousands_of_idle_and_slow_connections_and_an_endless_header_leave_a_merchant_served(
        tmp_path, start_service, start_edge):
    """While 3,000 idle connections, 300 that trickle a header and one that
    sends a header without end are held against an edge capped at 1,024
    connections, a merchant's refunds (each on a new connection, as the
    vendor's plugin sends them) are all answered, each within 5 s, and the
    edge's RSS stays under 200 MB."""
    raise_open_file_limit(IDLE_CONNECTIONS + SLOW_CONNECTIONS + 2000)
    url = f"sqlite:///{tmp_path / 'abuse.db'}"
    from service import db

    db.migrate(url)
    key = generated_key("abuse")
    data.load(url, [data.merchant(3000001, public_pem(key), balances={"HKD": "100000.00"})],
              [data.order(1000 + i, 3000001, "10.00") for i in range(40)])
    service = start_service(url)
    edge = start_edge(service.address, env={"REFUND_EDGE_MAX_CONNECTIONS": "1024",
                                           "REFUND_EDGE_HEADER_TIMEOUT": "5"})
    baseline = rss_bytes(edge.process.pid)
    attackers = Attackers(edge)
    attackers.thread.start()
    latencies, peak = [], baseline
    try:
        time.sleep(2.0)  # let the attack build up
        for i in range(40):
            reply = edge.post_refund(signed_body(key, f'{{"merchantId":"3000001","orderId":{1000 + i},"amount":10.00}}'),
                                     timeout=10)
            check_answer(reply, "0000", 200)
            latencies.append(reply.elapsed)
            peak = max(peak, rss_bytes(edge.process.pid))
            time.sleep(0.1)
    finally:
        attackers.close()
    refused = edge.output().count("connection refused (")
    print(f"\nabuse: {len(attackers.sockets)} attacking connections, {attackers.header_bytes / 2**20:.0f} MiB of "
          f"endless header sent; refunds answered in max {max(latencies) * 1000:.0f} ms, median "
          f"{sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms; edge RSS {baseline / 2**20:.0f} MB before, "
          f"peak {peak / 2**20:.0f} MB; refusal kinds logged {refused}")
    assert max(latencies) < 5.0
    assert peak < RSS_BOUND
    assert edge.process.poll() is None
    check_answer(edge.post_refund(signed_body(key, '{"merchantId":"3000001","orderId":1000,"amount":10.00}')),
                 "3003", 200)
    assert os.path.exists(f"/proc/{edge.process.pid}")
