"""Shared pytest fixtures: real registries (open, htpasswd, token, TLS), proxy, redis.

All fixtures are function-scoped and stop their processes on teardown, also when the
test fails. Tests needing the external binaries are skipped if they are missing.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.support import (  # noqa: E402
    BASIC_USERS,
    TEST_PASSWORDS,
    TOKEN_PERMISSIONS,
    TOKEN_USERS,
)
from tests.support.celery_workers import WorkerPool  # noqa: E402
from tests.support.proxy import CountingProxy  # noqa: E402
from tests.support.registry import (  # noqa: E402
    AuthMode,
    RedisServer,
    RedisUrl,
    RegistryProcess,
)

__all__ = ["BASIC_USERS", "TEST_PASSWORDS", "TOKEN_PERMISSIONS", "TOKEN_USERS"]

_INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"

# Every server in these tests is on loopback. A proxy configured on the machine (for package
# downloads, say) must never carry that traffic: in-process clients and subprocesses alike.
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(filter(None, [os.environ.get(_var), "127.0.0.1", "localhost"]))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under ``tests/integration`` with ``@pytest.mark.integration``."""
    for item in items:
        if _INTEGRATION_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


def _require(binary: str) -> None:
    """Skip on a developer machine without ``binary``; fail in CI, where a skip would hide
    that nothing was tested."""
    if shutil.which(binary) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary} is not installed (CI must install it: see .ci/run)")
        pytest.skip(f"{binary} is not installed")


MakeRegistry = Callable[..., RegistryProcess]
MakeProxy = Callable[..., CountingProxy]


@pytest.fixture
def make_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeRegistry]:
    """Factory ``make_registry(auth=None, tls=False, users=None, **kwargs)``.

    Starts a :class:`RegistryProcess` and returns it; all of them are stopped at
    teardown. ``auth="htpasswd"`` defaults to :data:`BASIC_USERS`; ``auth="token"``
    defaults to :data:`TOKEN_USERS` with :data:`TOKEN_PERMISSIONS` (``puller`` pull-only).
    Other keyword arguments go to :class:`RegistryProcess` (e.g. ``anonymous=("pull",)``).
    """
    _require("docker-registry")
    started: list[RegistryProcess] = []

    def factory(
        auth: AuthMode = None,
        tls: bool = False,
        users: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> RegistryProcess:
        if auth == "htpasswd":
            _require("htpasswd")
            users = BASIC_USERS if users is None else users
        elif auth == "token":
            users = TOKEN_USERS if users is None else users
            if users is TOKEN_USERS:
                kwargs.setdefault("permissions", TOKEN_PERMISSIONS)
        name = f"registry-{auth or 'open'}{'-tls' if tls else ''}"
        reg = RegistryProcess(
            tmp_path_factory.mktemp(name), auth=auth, tls=tls, users=users, **kwargs
        )
        started.append(reg)
        return reg.start()

    try:
        yield factory
    finally:
        for reg in reversed(started):
            reg.stop()


@pytest.fixture
def registry(make_registry: MakeRegistry) -> RegistryProcess:
    """An open (no auth, plain HTTP) registry."""
    return make_registry()


@pytest.fixture
def basic_registry(make_registry: MakeRegistry) -> RegistryProcess:
    """An htpasswd registry with users :data:`BASIC_USERS` (``admin``, ``reader``)."""
    return make_registry(auth="htpasswd")


@pytest.fixture
def token_registry(make_registry: MakeRegistry) -> RegistryProcess:
    """A token-auth registry; ``.token_server`` counts fetches. Users :data:`TOKEN_USERS`."""
    return make_registry(auth="token")


@pytest.fixture
def tls_registry(make_registry: MakeRegistry) -> RegistryProcess:
    """An open registry served over HTTPS; trust ``.ca_file``."""
    return make_registry(tls=True)


@pytest.fixture
def make_proxy() -> Iterator[MakeProxy]:
    """Factory ``make_proxy(upstream, **kwargs)`` returning a started CountingProxy."""
    started: list[CountingProxy] = []

    def factory(upstream: RegistryProcess | str, **kwargs: Any) -> CountingProxy:
        proxy = CountingProxy(upstream, **kwargs)
        started.append(proxy)
        return proxy.start()

    try:
        yield factory
    finally:
        for proxy in reversed(started):
            proxy.stop()


@pytest.fixture
def counting_proxy(registry: RegistryProcess, make_proxy: MakeProxy) -> CountingProxy:
    """A :class:`CountingProxy` in front of the ``registry`` fixture."""
    return make_proxy(registry)


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisUrl]:
    """A private ``redis-server``; yields its URL ``redis://127.0.0.1:P/0`` as a str
    subclass with ``stop()``, ``start()``, ``restart()``, ``port`` and ``server``.
    """
    _require("redis-server")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield RedisUrl(server)
    finally:
        server.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., WorkerPool]]:
    """Factory ``cluster(broker_url, **env_options) -> WorkerPool`` (see
    :func:`tests.support.celery_workers.syncer_env` for the options; ``None`` keeps a
    setting at its default, ``**USER_DEFAULTS`` keeps all of them). Every worker is stopped
    at teardown (SIGTERM, then SIGKILL of its process group) and its log tail printed (pytest
    shows it when the test failed)."""
    pools: list[WorkerPool] = []

    def factory(broker_url: str, **env_options: Any) -> WorkerPool:
        pool = WorkerPool(broker_url, tmp_path / f"cluster{len(pools)}", **env_options)
        pools.append(pool)
        return pool

    try:
        yield factory
    finally:
        for pool in pools:
            pool.stop_all()
            print(pool.report())
