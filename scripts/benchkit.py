"""The measuring kit of ``make bench`` (:mod:`scripts.bench`): run a tool, count what it cost.

A :class:`Run` is one tool invocation (or several in a row, e.g. one ``skopeo sync`` per
repository) measured from outside: wall time, the tool's own CPU (user + system, from GNU
time, children included), its peak RSS, the requests each registry received (counted at a
proxy, or from the registry's access log when no proxy is in the path) and the CPU the two
registries spent meanwhile. Workloads are seeded here too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.support import images
from tests.support.celery_workers import clean_env
from tests.support.delayproxy import DelayProxy
from tests.support.proxy import CountingProxy
from tests.support.registry import RedisServer, RegistryProcess

GNU_TIME = "/usr/bin/time"  # Debian package "time"
#: GNU time's report: user seconds, system seconds, peak RSS in KiB.
TIME_FORMAT = "%U %S %M"


def tool_env(directory: Path) -> dict[str, str]:
    """The environment of a measured tool: no proxy or syncer settings from the caller, and
    an empty docker config (only the bench's registries, anonymous): the tests' ``clean_env``."""
    return clean_env(directory)


def timed(command: list[str], report: Path) -> list[str]:
    """``command`` wrapped in GNU time, which writes its figures (:data:`TIME_FORMAT`) to
    ``report``."""
    return [GNU_TIME, "-f", TIME_FORMAT, "-o", str(report), *command]


def read_time(report: Path) -> tuple[float, float]:
    """CPU seconds (user + system) and peak RSS (MB) from a GNU time ``report``; zeros when
    it holds no figures (the tool was killed, or GNU time could not run it). GNU time may
    write a "Command exited with non-zero status" line first: the last line of three
    numbers is the one."""
    try:
        lines = report.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    figures = [f for f in (line.split() for line in lines) if len(f) == 3 and f[2].isdigit()]
    user, system, peak_kib = figures[-1] if figures else ("0", "0", "0")
    return float(user) + float(system), int(peak_kib) / 1024


def syncer_bin() -> list[str]:
    """The syncer CLI of this environment."""
    return [sys.executable, "-m", "workers.cli"]


def compile_bytecode() -> None:
    """Compile the project's modules to bytecode, as ``pip install`` does for an installed
    package: an editable checkout run under ``PYTHONDONTWRITEBYTECODE`` (set on some
    developer and CI machines) would otherwise compile every module from source at each
    start — about 0.25 s of CPU per run that no installed copy spends."""
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", "syncer", "workers", "config"],
                   cwd=root, check=True, stdout=subprocess.DEVNULL)


@dataclass
class Measure:
    """One process: wall seconds, own CPU seconds (user + system), peak RSS, exit code."""

    seconds: float
    cpu: float
    peak_rss_mb: float
    exit_code: int


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (started with ``start_new_session=True``): the
    tool under GNU time dies too, not only GNU time."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def measure(command: list[str], env: dict | None = None, timeout: float | None = None) -> Measure:
    """Run ``command``; wall time, CPU and peak RSS.

    CPU and RSS come from GNU time (``%U %S %M``): a child forked straight from this Python
    process would report this process's RSS at fork time as its own peak (Linux folds the
    pre-exec high-water mark into ``ru_maxrss``), hiding anything smaller. After ``timeout``
    seconds the whole process group is killed and the exit code is -9.
    """
    with tempfile.NamedTemporaryFile("r") as report:
        started = time.monotonic()
        proc = subprocess.Popen(
            timed(command, Path(report.name)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # a timeout kills the tool too, not only GNU time
        )
        try:
            _, stderr = proc.communicate(timeout=timeout)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            kill_session(proc)
            _, stderr = proc.communicate()
            returncode = -9
            stderr += f"\ntimed out after {timeout:.0f} s".encode()
        elapsed = time.monotonic() - started
        cpu, peak_mb = read_time(Path(report.name))
    if returncode:
        tail = stderr.decode(errors="replace")[-2000:]
        print(f"  ! {command[0]} exited {returncode}: {tail}", file=sys.stderr)
    return Measure(elapsed, cpu, peak_mb, returncode)


class RequestCounter:
    """Requests one registry served since :meth:`mark`: at its proxy when there is one,
    else from its access log (every request, one line). ``relay``: the delay relay in front
    of the registry, if any (its CPU is reported beside the registry's)."""

    def __init__(self, registry: RegistryProcess, proxy: CountingProxy | None = None,
                 relay: DelayProxy | None = None):
        self.registry = registry
        self.proxy = proxy
        self.relay = relay
        self._since = 0

    def mark(self) -> None:
        """Start counting from now."""
        if self.proxy is not None:
            self.proxy.reset()
        else:
            self._since = self.registry.log_mark()

    def count(self) -> int:
        """Requests since :meth:`mark`."""
        if self.proxy is not None:
            return len(self.proxy.records)
        return len(self.registry.access_log()[self._since:])


def server_cpu(*servers: RegistryProcess | DelayProxy | RedisServer | None) -> float:
    """CPU seconds (user + system) the servers' processes (registries, delay relays,
    redis-server) have used so far, together; None or a server not started counts 0."""
    total = 0.0
    for server in servers:
        if server is not None and server.proc is not None:
            times = psutil.Process(server.proc.pid).cpu_times()
            total += times.user + times.system
    return total


@dataclass
class Run:
    """One measured sync: the tool's figures plus what each side served and spent."""

    profile: str
    workload: str
    tool: str
    images: int
    result: Measure
    src_requests: int = 0
    dst_requests: int = 0
    registries_cpu: float = 0.0
    relays_cpu: float = 0.0  # the delay relays in front of the registries (latency profile)
    redis_cpu: float = 0.0  # redis-server (distributed runs)
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def requests(self) -> int:
        """Requests both registries served."""
        return self.src_requests + self.dst_requests

    @property
    def cpu_ms_per_request(self) -> float:
        """The tool's own CPU per request served (ms)."""
        return 1000 * self.result.cpu / self.requests if self.requests else 0.0


def measured(
    profile: str,
    workload: str,
    tool: str,
    images_count: int,
    commands: Sequence[list[str]],
    sides: tuple[RequestCounter, RequestCounter],
    *,
    env: dict | None = None,
    timeout: float | None = None,
) -> Run:
    """Run ``commands`` one after the other as one :class:`Run` (times and CPU summed, peak
    RSS the largest), counting the requests of both sides and the registries' CPU."""
    src, dst = sides
    src.mark()
    dst.mark()
    registries = (src.registry, dst.registry)
    cpu_before = server_cpu(*registries)
    relays_before = server_cpu(src.relay, dst.relay)
    parts = [measure(command, env=env, timeout=timeout) for command in commands]
    cpu_after = server_cpu(*registries)
    relays = server_cpu(src.relay, dst.relay) - relays_before
    total = Measure(
        sum(p.seconds for p in parts),
        sum(p.cpu for p in parts),
        max(p.peak_rss_mb for p in parts),
        next((p.exit_code for p in parts if p.exit_code), 0),
    )
    return Run(profile, workload, tool, images_count, total, src.count(), dst.count(),
               cpu_after - cpu_before, relays)


# -- workloads -------------------------------------------------------------------------------


def seed_small(src: RegistryProcess, repos: Sequence[str], tags: int) -> None:
    """``tags`` small images in each of ``repos``: two base layers shared by all (512 + 128
    KiB) and one 16 KiB layer of their own, like application images on a common base."""
    base = images.make_layer(512 * 1024, seed="small-base", compress=False)
    runtime = images.make_layer(128 * 1024, seed="small-runtime", compress=False)
    for repo in repos:
        for i in range(tags):
            own = images.make_layer(16 * 1024, seed=f"{repo}-{i}", compress=False)
            images.push_image(src, repo, f"t{i}", layers=[base, runtime, own])


def seed_layers(src: RegistryProcess, repo: str, count: int) -> None:
    """``count`` layer-heavy images in ``repo`` (tags t0…): 3 layers, 7 MB, one shared."""
    base = images.make_layer(4 * 1024 * 1024, seed="bench-base", compress=False)
    for i in range(count):
        layers = [
            base,
            images.make_layer(2 * 1024 * 1024, seed=f"a{i}", compress=False),
            images.make_layer(1024 * 1024, seed=f"b{i}", compress=False),
        ]
        images.push_image(src, repo, f"t{i}", layers=layers)


def landed(src: RegistryProcess, dst: RegistryProcess, pairs: Sequence[tuple[str, str]],
           tags: Sequence[str], *, exact: bool) -> int:
    """How many of ``tags`` of each (source repo, destination repo) pair are at the
    destination with every blob they reference, asked straight at the registries (not
    through any proxy); ``exact``: digest-identical too.

    skopeo is judged without ``exact``: it gzips the bench images' layers (plain tars under a
    gzip media type) and so rewrites their manifests; its copies never match by digest.
    """
    count = 0
    for src_repo, dst_repo in pairs:
        for tag in tags:
            want = images.manifest_digest(src, src_repo, tag)
            got = images.manifest_digest(dst, dst_repo, tag)
            if want is None or got is None or (exact and got != want):
                continue
            if not images.walk_image(dst, dst_repo, tag).missing:
                count += 1
    return count


def poll_peak(pids: Callable[[], Sequence[psutil.Process]], until: Callable[[], bool],
              deadline: float | None = None) -> float:
    """Poll the summed RSS of ``pids()`` until ``until()``, or until ``time.monotonic()``
    passes ``deadline`` (None: no limit; the caller tells which by asking ``until()`` again);
    the peak in MB."""
    peak = 0.0
    while not until():
        if deadline is not None and time.monotonic() > deadline:
            break
        rss = 0
        for proc in pids():
            with contextlib.suppress(psutil.Error):
                rss += proc.memory_info().rss
        peak = max(peak, rss / 1024 / 1024)
        time.sleep(0.05)
    return peak


def group_cpu(processes: Sequence[psutil.Process]) -> float:
    """CPU seconds (user + system, reaped children included) of ``processes``."""
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total
