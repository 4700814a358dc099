"""A small internal gRPC client: `python -m service.grpc_client refund ...`.

For operators and internal callers trying the service by hand; prints each
answer as JSON, and a rich error as its code, reason and message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from refund.v1 import refund_pb2, refund_pb2_grpc
from refund_wire.status import RpcError


def describe_error(error: grpc.RpcError) -> dict:
    """Code, reason, response code and decline detail of a rich gRPC error."""
    answer = {"code": error.code().name, "message": error.details()}
    rich = RpcError.from_call(error)
    if rich is not None and rich.reason:
        answer["reason"] = rich.reason
        answer["responseCode"] = rich.response_code
    if rich is not None and rich.decline is not None:
        answer["decline"] = json_format.MessageToDict(rich.decline)
    return answer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.grpc_client", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=os.environ.get("REFUND_GRPC_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--tls-ca", help="PEM CA of the service's certificate: connect over TLS")
    parser.add_argument("--tls-cert", help="PEM client certificate, for a service that requires mutual TLS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    commands = parser.add_subparsers(dest="command", required=True)
    refund = commands.add_parser("refund", help="refund an order")
    get = commands.add_parser("get-order", help="show an order and its transactions")
    for sub in (refund, get):
        sub.add_argument("--merchant-id", required=True)
        sub.add_argument("--order-id", type=int, default=0)
        sub.add_argument("--merchant-reference", default="")
    refund.add_argument("--amount", required=True, help='decimal text, e.g. "76.19"')
    args = parser.parse_args(argv)

    if args.tls_ca:
        def read(path):
            return Path(path).read_bytes() if path else None

        credentials = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
        channel = grpc.secure_channel(args.target, credentials)
    else:
        channel = grpc.insecure_channel(args.target)
    with channel:
        stub = refund_pb2_grpc.RefundServiceStub(channel)
        key = dict(merchant_id=args.merchant_id, order_id=args.order_id, merchant_reference=args.merchant_reference)
        try:
            if args.command == "refund":
                reply = stub.Refund(refund_pb2.RefundRequest(amount=args.amount, **key), timeout=args.timeout)
            else:
                reply = stub.GetOrder(refund_pb2.GetOrderRequest(**key), timeout=args.timeout)
        except grpc.RpcError as error:
            print(json.dumps(describe_error(error), indent=2))
            return 1
    print(json.dumps(json_format.MessageToDict(reply), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
