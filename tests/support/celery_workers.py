"""Real distributed-mode processes for tests: ``syncer worker`` (Celery, prefork), ``syncer
flower``, and the ``syncer plan`` / ``syncer status`` commands, all against a test Redis.

Every long-lived process is started in its own session (``start_new_session=True``), so its
process group holds the Celery main process *and* its prefork children: :meth:`kill` and
:meth:`stop` signal the whole group, and nothing outlives the test. Output goes to a log
file in the test's temporary directory (``w1.log``, ``flower.log``) for debugging; the
fixtures print the tail of each log at teardown, which pytest shows for a failed test.

Celery settings come from the environment the way an operator sets them
(``SYNCER_BROKER_URL``, ``SYNCER_VISIBILITY_TIMEOUT``, ``SYNCER_TASK_TIME_LIMIT``), plus a
small override module named in ``SYNCER_CELERY_CONFIG`` (the documented hook) that makes
kombu sweep for expired unacknowledged messages every second: kombu 5.7's event loop sweeps
only every ``unacked_restore_interval * unacked_restore_throttle`` = 10 s x 10 = 100 s by
default, so a short visibility timeout alone would not make redelivery quick. Tests of the
liveness layer pass :data:`USER_DEFAULTS` (``None`` for all three) and run with what a user
gets by default.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import psutil
import requests

from .ports import _die_with_parent, free_port, port_is_open, wait_until

#: The console script of the venv running the tests.
SYNCER = str(Path(sys.executable).with_name("syncer"))

#: Module written next to the logs and named in SYNCER_CELERY_CONFIG.
OVERRIDES_MODULE = "syncer_test_celery_overrides"

_OVERRIDES_SOURCE = '''"""Overrides of workers/settings.py, from tests/support/celery_workers.py."""
from workers.settings import build_settings

broker_transport_options = {
    **build_settings()["broker_transport_options"],
    "unacked_restore_interval": %(interval)d,
    "unacked_restore_throttle": 1,
}
'''

_DROP_ENV = ("SYNCER_", "CELERY_", "FLOWER_", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
             "https_proxy", "ALL_PROXY", "all_proxy", "DEFAULT_REGISTRY", "DEFAULT_NAMESPACE")


#: The "all liveness timings at their defaults" options of :func:`syncer_env` (and so of the
#: ``cluster`` fixture): no variable, no override module — what a user runs.
USER_DEFAULTS: dict[str, Any] = {
    "visibility_timeout": None, "task_time_limit": None, "restore_interval": None}


def clean_env(directory: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``syncer`` (or other tool's) subprocess, isolated from the machine.

    Variables that would change the child's behaviour (``SYNCER_*``, ``CELERY_*``,
    ``FLOWER_*``, proxies, ``DEFAULT_REGISTRY``/``DEFAULT_NAMESPACE``) are dropped; docker's
    config.json is replaced by an empty ``directory/docker-config``, so only the auth files
    the test writes provide credentials (a developer's ``credsStore`` is never called).
    ``extra`` variables are set last (e.g. a ``DOCKER_CONFIG`` of the test's own).
    """
    docker_config = directory / "docker-config"
    docker_config.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP_ENV)}
    env.update({"DOCKER_CONFIG": str(docker_config), "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def syncer_env(broker_url: str, directory: Path, *, visibility_timeout: int | None = 15,
               task_time_limit: int | None = 120, restore_interval: int | None = 1,
               extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``syncer`` subprocess bound to ``broker_url``.

    :func:`clean_env` (no machine settings, an empty docker config) plus the broker URL.
    ``None`` for ``visibility_timeout``, ``task_time_limit`` or ``restore_interval`` keeps
    what a user gets by default (no variable, no override module; see
    :data:`USER_DEFAULTS`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    if restore_interval is not None:
        (directory / f"{OVERRIDES_MODULE}.py").write_text(
            _OVERRIDES_SOURCE % {"interval": restore_interval})
    env = clean_env(directory)
    python_path = [str(directory), *filter(None, [env.get("PYTHONPATH")])]
    env.update({
        "SYNCER_BROKER_URL": str(broker_url),
        "PYTHONPATH": os.pathsep.join(python_path),
    })
    if visibility_timeout is not None:
        env["SYNCER_VISIBILITY_TIMEOUT"] = str(visibility_timeout)
    if task_time_limit is not None:
        env["SYNCER_TASK_TIME_LIMIT"] = str(task_time_limit)
    if restore_interval is not None:
        env["SYNCER_CELERY_CONFIG"] = OVERRIDES_MODULE
    env.update(extra or {})
    return env


def group_members(pgid: int) -> list[psutil.Process]:
    """Live processes of process group ``pgid`` (zombies excluded)."""
    found = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every process still in group ``pgid``."""
    for proc in group_members(pgid):
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def log_tail(path: Path, chars: int = 4000) -> str:
    """The end of a log file (empty if it does not exist)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


class GroupProcess:
    """A child process leading its own process group, logging to ``log_path`` (appended)."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_path: Path):
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.pgid = 0
        self._log: IO[bytes] | None = None
        self._log_offset = 0

    @property
    def running(self) -> bool:
        """True while the group leader is alive."""
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        """The group leader's pid (0 before start)."""
        return self.proc.pid if self.proc else 0

    def pids(self) -> set[int]:
        """Every live pid of the group (leader and children)."""
        return {p.pid for p in group_members(self.pgid)} if self.pgid else set()

    def start(self) -> GroupProcess:
        """Start the process; output is appended to ``log_path``."""
        if self.running:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.pgid = self.proc.pid
        return self

    def log_text(self, *, since_start: bool = False) -> str:
        """The whole log, or only what this start wrote."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[self._log_offset if since_start else 0:].decode(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float, what: str = "") -> re.Match[str]:
        """Wait until this start's output matches ``pattern``; fail early if the process dies."""
        found: list[re.Match[str]] = []

        def seen() -> bool:
            match = re.search(pattern, self.log_text(since_start=True))
            if match:
                found.append(match)
                return True
            if not self.running:
                code = self.proc.returncode if self.proc else "?"
                raise RuntimeError(f"{self.name} exited ({code}) before {what or pattern!r}:\n"
                                   f"{log_tail(self.log_path)}")
            return False

        try:
            wait_until(seen, timeout, f"{self.name}: {what or pattern}", interval=0.1)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- {self.log_path}:\n{log_tail(self.log_path)}") from None
        return found[0]

    def kill(self) -> set[int]:
        """SIGKILL the whole process group at once (no shutdown of any kind); wait until every
        member is gone. Returns the pids that were killed."""
        if not self.pgid:
            return set()
        victims = self.pids()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGKILL)
        kill_group(self.pgid)  # anything that raced the group signal
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        wait_until(lambda: not self.pids(), 10, f"{self.name}'s processes to die")
        self._close_log()
        return victims

    def stop(self, grace: float = 8.0) -> None:
        """SIGTERM the leader (a warm shutdown for Celery), then SIGKILL the whole group
        after ``grace`` seconds; the group is always swept, even if the leader exited."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pgid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=10)
        if self.pgid:
            kill_group(self.pgid)
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: not self.pids(), 10, f"{self.name}'s processes to die")
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class WorkerProcess(GroupProcess):
    """``syncer worker --auth FILE -c N -n NAME@%h --loglevel INFO``."""

    def __init__(self, name: str, auth_file: Path | None, env: Mapping[str, str], log_path: Path,
                 *, concurrency: int = 2, pool: str | None = None):
        argv = [SYNCER, "worker", "-c", str(concurrency), "-n", f"{name}@%h", "--loglevel", "INFO"]
        if pool:  # None: the CLI's default pool
            argv += ["--pool", pool]
        if auth_file is not None:
            argv[2:2] = ["--auth", str(auth_file)]
        super().__init__(name, argv, env, log_path)
        self.node = ""  # e.g. "w1@myhost", known once ready

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> WorkerProcess:
        """Start the worker and (by default) wait until Celery logs ``NAME@host ready.``."""
        super().start()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> str:
        """Wait for this start's ``ready.`` line; returns the node name."""
        match = self.wait_for_log(rf"({re.escape(self.name)}@\S+) ready\.", timeout, "ready.")
        self.node = match.group(1)
        return self.node

    def child_pids(self) -> set[int]:
        """The prefork pool processes."""
        return self.pids() - {self.pid}


class WorkerPool:
    """Starts named workers against one broker; :meth:`stop_all` tears every one down."""

    def __init__(self, broker_url: str, directory: Path, **env_options: Any):
        self.broker_url = str(broker_url)
        self.directory = Path(directory)
        self.env_options = env_options
        self.workers: list[WorkerProcess] = []
        self.env = syncer_env(self.broker_url, self.directory, **env_options)

    def start(self, name: str, auth_file: Path | None, *, concurrency: int = 2,
              pool: str | None = None, wait: bool = True,
              extra_env: Mapping[str, str] | None = None) -> WorkerProcess:
        """Start worker ``name`` (node ``name@%h``); its log is ``<directory>/<name>.log``."""
        worker = WorkerProcess(name, auth_file, {**self.env, **(extra_env or {})},
                               self.directory / f"{name}.log", concurrency=concurrency,
                               pool=pool)
        self.workers.append(worker)
        return worker.start(wait=wait)

    def start_many(self, names: Iterable[str], auth_file: Path | None,
                   **kwargs: Any) -> list[WorkerProcess]:
        """Start several workers, then wait for all of them to be ready."""
        started = [self.start(name, auth_file, wait=False, **kwargs) for name in names]
        for worker in started:
            worker.wait_ready()
        return started

    def logs(self) -> str:
        """Every worker log, concatenated."""
        seen: set[Path] = set()
        texts = []
        for worker in self.workers:
            if worker.log_path not in seen:
                seen.add(worker.log_path)
                texts.append(worker.log_text())
        return "\n".join(texts)

    def stop_all(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL of each group)."""
        for worker in self.workers:
            worker.stop(grace=5.0)

    def report(self) -> str:
        """Log tails of every worker, for a failed test's captured output."""
        parts = []
        for worker in self.workers:
            parts.append(f"--- {worker.name} ({worker.log_path}):\n{log_tail(worker.log_path)}")
        return "\n".join(parts)


class FlowerProcess(GroupProcess):
    """``syncer flower --port P`` on loopback, optionally behind basic auth."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *,
                 basic_auth: tuple[str, str] | None = None):
        self.port = free_port()
        env = dict(env)
        if basic_auth:
            env["FLOWER_BASIC_AUTH"] = f"{basic_auth[0]}:{basic_auth[1]}"
        self.basic_auth = basic_auth
        super().__init__("flower", [SYNCER, "flower", "--port", str(self.port),
                                    "--address", "127.0.0.1"], env, log_path)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, *, auth: bool = True, **kwargs: Any) -> requests.Response:
        """GET ``path`` (with the basic-auth credentials unless ``auth=False``)."""
        return requests.get(self.url + path, auth=self.basic_auth if auth else None,
                            timeout=10, **kwargs)

    def start(self, timeout: float = 30.0) -> FlowerProcess:
        """Start Flower and wait until it answers ``/healthcheck``."""
        super().start()

        def healthy() -> bool:
            if not self.running:
                raise RuntimeError(f"flower exited:\n{log_tail(self.log_path)}")
            if not port_is_open(self.port):
                return False
            with contextlib.suppress(requests.RequestException):
                return self.get("/healthcheck").text == "OK"
            return False

        wait_until(healthy, timeout, "flower /healthcheck", interval=0.2)
        return self

    def online_workers(self) -> set[str]:
        """Workers Flower has seen online through *events* (heartbeats), from ``/metrics``."""
        text = self.get("/metrics").text
        return set(re.findall(r'flower_worker_online\{worker="([^"]+)"\} 1\.0', text))


def run_syncer(env: Mapping[str, str], *args: str, timeout: float = 120,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``syncer ARGS`` to completion (text output captured)."""
    return subprocess.run([SYNCER, *args], env=dict(env), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, check=False)
