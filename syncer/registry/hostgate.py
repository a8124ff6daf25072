"""Shared rate limits: a 429 from a host pauses every request to that host, not just one.

A registry that answers ``429 Too Many Requests`` (or ``503`` with ``Retry-After``) is
telling the *client*, not the one request, to slow down. Without a shared gate, each of the
many threads copying images would find that out for itself, one more 429 each. With it, the
transport records the pause (:meth:`HostGate.pause`) and every thread asks the gate before
sending (:meth:`HostGate.wait`), so new requests to that host wait until the pause is over.

:class:`HostGate` is in-process (one per :class:`~syncer.registry.client.Registries`, i.e. per
process). The distributed mode shares pauses across workers with ``workers.redis_hostgate``,
which satisfies the same :class:`Gate` protocol.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from syncer.registry.retry import current_deadline

# The longest pause one answer can impose. A registry that asks for an hour gets obeyed by
# the image-level retry (which raises after waiting what it can); the gate only holds back
# new requests, and must not freeze a process that has other hosts to talk to.
MAX_PAUSE = 300.0
# How long a 429 *without* Retry-After holds its host back.
DEFAULT_RATE_LIMIT_PAUSE = 1.0


class Gate(Protocol):
    """What the transport needs from a rate-limit gate."""

    def pause(self, host: str, seconds: float) -> None:
        """No new request to ``host`` for ``seconds`` (a later expiry already set wins)."""
        ...

    def wait(self, host: str) -> None:
        """Return once no pause is in force for ``host`` (or the current deadline is due)."""
        ...


def pause_after(gate: Gate, host: str, status: int, retry_after: float | None) -> float | None:
    """Pause ``host`` at ``gate`` if the answer ``status`` asks every client thread to hold
    back; return the seconds paused (None: no pause). The one rule, for registry and token
    server answers alike:

    - ``429`` pauses for its ``Retry-After``, else :data:`DEFAULT_RATE_LIMIT_PAUSE`;
    - ``503`` with a ``Retry-After`` pauses that long (RFC 9110 15.6.4: the server is
      overloaded or down for maintenance, for that long);
    - anything else, a ``503`` without ``Retry-After`` included, pauses nothing: it is one
      request's failure, retried with backoff by that request alone.

    ``retry_after`` is the parsed header (:func:`~syncer.registry.retry.parse_retry_after`).
    """
    if status == 429:
        seconds = retry_after if retry_after is not None else DEFAULT_RATE_LIMIT_PAUSE
    elif status == 503 and retry_after is not None:
        seconds = retry_after
    else:
        return None
    gate.pause(host, seconds)
    return seconds


class HostGate:
    """In-process gate, thread-safe. ``clock``/``sleep`` are injectable for tests."""

    def __init__(
        self,
        *,
        max_pause: float = MAX_PAUSE,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.max_pause = max_pause
        self._clock = clock
        self._sleep = sleep
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def pause(self, host: str, seconds: float) -> None:
        """Hold new requests to ``host`` back for ``seconds`` (at most ``max_pause``)."""
        if seconds <= 0:
            return
        until = self._clock() + min(seconds, self.max_pause)
        with self._lock:
            if until > self._until.get(host, 0.0):
                self._until[host] = until

    def remaining(self, host: str) -> float:
        """Seconds the pause of ``host`` still runs (0.0 when none is in force)."""
        with self._lock:
            until = self._until.get(host)
            now = self._clock()
            if until is not None and until <= now:
                del self._until[host]  # expired: keep the table small
                return 0.0
        return 0.0 if until is None else until - now

    def wait(self, host: str) -> None:
        """Sleep while ``host`` is paused; never past
        :func:`~syncer.registry.retry.current_deadline` (the request then goes ahead and its own
        error, or the copy's time limit, decides)."""
        while True:
            left = self.remaining(host)
            if left <= 0:
                return
            deadline = current_deadline()
            if deadline is not None:
                left = min(left, deadline - self._clock())
                if left <= 0:
                    return
            # Re-check after sleeping: another answer may have extended the pause meanwhile.
            self._sleep(left)
