"""Rate-limit pauses shared by every worker through Redis (the distributed half of
:mod:`syncer.registry.hostgate`).

A pause is the key ``syncer:pause:<host>`` with a millisecond expiry (``PX``): it exists
exactly while the pause runs, and Redis forgets it by itself. Setting one only ever
*extends* it — a Lua script compares the key's remaining time (``PTTL``) and sets it only
when the new pause ends later — atomically, so two workers pausing at once keep the later
expiry. Redis 7's ``SET`` has no ``GT`` (that is ``PEXPIRE``'s, and it cannot create the
key), hence the script. Remaining times, not clock readings, travel through Redis, so the
workers' clocks need not agree.

Reads are cached: a worker asks Redis about a host at most once per ``poll_interval``
(default 1 s) and otherwise trusts its local :class:`~syncer.registry.hostgate.HostGate`, into which
every pause it reads or sets is copied. A request therefore costs no Redis round trip, and a
pause set by another worker is obeyed here within about a second. Redis errors never fail a
copy: the gate degrades to the local one and tries Redis again a little later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from syncer.registry.hostgate import MAX_PAUSE, HostGate
from workers.redis_util import RedisOutage

log = logging.getLogger(__name__)

KEY_PREFIX = "syncer:pause:"
POLL_INTERVAL = 1.0  # seconds between two reads of one host's pause from Redis

# KEYS[1] = pause key; ARGV[1] = pause in ms. Extend only: set when absent (PTTL -2), when
# without expiry (-1, never written by us), or when the new pause ends later.
_EXTEND_PAUSE = """
local left = redis.call('PTTL', KEYS[1])
local wanted = tonumber(ARGV[1])
if left < wanted then
  redis.call('SET', KEYS[1], '1', 'PX', wanted)
  return wanted
end
return left
"""


class RedisHostGate:
    """A :class:`~syncer.registry.hostgate.Gate` whose pauses every worker sharing ``client``
    obeys."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        local: HostGate | None = None,
        poll_interval: float = POLL_INTERVAL,
        key_prefix: str = KEY_PREFIX,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.client = client
        self.local = local if local is not None else HostGate()
        self.poll_interval = poll_interval
        self.key_prefix = key_prefix
        self._clock = clock
        self._script = client.register_script(_EXTEND_PAUSE)
        self._next_poll: dict[str, float] = {}
        self._outage = RedisOutage(
            log, "rate-limit pauses are not shared for %.0fs (Redis: %s); using this worker's own",
            clock=clock,
        )
        self._lock = threading.Lock()

    def pause(self, host: str, seconds: float) -> None:
        """Pause ``host`` here at once, and for every worker through Redis."""
        if seconds <= 0:
            return
        seconds = min(seconds, self.local.max_pause, MAX_PAUSE)
        self.local.pause(host, seconds)
        if not self._outage.usable():
            return
        try:
            self._script(keys=[self.key_prefix + host], args=[max(int(seconds * 1000), 1)])
        except (redis.RedisError, OSError) as exc:
            self._outage.failed(exc)

    def wait(self, host: str) -> None:
        """Wait while ``host`` is paused here or (as last read, ≤ ``poll_interval`` ago) in
        Redis; never past the current deadline (see :meth:`HostGate.wait`)."""
        if self._poll_due(host):
            try:
                left_ms = self.client.pttl(self.key_prefix + host)
            except (redis.RedisError, OSError) as exc:
                self._outage.failed(exc)
            else:
                if left_ms is not None and left_ms > 0:
                    self.local.pause(host, left_ms / 1000.0)
        self.local.wait(host)

    def remaining(self, host: str) -> float:
        """Seconds the pause of ``host`` still runs, as this worker knows it."""
        return self.local.remaining(host)

    def _poll_due(self, host: str) -> bool:
        """True for the one caller that should read Redis now (others use the cache)."""
        now = self._clock()
        with self._lock:
            if not self._outage.usable() or now < self._next_poll.get(host, 0.0):
                return False
            self._next_poll[host] = now + self.poll_interval
            return True
