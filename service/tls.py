"""TLS for refund-service (gRPC) and refund-edge (HTTPS): checked at start,
reloaded without downtime, with a gauge of seconds until each certificate expires.

Policy (docs/operations.md, "TLS policy"): TLS 1.2 minimum; TLS 1.2 only with
ECDHE key exchange and AEAD ciphers (AES-GCM, ChaCha20-Poly1305); TLS 1.3 with
its own suites, all AEAD. gRPC core takes its TLS 1.2 list from
GRPC_SSL_CIPHER_SUITES (set by service.native_logs before grpc loads) and
refuses anything below TLS 1.2 itself; the edge's context is built here.

At start a certificate and key pair must be readable PEM, the key must belong
to the certificate, and the certificate must be valid now; an expired one is
refused (exit 5) unless --allow-expired-certificate, which logs a warning at
start and at every reload. While running, the files are looked at every
--tls-reload-interval seconds and on SIGHUP: a changed pair is checked the same
way and then used for every new handshake; connections already open keep
theirs. A pair that fails the check (say the certificate was replaced but not
yet its key) is not used: the current pair stays, an error is logged, and the
files are tried again when they change.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from prometheus_client import Gauge

from service.startup import EXIT_TLS, StartupError

log = logging.getLogger("refund-tls")

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# OpenSSL's names for the edge's TLS 1.2 suites: ECDHE with AES-GCM or ChaCha20-Poly1305 only.
OPENSSL_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
DEFAULT_RELOAD_INTERVAL = 5.0

EXPIRY = Gauge("refund_tls_certificate_expiry_seconds",
               "Seconds until the certificate expires (negative: expired), per certificate this process uses",
               ["role", "path"])


@dataclass(frozen=True)
class Pair:
    """A certificate chain and its private key, as read and checked."""

    cert_pem: bytes
    key_pem: bytes
    subject: str
    not_after: datetime
    fingerprint: str  # SHA-256 of the leaf certificate (DER), hex

    def describe(self) -> str:
        return f"{self.subject}, valid until {self.not_after:%Y-%m-%dT%H:%M:%SZ}, sha256 {self.fingerprint[:16]}"


def _read(path: str, flag: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise StartupError(f"cannot read {flag} {path}: {exc.strerror or exc}", EXIT_TLS) from None


def read_certificates(path: str, flag: str, data: bytes | None = None) -> list[x509.Certificate]:
    data = _read(path, flag) if data is None else data
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise StartupError(f"{flag} {path} holds no PEM certificate", EXIT_TLS)
    return certificates


def _public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def read_pair(cert_path: str, key_path: str, *, allow_expired: bool = False, flags=("--tls-cert", "--tls-key"),
              now: datetime | None = None) -> Pair:
    """The pair from the files, or StartupError (exit 5) saying what is wrong with it."""
    cert_flag, key_flag = flags
    cert_pem = _read(cert_path, cert_flag)
    chain = read_certificates(cert_path, cert_flag, cert_pem)
    key_pem = _read(key_path, key_flag)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise StartupError(f"{key_flag} {key_path} is encrypted: give an unencrypted PEM private key "
                           f"(readable by the service account only)", EXIT_TLS) from None
    except (ValueError, UnsupportedAlgorithm):
        raise StartupError(f"{key_flag} {key_path} is not a PEM private key", EXIT_TLS) from None
    leaf = chain[0]
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        raise StartupError(f"the private key {key_flag} {key_path} does not match the certificate "
                           f"{cert_flag} {cert_path}", EXIT_TLS)
    now = now or datetime.now(UTC)
    pair = Pair(cert_pem, key_pem, leaf.subject.rfc4514_string() or "(no subject)", leaf.not_valid_after_utc,
                hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest())
    if leaf.not_valid_before_utc > now:
        raise StartupError(f"the certificate {cert_flag} {cert_path} ({pair.describe()}) is not valid before "
                           f"{leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}", EXIT_TLS)
    if pair.not_after <= now:
        if not allow_expired:
            raise StartupError(f"the certificate {cert_flag} {cert_path} expired at "
                               f"{pair.not_after:%Y-%m-%dT%H:%M:%SZ} ({pair.describe()}); renew it, or start with "
                               f"--allow-expired-certificate to serve it anyway", EXIT_TLS)
        log.warning("SERVING AN EXPIRED CERTIFICATE (--allow-expired-certificate): %s %s expired at %s; "
                    "clients that check expiry will refuse every handshake", cert_flag, cert_path,
                    f"{pair.not_after:%Y-%m-%dT%H:%M:%SZ}", extra={"fields": {"certificate": pair.describe()}})
    return pair


def watch_expiry(role: str, path: str, not_after: datetime) -> None:
    """refund_tls_certificate_expiry_seconds{role, path}: computed at each scrape."""
    deadline = not_after.timestamp()
    EXPIRY.labels(role, path).set_function(lambda: deadline - time.time())


def earliest_expiry(certificates: list[x509.Certificate]) -> datetime:
    return min(certificate.not_valid_after_utc for certificate in certificates)


def _stamp(*paths: str | None) -> tuple:
    """What changes when any of the files is replaced or rewritten."""
    stamp = []
    for path in paths:
        if path:
            try:
                status = os.stat(path)
                stamp.append((status.st_ino, status.st_size, status.st_mtime_ns))
            except OSError:
                stamp.append(None)
    return tuple(stamp)


class ReloadingPair:
    """A certificate pair (and, for the service, a client CA) that follows its files.
    `apply(pair, ca_pem)` is called with each new checked pair."""

    def __init__(self, cert: str, key: str, ca: str | None = None, *, allow_expired: bool = False,
                 ca_flag: str = "--tls-ca", ca_role: str = "client_ca"):
        self.cert, self.key, self.ca = cert, key, ca
        self.allow_expired = allow_expired
        self.ca_flag, self.ca_role = ca_flag, ca_role
        self._stamp = _stamp(cert, key, ca)
        self.pair, self.ca_pem = self._read()  # StartupError at start
        self.reloads = 0

    def _read(self) -> tuple[Pair, bytes | None]:
        pair = read_pair(self.cert, self.key, allow_expired=self.allow_expired)
        ca_pem = None
        if self.ca:
            ca_pem = _read(self.ca, self.ca_flag)
            certificates = read_certificates(self.ca, self.ca_flag, ca_pem)
            watch_expiry(self.ca_role, self.ca, earliest_expiry(certificates))
        watch_expiry("server", self.cert, pair.not_after)
        return pair, ca_pem

    def apply(self, pair: Pair, ca_pem: bytes | None) -> None:
        raise NotImplementedError

    def reload_if_changed(self, *, forced: bool = False) -> bool:
        """Read the files again when they changed (or `forced`, on SIGHUP) and use
        them if they pass the checks; True when a new pair is in use."""
        stamp = _stamp(self.cert, self.key, self.ca)
        if stamp == self._stamp and not forced:
            return False
        self._stamp = stamp
        try:
            pair, ca_pem = self._read()
            self.apply(pair, ca_pem)
        except StartupError as exc:
            log.error("kept the current TLS certificate (%s): %s", self.pair.describe(), exc)
            return False
        except (ssl.SSLError, ValueError) as exc:
            log.error("kept the current TLS certificate (%s): the new one is unusable: %s", self.pair.describe(),
                      getattr(exc, "reason", None) or exc)
            return False
        if pair.fingerprint != self.pair.fingerprint or ca_pem != self.ca_pem:
            log.info("TLS certificate reloaded: new handshakes use %s", pair.describe(),
                     extra={"fields": {"previous": self.pair.describe()}})
        self.pair, self.ca_pem = pair, ca_pem
        self.reloads += 1
        return True


class ServiceTls(ReloadingPair):
    """gRPC server credentials whose certificate (and client CA) gRPC core asks
    for at every new handshake: the newest checked pair."""

    def __init__(self, cert: str, key: str, ca: str | None = None, *, allow_expired: bool = False):
        import grpc

        super().__init__(cert, key, ca, allow_expired=allow_expired)
        self._lock = threading.Lock()
        self._pending = None
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self._configuration(self.pair, self.ca_pem), self._fetch,
            require_client_authentication=ca is not None)

    @staticmethod
    def _configuration(pair: Pair, ca_pem: bytes | None):
        import grpc

        return grpc.ssl_server_certificate_configuration([(pair.key_pem, pair.cert_pem)], root_certificates=ca_pem)

    def apply(self, pair: Pair, ca_pem: bytes | None) -> None:
        configuration = self._configuration(pair, ca_pem)
        with self._lock:
            self._pending = configuration

    def _fetch(self):
        """Called by gRPC core (on its own thread) before each handshake: a new
        configuration once after a reload, else None (keep the current one)."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending


