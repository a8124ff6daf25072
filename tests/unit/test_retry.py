"""The retry policy: only transient errors, capped exponential backoff, Retry-After."""

import pytest

from syncer.errors import (
    AuthenticationError,
    IntegrityError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    TransportError,
    UnsupportedManifestError,
    is_transient,
)
from syncer.retry import RetryPolicy, call_with_retries


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ServerError("503"), True),
        (RateLimitedError("429"), True),
        (IntegrityError("short body"), True),
        (TransportError("reset"), True),
        (TransportError("bad certificate", transient=False), False),
        (AuthenticationError("401"), False),
        (NotFoundError("404"), False),
        (UnsupportedManifestError("schema1"), False),
        (KeyError("bug"), False),
    ],
)
def test_transient_predicate(exc, transient):
    assert is_transient(exc) is transient


def test_backoff_grows_and_caps_without_jitter():
    policy = RetryPolicy(max_retries=10, base=1.0, cap=8.0, jitter=False)
    assert [policy.delay(n) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_jitter_stays_between_half_and_full():
    policy = RetryPolicy(base=4.0, cap=100.0)
    assert policy.delay(1, rng=lambda: 0.0) == 4.0
    assert policy.delay(1, rng=lambda: 1.0) == 8.0


def test_retry_after_wins_when_longer_but_is_capped():
    policy = RetryPolicy(base=1.0, jitter=False, retry_after_cap=30.0)
    assert policy.delay(0, RateLimitedError("429", retry_after=12.0)) == 12.0
    assert policy.delay(0, RateLimitedError("429", retry_after=3600.0)) == 30.0
    assert policy.delay(3, RateLimitedError("429", retry_after=0.5)) == 8.0


def test_call_with_retries_retries_transient_then_succeeds():
    outcomes = [ServerError("503"), ServerError("503"), "ok"]
    slept = []

    def operation():
        item = outcomes.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    result = call_with_retries(
        operation, RetryPolicy(max_retries=2, jitter=False), sleep=slept.append
    )
    assert result == "ok"
    assert slept == [1.0, 2.0]


def test_call_with_retries_stops_at_permanent_error():
    calls = []

    def operation():
        calls.append(1)
        raise NotFoundError("gone")

    with pytest.raises(NotFoundError):
        call_with_retries(operation, RetryPolicy(max_retries=5), sleep=lambda s: None)
    assert len(calls) == 1


def test_call_with_retries_gives_up_after_budget():
    calls = []

    def operation():
        calls.append(1)
        raise ServerError("503")

    with pytest.raises(ServerError):
        call_with_retries(operation, RetryPolicy(max_retries=3), sleep=lambda s: None)
    assert len(calls) == 4
