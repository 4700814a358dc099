"""The bare chain's gRPC hop: a tiny proto of its own, built here instead of by protoc
(no generation step, and unaffected when refund.v1's messages are renamed):

    syntax = "proto3";
    package bench.bare;
    message RefundRequest { bytes request = 1; string signature = 2; }
    message RefundReply {
      string response_code = 1; int64 order_id = 2; string order_status = 3;
      int64 transaction_id = 4; string amount = 5;   // decimal text, "10.00"
    }
    service BareRefundService { rpc Refund(RefundRequest) returns (RefundReply); }

The message classes are the same upb-backed protobuf classes protoc's output would give.
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

METHOD = "/bench.bare.BareRefundService/Refund"

_F = descriptor_pb2.FieldDescriptorProto


def _build():
    file = descriptor_pb2.FileDescriptorProto(name="bench/bare.proto", package="bench.bare", syntax="proto3")
    request = file.message_type.add(name="RefundRequest")
    request.field.add(name="request", number=1, type=_F.TYPE_BYTES, label=_F.LABEL_OPTIONAL)
    request.field.add(name="signature", number=2, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    reply = file.message_type.add(name="RefundReply")
    for number, (name, kind) in enumerate([("response_code", _F.TYPE_STRING), ("order_id", _F.TYPE_INT64),
                                           ("order_status", _F.TYPE_STRING), ("transaction_id", _F.TYPE_INT64),
                                           ("amount", _F.TYPE_STRING)], start=1):
        reply.field.add(name=name, number=number, type=kind, label=_F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.bare.RefundRequest")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.bare.RefundReply")))


RefundRequest, RefundReply = _build()


def handler(refund) -> grpc.GenericRpcHandler:
    """The service's one method, `refund(request, context) -> RefundReply` (async)."""
    method = grpc.unary_unary_rpc_method_handler(refund, request_deserializer=RefundRequest.FromString,
                                                 response_serializer=RefundReply.SerializeToString)
    return grpc.method_handlers_generic_handler("bench.bare.BareRefundService", {"Refund": method})


def stub(channel: grpc.aio.Channel):
    """The client side: `await stub(request, timeout=...) -> RefundReply`."""
    return channel.unary_unary(METHOD, request_serializer=RefundRequest.SerializeToString,
                               response_deserializer=RefundReply.FromString)
