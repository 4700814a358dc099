"""RefundService over gRPC, in process on a free port, on SQLite and PostgreSQL."""

from __future__ import annotations

import re

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from refund.v1 import refund_pb2
from service import db, schema
from tests.support import data
from tests.support.in_process import InProcessService, error_info
from tests.support.processes import free_port

MERCHANT, OTHER = 3000001, 3000002


@pytest.fixture
def service(database_url):
    data.load(
        database_url,
        [data.merchant(MERCHANT, balances={"HKD": "1000.00", "JPY": "50000", "BHD": "10.000"}),
         data.merchant(OTHER, balances={"HKD": "1000.00"})],
        [
            data.order(1076, MERCHANT, "76.19", reference="s22tring"),
            data.order(1077, MERCHANT, "120.00", method="ALIPAY", reference="alipay-0001"),
            data.order(1078, MERCHANT, "35.50", method="OCTOPUS", status="SETTLED"),
            data.order(1079, MERCHANT, "4800", currency="JPY", method="MASTERCARD"),
            data.order(1080, MERCHANT, "2000.00"),
            data.order(1081, MERCHANT, "10.00", status="OPEN"),
            data.order(1082, MERCHANT, "5.250", currency="BHD"),
            data.order(1083, MERCHANT, "12.00", status="SETTLED"),
            data.order(2001, OTHER, "50.00"),
        ],
    )
    running = InProcessService(database_url)
    running.url = database_url
    yield running
    running.close()


def refund(service, amount, order_id=0, reference="", merchant=MERCHANT):
    return service.stub.Refund(refund_pb2.RefundRequest(
        merchant_id=str(merchant), order_id=order_id, merchant_reference=reference, amount=amount), timeout=10)


def declined(service, amount, **kwargs):
    with pytest.raises(grpc.RpcError) as caught:
        refund(service, amount, **kwargs)
    info, decline = error_info(caught.value)
    return caught.value, info, decline


def balance(url, merchant=MERCHANT, currency="HKD") -> int:
    engine = db.make_engine(url)
    with engine.connect() as connection:
        value = connection.execute(sa.select(schema.balances.c.unsettled).where(
            schema.balances.c.merchant_id == merchant, schema.balances.c.currency == currency)).scalar_one()
    engine.dispose()
    return value


def attempts(url) -> list[tuple]:
    engine = db.make_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(sa.select(schema.refund_attempts.c.order_id, schema.refund_attempts.c.response_code)
                                  .order_by(schema.refund_attempts.c.id)).all()
    engine.dispose()
    return [tuple(row) for row in rows]


def test_full_refund_is_approved_and_debits_the_balance(service):
    reply = refund(service, "76.19", order_id=1076)
    assert reply.response_code == "0000"
    assert (reply.order.id, reply.order.status, reply.order.amount, reply.order.currency) == \
        (1076, "REFUNDED", "76.19", "HKD")
    txn = reply.transaction
    assert (txn.type, txn.status, txn.amount, txn.currency, txn.order_id, txn.merchant_id) == \
        ("REFUND", "SUCCESS", "76.19", "HKD", 1076, str(MERCHANT))
    assert txn.masked_pan == "411111******1111"
    assert re.fullmatch(r"\d{6}", txn.stan)
    assert reply.order.update_time.ToDatetime() >= reply.order.create_time.ToDatetime()
    assert balance(service.url) == 100000 - 7619
    assert attempts(service.url) == [(1076, "0000")]


def test_partial_refund_by_reference_marks_the_order_partially_refunded(service):
    reply = refund(service, "10", reference="s22tring")
    assert (reply.order.status, reply.transaction.amount) == ("PARTIALLY_REFUNDED", "10.00")
    assert balance(service.url) == 100000 - 1000


def test_amounts_keep_the_currency_precision(service):
    assert refund(service, "4800", order_id=1079).order.amount == "4800"
    assert balance(service.url, currency="JPY") == 50000 - 4800
    reply = refund(service, "1.25", order_id=1082)
    assert (reply.order.amount, reply.transaction.amount) == ("5.250", "1.250")


def test_second_refund_is_already_refunded_and_carries_the_first_refund(service):
    first = refund(service, "5.00", order_id=1076)
    error, info, decline = declined(service, "5.00", order_id=1076)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert (info.reason, info.domain, info.metadata["responseCode"]) == ("ALREADY_REFUNDED", "refund.gateway", "3003")
    assert decline.transaction == first.transaction
    assert decline.order.status == "PARTIALLY_REFUNDED"
    assert balance(service.url) == 100000 - 500


