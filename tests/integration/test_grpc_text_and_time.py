"""No INTERNAL over gRPC for any text or timestamp a caller sends: every
string field is checked for what both databases can store (no NUL, no lone
surrogate, a bounded length) and every timestamp for its range; the answer is
INVALID_ARGUMENT with reason INVALID_REQUEST and nothing is written. On SQLite
and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refund.v1 import refund_pb2
from tests.support import data
from tests.support.in_process import InProcessService, error_info

MERCHANT = 3100001


@pytest.fixture
def service(database_url):
    data.load(database_url, [data.merchant(MERCHANT, balances={"HKD": "1000.00"})],
              [data.order(1076, MERCHANT, "76.19", reference="s22tring")])
    running = InProcessService(database_url)
    running.url = database_url
    yield running
    running.close()


def invalid_argument(call, request):
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (caught.value.code(), caught.value.details())
    info, _ = error_info(caught.value)
    assert info.reason == "INVALID_REQUEST", info
    return caught.value.details()


BAD_TEXTS = {"NUL": "s22\x00tring", "NUL alone": "\x00", "129 characters": "r" * 129,
             "4096 characters": "\u00e9" * 4096}


def sale(order_id=5000, **overrides):
    fields = dict(order_id=order_id, merchant_id=str(MERCHANT), merchant_reference=f"sale-{order_id}", currency="HKD",
                  amount="9.90", payment_method="VISA", masked_pan="400000******0002", stan="123456")
    return refund_pb2.RecordSaleRequest(**{**fields, **overrides})


@pytest.mark.parametrize("text", BAD_TEXTS.values(), ids=BAD_TEXTS.keys())
def test_a_reference_the_database_cannot_store_is_invalid_argument_on_every_method(service, text):
    stub = service.stub
    invalid_argument(stub.Refund, refund_pb2.RefundRequest(merchant_id=str(MERCHANT), merchant_reference=text,
                                                           amount="1.00"))
    invalid_argument(stub.Refund, refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=1076,
                                                           merchant_reference=text, amount="1.00"))
    invalid_argument(stub.GetOrder, refund_pb2.GetOrderRequest(merchant_id=str(MERCHANT), merchant_reference=text))
    invalid_argument(stub.RecordSale, sale(merchant_reference=text))
    invalid_argument(stub.RecordSale, sale(payment_method=text))
    # Nothing was written: the order is still refundable in full.
    assert stub.Refund(refund_pb2.RefundRequest(merchant_id=str(MERCHANT), order_id=1076, amount="76.19"),
                       timeout=10).order.status == "REFUNDED"


@pytest.mark.parametrize("seconds, nanos", [
    (2**62, 0), (-(2**40), 0), (0, -5), (-1, 0), (0, 10**9), (253402300800, 0), (-62135596801, 0),
], ids=["2^62 s", "-2^40 s", "-5 ns", "before 1970", "nanos 1e9", "year 10000", "before year 1"])
def test_a_sale_time_out_of_range_is_invalid_argument_and_writes_nothing(service, seconds, nanos):
    request = sale(create_time=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))
    assert "create_time" in invalid_argument(service.stub.RecordSale, request)
    with pytest.raises(grpc.RpcError) as caught:
        service.stub.GetOrder(refund_pb2.GetOrderRequest(merchant_id=str(MERCHANT), order_id=5000), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("seconds, nanos, shown", [
    (0, 0, "1970-01-01T00:00:00"),
    (253402300799, 999_999_999, "9999-12-31T23:59:59"),
    (1_795_000_000, 5, "2026-11-18T"),
], ids=["1970", "the last instant of 9999", "now-ish with nanos"])
def test_a_sale_time_at_the_edges_of_the_range_is_stored_and_read_back(service, seconds, nanos, shown):
    reply = service.stub.RecordSale(sale(create_time=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)),
                                    timeout=10)
    assert reply.order.create_time.seconds == seconds
    found = service.stub.GetOrder(refund_pb2.GetOrderRequest(merchant_id=str(MERCHANT), order_id=5000), timeout=10)
    assert found.order.create_time.ToDatetime().isoformat().startswith(shown)


def test_invalid_utf8_in_a_string_field_is_refused_without_a_server_fault(service):
    """A client of another language can put any bytes in a proto3 string; the
    server must refuse them without answering INTERNAL."""
    good = refund_pb2.GetOrderRequest(merchant_id=str(MERCHANT), merchant_reference="s22tring").SerializeToString()
    broken = good.replace(b"s22tring", b"s22\xed\xa0\x80ng")  # a UTF-8-encoded lone surrogate, same length
    call = service.channel.unary_unary("/refund.v1.RefundService/GetOrder", request_serializer=None,
                                       response_deserializer=refund_pb2.GetOrderResponse.FromString)
    with pytest.raises(grpc.RpcError) as caught:
        call(broken, timeout=10)
    assert caught.value.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), caught.value


SERVER_FAULTS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
                 grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DATA_LOSS)


def _texts():
    """What Python's protobuf can send: any Unicode but lone surrogates (those
    only as bytes, above); NUL, control characters and lengths around 128 and 32."""
    characters = st.one_of(st.characters(exclude_categories=["Cs"]),
                           st.sampled_from(["\x00", "\x00", "\x01", "\x7f", "\U0001f4b3", "'", "%", "_"]))
    return st.one_of(st.lists(characters, min_size=1, max_size=40).map("".join),
                     st.tuples(st.integers(30, 300), characters).map(lambda t: t[1] * t[0]))


def _outcome(call, request) -> grpc.StatusCode:
    try:
        call(request, timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        assert error.code() not in SERVER_FAULTS, (error.code(), error.details())
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            assert error_info(error)[0].reason in ("INVALID_REQUEST", "INVALID_AMOUNT")
        return error.code()


@settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reference=_texts(), method=st.sampled_from(["VISA", "VISA\x00", "ALIPAY"]) | _texts(),
       seconds=st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-10**10, 3 * 10**11)),
       nanos=st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-2, 10**9 + 1)),
       order_id=st.integers(1, 2**63 - 1))
def test_any_text_and_time_over_grpc_is_answered_without_a_server_fault(service, reference, method, seconds, nanos,
                                                                         order_id):
    stub = service.stub
    sold = _outcome(stub.RecordSale, sale(order_id, merchant_reference=reference, payment_method=method,
                                          create_time=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)))
    storable = "\x00" not in reference and len(reference) <= 128 and "\x00" not in method and len(method) <= 32
    in_range = 0 <= seconds <= 253402300799 and 0 <= nanos < 10**9
    if not (storable and in_range):
        assert sold == grpc.StatusCode.INVALID_ARGUMENT
    _outcome(stub.GetOrder, refund_pb2.GetOrderRequest(merchant_id=str(MERCHANT), merchant_reference=reference))
    _outcome(stub.Refund, refund_pb2.RefundRequest(merchant_id=str(MERCHANT), merchant_reference=reference,
                                                   amount="1.00"))


@settings(deadline=None, max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["merchant_id", "currency", "masked_pan", "stan", "amount"]), text=_texts(),
       settlement_id=st.sampled_from(["s-1", "s-2"]) | _texts())
def test_any_text_in_the_other_string_fields_is_answered_without_a_server_fault(service, field, text,
                                                                                 settlement_id):
    _outcome(service.stub.RecordSale, sale(6000, **{field: text}))
    settle = dict(merchant_id=str(MERCHANT), currency="HKD", amount="0.01", settlement_id=settlement_id)
    if field in ("merchant_id", "currency", "amount"):
        settle[field] = text
    _outcome(service.stub.Settle, refund_pb2.SettleRequest(**settle))
