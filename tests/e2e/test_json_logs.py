"""Every line refund-service and refund-edge write on stdout and stderr is one JSON
object: their own logs, the "listening on" announcements, uvicorn's lines, and
nothing of gRPC core's free text (rejected handshakes, traces), whatever
GRPC_VERBOSITY / GRPC_TRACE say, unless REFUND_GRPC_NATIVE_LOGS=1 asks for it."""

from __future__ import annotations

import json
import socket
import ssl
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.tls import Pki

NOISY_GRPC = {"GRPC_VERBOSITY": "DEBUG", "GRPC_TRACE": "handshaker,tcp,api"}


def not_json(output: str) -> list[str]:
    bad = []
    for line in output.splitlines():
        try:
            if not isinstance(json.loads(line), dict):
                bad.append(line)
        except ValueError:
            bad.append(line)
    return bad


def knock(host: str, port: int, pki: Pki) -> None:
    """Handshakes a server must refuse: plaintext bytes, TLS without a client certificate."""
    with socket.create_connection((host, port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            raw.recv(100)
        except OSError:
            pass
    context = ssl.create_default_context(cafile=str(pki.ca_path))
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                tls.recv(100)
    except (OSError, ssl.SSLError):
        pass


def _rejected_handshakes(sqlite_url, start_service, start_edge, pki, env):
    cert, key = pki.issue("refund-service", server=True)
    service = start_service(sqlite_url, "--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(pki.ca_path),
                            env=env)
    edge = start_edge(service.address, "--tls-cert", str(cert), "--tls-key", str(key), "--access-log", env=env)
    host, port = service.address.rsplit(":", 1)
    for _ in range(3):
        knock(host, int(port), pki)
        knock(edge.host, edge.port, pki)
    with grpc.insecure_channel(service.address) as channel:  # a plaintext gRPC client
        with pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    time.sleep(1.0)
    return service, edge


@pytest.mark.parametrize("env", [{}, NOISY_GRPC], ids=["default", "grpc-tracing-asked-for"])
def test_rejected_handshakes_add_no_free_text_lines_to_the_output(env, sqlite_url, start_service, start_edge, pki):
    service, edge = _rejected_handshakes(sqlite_url, start_service, start_edge, pki, env)
    service.stop()
    edge.stop()
    for process in (service, edge):
        output = process.output()
        assert f"{process.name} listening on" in output
        assert not not_json(output), not_json(output)[:5]


def test_refund_grpc_native_logs_lets_grpc_core_speak_for_debugging(sqlite_url, start_service, start_edge, pki):
    service, _ = _rejected_handshakes(sqlite_url, start_service, start_edge, pki,
                                      {"REFUND_GRPC_NATIVE_LOGS": "1", "GRPC_VERBOSITY": "INFO"})
    assert any("ssl_transport_security" in line or "andshake" in line for line in not_json(service.output())), \
        service.output()[-2000:]
