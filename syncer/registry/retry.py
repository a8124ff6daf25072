"""The one retry policy, shared by every layer that retries: a request, a token fetch, an image.

Only transient errors (:func:`syncer.registry.errors.is_transient`) are retried. The delay grows
exponentially from ``base`` and is capped at ``cap``; "full jitter" (a uniform draw between
half the delay and the delay) keeps many workers from retrying a recovering registry in step.
A registry's ``Retry-After`` (429 / 503) wins over the computed delay when it is longer, up
to ``retry_after_cap``, so a rate limit is obeyed but cannot park a worker for an hour.

Two layers use it, with different parameters and never stacked on the same failure:

- :data:`REQUEST_RETRIES`, in place, by :mod:`syncer.registry.transport` (every request whose
  body can be replayed) and :mod:`syncer.registry.auth` (token fetches): a few quick tries,
  where the fault happened. A ``Retry-After`` longer than its cap is not slept on here: the
  error goes up to
- the image-level policy (``--retries``), run by the embedded pool and the Celery task, which
  retries whatever is left — the whole image — and honours long ``Retry-After`` values.

A *deadline* (a ``time.monotonic()`` value, set by the copier with :func:`deadline_scope`)
bounds the in-place layer: it never sleeps past the deadline of the copy it serves, it raises
the last error instead. The deadline lives in a :class:`contextvars.ContextVar`, so it follows
the copy's thread (and any thread started with a copied context), not the process.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

from syncer.registry import observe
from syncer.registry.errors import is_transient, retry_after

log = logging.getLogger(__name__)

T = TypeVar("T")

_DEADLINE: ContextVar[float | None] = ContextVar("syncer_deadline", default=None)


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how long to wait. ``max_retries`` counts retries, not attempts.

    ``defer_long_retry_after``: when the registry asks for a wait longer than
    ``retry_after_cap``, do not retry at this layer (raise, so an outer layer waits it out)
    instead of waiting only the capped time and asking too early.
    """

    max_retries: int = 2
    base: float = 1.0
    cap: float = 60.0
    jitter: bool = True
    retry_after_cap: float = 300.0
    defer_long_retry_after: bool = False

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

    def next_delay(
        self,
        retries_done: int,
        exc: BaseException,
        *,
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
        transient_only: bool = True,
    ) -> float | None:
        """The wait before the next try, or None when this layer must give up on ``exc``.

        None when ``exc`` is permanent, the budget is spent, the registry asked for a longer
        wait than this layer takes (``defer_long_retry_after``), or the wait would end past
        ``deadline`` (a ``time.monotonic()`` value). ``transient_only=False``: the caller
        already judged ``exc`` worth another try (a blob restart after a lost upload
        session, an error permanent for one request but not for a new session).
        """
        if retries_done >= self.max_retries or (transient_only and not is_transient(exc)):
            return None
        asked = retry_after(exc)
        if self.defer_long_retry_after and asked is not None and asked > self.retry_after_cap:
            return None
        wait = self.delay(retries_done, exc, rng)
        if deadline is not None and clock() + wait > deadline:
            return None
        return wait

    @property
    def longest_delay(self) -> float:
        """The longest single wait this policy can produce (for Celery's visibility timeout)."""
        return max(self.cap, self.retry_after_cap)


# In place, per request: 5 tries, waits of ~0.1-0.2, 0.2-0.4, 0.4-0.8, 0.8-1.6 s (about 3 s
# at worst) unless the registry asks for longer; a Retry-After above 30 s goes up a layer.
REQUEST_RETRIES = RetryPolicy(
    max_retries=4, base=0.2, cap=5.0, retry_after_cap=30.0, defer_long_retry_after=True
)


def call_with_retries(
    operation: Callable[[], T],
    policy: RetryPolicy,
    *,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    deadline: float | None = None,
) -> T:
    """Run ``operation`` until it succeeds, fails permanently, or the budget is spent.

    ``on_retry(retry_number, exc, delay)`` is called before each wait (for logging). With a
    ``deadline`` (``time.monotonic()`` value), no wait ends past it: the last error is raised.
    """
    retries_done = 0
    while True:
        try:
            return operation()
        except Exception as exc:
            wait = policy.next_delay(retries_done, exc, deadline=deadline)
            if wait is None:
                raise
            retries_done += 1
            if on_retry is not None:
                on_retry(retries_done, exc, wait)
            sleep(wait)


def retry_in_place(
    operation: Callable[[], T],
    policy: RetryPolicy,
    *,
    registry: str,
    what: str,
    describe: Callable[[BaseException], str] = str,
) -> T:
    """:func:`call_with_retries` under :func:`current_deadline`, for a request retried where
    it failed (the transport's requests, the authenticator's token fetches): each retry is
    logged (``retry n/N in Xs: <what> at <registry>: <reason>``) and counted by the installed
    :mod:`~syncer.registry.observe` observer. ``describe`` gives the reason's one-line text."""

    def note(number: int, exc: BaseException, wait: float) -> None:
        reason = describe(exc)
        log.info(
            "retry %d/%d in %.2fs: %s at %s: %s", number, policy.max_retries, wait, what,
            registry, reason, extra={"registry": registry, "error": reason},
        )
        watcher = observe.observer
        if watcher is not None:
            watcher.retried(registry)

    return call_with_retries(operation, policy, on_retry=note, deadline=current_deadline())


@contextlib.contextmanager
def deadline_scope(deadline: float | None) -> Iterator[None]:
    """Run the block under ``deadline`` (a ``time.monotonic()`` value; None: no new bound).

    Scopes nest and only tighten: inside, :func:`current_deadline` is the earlier of the
    enclosing deadline and this one. Threads do not inherit context variables: a pool that
    works for the scope must run its tasks in a copy of the context
    (``contextvars.copy_context().run``).
    """
    enclosing = _DEADLINE.get()
    if deadline is None:
        effective = enclosing
    elif enclosing is None:
        effective = deadline
    else:
        effective = min(enclosing, deadline)
    token = _DEADLINE.set(effective)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def current_deadline() -> float | None:
    """The deadline of the enclosing :func:`deadline_scope` (``time.monotonic()``), or None."""
    return _DEADLINE.get()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC 9110 10.2.3);
    None when absent or unparseable."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)
