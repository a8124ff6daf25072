"""The distributed half of ``make demo``: Redis, two workers and Flower on loopback.

:class:`Fleet` starts a throw-away ``redis-server`` (free loopback port, no persistence, in
the demo's temporary directory), two ``syncer worker`` processes with their default node
names (``syncer-<hex>@host``) and ``syncer flower`` behind basic auth with a generated
password. Every process it starts is recorded the moment it exists, and :meth:`Fleet.stop`
ends them all — workers and Flower by process group (SIGTERM, then SIGKILL after a grace
period), then Redis — whatever happened before: ``scripts.demo`` calls it from a ``finally``
block and from ``atexit``, and turns SIGTERM and SIGHUP into an exception so that both run.
The children also ask Linux to SIGTERM them if the demo dies without cleaning up
(``PR_SET_PDEATHSIG``, see :mod:`tests.support.ports`).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import sys
from pathlib import Path

import requests

from tests.support.celery_workers import SYNCER, FlowerProcess, GroupProcess, syncer_env
from tests.support.ports import wait_until
from tests.support.registry import RedisServer

FLOWER_USER = "admin"
#: ``syncer worker`` logs ``<node> ready.`` once it consumes; default nodes look like this.
READY = re.compile(r"(syncer-[0-9a-f]+@\S+) ready\.")


class Fleet:
    """Redis, ``workers`` times ``syncer worker --config CONFIG`` and Flower, for one demo."""

    def __init__(self, directory: Path, config: Path, *, workers: int = 2,
                 concurrency: int = 4):
        self.directory = directory
        self.config = config
        self.count = workers
        self.concurrency = concurrency
        self.password = secrets.token_urlsafe(12)
        self.redis = RedisServer(directory / "redis")
        self.env: dict[str, str] = {}
        self.workers: list[GroupProcess] = []
        self.nodes: list[str] = []
        self.flower: FlowerProcess | None = None

    @property
    def broker_url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return self.redis.url

    def start(self) -> Fleet:
        """Start Redis, then the workers and Flower together; wait until all are ready and
        Flower has seen every worker online (it learns about workers from their events)."""
        self.redis.start()
        # Defaults as a user runs them: no shortened timeouts, no override module.
        self.env = syncer_env(self.broker_url, self.directory / "env", visibility_timeout=None,
                              task_time_limit=None, restore_interval=None)
        for i in range(self.count):
            argv = [SYNCER, "worker", "--config", str(self.config),
                    "--concurrency", str(self.concurrency)]
            worker = GroupProcess(f"worker{i + 1}", argv, self.env,
                                  self.directory / f"worker{i + 1}.log")
            self.workers.append(worker)  # recorded first: stop() must see it even if start fails
            worker.start()
        self.flower = FlowerProcess(self.env, self.directory / "flower.log",
                                    basic_auth=(FLOWER_USER, self.password))
        self.flower.start()
        self.nodes = [w.wait_for_log(READY.pattern, 60, "ready.").group(1) for w in self.workers]
        flower = self.flower
        wait_until(lambda: set(self.nodes) <= flower.online_workers(), 30,
                   "Flower to see every worker online", interval=0.3)
        return self

    @property
    def flower_url(self) -> str:
        """Flower's address (loopback)."""
        return self.flower.url if self.flower else ""

    def flower_view(self, run_id: str) -> tuple[int, dict[str, int]]:
        """What Flower shows: the number of workers online and the run's tasks by state."""
        assert self.flower is not None
        online = len(self.flower.online_workers())
        tasks = self.flower.get("/api/tasks").json().values()
        states: dict[str, int] = {}
        for task in tasks:
            if run_id in (task.get("args") or ""):
                states[task["state"]] = states.get(task["state"], 0) + 1
        return online, states

    def wait_for_flower(self, run_id: str, jobs: int, timeout: float = 15) -> None:
        """Wait until Flower has every task of ``run_id`` in a final state (its events
        arrive a moment after the ledger says the run is over)."""
        def settled() -> bool:
            with contextlib.suppress(requests.RequestException, ValueError):
                _, states = self.flower_view(run_id)
                return states.get("SUCCESS", 0) + states.get("FAILURE", 0) >= jobs
            return False

        with contextlib.suppress(TimeoutError):
            wait_until(settled, timeout, "Flower to record the run", interval=0.3)

    def stop(self) -> None:
        """Stop every process this fleet started (idempotent; never raises)."""
        for process in [*self.workers, *([self.flower] if self.flower else [])]:
            try:
                process.stop(grace=8.0)
            except Exception as exc:  # keep going: the next process must stop too
                print(f"  could not stop {process.name}: {exc}", file=sys.stderr)
        try:
            self.redis.stop()
        except Exception as exc:
            print(f"  could not stop redis-server: {exc}", file=sys.stderr)

    def log_tails(self, chars: int = 1500) -> str:
        """The end of every worker's and Flower's log (for a failed demo)."""
        parts = []
        for process in [*self.workers, *([self.flower] if self.flower else [])]:
            parts.append(f"--- {process.name} ({process.log_path}):\n"
                         f"{process.log_text()[-chars:]}")
        return "\n".join(parts)
