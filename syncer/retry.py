"""The one retry policy, shared by the embedded thread pool and the Celery tasks.

Only transient errors (:func:`syncer.errors.is_transient`) are retried. The delay grows
exponentially from ``base`` and is capped at ``cap``; "full jitter" (a uniform draw between
half the delay and the delay) keeps many workers from retrying a recovering registry in step.
A registry's ``Retry-After`` (429 / 503) wins over the computed delay when it is longer, up
to ``retry_after_cap``, so a rate limit is obeyed but cannot park a worker for an hour.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from syncer.errors import is_transient, retry_after

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how long to wait. ``max_retries`` counts retries, not attempts."""

    max_retries: int = 2
    base: float = 1.0
    cap: float = 60.0
    jitter: bool = True
    retry_after_cap: float = 300.0

    def should_retry(self, retries_done: int, exc: BaseException) -> bool:
        """True when ``exc`` is transient and the budget allows another try."""
        return retries_done < self.max_retries and is_transient(exc)

    def delay(
        self,
        retries_done: int,
        exc: BaseException | None = None,
        rng: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait before retry number ``retries_done + 1``."""
        computed = min(self.cap, self.base * (2**retries_done))
        if self.jitter:
            computed = computed / 2 + rng() * computed / 2
        asked = retry_after(exc) if exc is not None else None
        if asked is not None:
            computed = max(computed, min(asked, self.retry_after_cap))
        return computed

    @property
    def longest_delay(self) -> float:
        """The longest single wait this policy can produce (for Celery's visibility timeout)."""
        return max(self.cap, self.retry_after_cap)


def call_with_retries(
    operation: Callable[[], T],
    policy: RetryPolicy,
    *,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``operation`` until it succeeds, fails permanently, or the budget is spent.

    ``on_retry(retry_number, exc, delay)`` is called before each wait (for logging).
    """
    retries_done = 0
    while True:
        try:
            return operation()
        except Exception as exc:
            if not policy.should_retry(retries_done, exc):
                raise
            wait = policy.delay(retries_done, exc)
            retries_done += 1
            if on_retry is not None:
                on_retry(retries_done, exc, wait)
            sleep(wait)