@pytest.mark.parametrize("order_id, amount, code, reason, response_code", [
    (1077, "60.00", grpc.StatusCode.FAILED_PRECONDITION, "PARTIAL_REFUND_NOT_SUPPORTED", "4002"),
    (1078, "35.50", grpc.StatusCode.FAILED_PRECONDITION, "REFUND_NOT_SUPPORTED", "4001"),
    (1076, "76.20", grpc.StatusCode.OUT_OF_RANGE, "AMOUNT_EXCEEDS_ORDER", "4003"),
    (1080, "2000.00", grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_BALANCE", "4004"),
    (1081, "10.00", grpc.StatusCode.FAILED_PRECONDITION, "ORDER_NOT_REFUNDABLE", "3002"),
    (1076, "76.191", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT", "1002"),
    (1079, "1.5", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT", "1002"),
    (1076, "0", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT", "1002"),
    (1076, "-1", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT", "1002"),
    (1076, "NaN", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT", "1002"),
    (1076, "Infinity", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT", "1002"),
    (1076, "1e400", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_AMOUNT", "1002"),
])
def test_declines_carry_code_reason_and_the_order(service, order_id, amount, code, reason, response_code):
    error, info, decline = declined(service, amount, order_id=order_id)
    assert error.code() == code
    assert (info.reason, info.metadata["responseCode"]) == (reason, response_code)
    assert decline.order.id == order_id and decline.response_code == response_code
    assert not decline.HasField("transaction")
    assert balance(service.url) == 100000
    assert attempts(service.url) == [(order_id, response_code)]


def test_settled_order_can_be_refunded(service):
    assert refund(service, "12.00", order_id=1083).order.status == "REFUNDED"


def test_another_merchants_order_is_answered_exactly_like_a_missing_one(service):
    foreign, foreign_info, foreign_decline = declined(service, "50.00", order_id=2001)
    missing, missing_info, missing_decline = declined(service, "50.00", order_id=999999)
    assert foreign.code() == missing.code() == grpc.StatusCode.NOT_FOUND
    assert foreign.details() == missing.details()
    assert foreign.trailing_metadata() == missing.trailing_metadata()
    assert foreign_info.reason == "ORDER_NOT_FOUND" and foreign_decline is None and missing_decline is None
    by_reference, *_ = declined(service, "50.00", reference="ref-2001")
    assert by_reference.trailing_metadata() == missing.trailing_metadata()
    assert balance(service.url, merchant=OTHER) == 100000


@pytest.mark.parametrize("request_fields, message", [
    ({"order_id": 0, "merchant_reference": ""}, "orderId or merchantReference is required"),
    ({"order_id": 1076, "merchant_reference": "alipay-0001"}, "name different orders"),
    ({"order_id": -5}, "positive"),
])
def test_bad_order_identifiers_are_invalid_requests(service, request_fields, message):
    with pytest.raises(grpc.RpcError) as caught:
        service.stub.Refund(refund_pb2.RefundRequest(merchant_id=str(MERCHANT), amount="1.00", **request_fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert error_info(caught.value)[0].reason == "INVALID_REQUEST"


def test_merchant_id_must_be_digits(service):
    error, info, _ = declined(service, "1.00", order_id=1076, merchant="30x")
    assert (error.code(), info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")


def test_get_order_returns_the_order_with_its_transactions(service):
    refund(service, "76.19", order_id=1076)
    reply = service.stub.GetOrder(refund_pb2.GetOrderRequest(merchant_id=str(MERCHANT), merchant_reference="s22tring"))
    assert reply.order.status == "REFUNDED"
    assert [(t.type, t.amount) for t in reply.transactions] == [("SALE", "76.19"), ("REFUND", "76.19")]
    with pytest.raises(grpc.RpcError) as caught:
        service.stub.GetOrder(refund_pb2.GetOrderRequest(merchant_id=str(MERCHANT), order_id=2001))
    assert error_info(caught.value)[0].reason == "ORDER_NOT_FOUND"


def test_states_and_types_are_enums_with_the_release_strings_beside_them(service):
    reply = refund(service, "10.00", order_id=1080)
    assert (reply.order.order_status, reply.order.status) == (refund_pb2.ORDER_STATUS_PARTIALLY_REFUNDED,
                                                              "PARTIALLY_REFUNDED")
    assert (reply.transaction.transaction_type, reply.transaction.type) == (refund_pb2.TRANSACTION_TYPE_REFUND,
                                                                            "REFUND")
    assert (reply.transaction.transaction_status, reply.transaction.status) == \
        (refund_pb2.TRANSACTION_STATUS_SUCCESS, "SUCCESS")
    found = service.stub.GetOrder(refund_pb2.GetOrderRequest(merchant_id=str(MERCHANT), order_id=1080))
    assert [(t.transaction_type, t.type) for t in found.transactions] == \
        [(refund_pb2.TRANSACTION_TYPE_SALE, "SALE"), (refund_pb2.TRANSACTION_TYPE_REFUND, "REFUND")]
    settled = service.stub.GetOrder(refund_pb2.GetOrderRequest(merchant_id=str(MERCHANT), order_id=1078))
    assert (settled.order.order_status, settled.order.status) == (refund_pb2.ORDER_STATUS_SETTLED, "SETTLED")
    _, _, decline = declined(service, "10.00", order_id=1081)
    assert (decline.order.order_status, decline.order.status) == (refund_pb2.ORDER_STATUS_OPEN, "OPEN")


def sale(order_id=5000, amount="99.90", **overrides):
    fields = dict(order_id=order_id, merchant_id=str(MERCHANT), merchant_reference=f"sale-{order_id}", currency="HKD",
                  amount=amount, payment_method="VISA", masked_pan="400000******0002", stan="123456")
    return refund_pb2.RecordSaleRequest(**{**fields, **overrides})


def test_recorded_sale_credits_the_balance_once_and_can_be_refunded(service):
    first = service.stub.RecordSale(sale())
    again = service.stub.RecordSale(sale())
    assert first.unsettled_balance == again.unsettled_balance == "1099.90"
    assert (first.order.status, first.transaction.type, first.transaction.stan) == ("SUCCESS", "SALE", "123456")
    assert balance(service.url) == 109990
    assert refund(service, "99.90", order_id=5000).transaction.masked_pan == "400000******0002"


@pytest.mark.parametrize("overrides, reason", [
    ({"masked_pan": "4111111111111111"}, "INVALID_REQUEST"),
    ({"stan": "12345"}, "INVALID_REQUEST"),
    ({"currency": "XXQ"}, "INVALID_REQUEST"),
    ({"payment_method": "NOPE"}, "INVALID_REQUEST"),
    ({"merchant_id": "999"}, "INVALID_REQUEST"),
    ({"amount": "1.001"}, "INVALID_AMOUNT"),
    ({"amount": "0"}, "INVALID_AMOUNT"),
    ({"merchant_reference": "s22tring"}, "ORDER_EXISTS"),
    ({"order_id": 1076}, "ORDER_EXISTS"),
])
def test_bad_sales_are_refused_and_write_nothing(service, overrides, reason):
    with pytest.raises(grpc.RpcError) as caught:
        service.stub.RecordSale(sale(**overrides))
    assert error_info(caught.value)[0].reason == reason
    assert balance(service.url) == 100000


def settle(service, amount, settlement_id, merchant=MERCHANT, currency="HKD"):
    return service.stub.Settle(refund_pb2.SettleRequest(merchant_id=str(merchant), currency=currency, amount=amount,
                                                        settlement_id=settlement_id), timeout=10)


def test_settlement_debits_the_balance_but_never_below_zero(service):
    reply = settle(service, "999.99", "batch-1")
    assert reply.unsettled_balance == "0.01"
    assert (reply.settlement.settlement_id, reply.settlement.amount) == ("batch-1", "999.99")
    with pytest.raises(grpc.RpcError) as caught:
        settle(service, "0.02", "batch-2")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value)[0].reason == "INSUFFICIENT_BALANCE"
    assert balance(service.url) == 1
    error, info, _ = declined(service, "1.00", order_id=1076)
    assert info.reason == "INSUFFICIENT_BALANCE"


def test_health_and_reflection_are_served(service):
    health = health_pb2_grpc.HealthStub(service.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(service.channel)
    answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for answer in answers for s in answer.list_services_response.service}
    assert {"refund.v1.RefundService", "grpc.health.v1.Health"} <= names


def test_reflection_v1_is_served_next_to_v1alpha(service):
    """grpc.reflection.v1 has v1alpha's messages under another package name."""
    info = service.channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    answers = list(info(iter([reflection_pb2.ServerReflectionRequest(list_services=""),
                              reflection_pb2.ServerReflectionRequest(file_containing_symbol="refund.v1.RefundService")]),
                        timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"refund.v1.RefundService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    assert answers[1].file_descriptor_response.file_descriptor_proto, answers[1]


def test_database_down_answers_unavailable_quickly():
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"
    running = InProcessService(url, db_timeout=1.0, connect=False)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            running.stub.Refund(refund_pb2.RefundRequest(merchant_id="1", order_id=1, amount="1.00"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        info, _ = error_info(caught.value)
        assert (info.reason, info.metadata["responseCode"]) == ("SERVICE_UNAVAILABLE", "9001")
        assert "postgres" not in caught.value.details()
    finally:
        running.close()


def test_caller_deadline_shorter_than_the_database_answers_unavailable_in_time(service):
    """A lock held by another transaction stalls the refund: the caller gets
    UNAVAILABLE within its deadline, and the retry after the lock is released
    refunds the order exactly once."""
    if not service.url.startswith("postgresql"):
        pytest.skip("SQLite holds the write lock per file; covered by the PostgreSQL variant")
    engine = sa.create_engine(service.url)
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1 FROM orders WHERE id = 1076 FOR UPDATE"))
        with pytest.raises(grpc.RpcError) as caught:
            refund_with_timeout = service.stub.Refund.with_call
            refund_with_timeout(refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=1076, amount="76.19"),
                                timeout=1.0)
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        connection.rollback()
    engine.dispose()
    assert refund(service, "76.19", order_id=1076).response_code == "0000"
    error, info, decline = declined(service, "76.19", order_id=1076)
    assert info.reason == "ALREADY_REFUNDED"
    assert balance(service.url) == 100000 - 7619
