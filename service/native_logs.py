"""Keep gRPC core's own log lines out of our stdout/stderr, and pin its TLS ciphers.

gRPC core (C++) writes free-text lines such as `I1129 ... ssl_transport_security.cc
... Handshake failed` straight to stderr, whatever the Python log level: any
client could add such lines to the JSON log stream. It reads GRPC_VERBOSITY,
GRPC_TRACE and GRPC_SSL_CIPHER_SUITES once, when grpc is first imported, so
this module must be imported before grpc (service.server and
gateway_edge.server import it first).

By default gRPC core says nothing (GRPC_VERBOSITY=NONE, no GRPC_TRACE): our
own log lines report what matters (a refused start, an unreachable back end).
For debugging, REFUND_GRPC_NATIVE_LOGS=1 leaves GRPC_VERBOSITY and GRPC_TRACE
as the environment sets them; those lines are then gRPC's own free text.

The TLS 1.2 cipher suites are AEAD with forward secrecy only (see service.tls).
"""

import os

NATIVE_LOGS_VARIABLE = "REFUND_GRPC_NATIVE_LOGS"
# gRPC core's names (BoringSSL) for TLS 1.2; TLS 1.3's suites are all AEAD and not configurable.
GRPC_TLS12_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
                      "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:"
                      "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")


def native_logs_enabled() -> bool:
    return os.environ.get(NATIVE_LOGS_VARIABLE) == "1"


def quiet_grpc_core() -> None:
    if not native_logs_enabled():
        os.environ["GRPC_VERBOSITY"] = "NONE"
        os.environ.pop("GRPC_TRACE", None)
    os.environ["GRPC_SSL_CIPHER_SUITES"] = GRPC_TLS12_CIPHERS


quiet_grpc_core()
