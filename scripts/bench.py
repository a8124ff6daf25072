"""``make bench``: speed, requests, CPU and memory of ``syncer`` side by side with ``skopeo``.

Both tools run against the same throw-away local registries (distribution, plain HTTP on
loopback), each into its own destination namespace, so neither gets a warm cache from the
other. syncer runs with its defaults (``--proc`` included). Measured in three profiles:

- ``loopback``: the tools talk to the registries directly; the run is CPU-bound (tool and
  registries share the cores), so CPU per request is what counts. Requests are counted from
  the registries' access logs (a proxy in the path would cost CPU of its own).
- ``latency``: a :class:`tests.support.delayproxy.DelayProxy` in front of each registry, a
  TCP relay adding a ``BENCH_LATENCY_MS`` (25 ms) round trip to every request/response
  exchange: a far-away registry, where round trips and parallelism count. The relay parses
  no HTTP and keeps one upstream connection per client connection, so it costs less CPU than
  an HTTP proxy (its CPU is printed beside the registries'); requests are counted at the
  registries' access logs.
  Also a ``--proc`` sweep and the distributed mode (one worker of 8 vs two workers of 8,
  ``syncer plan --wait``).
- ``faults``: the layer-heavy sync through fault-injecting proxies: clean, then 10 % and 30 %
  of the requests on each side answered 500 / 503 / 429 (``Retry-After: 1``), reset, or cut
  part way; the outcome is checked by digest at the registries.

Workloads: ``small`` — 120 small images (2 repositories x 60 tags; two base layers shared by
all, one 16 KiB layer each), full sync then a no-op re-run (repeated: its spread is printed);
``layers`` — 24 images of 3 layers (7 MB, one shared). Plus ``memory``: one 600 MB layer vs
a 6 MB one copied with ``syncer copy``, the peak RSS must stay flat.

syncer runs as installed: its modules compiled to bytecode first (``compileall``, what ``pip
install`` does), so no run pays for compiling them (``PYTHONDONTWRITEBYTECODE`` is set on some
machines). Each row: wall time and ratio to skopeo, requests per image per side (source +
destination, listing included), the tool's own CPU (user + system, from GNU time) and per
request, the registries' CPU meanwhile, peak RSS. Benchmarks report; they are not timed tests
(the exit code says only whether every run succeeded, every syncer full sync landed digest-
identical — checked at the registries after the timed part — and the memory stayed flat).

Knobs (environment): ``BENCH_PROFILES`` (``loopback,latency,faults,memory``),
``BENCH_SMALL_TAGS`` (60 per repository), ``BENCH_IMAGES`` (24 layer-heavy images),
``BENCH_LATENCY_MS`` (25), ``BENCH_FAR_LATENCY_MS`` (100: one worker vs two again there;
0 skips it), ``BENCH_PROCS`` (``--proc`` sweep in the latency profile,
``4,8,16``; empty: none), ``BENCH_NOOP_RUNS`` (5), ``BENCH_DISTRIBUTED`` (1; 0 skips the
Celery runs), ``BENCH_BIG_MB`` (600), ``BENCH_FAULT_RATES`` (``0.1,0.3``),
``BENCH_FAULT_SEED``, ``BENCH_TIMEOUT`` (seconds per tool run, 900). A quick run (about a
minute): ``BENCH_SMALL_TAGS=10 BENCH_IMAGES=4 BENCH_BIG_MB=20 BENCH_FAULT_RATES=0.1
BENCH_PROCS= BENCH_NOOP_RUNS=2 .venv/bin/python -m scripts.bench``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from scripts.benchkit import (
    GNU_TIME,
    Measure,
    RequestCounter,
    Run,
    compile_bytecode,
    group_cpu,
    kill_session,
    landed,
    measure,
    measured,
    poll_peak,
    read_time,
    seed_layers,
    seed_small,
    server_cpu,
    syncer_bin,
    timed,
    tool_env,
)
from scripts.benchreport import fault_table, run_table
from tests.support import images
from tests.support.celery_workers import WorkerProcess, group_members, syncer_env
from tests.support.delayproxy import DelayProxy
from tests.support.proxy import CountingProxy
from tests.support.registry import RedisServer, RegistryProcess

PROFILES = [p.strip() for p in os.environ.get(
    "BENCH_PROFILES", "loopback,latency,faults,memory").split(",") if p.strip()]
SMALL_TAGS = int(os.environ.get("BENCH_SMALL_TAGS", "60"))
SMALL_REPOS = ("small/a", "small/b")
IMAGES = int(os.environ.get("BENCH_IMAGES", "24"))
LATENCY = float(os.environ.get("BENCH_LATENCY_MS", "25")) / 1000
FAR_LATENCY = float(os.environ.get("BENCH_FAR_LATENCY_MS", "100")) / 1000
PROCS = [int(p) for p in os.environ.get("BENCH_PROCS", "4,8,16").split(",") if p.strip()]
NOOP_RUNS = max(1, int(os.environ.get("BENCH_NOOP_RUNS", "5")))
DISTRIBUTED = os.environ.get("BENCH_DISTRIBUTED", "1") != "0"
BIG_BLOB_MB = int(os.environ.get("BENCH_BIG_MB", "600"))
FAULT_RATES = [float(r) for r in os.environ.get("BENCH_FAULT_RATES", "0.1,0.3").split(",")
               if r.strip()]
FAULT_SEED = os.environ.get("BENCH_FAULT_SEED", "bench")
TIMEOUT = float(os.environ.get("BENCH_TIMEOUT", "900"))
OUT = Path("bench-out")
# What the issue asks of the latency profile (reported, not enforced).
TARGETS = {"small": 0.06, "layers": 0.3}
DISTRIBUTED_TARGET = 0.6
CORES = os.cpu_count() or 1  # shared by the tools, the registries, the relays and Redis


class Bench:
    """The source registry with both workloads, and the runs measured so far."""

    def __init__(self, tmp: Path, src: RegistryProcess):
        self.tmp = tmp
        self.src = src
        self.env = tool_env(tmp / "env")
        self.runs: list[Run] = []
        self.noops: dict[tuple[str, str], list[Run]] = {}
        self.sweep: list[Run] = []
        self.distributed: list[Run] = []
        self.far: list[Run] = []  # the same at BENCH_FAR_LATENCY_MS
        self.pools: dict[str, Measure] = {}
        self.faulty: list[Run] = []
        self.memory: tuple[Measure, Measure, Measure] | None = None
        self.relay_cpu: float | None = None  # the latency profile's delay relays, in all

    @property
    def small_images(self) -> int:
        return SMALL_TAGS * len(SMALL_REPOS)

    # -- commands ------------------------------------------------------------------------

    def syncer_small(self, src_host: str, dst_host: str, namespace: str,
                     *options: str) -> list[list[str]]:
        """``syncer sync`` of both small repositories into ``dst/namespace``."""
        config = OUT / f"{namespace.replace('/', '-')}-small.yaml"
        config.write_text(yaml.safe_dump(
            {f"{src_host}/{repo}": f"{dst_host}/{namespace}/{repo.rsplit('/', 1)[1]}"
             for repo in SMALL_REPOS}))
        return [[*syncer_bin(), "sync", f"--images={config}", *options]]

    def syncer_layers(self, src_host: str, dst_host: str, namespace: str,
                      *options: str) -> list[list[str]]:
        """``syncer sync`` of the layer-heavy repository into ``dst/namespace/app``."""
        config = OUT / f"{namespace.replace('/', '-')}-layers.yaml"
        config.write_text(yaml.safe_dump({f"{src_host}/bench/app": f"{dst_host}/{namespace}/app"}))
        return [[*syncer_bin(), "sync", f"--images={config}", *options]]

    @staticmethod
    def skopeo(src_host: str, dst_host: str, namespace: str, repos: tuple[str, ...],
               *options: str) -> list[list[str]]:
        """One ``skopeo sync`` per repository (every tag) into ``dst/namespace``."""
        return [["skopeo", "sync", "--src", "docker", "--dest", "docker",
                 "--src-tls-verify=false", "--dest-tls-verify=false", *options,
                 f"{src_host}/{repo}", f"{dst_host}/{namespace}"] for repo in repos]

    def run(self, profile: str, workload: str, tool: str, commands, sides) -> Run:
        count = self.small_images if workload.startswith("small") else IMAGES
        print(f"  {profile} / {workload} / {tool}…", flush=True)
        run = measured(profile, workload, tool, count, commands, sides, env=self.env,
                       timeout=TIMEOUT)
        return run

    def check_landed(self, run: Run, dst: RegistryProcess, namespace: str) -> Run:
        """After the timed part: how many images of a syncer full sync into ``namespace``
        are at ``dst`` digest-identical with every blob (``run.extra["landed"]``, which the
        report's verdict requires to be every image); a shortfall is printed."""
        if run.workload.startswith("small"):
            pairs = [(repo, f"{namespace}/{repo.rsplit('/', 1)[1]}") for repo in SMALL_REPOS]
            tags = [f"t{i}" for i in range(SMALL_TAGS)]
        else:
            pairs, tags = [("bench/app", f"{namespace}/app")], [f"t{i}" for i in range(IMAGES)]
        run.extra["landed"] = landed(self.src, dst, pairs, tags, exact=True)
        if run.extra["landed"] != run.images:
            print(f"  ! {run.profile} / {run.workload}: only {run.extra['landed']} of "
                  f"{run.images} images landed digest-identical", file=sys.stderr)
        return run

    # -- profiles ------------------------------------------------------------------------

    def side_by_side(self, profile: str, src_host: str, dst_host: str,
                     sides: tuple[RequestCounter, RequestCounter]) -> None:
        """Full sync of both workloads and the repeated no-op, for both tools."""
        for tool in ("syncer", "skopeo"):
            ns = f"{profile}-{tool}"
            commands = (self.syncer_small(src_host, dst_host, ns) if tool == "syncer"
                        else self.skopeo(src_host, dst_host, ns, SMALL_REPOS))
            full = self.run(profile, "small: full sync", tool, commands, sides)
            if tool == "syncer":
                self.check_landed(full, sides[1].registry, ns)
            self.runs.append(full)
            repeats = NOOP_RUNS if profile == "loopback" else 1
            noops = [self.run(profile, "small: no-op re-run", tool, commands, sides)
                     for _ in range(repeats)]
            self.noops[(profile, tool)] = noops
            self.runs.append(sorted(noops, key=lambda r: r.result.seconds)[len(noops) // 2])
        for tool in ("syncer", "skopeo"):
            ns = f"{profile}-{tool}"
            commands = (self.syncer_layers(src_host, dst_host, ns) if tool == "syncer"
                        else self.skopeo(src_host, dst_host, ns, ("bench/app",)))
            full = self.run(profile, "layers: full sync", tool, commands, sides)
            if tool == "syncer":
                self.check_landed(full, sides[1].registry, ns)
            self.runs.append(full)

    def loopback(self) -> None:
        """Both tools straight at the registries."""
        print("profile loopback…", flush=True)
        with RegistryProcess(self.tmp / "dst-loopback") as dst:
            sides = (RequestCounter(self.src), RequestCounter(dst))
            self.side_by_side("loopback", self.src.host, dst.host, sides)
            if DISTRIBUTED:
                print("  distributed: one worker, prefork vs threads (4 at once)…", flush=True)
                self.pools = {pool: self.measure_pool(dst, pool) for pool in ("prefork", "threads")}

    @contextlib.contextmanager
    def far_away(self, name: str, rtt: float):
        """A fresh destination registry ``name``, a delay relay of ``rtt`` in front of each
        registry, and the request counters of both sides."""
        with RegistryProcess(self.tmp / name) as dst, \
                DelayProxy(self.src.host, rtt) as src_proxy, \
                DelayProxy(dst.host, rtt) as dst_proxy:
            yield dst, src_proxy, dst_proxy, (RequestCounter(self.src, relay=src_proxy),
                                              RequestCounter(dst, relay=dst_proxy))

    def latency(self) -> None:
        """Both tools through delaying proxies; the ``--proc`` sweep; workers of 8."""
        print(f"profile latency ({LATENCY * 1000:.0f} ms round trip)…", flush=True)
        with self.far_away("dst-latency", LATENCY) as (dst, src_proxy, dst_proxy, sides):
            relays_before = server_cpu(src_proxy, dst_proxy)
            self.side_by_side("latency", src_proxy.host, dst_proxy.host, sides)
            for proc in PROCS:
                commands = self.syncer_small(src_proxy.host, dst_proxy.host, f"sweep-{proc}",
                                             f"--proc={proc}")
                run = self.run("latency", f"small: --proc {proc}", "syncer", commands, sides)
                self.sweep.append(self.check_landed(run, dst, f"sweep-{proc}"))
            if DISTRIBUTED:
                for workers in (1, 2):
                    self.distributed.append(
                        self.measure_workers(dst, src_proxy, dst_proxy, sides, workers, 8))
            self.relay_cpu = server_cpu(src_proxy, dst_proxy) - relays_before
        if DISTRIBUTED and FAR_LATENCY:
            self.far_workers()

    def far_workers(self) -> None:
        """One worker of 8 vs two through relays of ``BENCH_FAR_LATENCY_MS`` (100 ms): a
        registry far enough that the run is bound by round trips, not by this machine's two
        cores (which the registries, the relays and the workers share at 25 ms)."""
        profile = f"latency {FAR_LATENCY * 1000:.0f} ms"
        print(f"profile {profile} (distributed only)…", flush=True)
        with self.far_away("dst-far", FAR_LATENCY) as (dst, src_proxy, dst_proxy, sides):
            for workers in (1, 2):
                self.far.append(self.measure_workers(dst, src_proxy, dst_proxy, sides,
                                                     workers, 8, profile))

    def faults(self) -> None:
        """The layer-heavy sync of both tools through fault-injecting proxies: clean first,
        then at each of ``FAULT_RATES``; every rate gets a fresh destination registry (and
        fresh proxies), so nothing is already there and no blob can be mounted."""
        for rate in [0.0, *FAULT_RATES]:
            profile = "clean (via proxies)" if rate == 0 else f"{rate:.0%} faults"
            print(f"profile faults: {profile}…", flush=True)
            dst = RegistryProcess(self.tmp / f"dst-faults-{round(rate * 100)}")
            with dst, CountingProxy(self.src) as src_proxy, CountingProxy(dst) as dst_proxy:
                sides = (RequestCounter(self.src, src_proxy), RequestCounter(dst, dst_proxy))
                commands = {
                    "syncer": self.syncer_layers(src_proxy.host, dst_proxy.host, "ours"),
                    "skopeo": self.skopeo(src_proxy.host, dst_proxy.host, "skopeo",
                                          ("bench/app",), "--keep-going", "--retry-times=2"),
                }
                for tool, command in commands.items():
                    for side, proxy in (("src", src_proxy), ("dst", dst_proxy)):
                        proxy.chaos(rate, seed=f"{FAULT_SEED}-{side}-{tool}-{rate}",
                                    retry_after=1)
                    try:
                        run = self.run(profile, "layers: full sync", tool, command, sides)
                    finally:
                        src_proxy.chaos(0)
                        dst_proxy.chaos(0)
                    faults = src_proxy.fault_counts()
                    for kind, n in dst_proxy.fault_counts().items():
                        faults[kind] = faults.get(kind, 0) + n
                    repo = "ours/app" if tool == "syncer" else "skopeo/app"
                    run.extra = {
                        "faults": dict(sorted(faults.items())),
                        "landed": landed(self.src, dst, [("bench/app", repo)],
                                         [f"t{i}" for i in range(IMAGES)],
                                         exact=tool == "syncer"),
                    }
                    self.faulty.append(run)

    def memory_profile(self) -> None:
        """``syncer copy`` of a big single-layer image vs a small one: peak RSS flat."""
        print(f"memory: big blob ({BIG_BLOB_MB} MB) vs small (6 MB)…", flush=True)
        with RegistryProcess(self.tmp / "dst-memory") as dst:
            push_big(self.src, "big/large", BIG_BLOB_MB * 1024 * 1024)
            push_big(self.src, "big/small", 6 * 1024 * 1024)
            small = measure([*syncer_bin(), "copy", f"{self.src.host}/big/small:v1",
                             f"{dst.host}/ours/small:v1"], env=self.env, timeout=TIMEOUT)
            large = measure([*syncer_bin(), "copy", f"{self.src.host}/big/large:v1",
                             f"{dst.host}/ours/large:v1"], env=self.env, timeout=TIMEOUT)
            theirs = measure(["skopeo", "copy", "--src-tls-verify=false",
                              "--dest-tls-verify=false", f"docker://{self.src.host}/big/large:v1",
                              f"docker://{dst.host}/skopeo/large:v1"], env=self.env,
                             timeout=TIMEOUT)
            want = images.manifest_digest(self.src, "big/large", "v1")
            assert images.manifest_digest(dst, "ours/large", "v1") == want, "big image differs"
        self.memory = (large, small, theirs)

    # -- distributed -----------------------------------------------------------------------

    def measure_pool(self, dst: RegistryProcess, pool: str) -> Measure:
        """``syncer plan --wait`` of the layer-heavy workload on one worker of ``pool`` (4 at
        once): wall time of the whole run (planning included) and the peak summed RSS of
        the worker's processes."""
        with RedisServer(self.tmp / f"redis-{pool}") as redis_server:
            env = syncer_env(redis_server.url, self.tmp / f"env-{pool}",
                             extra={"SYNCER_ALLOWED_REGISTRIES": f"{self.src.host},{dst.host}"})
            commands = self.syncer_layers(self.src.host, dst.host, f"pool-{pool}")
            worker = WorkerProcess(f"bench-{pool}", None, env, self.tmp / f"worker-{pool}.log",
                                   concurrency=4, pool=pool)
            try:
                worker.start()
                return self.plan_and_wait(commands[0], env, [worker])[0]
            finally:
                worker.stop()

    def measure_workers(self, dst: RegistryProcess, src_proxy: DelayProxy,
                        dst_proxy: DelayProxy, sides, count: int, concurrency: int,
                        profile: str = "latency") -> Run:
        """The small workload through the delay relays on ``count`` workers of
        ``concurrency`` (threads pool): ``syncer plan --wait``, CPU of the workers and the
        planner, requests at the registries."""
        label = f"small: {count} worker{'s' if count > 1 else ''} x {concurrency}"
        print(f"  {profile} / {label}…", flush=True)
        name = f"w{count}-{profile.split()[-1]}"  # unique per profile: fresh namespaces, files
        with RedisServer(self.tmp / f"redis-{name}") as redis_server:
            env = syncer_env(
                redis_server.url, self.tmp / f"env-{name}",
                extra={"SYNCER_ALLOWED_REGISTRIES": f"{src_proxy.host},{dst_proxy.host}"})
            commands = self.syncer_small(src_proxy.host, dst_proxy.host, f"workers-{name}")
            workers = [WorkerProcess(f"bench-{name}-{i}", None, env,
                                     self.tmp / f"worker-{name}-{i}.log",
                                     concurrency=concurrency) for i in range(count)]
            try:
                for worker in workers:
                    worker.start()
                for side in sides:
                    side.mark()
                before = server_cpu(self.src, dst)
                relays_before = server_cpu(src_proxy, dst_proxy)
                redis_before = server_cpu(redis_server)
                result, workers_cpu = self.plan_and_wait(commands[0], env, workers)
                after = server_cpu(self.src, dst)
                relays = server_cpu(src_proxy, dst_proxy) - relays_before
                redis_cpu = server_cpu(redis_server) - redis_before
            finally:
                for worker in workers:
                    worker.stop()
        result.cpu += workers_cpu
        run = Run(profile, label, "syncer", self.small_images, result,
                  sides[0].count(), sides[1].count(), after - before, relays, redis_cpu)
        return self.check_landed(run, dst, f"workers-{name}")

    def plan_and_wait(self, sync_command: list[str], env: dict,
                      workers: list[WorkerProcess]) -> tuple[Measure, float]:
        """Run ``syncer plan --wait`` (the images file of ``sync_command``) against running
        ``workers``; the run's Measure (wall, planner CPU, peak summed RSS of the workers)
        and the CPU the workers spent meanwhile."""
        images_file = next(a for a in sync_command if a.startswith("--images="))
        # A folder of its own per run: a run that fails can never report an earlier run's
        # figures.
        run_dir = Path(tempfile.mkdtemp(prefix="plan-", dir=self.tmp))
        report, log_path = run_dir / "plan.time", run_dir / "plan.log"
        # The workers' processes (a prefork pool's children are forked at start): listed
        # once, polled for RSS while the run goes on.
        processes = [p for w in workers for p in group_members(w.pgid)]
        cpu_before = group_cpu(processes)
        started = time.monotonic()
        with open(log_path, "wb") as log:
            plan = subprocess.Popen(
                timed([*syncer_bin(), "plan", images_file, "--wait", "--json"], report),
                env=env, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True,  # a timeout kills the planner too, not only GNU time
            )
            peak = poll_peak(lambda: processes, lambda: plan.poll() is not None,
                             deadline=started + TIMEOUT)
            timed_out = plan.poll() is None
            if timed_out:  # hung: the whole group killed, as measure() does
                kill_session(plan)
                plan.wait()
        returncode = -9 if timed_out else plan.returncode
        elapsed = time.monotonic() - started
        workers_cpu = group_cpu(processes) - cpu_before
        cpu, _ = read_time(report)
        if returncode:
            tail = log_path.read_text(errors="replace")[-2000:]
            if timed_out:
                tail += f"\ntimed out after {TIMEOUT:.0f} s"
            print(f"  ! syncer plan --wait exited {returncode}: {tail}", file=sys.stderr)
        return Measure(elapsed, cpu, peak, returncode), workers_cpu


def push_big(src: RegistryProcess, repo: str, size: int) -> None:
    """Push an image whose single layer is ``size`` random bytes, streamed from a file."""
    session = src.admin()
    hasher = hashlib.sha256()
    with tempfile.TemporaryFile() as spool:
        remaining = size
        while remaining:
            piece = os.urandom(min(remaining, 8 * 1024 * 1024))
            hasher.update(piece)
            spool.write(piece)
            remaining -= len(piece)
        digest = "sha256:" + hasher.hexdigest()
        spool.seek(0)
        start = session.post(f"/v2/{repo}/blobs/uploads/")
        location = start.headers["Location"]
        sep = "&" if "?" in location else "?"
        done = session.put(
            f"{location}{sep}digest={digest}",
            data=spool,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        )
        assert done.status_code == 201, done.text
    config = images.make_config("linux", "amd64", [digest])
    images.push_blob(src, repo, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": images.DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": len(config),
            "digest": images.sha256_digest(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "size": size,
                "digest": digest,
            }
        ],
    }
    images.push_manifest(src, repo, "v1", json.dumps(manifest).encode(), images.DOCKER_MANIFEST)


# -- report ----------------------------------------------------------------------------------


def report(bench: Bench) -> tuple[str, bool]:
    """The whole report (Markdown) and whether every run went well."""
    reference = {(r.profile, r.workload): r for r in bench.runs if r.tool == "skopeo"}
    lines = [
        f"syncer {' '.join(syncer_bin()[1:])} (defaults) vs skopeo; small = "
        f"{bench.small_images} images, layers = {IMAGES} images; requests counted at the "
        "registries' access logs (loopback, latency) or at the proxies (faults); own CPU = "
        "user + system of the tool's processes; figures vary run to run.",
        "",
        *run_table(bench.runs, reference=reference),
    ]
    for (profile, tool), noops in bench.noops.items():
        if len(noops) > 1:
            walls = sorted(r.result.seconds for r in noops)
            lines.append("")
            lines.append(
                f"{profile} no-op re-run x{len(noops)}, {tool}: min {walls[0]:.2f} s, median "
                f"{statistics.median(walls):.2f} s, max {walls[-1]:.2f} s "
                f"(CPU {min(r.result.cpu for r in noops):.2f} to "
                f"{max(r.result.cpu for r in noops):.2f} s)")
    checks = []
    for workload, target in TARGETS.items():
        mine = reference_run(bench.runs, "latency", f"{workload}: full sync", "syncer")
        theirs = reference.get(("latency", f"{workload}: full sync"))
        if mine and theirs and theirs.result.seconds:
            ratio = mine.result.seconds / theirs.result.seconds
            checks.append(f"latency {workload}: {ratio:.3f}x skopeo (target <= {target}x)")
    if bench.relay_cpu is not None:
        lines += ["", f"latency profile: the two delay relays used {bench.relay_cpu:.2f} s of CPU "
                  "over the whole profile (every run of both tools; on the same 2 cores)."]
    if bench.sweep:
        lines += ["", "`--proc` sweep (latency profile, small workload, full sync):", "",
                  *run_table(bench.sweep)]
    if bench.distributed:
        lines += ["", "Distributed (latency profile, `syncer plan --wait`, threads pool; own CPU "
                  "= workers + planner, RSS = workers):", "",
                  *run_table([*bench.distributed, *bench.far])]
        lines += ["", *cpu_floor_lines([*bench.distributed, *bench.far])]
        if len(bench.distributed) == 2 and bench.distributed[0].result.seconds:
            one, two = bench.distributed
            ratio = two.result.seconds / one.result.seconds
            # The floor: two workers could finish no sooner than their CPU allows.
            checks.append(f"two workers of 8 vs one: {ratio:.2f}x (target <= "
                          f"{DISTRIBUTED_TARGET}x; the two-worker run's CPU floor alone is "
                          f"{cpu_floor(two) / one.result.seconds:.2f}x)")
    if bench.far and len(bench.far) == 2 and bench.far[0].result.seconds:
        ratio = bench.far[1].result.seconds / bench.far[0].result.seconds
        checks.append(f"two workers of 8 vs one at {FAR_LATENCY * 1000:.0f} ms: "
                      f"{ratio:.2f}x")
    if bench.pools:
        lines += ["", "| worker pool (plan --wait, 1 worker x 4, layers) | seconds "
                  "| worker RSS MB (all processes) |", "|---|---|---|"]
        lines += [f"| {pool} | {m.seconds:.2f} | {m.peak_rss_mb:.1f} |"
                  for pool, m in bench.pools.items()]
    if bench.faulty:
        lines += ["", *fault_table(bench.faulty)]
    flat = True
    if bench.memory:
        large, small, theirs = bench.memory
        growth = large.peak_rss_mb - small.peak_rss_mb
        flat = large.peak_rss_mb < 100 and growth <= 10
        lines += ["", f"big-blob memory: peak {large.peak_rss_mb:.1f} MB for {BIG_BLOB_MB} MB vs "
                  f"{small.peak_rss_mb:.1f} MB for 6 MB (growth {growth:+.1f} MB): "
                  f"{'flat' if flat else 'NOT FLAT'} (limit: < 100 MB, growth <= 10 MB); "
                  f"{large.seconds:.2f} s vs skopeo {theirs.seconds:.2f} s "
                  f"({theirs.peak_rss_mb:.1f} MB)"]
    if checks:
        lines += ["", "Targets (issue 9): " + "; ".join(checks)]
    everything = [*bench.runs, *bench.sweep, *bench.distributed, *bench.far]
    ok = (
        flat
        and not any(r.result.exit_code for r in everything if r.tool == "syncer")
        # every syncer full sync landed digest-identical (checked after the timed part)
        and all(r.extra.get("landed", r.images) == r.images for r in everything
                if r.tool == "syncer")
        and not any(m.exit_code for m in bench.pools.values())
        # syncer must land every image under faults too; skopeo's outcome is only reported
        and all(r.extra.get("landed") == r.images for r in bench.faulty if r.tool == "syncer")
        and not (bench.memory and any(m.exit_code for m in bench.memory[:2]))
    )
    return "\n".join(lines), ok


def cpu_floor(run: Run) -> float:
    """The shortest wall time ``run``'s CPU allows on this machine's cores: every process it
    kept busy (workers, planner, registries, relays, redis-server) over ``os.cpu_count()``."""
    busy = run.result.cpu + run.registries_cpu + run.relays_cpu + run.redis_cpu
    return busy / CORES


def cpu_floor_lines(runs: list[Run]) -> list[str]:
    """Per distributed run: where its CPU went, and the wall time that CPU allows at best."""
    lines = [f"| distributed run | workers + planner CPU | registries | relays | redis | "
             f"CPU floor on {CORES} cores | wall |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(
            f"| {run.profile} / {run.workload} | {run.result.cpu:.2f} s | "
            f"{run.registries_cpu:.2f} s | {run.relays_cpu:.2f} s | "
            f"{run.redis_cpu:.2f} s | {cpu_floor(run):.2f} s | "
            f"{run.result.seconds:.2f} s |")
    return lines


def reference_run(runs: list[Run], profile: str, workload: str, tool: str) -> Run | None:
    """The run of ``tool`` for ``profile``/``workload``, if measured."""
    return next((r for r in runs if (r.profile, r.workload, r.tool) == (profile, workload, tool)),
                None)


def main() -> int:
    """Run every profile asked for and print the report."""
    if not shutil.which("skopeo") or not os.path.exists(GNU_TIME):
        print("bench needs skopeo and GNU time (apt-get install skopeo time)", file=sys.stderr)
        return 2
    OUT.mkdir(exist_ok=True)
    compile_bytecode()
    with tempfile.TemporaryDirectory(prefix="syncer-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with RegistryProcess(tmp / "src") as src:
            small = bool({"loopback", "latency"} & set(PROFILES))
            print(f"seeding {SMALL_TAGS * len(SMALL_REPOS) if small else 0} small and {IMAGES} "
                  "layer-heavy images…", flush=True)
            if small:
                seed_small(src, SMALL_REPOS, SMALL_TAGS)
            seed_layers(src, "bench/app", IMAGES)
            bench = Bench(tmp, src)
            steps = {"loopback": bench.loopback, "latency": bench.latency,
                     "faults": bench.faults if FAULT_RATES else lambda: None,
                     "memory": bench.memory_profile}
            for name in PROFILES:
                steps[name]()
    text, ok = report(bench)
    print("\n" + text)
    (OUT / "report.md").write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
