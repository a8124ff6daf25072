"""Small helpers shared by the Redis-backed parts of the workers.

- :func:`text`: a Redis reply (bytes, or a number from a script) as text;
- :class:`RedisOutage`: "Redis is down: fall back to this worker's own state for
  :data:`ERROR_BACKOFF` seconds, say so once, then try Redis again" — what the shared
  rate-limit pauses (:mod:`workers.redis_hostgate`) and the shared registry limits
  (:mod:`workers.redis_limiter`) do when Redis fails, so that a Redis outage never fails a copy.
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
