"""Per-registry limits shared by every worker through Redis (the distributed backend of
:mod:`syncer.registry.limits`).

Two keys per limited registry, both with an expiry, so nothing is left behind:

- ``syncer:limit:slots:<registry>`` — a sorted set of *leases*, one per request in flight,
  scored by the lease's expiry (Redis server time, ms). A Lua script drops expired leases and
  adds one only while fewer than ``max_concurrency`` remain: a semaphore whose slots come back
  by themselves ``lease_ttl`` seconds (30 s) after a worker dies mid-request. A thread of each
  worker renews the leases it holds every ``lease_ttl / 3`` seconds (``ZADD XX``: a lease
  released meanwhile is not brought back), so a slot held by an hour-long download stays held.
- ``syncer:limit:rate:<registry>`` — the registry's next free request start (µs, Redis time):
  a reservation script (GCRA with a burst of one) hands out starts ``1/requests_per_second``
  apart and answers how long the caller waits for its own.

Both scripts read the clock with Redis ``TIME`` (allowed in scripts since Redis 5's effect
replication, the default of Redis 7): one clock for every host, whatever theirs say.

Waiting for a slot is a poll (20 ms doubling to 200 ms, jittered), cut short when a thread of
this process gives a slot back. Redis errors never fail a copy: the backend falls back to a
:class:`~syncer.registry.limits.LocalBackend` (this worker's share only) for
:data:`~workers.redis_util.ERROR_BACKOFF` seconds, says so once, and tries Redis again.

Every worker should carry the same limits for a registry: each one compares the shared count
with *its own* ``max_concurrency``.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from syncer.registry.limits import LocalBackend
from workers.redis_util import RedisOutage, Renewer

log = logging.getLogger(__name__)

KEY_PREFIX = "syncer:limit:"
LEASE_TTL = 30.0  # seconds a slot outlives a worker that stopped renewing it
POLL_MIN, POLL_MAX = 0.02, 0.2  # seconds between two tries for a slot

# KEYS[1] slots; ARGV: limit, lease id, ttl ms, force ('1': take it even when full).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[4] == '1' or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
  return 1
end
return 0
"""

# KEYS[1] slots; ARGV: ttl ms, lease ids. Pushes the expiry of leases still there.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local kept = 0
for i = 2, #ARGV do
  kept = kept + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return kept
"""

# KEYS[1] rate; ARGV[1] interval µs. Returns µs to wait for the reserved start.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local start = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
local next_start = start + interval
redis.call('SET', KEYS[1], string.format('%.0f', next_start),
           'PX', math.ceil((next_start - now) / 1000) + 1000)
return math.floor(start - now)
"""


@dataclass(frozen=True)
class _LocalToken:
    """A slot taken from the local fallback while Redis was unusable."""

    token: object


class RedisLimitBackend:
    """A :class:`~syncer.registry.limits.LimitBackend` every worker sharing ``client`` obeys."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        lease_ttl: float = LEASE_TTL,
        key_prefix: str = KEY_PREFIX,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.client = client
        self.lease_ttl = lease_ttl
        self.key_prefix = key_prefix
        self.local = LocalBackend()
        self._clock = clock
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._reserve = client.register_script(_RESERVE)
        self._owner = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._serial = 0
        self._held: dict[str, str] = {}  # lease id -> registry
        self._cond = threading.Condition()
        self._renewer = Renewer("syncer-limit-leases", lease_ttl / 3, self.renew)
        self._outage = RedisOutage(
            log, "registry limits are not shared for %.0fs (Redis: %s); this worker counts its "
            "own requests only", clock=clock,
        )

    def slots_key(self, registry: str) -> str:
        """The sorted set of leases of ``registry``."""
        return f"{self.key_prefix}slots:{registry}"

    def rate_key(self, registry: str) -> str:
        """The next free request start of ``registry``."""
        return f"{self.key_prefix}rate:{registry}"

    # -- slots -------------------------------------------------------------------------------

    def acquire(self, registry: str, limit: int, timeout: float, *, force: bool = False) -> object:
        """A lease id within ``timeout`` seconds (None if none came free)."""
        end = self._clock() + timeout
        delay = POLL_MIN
        while True:
            if not self._outage.usable():
                return self._local_acquire(registry, limit, end, force)
            with self._cond:
                self._serial += 1
                lease = f"{self._owner}-{self._serial}"
            try:
                taken = self._acquire(
                    keys=[self.slots_key(registry)],
                    args=[limit, lease, max(int(self.lease_ttl * 1000), 1), "1" if force else "0"],
                )
            except (redis.RedisError, OSError) as exc:
                self._outage.failed(exc)
                continue
            if taken:
                with self._cond:
                    self._held[lease] = registry
                self._renewer.ensure()
                return lease
            left = end - self._clock()
            if left <= 0:
                return None
            with self._cond:  # a slot given back by this process wakes us at once
                self._cond.wait(min(delay * (0.5 + random.random()), left))
            delay = min(delay * 2, POLL_MAX)

    def _local_acquire(self, registry: str, limit: int, end: float, force: bool) -> object:
        token = self.local.acquire(registry, limit, max(end - self._clock(), 0.0), force=force)
        return None if token is None else _LocalToken(token)

    def release(self, registry: str, token: object) -> None:
        """Give a lease back (at worst it expires by itself)."""
        if isinstance(token, _LocalToken):
            self.local.release(registry, token.token)
            return
        with self._cond:
            self._held.pop(str(token), None)
            self._cond.notify_all()
        try:
            self.client.zrem(self.slots_key(registry), str(token))
        except (redis.RedisError, OSError) as exc:
            self._outage.failed(exc)

    def renew(self) -> None:
        """Push the expiry of every lease this process holds (one script per registry)."""
        with self._cond:
            by_registry: dict[str, list[str]] = {}
            for lease, registry in self._held.items():
                by_registry.setdefault(registry, []).append(lease)
        ttl_ms = max(int(self.lease_ttl * 1000), 1)
        for registry, leases in by_registry.items():
            try:
                self._renew(keys=[self.slots_key(registry)], args=[ttl_ms, *leases])
            except (redis.RedisError, OSError) as exc:
                self._outage.failed(exc)
                return

    # -- rate --------------------------------------------------------------------------------

    def reserve(self, registry: str, rate: float) -> float:
        """Reserve the next start of ``registry`` in Redis; seconds to wait for it."""
        if self._outage.usable():
            interval_us = max(int(1_000_000 / rate), 1)
            try:
                waited = self._reserve(keys=[self.rate_key(registry)], args=[interval_us])
                return max(int(waited), 0) / 1_000_000
            except (redis.RedisError, OSError) as exc:
                self._outage.failed(exc)
        return self.local.reserve(registry, rate)