def _context_from(pair: Pair) -> ssl.SSLContext:
    """A server context of our policy holding `pair` (loaded through private temporary files:
    OpenSSL loads from files, and these hold exactly the bytes that were checked)."""
    context = policy_context()
    with tempfile.TemporaryDirectory(prefix="refund-tls-") as directory:  # mode 0700
        cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        for path, data in ((cert_path, pair.cert_pem), (key_path, pair.key_pem)):
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
        context.load_cert_chain(cert_path, key_path)
    return context


def policy_context() -> ssl.SSLContext:
    """An HTTPS server context: TLS 1.2 minimum, ECDHE+AEAD suites for TLS 1.2."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(OPENSSL_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    return context


class EdgeTls(ReloadingPair):
    """The edge's HTTPS context: `context` is what uvicorn serves with; at each
    handshake (the ClientHello callback, with or without SNI) it hands the
    connection the context of the newest checked pair."""

    def __init__(self, cert: str, key: str, *, allow_expired: bool = False):
        super().__init__(cert, key, allow_expired=allow_expired)
        self._current = _context_from(self.pair)
        self.context = _context_from(self.pair)
        self.context.sni_callback = self._choose

    def apply(self, pair: Pair, ca_pem: bytes | None) -> None:
        self._current = _context_from(pair)

    def _choose(self, connection, server_name, context):
        connection.context = self._current
        return None
