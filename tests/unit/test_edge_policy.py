"""gateway_edge.policy in isolation: the token bucket, its bound on memory, the
settings' syntax, and reading the merchant a request claims."""

from __future__ import annotations

import pytest

from gateway_edge.policy import (
    Rate,
    RateLimiter,
    StatusMode,
    StatusModes,
    claimed_merchant,
    parse_overrides,
    parse_rate,
    parse_status_mode,
)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_bucket_allows_its_burst_then_one_request_per_interval_and_says_how_long_to_wait():
    clock = Clock()
    limiter = RateLimiter(Rate(2.0, 3), clock=clock)
    assert [limiter.take(1) for _ in range(3)] == [None, None, None]
    assert limiter.take(1) == pytest.approx(0.5)
    clock.now += 0.25
    assert limiter.take(1) == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.take(1) is None
    clock.now += 100  # refills up to the burst, not beyond
    assert [limiter.take(1) for _ in range(4)][-1] == pytest.approx(0.5)


def test_merchants_have_buckets_of_their_own_and_overrides_win():
    limiter = RateLimiter(Rate(1.0, 1), {7: Rate(5.0, 5), 8: None}, clock=Clock())
    assert limiter.take(1) is None and limiter.take(1) is not None
    assert limiter.take(2) is None  # another merchant is not affected
    assert all(limiter.take(7) is None for _ in range(5)) and limiter.take(7) is not None
    assert all(limiter.take(8) is None for _ in range(1000))  # off for merchant 8
    assert RateLimiter(None).active is False and RateLimiter(None, {7: Rate(1, 1)}).active is True
    assert RateLimiter(None, {7: Rate(1, 1)}).take(8) is None


def test_a_token_given_back_can_be_spent_again_but_never_beyond_the_burst():
    limiter = RateLimiter(Rate(1.0, 2), clock=Clock())
    assert limiter.take(1) is None and limiter.take(1) is None and limiter.take(1) is not None
    limiter.give_back(1)
    assert limiter.take(1) is None
    for _ in range(10):
        limiter.give_back(1)
    assert [limiter.take(1) is None for _ in range(3)] == [True, True, False]


def test_the_number_of_buckets_is_bounded_and_a_forgotten_bucket_comes_back_full():
    limiter = RateLimiter(Rate(1.0, 1), max_tracked=100, clock=Clock())
    assert limiter.take(1) is None and limiter.take(1) is not None
    for merchant in range(1000, 1200):  # made-up merchant ids
        limiter.take(merchant)
    assert len(limiter._buckets) == 100
    assert limiter.take(1) is None  # forgotten: full again (lenient, never stricter)


@pytest.mark.parametrize("text, rate", [
    ("50/100", Rate(50.0, 100)), ("50", Rate(50.0, 100)), ("0.5", Rate(0.5, 1)), ("2.5/3", Rate(2.5, 3)),
    ("off", None), (" OFF ", None),
])
def test_rates_are_rate_or_rate_slash_burst_or_off(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "0", "-1", "1/0", "1/x", "nan", "inf", "1/2/3"])
def test_a_bad_rate_is_refused(text):
    with pytest.raises(ValueError):
        parse_rate(text)


def test_overrides_are_merchant_id_equals_value_from_repeated_flags_or_comma_lists():
    assert parse_overrides(["1=2/3", "4=off,5=1", ""], parse_rate) == {1: Rate(2.0, 3), 4: None, 5: Rate(1.0, 2)}
    assert parse_overrides(["3000001=always-200"], parse_status_mode) == {3000001: StatusMode.ALWAYS_200}
    for bad in (["abc=1"], ["1"], ["=1"], ["1=sometimes"], ["9" * 19 + "=1"]):
        with pytest.raises(ValueError):
            parse_overrides(bad, parse_status_mode if "sometimes" in bad[0] else parse_rate)


def test_status_modes_fall_back_to_the_default():
    modes = StatusModes(StatusMode.DOCUMENTED, {7: StatusMode.ALWAYS_200})
    assert modes.of(7) is StatusMode.ALWAYS_200 and modes.of(8) is StatusMode.DOCUMENTED
    assert modes.of(None) is StatusMode.DOCUMENTED and modes.per_merchant
    assert not StatusModes().per_merchant and StatusModes().of(7) is StatusMode.DOCUMENTED


@pytest.mark.parametrize("request_bytes, merchant", [
    (b'{"merchantId":"3000001","orderId":1}', 3000001),
    (b'{"orderId":1,"merchantId":"42"}', 42),
    (b'{"merchantId":3000001}', None),
    (b'{"merchantId":"30a"}', None),
    (b'{"merchantId":"' + b"9" * 19 + b'"}', None),
    (b'{"merchantId":"1","merchantId":"2"}', None),
    (b'[{"merchantId":"1"}]', None),
    (b"not json", None),
    (b'{"merchantId":"\\u0031"}', 1),
])
def test_the_claimed_merchant_is_read_as_the_service_will(request_bytes, merchant):
    assert claimed_merchant(request_bytes) == merchant
