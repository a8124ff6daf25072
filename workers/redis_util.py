"""Small helpers shared by the Redis-backed parts of the workers.

- :func:`text`: a Redis reply (bytes, or a number from a script) as text;
- :class:`RedisOutage`: "Redis is down: fall back to this worker's own state for
  :data:`ERROR_BACKOFF` seconds, say so once, then try Redis again" — what the shared
  rate-limit pauses (:mod:`workers.redis_hostgate`) and the shared registry limits
  (:mod:`workers.redis_limiter`) do when Redis fails, so that a Redis outage never fails a copy;
- :class:`Renewer`: one thread per process that renews what the process holds in Redis with a
  TTL — registry-limit leases (:mod:`workers.redis_limiter`), blob locks
  (:mod:`workers.redis_coordinator`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

ERROR_BACKOFF = 10.0  # after a Redis error, seconds before Redis is asked again


def text(value: bytes | str | int | float) -> str:
    """A Redis reply as ``str`` (bytes decoded as UTF-8; anything else through ``str``)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisOutage:
    """Whether Redis may be asked now, after the last error.

    :meth:`failed` starts (or extends) a back-off of ``backoff`` seconds; the first failure
    of an outage logs ``message`` once (``%.0f`` the back-off, ``%s`` the error's class name).
    Thread-safe.
    """

    def __init__(
        self,
        logger: logging.Logger,
        message: str,
        *,
        backoff: float = ERROR_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.logger = logger
        self.message = message
        self.backoff = backoff
        self.clock = clock
        self._down_until = 0.0
        self._lock = threading.Lock()

    def usable(self) -> bool:
        """True when no back-off runs: Redis may be asked."""
        return self.clock() >= self._down_until

    def failed(self, exc: BaseException) -> None:
        """Redis failed: use the local fallback for the back-off (warn when an outage starts)."""
        with self._lock:
            now = self.clock()
            first = now >= self._down_until
            self._down_until = now + self.backoff
        if first:
            self.logger.warning(self.message, self.backoff, type(exc).__name__)


class Renewer:
    """One daemon thread per process that calls ``renew()`` every ``interval`` seconds.

    For keys this process holds in Redis with a TTL (a third of it is the usual interval):
    ``renew`` extends whatever is held at that moment, so one thread serves any number of
    holdings. Started by the first :meth:`ensure`, and again after a fork (a forked child
    inherits the object but not the thread).
    """

    def __init__(self, name: str, interval: float, renew: Callable[[], None]):
        self.name = name
        self.interval = interval
        self.renew = renew
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ensure(self) -> None:
        """Start the thread unless it runs."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            self.renew()
