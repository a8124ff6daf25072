"""Blob dedupe across worker processes and hosts, in Redis (see :mod:`syncer.copy.coordinator`).

- ``syncer:bloblock:<registry>:<key>``: an exclusive lock — redis-py's :class:`redis.lock.Lock`
  (``SET NX PX`` with a random token, Lua compare-and-delete release) — keyed by a blob digest
  or any string such as ``manifest:<repo>@<digest>``. One keeper thread per process resets
  the TTL of every lock held there with the lock's atomic ``reacquire`` (a Lua script that
  checks the token and sets the TTL in one step); if the holder dies the lock expires after
  ``lock_ttl`` seconds, and a waiter takes over. Waiters poll, briefly at first (see
  :meth:`RedisBlobCoordinator._acquire`).
- ``syncer:blobrepos:<registry>:<digest>``: a set of destination repositories known to hold
  the blob — cross-repository mount candidates for every worker.
- ``syncer:blobhere:<registry>:<repository>@<digest>``: "confirmed there" by some worker,
  expiring after :data:`~syncer.copy.coordinator.PRESENCE_TTL` — another worker that needs the
  blob there skips its own check (a request to the registry for a Redis round trip).

A waiter never waits past the copy's deadline (it raises
:class:`~syncer.registry.errors.TimeLimitExceeded` then) nor longer than ``max_wait``; past
``max_wait``, or when Redis fails, it goes on *unlocked*: a duplicate upload of the same
content-addressed blob is safe, only wasteful.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis
from redis.exceptions import LockError
from redis.lock import Lock

from syncer.copy.coordinator import PRESENCE_TTL
from syncer.registry.errors import TimeLimitExceeded
from workers.redis_util import Renewer, text

HOLDERS_TTL = 7 * 24 * 3600
#: A waiter's first pause between tries (seconds), growing by POLL_GROWTH up to ``poll``.
FIRST_POLL = 0.01
POLL_GROWTH = 1.25
log = logging.getLogger(__name__)


class RedisBlobCoordinator:
    """Implements :class:`syncer.copy.coordinator.BlobCoordinator` over Redis.

    ``lock_ttl``: seconds a lock outlives a holder that stopped refreshing it (died) — no
    longer than it takes the liveness layer to enqueue a dead worker's jobs again (30-50 s),
    so that the recovered copy does not wait on its predecessor's lock;
    ``poll``: the longest pause between a waiter's tries; ``max_wait``: the longest a waiter
    waits for a live holder before going on unlocked, whatever its deadline.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        lock_ttl: float = 30.0,
        poll: float = 0.2,
        max_wait: float = 1800.0,
    ):
        self.redis = client
        self.lock_ttl = lock_ttl
        self.poll = poll
        self.max_wait = max_wait
        self._guard = threading.Lock()
        self._held: dict[int, Lock] = {}  # locks held in this process, by id
        self._keeper = Renewer("bloblock keep-alive", lock_ttl / 3, self._extend_held)

    @contextmanager
    def lock(
        self, registry: str, key: str, *, deadline: float | None = None,
        wait: float | None = None, until: Callable[[], bool] | None = None,
    ) -> Iterator[bool]:
        """Hold the lock for ``key`` on ``registry`` (waits while another holds it); the
        context value is True.

        Raises :class:`TimeLimitExceeded` when ``deadline`` (a ``time.monotonic()`` value)
        comes first; goes on unlocked when ``max_wait`` passes or Redis fails. With ``wait``
        (seconds, 0: not at all) a lock still held by another after that long is given up:
        the value is False then, and nothing is held. ``until`` is asked between tries while
        waiting: once it answers True the wait ends the same way (False, nothing held).
        """
        name = f"syncer:bloblock:{registry}:{key}"
        # thread_local=False: the token must be visible to the keeper thread that extends it.
        lock = self.redis.lock(
            name, timeout=self.lock_ttl, thread_local=False,
            raise_on_release_error=False,
        )
        limit = self.max_wait
        if deadline is not None:
            limit = min(limit, deadline - time.monotonic())
        patient = wait is not None and wait < limit  # give up before the deadline/max_wait
        if patient:
            limit = wait
        try:
            acquired, told_to_stop = self._acquire(lock, limit, until)
        except redis.RedisError as exc:
            log.warning("lock %s: Redis unavailable (%s); going on unlocked", name, exc)
            yield True
            return
        if not acquired and (patient or told_to_stop):
            yield False
            return
        if not acquired:
            if deadline is not None and time.monotonic() + self.poll >= deadline:
                raise TimeLimitExceeded(f"time limit exceeded waiting for {key} on {registry}")
            log.warning("lock %s: still held after %.0fs; going on unlocked", name, limit)
            yield True
            return
        self._keep(lock)
        try:
            yield True
        finally:
            self._let_go(lock)
            with contextlib.suppress(LockError, redis.RedisError):
                lock.release()

    def _acquire(self, lock: Lock, limit: float, until: Callable[[], bool] | None
                 ) -> tuple[bool, bool]:
        """Try to take ``lock`` for up to ``limit`` seconds (once, when ``limit`` <= 0):
        ``(taken, until said stop)``.

        The pause between tries starts at :data:`FIRST_POLL` and grows to ``self.poll``: the
        usual holder (a small blob's upload, a manifest PUT) is done within a few round trips,
        and every waiter behind it would otherwise notice only on its next fixed tick — a
        convoy of N waiters then costs N ticks, while each needs the lock only for a moment.
        """
        ends = time.monotonic() + max(limit, 0.0)
        pause = min(FIRST_POLL, self.poll)
        while True:
            if lock.acquire(blocking=False):
                return True, False
            if until is not None and until():
                return False, True
            left = ends - time.monotonic()
            if left <= 0:
                return False, False
            time.sleep(min(pause, left))
            pause = min(pause * POLL_GROWTH, self.poll)

    def _keep(self, lock: Lock) -> None:
        """Have the keeper thread extend ``lock`` while it is held."""
        with self._guard:
            self._held[id(lock)] = lock
        self._keeper.ensure()

    def _let_go(self, lock: Lock) -> None:
        with self._guard:
            self._held.pop(id(lock), None)

    def _extend_held(self) -> None:
        """Reset the TTL of every lock held here, atomically and only where we still own it
        (the keeper's round, every third of the TTL: most locks — a small blob, a manifest
        PUT — are let go long before the first)."""
        with self._guard:
            held = list(self._held.values())
        for lock in held:
            try:
                lock.reacquire()
            except LockError:
                self._let_go(lock)  # expired and taken by another: the work goes on unlocked
            except redis.RedisError:
                continue  # a Redis blip: next round; the TTL still has 2/3 left

    def holders(self, registry: str, digest: str) -> list[str]:
        """Destination repositories known to hold the blob."""
        try:
            members = self.redis.smembers(f"syncer:blobrepos:{registry}:{digest}")
        except redis.RedisError:
            return []
        return sorted(text(m) for m in members)

    def record(self, registry: str, repository: str, digest: str) -> None:
        """Remember that ``repository`` holds the blob (a mount source for a week, a
        confirmation for :data:`~syncer.copy.coordinator.PRESENCE_TTL`)."""
        key = f"syncer:blobrepos:{registry}:{digest}"
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.sadd(key, repository)
            pipe.expire(key, HOLDERS_TTL)
            pipe.set(_here_key(registry, repository, digest), 1, ex=int(PRESENCE_TTL))
            pipe.execute()
        except redis.RedisError:
            pass  # only an optimisation: a missed record costs an upload, not correctness

    def confirmed(self, registry: str, repository: str, digest: str) -> bool:
        """Whether a worker confirmed the blob in ``repository`` within ``PRESENCE_TTL``."""
        try:
            return bool(self.redis.exists(_here_key(registry, repository, digest)))
        except redis.RedisError:
            return False  # then the registry is asked


def _here_key(registry: str, repository: str, digest: str) -> str:
    return f"syncer:blobhere:{registry}:{repository}@{digest}"
