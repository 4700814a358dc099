"""Certificates rotate without downtime on refund-service and refund-edge; the TLS
policy (TLS 1.2 minimum, ECDHE with AEAD suites only) holds on both; every
certificate's expiry is a gauge; refund-client trusts a private CA."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from refund.v1 import refund_pb2, refund_pb2_grpc
from tests.support import ROOT, data
from tests.support.keys import EXAMPLE_KEY_PEM, EXAMPLE_PUB_PEM, example_key, signed_body

MERCHANT = 7700001
FIRST_ORDER = 770_000
ORDERS = 2000


def _fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def file_fingerprint(cert_path: Path) -> str:
    return _fingerprint(ssl.PEM_cert_to_DER_cert(cert_path.read_text()))


def presented(host: str, port: int, ca: Path, *, alpn: str | None = None, client: tuple[Path, Path] | None = None,
              ) -> str:
    """The fingerprint of the certificate a new handshake gets."""
    context = ssl.create_default_context(cafile=str(ca))
    if alpn:
        context.set_alpn_protocols([alpn])
    if client:
        context.load_cert_chain(str(client[0]), str(client[1]))
    with socket.create_connection((host, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return _fingerprint(tls.getpeercert(binary_form=True))


def install(source: tuple[Path, Path], target: tuple[Path, Path]) -> None:
    """Replace the served certificate, then its key, each by an atomic rename (as a
    deployment tool would): for a moment the certificate and key do not match."""
    for new, served in zip(source, target, strict=False):
        staging = served.with_suffix(".new")
        shutil.copyfile(new, staging)
        os.replace(staging, served)
        time.sleep(0.3)


def expiry_gauges(url: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = {}
    for labels, value in re.findall(r"^refund_tls_certificate_expiry_seconds\{([^}]*)\} (\S+)$", text, re.M):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        found[(fields["role"], fields["path"])] = float(value)
    return found


class RefundLoop:
    """Signed refunds through the HTTPS edge, one new connection (a new handshake)
    per request, one order after another, until stopped; records each answer
    and the certificate its handshake got."""

    def __init__(self, host: str, port: int, ca: Path):
        self.host, self.port, self.ca = host, port, ca
        self.answers: list[tuple[float, int, str, str]] = []  # (time, HTTP status, responseCode, fingerprint)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        context = ssl.create_default_context(cafile=str(self.ca))
        order_id = FIRST_ORDER
        while not self._stop.is_set() and order_id < FIRST_ORDER + ORDERS:
            request = f'{{"merchantId":"{MERCHANT}","orderId":{order_id},"amount":1.00}}'
            connection = http.client.HTTPSConnection(self.host, self.port, context=context, timeout=30)
            try:
                connection.request("POST", "/direct/refund", signed_body(example_key(), request),
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
                body = json.loads(response.read())
                fingerprint = _fingerprint(connection.sock.getpeercert(binary_form=True))
                self.answers.append((time.monotonic(), response.status, body["responseCode"], fingerprint))
            except Exception as exc:  # a refused handshake or a dropped connection is a failure of the test
                self.failures.append(f"order {order_id}: {type(exc).__name__}: {exc}")
            finally:
                connection.close()
            order_id += 1

    def wait_for_answers(self, count: int, limit: float = 60):
        deadline = time.monotonic() + limit
        while len(self.answers) + len(self.failures) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self):
        self._stop.set()
        self._thread.join(60)


def test_certificates_rotate_under_a_refund_loop_on_the_service_and_the_edge_without_a_failed_request(
        sqlite_url, start_service, start_edge, pki, tmp_path):
    data.load(sqlite_url, [data.merchant(MERCHANT, EXAMPLE_PUB_PEM.read_text(), {"HKD": "100000.00"})],
              [data.order(FIRST_ORDER + i, MERCHANT, "10.00") for i in range(ORDERS)])
    served = tmp_path / "served"
    served.mkdir()
    service_pair = (served / "service.crt.pem", served / "service.key.pem")
    edge_pair = (served / "edge.crt.pem", served / "edge.key.pem")
    for source, target in ((pki.issue("service-2026", server=True), service_pair),
                           (pki.issue("edge-2026", server=True), edge_pair)):
        for new, path in zip(source, target, strict=False):
            shutil.copyfile(new, path)
    client = pki.issue("edge-client", server=False)

    # The service looks at its files every 0.3 s; the edge only on SIGHUP (its interval is an hour).
    service = start_service(sqlite_url, "--tls-cert", str(service_pair[0]), "--tls-key", str(service_pair[1]),
                            "--tls-ca", str(pki.ca_path), "--tls-reload-interval", "0.3",
                            "--metrics-listen", "127.0.0.1:0")
    edge = start_edge(service.address, "--tls-cert", str(edge_pair[0]), "--tls-key", str(edge_pair[1]),
                      "--tls-reload-interval", "3600", "--grpc-tls-ca", str(pki.ca_path),
                      "--grpc-tls-cert", str(client[0]), "--grpc-tls-key", str(client[1]))
    service_metrics = re.search(r"refund-service metrics on (\S+)", service.output()).group(1)
    old_service, old_edge = file_fingerprint(service_pair[0]), file_fingerprint(edge_pair[0])
    service_address = (service.address.rsplit(":", 1)[0], int(service.address.rsplit(":", 1)[1]))
    assert presented(*service_address, pki.ca_path, alpn="h2", client=client) == old_service
    before = expiry_gauges(service_metrics)[("server", str(service_pair[0]))]
    assert 0 < before <= 86400

    # Connections opened before the rotation: an HTTP keep-alive connection to the
    # edge and a gRPC channel to the service.
    kept = http.client.HTTPSConnection(edge.host, edge.port, context=ssl.create_default_context(
        cafile=str(pki.ca_path)), timeout=30)
    kept.request("GET", "/healthz")
    assert kept.getresponse().read() == b'{"status":"SERVING"}'
    channel = grpc.secure_channel(service.address, grpc.ssl_channel_credentials(
        pki.ca_path.read_bytes(), client[1].read_bytes(), client[0].read_bytes()))
    stub = refund_pb2_grpc.RefundServiceStub(channel)
    assert stub.GetOrder(refund_pb2.GetOrderRequest(merchant_id=str(MERCHANT), order_id=FIRST_ORDER),
                         timeout=10).order.id == FIRST_ORDER

    loop = RefundLoop(edge.host, edge.port, pki.ca_path)
    try:
        loop.wait_for_answers(20)
        new_service_files = pki.issue("service-2027", server=True, valid_for=dt.timedelta(days=90))
        new_edge_files = pki.issue("edge-2027", server=True, valid_for=dt.timedelta(days=90))
        new_service, new_edge = file_fingerprint(new_service_files[0]), file_fingerprint(new_edge_files[0])
        install(new_service_files, service_pair)
        install(new_edge_files, edge_pair)
        edge.process.send_signal(signal.SIGHUP)
        rotated = time.monotonic()
        deadline = rotated + 20
        while time.monotonic() < deadline and not (
                presented(edge.host, edge.port, pki.ca_path) == new_edge
                and presented(*service_address, pki.ca_path, alpn="h2", client=client) == new_service):
            time.sleep(0.1)
        switched = time.monotonic()
        count = len(loop.answers)
        loop.wait_for_answers(count + 20)
    finally:
        loop.stop()

    assert not loop.failures, loop.failures[:5]
    assert [(status, code) for _, status, code, _ in loop.answers] == [(200, "0000")] * len(loop.answers)
    assert presented(edge.host, edge.port, pki.ca_path) == new_edge
    assert presented(*service_address, pki.ca_path, alpn="h2", client=client) == new_service
    seen = [fingerprint for _, _, _, fingerprint in loop.answers]
    assert seen[0] == old_edge and seen[-1] == new_edge
    assert all(fingerprint == new_edge for at, _, _, fingerprint in loop.answers if at > switched + 0.5)
    # The connections opened before go on: the keep-alive connection (on its old certificate), the gRPC channel.
    kept.request("GET", "/healthz")
    assert kept.getresponse().read() == b'{"status":"SERVING"}'
    assert _fingerprint(kept.sock.getpeercert(binary_form=True)) == old_edge
    kept.close()
    assert stub.GetOrder(refund_pb2.GetOrderRequest(merchant_id=str(MERCHANT), order_id=FIRST_ORDER),
                         timeout=10).order.status == "PARTIALLY_REFUNDED"
    channel.close()
    # The gauges follow: the new certificates are valid for 90 days.
    after = expiry_gauges(service_metrics)[("server", str(service_pair[0]))]
    assert 89 * 86400 < after <= 90 * 86400
    for process in (service, edge):
        assert "TLS certificate reloaded: new handshakes use CN=" in process.output()
        for line in process.output().splitlines():
            json.loads(line)
    print(f"\nrotation: {len(loop.answers)} refunds through new handshakes, all 0000; both processes presented "
          f"the new certificates {switched - rotated:.2f} s after the files were in place")


def test_every_certificate_in_use_has_an_expiry_gauge_on_the_edge(sqlite_url, start_service, start_edge, pki):
    cert, key = pki.issue("edge", server=True, valid_for=dt.timedelta(days=30))
    service = start_service(sqlite_url)
    edge = start_edge(service.address, "--tls-cert", str(cert), "--tls-key", str(key),
                      "--metrics-listen", "127.0.0.1:0")
    metrics_address = re.search(r"refund-edge metrics on https://(\S+)/metrics", edge.output()).group(1)
    context = ssl.create_default_context(cafile=str(pki.ca_path))
    # The metrics listener is a socket of the same server: HTTPS too.
    with urllib.request.urlopen(f"https://{metrics_address}/metrics", context=context, timeout=10) as response:
        text = response.read().decode()
    value = float(re.search(rf'^refund_tls_certificate_expiry_seconds\{{path="{re.escape(str(cert))}",'
                            rf'role="server"\}} (\S+)$', text, re.M).group(1))
    assert 29 * 86400 < value <= 30 * 86400


def _handshake(host: str, port: int, ca: Path, *, maximum=None, minimum=None, ciphers: str | None = None,
               alpn: str | None = None) -> tuple[str, str]:
    context = ssl.create_default_context(cafile=str(ca))
    if minimum:
        context.minimum_version = minimum
    if maximum:
        context.maximum_version = maximum
    if ciphers:
        context.set_ciphers(ciphers)
    if alpn:
        context.set_alpn_protocols([alpn])
    with socket.create_connection((host, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return tls.version(), tls.cipher()[0]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_policy_tls12_minimum_and_aead_suites_only_on_the_service_and_the_edge(
        sqlite_url, start_service, start_edge, pki):
    cert, key = pki.issue("server", server=True)
    service = start_service(sqlite_url, "--tls-cert", str(cert), "--tls-key", str(key))
    edge = start_edge(service.address, "--tls-cert", str(cert), "--tls-key", str(key))
    service_host, service_port = service.address.rsplit(":", 1)
    endpoints = {"edge": (edge.host, edge.port, None), "service": (service_host, int(service_port), "h2")}
    for name, (host, port, alpn) in endpoints.items():
        version, cipher = _handshake(host, port, pki.ca_path, alpn=alpn)
        assert version == "TLSv1.3", (name, version)
        version, cipher = _handshake(host, port, pki.ca_path, maximum=ssl.TLSVersion.TLSv1_2, alpn=alpn)
        assert version == "TLSv1.2" and ("GCM" in cipher or "CHACHA20" in cipher) and "ECDHE" in cipher, \
            (name, cipher)
        for cbc in ("ECDHE-RSA-AES256-SHA384", "ECDHE-RSA-AES128-SHA256", "ECDHE-RSA-AES128-SHA", "AES128-GCM-SHA256"):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _handshake(host, port, pki.ca_path, maximum=ssl.TLSVersion.TLSv1_2, ciphers=cbc, alpn=alpn)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _handshake(host, port, pki.ca_path, minimum=ssl.TLSVersion.TLSv1, maximum=ssl.TLSVersion.TLSv1_1,
                       ciphers="DEFAULT:@SECLEVEL=0", alpn=alpn)


def test_refund_client_trusts_a_private_ca_with_cacert(sqlite_url, start_service, start_edge, pki):
    data.load(sqlite_url, [data.merchant(MERCHANT, EXAMPLE_PUB_PEM.read_text(), {"HKD": "100.00"})],
              [data.order(FIRST_ORDER, MERCHANT, "10.00")])
    cert, key = pki.issue("edge", server=True)
    edge = start_edge(start_service(sqlite_url).address, "--tls-cert", str(cert), "--tls-key", str(key))
    command = [sys.executable, "-m", "gateway_edge.client", "--url", f"https://{edge.address}", "--key",
               str(EXAMPLE_KEY_PEM), "--merchant-id", str(MERCHANT), "--order-id", str(FIRST_ORDER), "--amount", "1.00"]
    untrusted = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert untrusted.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr, untrusted.stderr
    trusted = subprocess.run([*command, "--cacert", str(pki.ca_path)], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert trusted.returncode == 0 and '"responseCode":"0000"' in trusted.stdout, trusted.stdout + trusted.stderr


def test_sighup_means_reload_and_never_stops_a_plaintext_service_or_edge(sqlite_url, start_service, start_edge):
    service = start_service(sqlite_url)
    edge = start_edge(service.address)
    for process in (service, edge):
        process.process.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert service.process.poll() is None and edge.process.poll() is None
    assert edge.request("GET", "/healthz").status == 200
    for process in (service, edge):
        assert "SIGHUP: no TLS files to reload" in process.output()
