"""Helpers for the tests of docs/api.md section 7 and of operating the gateway
(idempotency, replay window, signed responses, order query, logs, metrics,
TLS): a seeded world, a gateway of real processes, signed requests with
timestamps, certificates made in the test, JSON log lines."""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import json
import re
import ssl
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from service import domain
from tests import data
from tests.conftest import ServiceProcess
from tests.edge_fixtures import (
    EXAMPLE_PUB_PEM,
    EdgeProcess,
    Reply,
    admin,
    balance_of,
    example_key,
    generated_key,
    public_pem,
    signed_body,
)

MERCHANT, OTHER = 3000001, 3000002


def seed(url: str) -> None:
    """Merchant 3000001 (the example key; HKD 1000.00) and 3000002 (its own key;
    HKD 500.00), each with a few paid VISA orders."""
    merchants = [data.merchant(MERCHANT, EXAMPLE_PUB_PEM.read_text(), {"HKD": "1000.00"}),
                 data.merchant(OTHER, public_pem(generated_key("other")), {"HKD": "500.00"})]
    orders = [data.order(order_id, MERCHANT, "100.00", reference=f"shop-{order_id}") for order_id in range(101, 121)]
    orders += [data.order(2000, MERCHANT, "5000.00", reference="big-2000"),
               data.order(201, OTHER, "99.00", reference="theirs-201")]
    data.load(url, merchants, orders)


def set_balance(url: str, merchant_id: int, hkd: str) -> None:
    """Bring the HKD balance to `hkd` as an operator would: a journaled
    `refund-admin balance adjust` by the difference (load never changes a live balance)."""
    change = domain.to_minor(hkd, "HKD") - balance_of(url, merchant_id, "HKD")
    if change:
        text = ("-" if change < 0 else "") + domain.format_minor(abs(change), "HKD")
        admin(url, "balance", "adjust", str(merchant_id), "HKD", text, "--reason", "test top-up")


def now_iso(offset_seconds: float = 0, tz_hours: int = 8) -> str:
    """The current time (plus an offset) as ISO 8601 in a +08:00 zone, like a Hong Kong merchant."""
    zone = dt.timezone(dt.timedelta(hours=tz_hours))
    return (dt.datetime.now(zone) + dt.timedelta(seconds=offset_seconds)).isoformat(timespec="seconds")


def request_text(order_id=None, amount=None, merchant=MERCHANT, reference=None, timestamp=None, **extra) -> str:
    fields = [f'"merchantId":"{merchant}"']
    if order_id is not None:
        fields.append(f'"orderId":{order_id}')
    if reference is not None:
        fields.append(f'"merchantReference":{json.dumps(reference)}')
    if amount is not None:
        fields.append(f'"amount":{amount}')
    if timestamp is not None:
        fields.append(f'"timestamp":{json.dumps(timestamp)}')
    fields += [f'{json.dumps(name)}:{json.dumps(value)}' for name, value in extra.items()]
    return "{" + ",".join(fields) + "}"


@dataclass
class Gateway:
    database_url: str
    service: ServiceProcess
    edge: EdgeProcess

    def post(self, path: str, request: str, key=None, headers: dict | None = None) -> Reply:
        body = signed_body(key or example_key(), request)
        return self.edge.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})

    def refund(self, request: str, key=None, idempotency_key: str | None = None, headers=None) -> Reply:
        headers = dict(headers or {})
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        return self.post("/direct/refund", request, key, headers)

    def query(self, request: str, key=None, headers=None) -> Reply:
        return self.post("/direct/query", request, key, headers)


def make_gateway_key(url: str, directory: Path) -> tuple[Path, Path]:
    """`refund-admin gateway-key create --out`, then `gateway-key public`: (private key file, public key file)."""
    private = directory / "gateway.key.pem"
    admin(url, "gateway-key", "create", "--out", str(private))
    public = directory / "gateway.pub.pem"
    public.write_text(admin(url, "gateway-key", "public"))
    return private, public


# -- logs --------------------------------------------------------------------------

# The lines a process prints on stdout for people and tests (everything else is a JSON log line).
ANNOUNCEMENTS = re.compile(r"(refund-service listening on|refund-service metrics on|refund-edge listening on"
                           r"|refund-edge metrics on) ")


def log_lines(output: str) -> list[dict]:
    """Every log line of a process's output, each parsed as one JSON object."""
    entries = []
    for line in output.splitlines():
        if not line.strip() or ANNOUNCEMENTS.match(line):
            continue
        entry = json.loads(line)
        assert isinstance(entry, dict) and {"time", "level", "logger", "message"} <= set(entry), line
        entries.append(entry)
    return entries


def wait_for_log(process, predicate, timeout: float = 5.0) -> list[dict]:
    """The process's log entries once one satisfies `predicate` (log lines are written after the answer)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = log_lines(process.output())
        if any(predicate(entry) for entry in entries) or time.monotonic() > deadline:
            return entries
        time.sleep(0.05)


def metrics_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels) -> float | None:
    """The value of one sample in Prometheus text format, or None."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))  # the exposition sorts them
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.M)
    return float(match.group(1)) if match else None


# -- certificates ---------------------------------------------------------------------


@dataclass
class Pki:
    """A CA and PEM files signed by it, written into a directory."""

    directory: Path
    ca_key: rsa.RSAPrivateKey
    ca_cert: x509.Certificate
    ca_path: Path

    @classmethod
    def create(cls, directory: Path, name: str = "Test CA") -> "Pki":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        directory.mkdir(parents=True, exist_ok=True)
        ca_path = directory / f"{name.replace(' ', '-').lower()}.pem"
        ca_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, key, cert, ca_path)

    def issue(self, name: str, *, server: bool, valid_for: dt.timedelta = dt.timedelta(days=1)) -> tuple[Path, Path]:
        """(certificate file, key file) for `name`: a server certificate for
        127.0.0.1 and localhost, or a client certificate; valid from 5 minutes ago
        for `valid_for` (a negative one makes an expired certificate)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = dt.datetime.now(dt.timezone.utc)
        not_before = min(now - dt.timedelta(minutes=5), now + valid_for - dt.timedelta(days=1))
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(self.ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before).not_valid_after(now + valid_for)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(
                       [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_path, key_path = self.directory / f"{name}.crt.pem", self.directory / f"{name}.key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path


def https_request(host: str, port: int, ca_path: Path, method: str, path: str, body: bytes | None = None,
                  headers: dict | None = None) -> Reply:
    context = ssl.create_default_context(cafile=str(ca_path))
    connection = http.client.HTTPSConnection(host, port, context=context, timeout=30)
    started = time.monotonic()
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        payload = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, payload,
                     time.monotonic() - started)
    finally:
        connection.close()
