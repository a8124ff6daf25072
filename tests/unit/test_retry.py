"""The retry policy: only transient errors, capped exponential backoff, Retry-After."""

import pytest

from syncer.registry.errors import (
    AuthenticationError,
    IntegrityError,
    NotFoundError,
    RateLimitedError,
    ServerError,
    TransportError,
    UnsupportedManifestError,
    is_transient,
)
from syncer.registry.retry import RetryPolicy, call_with_retries


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


# -- the in-place (request-level) parameters, deadlines, Retry-After parsing ----------------


def test_request_level_policy_is_small_and_defers_long_retry_after():
    from syncer.registry.retry import REQUEST_RETRIES

    assert REQUEST_RETRIES.max_retries == 4  # 5 tries per request
    assert REQUEST_RETRIES.defer_long_retry_after
    waits = [REQUEST_RETRIES.delay(n, rng=lambda: 1.0) for n in range(4)]
    assert waits == [0.2, 0.4, 0.8, 1.6] and sum(waits) < 5
    assert REQUEST_RETRIES.next_delay(0, RateLimitedError("429", retry_after=12.0)) == 12.0
    assert REQUEST_RETRIES.next_delay(0, RateLimitedError("429", retry_after=31.0)) is None
    assert REQUEST_RETRIES.next_delay(4, ServerError("503")) is None  # budget spent
    assert REQUEST_RETRIES.next_delay(0, NotFoundError("404")) is None
    # The image-level default keeps waiting a capped time instead of deferring.
    assert RetryPolicy(jitter=False).next_delay(0, RateLimitedError("429", retry_after=900)) == 300


def test_next_delay_never_ends_past_the_deadline():
    policy = RetryPolicy(max_retries=5, base=1.0, jitter=False)
    clock = lambda: 100.0  # noqa: E731
    assert policy.next_delay(0, ServerError("503"), deadline=101.5, clock=clock) == 1.0
    assert policy.next_delay(1, ServerError("503"), deadline=101.5, clock=clock) is None
    assert policy.next_delay(0, ServerError("503"), deadline=None, clock=clock) == 1.0


def test_call_with_retries_raises_the_last_error_at_the_deadline():
    import time

    calls = []

    def operation():
        calls.append(1)
        raise ServerError(f"503 #{len(calls)}")

    policy = RetryPolicy(max_retries=10, base=0.05, cap=0.05, jitter=False)
    with pytest.raises(ServerError, match="503 #"):
        call_with_retries(operation, policy, deadline=time.monotonic() + 0.12)
    assert 2 <= len(calls) <= 4


def test_deadline_scope_sets_nests_tightening_and_restores():
    from syncer.registry.retry import current_deadline, deadline_scope

    assert current_deadline() is None
    with deadline_scope(50.0):
        assert current_deadline() == 50.0
        with deadline_scope(80.0):
            assert current_deadline() == 50.0  # an inner scope cannot extend
        with deadline_scope(20.0):
            assert current_deadline() == 20.0
        with deadline_scope(None):
            assert current_deadline() == 50.0
        assert current_deadline() == 50.0
    assert current_deadline() is None


def test_deadline_scope_is_per_thread_unless_the_context_is_copied():
    import contextvars
    import threading

    from syncer.registry.retry import current_deadline, deadline_scope

    seen: dict[str, float | None] = {}
    with deadline_scope(7.0):
        plain = threading.Thread(target=lambda: seen.update(plain=current_deadline()))
        context = contextvars.copy_context()
        copied = threading.Thread(
            target=lambda: context.run(lambda: seen.update(copied=current_deadline()))
        )
        for thread in (plain, copied):
            thread.start()
            thread.join()
    assert seen == {"plain": None, "copied": 7.0}


def test_parse_retry_after_seconds_and_http_dates():
    from datetime import UTC, datetime, timedelta
    from email.utils import format_datetime

    from syncer.registry.retry import parse_retry_after

    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=90), usegmt=True)
    assert 85 <= parse_retry_after(later) <= 91


# -- the in-process host gate --------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


def test_host_gate_keeps_the_later_expiry_and_waits_it_out():
    from syncer.registry.hostgate import HostGate

    clock = FakeClock()
    gate = HostGate(clock=clock, sleep=clock.sleep)
    gate.wait("a")  # nothing paused: no sleep
    gate.pause("a", 5.0)
    gate.pause("a", 2.0)  # shorter: ignored
    assert gate.remaining("a") == 5.0 and gate.remaining("b") == 0.0
    gate.wait("b")
    assert clock.slept == []
    gate.wait("a")
    assert clock.slept == [5.0] and gate.remaining("a") == 0.0
    gate.pause("a", 10_000)  # capped: a registry cannot freeze the process for hours
    assert gate.remaining("a") == 300.0


def test_host_gate_wait_is_bounded_by_the_deadline():
    from syncer.registry.hostgate import HostGate
    from syncer.registry.retry import deadline_scope

    clock = FakeClock()
    gate = HostGate(clock=clock, sleep=clock.sleep)
    gate.pause("a", 30.0)
    with deadline_scope(clock.now + 4.0):
        gate.wait("a")
    assert clock.slept == [4.0]
    assert gate.remaining("a") == 26.0


def test_host_gate_holds_other_threads_until_the_pause_ends():
    import threading
    import time

    from syncer.registry.hostgate import HostGate

    gate = HostGate()
    gate.pause("reg", 0.3)
    passed: list[float] = []
    started = time.monotonic()
    threads = [
        threading.Thread(target=lambda: (gate.wait("reg"), passed.append(time.monotonic())))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(passed) == 4 and all(t - started >= 0.29 for t in passed)
