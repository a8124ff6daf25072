"""What a worker process needs to run jobs, built once per process (after the fork).

Credentials come from this host's own files — ``SYNCER_AUTH_FILE`` (an auth file) or
``SYNCER_CONFIG_FILE`` (a config with an ``auth`` section), else docker's config.json —
never from the task message.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import redis

from syncer.copy.copier import ImageCopier
from syncer.plan.config import load_auth_file
from syncer.registry.client import Registries
from syncer.registry.credentials import CredentialStore
from syncer.registry.limits import Limiter
from workers.redis_coordinator import RedisBlobCoordinator
from workers.redis_hostgate import RedisHostGate
from workers.redis_ledger import RedisLedger
from workers.redis_limiter import RedisLimitBackend
from workers.settings import redis_url

_store: CredentialStore | None = None
_store_lock = threading.Lock()


def load_worker_store() -> CredentialStore:
    """Credentials of this worker host (raises ConfigError on a bad file).

    One store per process, shared by the ``worker`` command (whose log scrubber asks it for
    secrets) and the tasks: secrets a credential helper answers while a task runs are then
    scrubbed from the logs too. A forked prefork child keeps using its copy.
    """
    global _store
    with _store_lock:
        if _store is None:
            _store = _read_worker_store()
        return _store


def _read_worker_store() -> CredentialStore:
    config_file = os.environ.get("SYNCER_CONFIG_FILE")
    auth_file = os.environ.get("SYNCER_AUTH_FILE")
    if config_file:
        return CredentialStore(load_auth_file(config_file, section="auth"))
    if auth_file:
        return CredentialStore(load_auth_file(auth_file))
    return CredentialStore()


def redis_client() -> redis.Redis:
    """A Redis client for ledgers and blob dedupe, tolerant of a restarting server."""
    return redis.Redis.from_url(
        redis_url(),
        socket_timeout=30,
        socket_connect_timeout=10,
        health_check_interval=15,
        retry_on_timeout=True,
    )


@dataclass
class WorkerContext:
    """Per-process state: the copier (with its registry connections), Redis."""

    copier: ImageCopier
    redis: redis.Redis

    def ledger(self, run_id: str) -> RedisLedger:
        """The ledger of ``run_id``."""
        return RedisLedger(self.redis, run_id)


_context: WorkerContext | None = None
_context_pid = 0
_lock = threading.Lock()


def get_context() -> WorkerContext:
    """This process's context, created on first use (and again in a forked child)."""
    global _context, _context_pid
    with _lock:
        if _context is None or _context_pid != os.getpid():
            store = load_worker_store()
            client = redis_client()
            # Rate-limit pauses (429 / Retry-After) are shared with every worker via Redis.
            # So are the auth file's per-registry limits (max_concurrency, requests_per_second).
            registries = Registries(store, gate=RedisHostGate(client),
                                    limiter=Limiter(RedisLimitBackend(client)))
            coordinator = RedisBlobCoordinator(client)
            _context = WorkerContext(ImageCopier(registries, coordinator=coordinator), client)
            _context_pid = os.getpid()
        return _context
