"""Callers and stored data of release 0.1.0 keep working with today's protos.

protos/releases/v0.1.0.binpb is the 0.1.0 refund.proto as a buf image (a
FileDescriptorSet). `make lint` runs `buf breaking` against it; buf does not
compare an RPC's old and new message when only the message's name changed
(buf.yaml excepts that rule for the renames of 0.1.0), so this checks it here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, json_format, message_factory
from google.rpc import code_pb2, status_pb2

from gateway_edge import answers
from refund.v1 import refund_pb2
from refund_wire.status import replayed_answer
from service import domain, grpc_api

RELEASE = Path(__file__).resolve().parents[2] / "protos" / "releases" / "v0.1.0.binpb"


@pytest.fixture(scope="module")
def release() -> descriptor_pool.DescriptorPool:
    images = descriptor_pb2.FileDescriptorSet.FromString(RELEASE.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in images.file:
        pool.Add(file)
    return pool


def old_class(release, name: str):
    return message_factory.GetMessageClass(release.FindMessageTypeByName(f"refund.v1.{name}"))


def _fields(message) -> dict[int, tuple]:
    """number -> (name, JSON name, type, repeated, presence, message or enum type) of each field."""
    return {f.number: (f.name, f.json_name, f.type, f.is_repeated, f.has_presence,
                       (f.message_type or f.enum_type).full_name if f.type in _NAMED else None)
            for f in message.fields}


_NAMED = (descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE, descriptor_pb2.FieldDescriptorProto.TYPE_ENUM)


def test_every_rpc_of_the_release_takes_and_answers_the_same_fields(release):
    old_service = release.FindServiceByName("refund.v1.RefundService")
    new_service = refund_pb2.DESCRIPTOR.services_by_name["RefundService"]
    assert {m.name for m in old_service.methods} <= set(new_service.methods_by_name)
    for old in old_service.methods:
        new = new_service.methods_by_name[old.name]
        assert (new.client_streaming, new.server_streaming) == (old.client_streaming, old.server_streaming)
        for old_message, new_message in ((old.input_type, new.input_type), (old.output_type, new.output_type)):
            old_fields, new_fields = _fields(old_message), _fields(new_message)
            assert {n: new_fields.get(n) for n in old_fields} == old_fields, (old.name, new_message.full_name)


def test_a_merchant_refund_answer_reads_as_the_release_refund_response(release):
    new = refund_pb2.MerchantRefundResponse(
        response_code="0000",
        order=grpc_api.order_message(_order()),
        transaction=refund_pb2.Transaction(id=2, type="REFUND", status="SUCCESS",
                                           transaction_type=refund_pb2.TRANSACTION_TYPE_REFUND,
                                           transaction_status=refund_pb2.TRANSACTION_STATUS_SUCCESS))
    old = old_class(release, "RefundResponse").FromString(new.SerializeToString())
    assert (old.order.status, old.transaction.type, old.transaction.status) == ("REFUNDED", "REFUND", "SUCCESS")
    as_json = json_format.MessageToDict(old)
    assert as_json["order"]["status"] == "REFUNDED"
    signed = old_class(release, "SignedRequest")(request=b'{"merchantId":"1"}', signature="c2ln",
                                                  idempotency_key="k-1").SerializeToString()
    assert refund_pb2.MerchantRefundRequest.FromString(signed).idempotency_key == "k-1"
    assert refund_pb2.MerchantGetOrderRequest.FromString(signed).request == b'{"merchantId":"1"}'


def test_an_answer_stored_by_the_release_for_an_idempotency_key_replays(release):
    old_reply = old_class(release, "RefundResponse")(response_code="0000")
    old_reply.order.id, old_reply.order.status = 1076, "REFUNDED"
    packed = any_pb2.Any()
    packed.Pack(old_reply)  # what 0.1.0 stored: a Status whose detail is typed refund.v1.RefundResponse
    stored = status_pb2.Status(code=code_pb2.OK, details=[packed]).SerializeToString()
    replayed = replayed_answer(stored)
    assert (replayed.order.id, replayed.order.status) == (1076, "REFUNDED")
    assert replayed.order.order_status == refund_pb2.ORDER_STATUS_UNSPECIFIED  # 0.1.0 had no enum


def test_what_this_release_stores_is_typed_as_the_release_stored_it():
    approved = domain.RefundResult(domain.ResponseCode.SUCCESS, "SUCCESS", order=_order())
    stored = grpc_api.encode_answer(approved)
    assert status_pb2.Status.FromString(stored).details[0].type_url == "type.googleapis.com/refund.v1.RefundResponse"
    replayed = replayed_answer(stored)
    assert isinstance(replayed, refund_pb2.MerchantRefundResponse)
    assert replayed == grpc_api.refund_answer(approved, refund_pb2.MerchantRefundResponse)


def test_the_edge_shows_the_enums_and_falls_back_to_the_strings_of_a_release_answer():
    new = grpc_api.order_message(_order())
    assert new.order_status == refund_pb2.ORDER_STATUS_REFUNDED and new.status == "REFUNDED"
    old = refund_pb2.Order()
    old.CopyFrom(new)
    old.ClearField("order_status")
    assert answers._order(new) == answers._order(old)
    newer = refund_pb2.Order()
    newer.CopyFrom(new)
    newer.order_status = 99  # a value added after this edge was built: the string says what it is
    assert answers._order(newer) == answers._order(new)
    assert '"status":"REFUNDED"' in answers._order(new)
    sale = refund_pb2.Transaction(id=1, merchant_id="1", type="SALE", currency="HKD", amount="1.00", status="SUCCESS")
    both = refund_pb2.Transaction(transaction_type=refund_pb2.TRANSACTION_TYPE_SALE,
                                  transaction_status=refund_pb2.TRANSACTION_STATUS_SUCCESS)
    both.MergeFrom(sale)
    assert answers._transaction(sale) == answers._transaction(both)
    assert '"type":"SALE"' in answers._transaction(both)


def _order() -> domain.Order:
    now = datetime(2026, 11, 26, 11, 41, 19, tzinfo=UTC)
    return domain.Order(id=1076, merchant_id=3000001, merchant_reference="s22tring", currency="HKD", amount=7619,
                        status="REFUNDED", payment_method="VISA", create_time=now, update_time=now)
