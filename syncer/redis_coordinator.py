"""Blob dedupe across worker processes and hosts, in Redis (see :mod:`syncer.dedupe`).

- ``syncer:bloblock:<registry>:<digest>``: an upload lock (``SET NX PX``) with a random
  token, kept alive by a watchdog thread while the upload runs and released by a
  compare-and-delete script. If its holder dies the lock expires after ``lock_ttl``
  seconds, and a waiter takes over.
- ``syncer:blobrepos:<registry>:<digest>``: a set of destination repositories known to hold
  the blob — cross-repository mount candidates for every worker.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
HOLDERS_TTL = 7 * 24 * 3600


class RedisBlobCoordinator:
    """Implements :class:`syncer.dedupe.BlobCoordinator` over Redis."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        lock_ttl: float = 60.0,
        poll: float = 0.2,
        max_wait: float = 3600.0,
    ):
        self.redis = client
        self.lock_ttl = lock_ttl
        self.poll = poll
        self.max_wait = max_wait
        self._release = client.register_script(_RELEASE)

    @contextmanager
    def lock(self, registry: str, digest: str) -> Iterator[None]:
        """Hold the upload lock for ``digest`` on ``registry`` (waits while another holds it)."""
        key = f"syncer:bloblock:{registry}:{digest}"
        token = secrets.token_hex(16)
        ttl_ms = int(self.lock_ttl * 1000)
        if not self._acquire(key, token, ttl_ms):
            yield  # Redis unreachable: go on unlocked (a duplicate upload is safe, only wasteful)
            return
        stop = threading.Event()
        watchdog = threading.Thread(
            target=self._keep_alive, args=(key, token, ttl_ms, stop), daemon=True
        )
        watchdog.start()
        try:
            yield
        finally:
            stop.set()
            watchdog.join()
            with contextlib.suppress(redis.RedisError):
                self._release(keys=[key], args=[token])

    def _acquire(self, key: str, token: str, ttl_ms: int) -> bool:
        """Wait for the lock; False when Redis fails or waiting takes longer than max_wait."""
        deadline = time.monotonic() + self.max_wait
        try:
            while not self.redis.set(key, token, nx=True, px=ttl_ms):
                if time.monotonic() > deadline:
                    return False
                time.sleep(self.poll)
        except redis.RedisError:
            return False
        return True

    def _keep_alive(self, key: str, token: str, ttl_ms: int, stop: threading.Event) -> None:
        while not stop.wait(self.lock_ttl / 3):
            try:
                if self.redis.get(key) not in (token, token.encode()):
                    return
                self.redis.pexpire(key, ttl_ms)
            except redis.RedisError:
                return

    def holders(self, registry: str, digest: str) -> list[str]:
        """Destination repositories known to hold the blob."""
        try:
            members = self.redis.smembers(f"syncer:blobrepos:{registry}:{digest}")
        except redis.RedisError:
            return []
        return sorted(m.decode() if isinstance(m, bytes) else m for m in members)

    def record(self, registry: str, repository: str, digest: str) -> None:
        """Remember that ``repository`` holds the blob."""
        key = f"syncer:blobrepos:{registry}:{digest}"
        try:
            pipe = self.redis.pipeline()
            pipe.sadd(key, repository)
            pipe.expire(key, HOLDERS_TTL)
            pipe.execute()
        except redis.RedisError:
            pass  # only an optimisation: a missed record costs an upload, not correctness
