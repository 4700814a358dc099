"""What refund-edge checks before it serves, and its TLS reloading.

Each problem stops the edge with one JSON log line and the exit status of
service.startup: 2 for a bad flag or environment value, 5 for a certificate
or key file that cannot be used (unreadable, not PEM, a key that does not match
its certificate, an expired certificate without --allow-expired-certificate,
a --signing-key that is not an RSA private key of 2048 bits or more).

The HTTPS certificate and key follow their files (service.tls.EdgeTls): looked
at every --tls-reload-interval seconds and on SIGHUP; new handshakes use the
new pair, connections already open keep theirs. The client certificate for
mutual TLS to refund-service and its CA are read at start (restart the edge to
change them); every certificate's expiry is exported as
refund_tls_certificate_expiry_seconds.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc

from gateway_edge.signer import ResponseSigner
from service import tls
from service.startup import EXIT_TLS, StartupError

log = logging.getLogger("refund-edge")


def https(args) -> tls.EdgeTls | None:
    if not args.tls_cert:
        return None
    return tls.EdgeTls(args.tls_cert, args.tls_key, allow_expired=args.allow_expired_certificate)


def grpc_credentials(args) -> grpc.ChannelCredentials | None:
    """TLS to refund-service (None: plaintext), with a client certificate for mutual TLS."""
    if not args.grpc_tls_ca:
        return None
    root = tls._read(args.grpc_tls_ca, "--grpc-tls-ca")
    tls.watch_expiry("grpc_ca", args.grpc_tls_ca,
                     tls.earliest_expiry(tls.read_certificates(args.grpc_tls_ca, "--grpc-tls-ca", root)))
    if not args.grpc_tls_cert:
        return grpc.ssl_channel_credentials(root)
    pair = tls.read_pair(args.grpc_tls_cert, args.grpc_tls_key, allow_expired=args.allow_expired_certificate,
                         flags=("--grpc-tls-cert", "--grpc-tls-key"))
    tls.watch_expiry("grpc_client", args.grpc_tls_cert, pair.not_after)
    return grpc.ssl_channel_credentials(root, pair.key_pem, pair.cert_pem)


def signer(args) -> ResponseSigner | None:
    if not args.signing_key:
        return None
    try:
        return ResponseSigner.from_file(args.signing_key)
    except OSError as exc:
        raise StartupError(f"cannot read --signing-key {args.signing_key}: {exc.strerror or exc}", EXIT_TLS) from None
    except (ValueError, TypeError) as exc:  # not a PEM private key, encrypted, or not RSA
        raise StartupError(f"unusable --signing-key {args.signing_key}: {exc}", EXIT_TLS) from None


def follow_tls_files(edge_tls: tls.EdgeTls | None, interval: float) -> asyncio.Task | None:
    """Reload the HTTPS pair when its files change and on SIGHUP (on the running loop).
    Without HTTPS, SIGHUP is only logged: it means "reload", never "stop"."""
    loop = asyncio.get_running_loop()
    if edge_tls is None:
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP: no TLS files to reload"))
        return None
    loop.add_signal_handler(signal.SIGHUP, lambda: edge_tls.reload_if_changed(forced=True))

    async def poll():
        while True:
            await asyncio.sleep(interval)
            edge_tls.reload_if_changed()

    return loop.create_task(poll())
