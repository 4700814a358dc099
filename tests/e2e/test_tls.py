"""TLS, with certificates made in the test (cryptography's x509 builder): the
edge serves HTTPS, refund-service requires mutual TLS from its callers, and
the edge calls it with a client certificate."""

from __future__ import annotations

import http.client
import ssl
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import ROOT
from tests.support.answers import check_answer
from tests.support.data import request_text, seed
from tests.support.http import http_request
from tests.support.keys import example_key, signed_body
from tests.support.processes import Process
from tests.support.tls import Pki


def test_the_edge_serves_https_from_a_certificate_and_key(sqlite_url, start_service, start_edge, pki):
    seed(sqlite_url)
    cert, key = pki.issue("edge", server=True)
    service = start_service(sqlite_url)
    edge = start_edge(service.address, "--tls-cert", str(cert), "--tls-key", str(key))
    assert f"refund-edge listening on {edge.address} (https)" in edge.output()

    health = http_request(edge.host, edge.port, "GET", "/healthz", ca_path=pki.ca_path)
    assert health.status == 200 and health.body == b'{"status":"SERVING"}'
    reply = http_request(edge.host, edge.port, "POST", "/direct/refund",
                         signed_body(example_key(), request_text(101, "1.00")), {"Content-Type": "application/json"},
                         ca_path=pki.ca_path)
    check_answer(reply, "0000", 200)

    # Plain HTTP gets no answer; a client that does not trust the CA refuses the server.
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        edge.request("GET", "/healthz", timeout=5)
    with pytest.raises(ssl.SSLCertVerificationError):
        http_request(edge.host, edge.port, "GET", "/healthz",
                     ca_path=Pki.create(pki.directory / "other", "Other CA").ca_path)


def test_the_service_requires_mutual_tls_and_the_edge_calls_it_with_a_client_certificate(
        sqlite_url, start_service, start_edge, pki):
    seed(sqlite_url)
    server_cert, server_key = pki.issue("refund-service", server=True)
    client_cert, client_key = pki.issue("refund-edge", server=False)
    service = start_service(sqlite_url, env={"REFUND_GRPC_TLS_CA": str(pki.ca_path),
                                             "REFUND_GRPC_TLS_CERT": str(server_cert),
                                             "REFUND_GRPC_TLS_KEY": str(server_key)})
    assert "(mutual TLS, database" in service.output()

    edge = start_edge(service.address, "--grpc-tls-ca", str(pki.ca_path), "--grpc-tls-cert", str(client_cert),
                      "--grpc-tls-key", str(client_key))
    check_answer(edge.post_refund(signed_body(example_key(), request_text(101, "1.00"))), "0000", 200)
    assert edge.request("GET", "/healthz").status == 200

    # Without a client certificate, or with one from another CA, or in plaintext: no service.
    stranger_ca = Pki.create(pki.directory / "stranger", "Stranger CA")
    stranger_cert, stranger_key = stranger_ca.issue("intruder", server=False)
    for flags in (["--grpc-tls-ca", str(pki.ca_path)],
                  ["--grpc-tls-ca", str(pki.ca_path), "--grpc-tls-cert", str(stranger_cert),
                   "--grpc-tls-key", str(stranger_key)],
                  []):
        refused = start_edge(service.address, *flags, deadline=2)
        check_answer(refused.post_refund(signed_body(example_key(), request_text(102, "1.00"))), "9001", 503)
        assert refused.request("GET", "/healthz").status == 503

    # An internal gRPC caller with a client certificate is served.
    credentials = grpc.ssl_channel_credentials(pki.ca_path.read_bytes(), client_key.read_bytes(),
                                               client_cert.read_bytes())
    with grpc.secure_channel(service.address, credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    tool = subprocess.run([sys.executable, "-m", "service.grpc_client", "--target", service.address,
                           "--tls-ca", str(pki.ca_path), "--tls-cert", str(client_cert), "--tls-key", str(client_key),
                           "get-order", "--merchant-id", "3000001", "--order-id", "101"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert tool.returncode == 0 and '"status": "PARTIALLY_REFUNDED"' in tool.stdout, tool.stdout + tool.stderr


def test_the_service_can_serve_tls_without_client_certificates(sqlite_url, start_service, start_edge, pki):
    seed(sqlite_url)
    cert, key = pki.issue("refund-service", server=True)
    service = start_service(sqlite_url, "--tls-cert", str(cert), "--tls-key", str(key))
    assert "(TLS, database" in service.output()
    edge = start_edge(service.address, "--grpc-tls-ca", str(pki.ca_path))
    check_answer(edge.post_refund(signed_body(example_key(), request_text(101, "1.00"))), "0000", 200)


def test_incomplete_or_unreadable_tls_settings_stop_the_processes_with_a_message(sqlite_url, pki):
    cert, key = pki.issue("refund-service", server=True)
    for args, message in ((["--tls-cert", str(cert)], "--tls-cert and --tls-key go together"),
                          (["--tls-ca", str(pki.ca_path)], "--tls-ca needs --tls-cert and --tls-key"),
                          (["--tls-cert", str(cert), "--tls-key", str(pki.directory / "none.pem")],
                           "cannot read --tls-key")):
        with pytest.raises(RuntimeError) as failed:
            Process.service(sqlite_url, *args)
        assert message in str(failed.value) and "Traceback" not in str(failed.value)

    for args, message in ((["--tls-cert", str(cert), "--tls-key", str(pki.ca_path)], "is not a PEM private key"),
                          (["--tls-cert", str(cert)], "--tls-cert and --tls-key go together"),
                          (["--grpc-tls-ca", str(pki.directory / "none.pem")], "cannot read --grpc-tls-ca")):
        with pytest.raises(RuntimeError) as failed:
            Process.edge("127.0.0.1:1", *args)
        assert message in str(failed.value) and "Traceback" not in str(failed.value)
