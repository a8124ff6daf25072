"""``make bench``: speed and memory of ``syncer`` side by side with ``skopeo sync``.

Both tools run in one session against the same pair of throw-away local registries (plain
HTTP on loopback), each into its own destination namespace, so neither gets a warm cache
from the other. Every figure is wall time and peak RSS of the tool's process (from
``wait4``'s rusage), reported with the ratio syncer / skopeo.

Scenarios:
- ``full``: N images (several layers each, some shared) copied into an empty namespace.
- ``incremental``: the same sync again — everything already there.
- ``big-blob``: one image with a 600 MB layer vs one with a 6 MB layer, copied with
  ``syncer copy``: the peak RSS must stay flat (blobs are streamed, never held).
- ``faults``: the full sync again, through a fault-injecting proxy
  (:class:`tests.support.proxy.CountingProxy`) in front of the source and one in front of
  the destination: first clean (to count requests), then with 10 % and 30 % of the requests
  on each side answered 500 / 503 / 429 (``Retry-After: 1``), reset, or with a body cut
  part way. Wall time, requests and injected faults are printed next to the clean run, with
  the outcome checked by digest at the registries ("failed N of M" when images are missing).
  skopeo runs with ``--keep-going --retry-times 2`` (whole-image retries, like syncer's
  default ``--retries 2``). A speed figure, not a timed test.

Knobs (environment): ``BENCH_IMAGES`` (default 24), ``BENCH_BIG_MB`` (600),
``BENCH_FAULT_RATES`` (``0.1,0.3``; empty: no fault profile), ``BENCH_FAULT_SEED``,
``BENCH_FAULT_TIMEOUT`` (seconds per faulty run, 900). A quick run:
``BENCH_IMAGES=4 BENCH_BIG_MB=20 .venv/bin/python -m scripts.bench``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.support import images
from tests.support.celery_workers import WorkerProcess, group_members, syncer_env
from tests.support.proxy import CountingProxy
from tests.support.registry import RedisServer, RegistryProcess

IMAGES = int(os.environ.get("BENCH_IMAGES", "24"))
BIG_BLOB_MB = int(os.environ.get("BENCH_BIG_MB", "600"))
OUT = Path("bench-out")
GNU_TIME = "/usr/bin/time"  # Debian package "time"
FAULT_RATES = [
    float(rate)
    for rate in os.environ.get("BENCH_FAULT_RATES", "0.1,0.3").split(",")
    if rate.strip()
]
FAULT_SEED = os.environ.get("BENCH_FAULT_SEED", "bench")
FAULT_TIMEOUT = float(os.environ.get("BENCH_FAULT_TIMEOUT", "900"))


@dataclass
class Measure:
    """One tool run."""

    seconds: float
    peak_rss_mb: float
    exit_code: int


def measure(command: list[str], env: dict | None = None, timeout: float | None = None) -> Measure:
    """Run ``command``; wall time and its peak RSS.

    The RSS comes from GNU time (``%M``): a child forked straight from this Python process
    would report this process's RSS at fork time as its own peak (Linux folds the pre-exec
    high-water mark into ``ru_maxrss``), hiding anything smaller. After ``timeout`` seconds
    the whole process group is killed and the exit code is -9.
    """
    with tempfile.NamedTemporaryFile("r") as report:
        started = time.monotonic()
        proc = subprocess.Popen(
            [GNU_TIME, "-f", "%M", "-o", report.name, *command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # a timeout kills the tool too, not only GNU time
        )
        try:
            _, stderr = proc.communicate(timeout=timeout)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, stderr = proc.communicate()
            returncode = -9
            stderr += f"\ntimed out after {timeout:.0f} s".encode()
        elapsed = time.monotonic() - started
        lines = [line for line in report.read().splitlines() if line.strip().isdigit()]
    if returncode:
        tail = stderr.decode(errors="replace")[-2000:]
        print(f"  ! {command[0]} exited {returncode}: {tail}", file=sys.stderr)
    peak_kib = int(lines[-1]) if lines else 0
    return Measure(elapsed, peak_kib / 1024, returncode)


def seed(src: RegistryProcess) -> None:
    """Push ``IMAGES`` images into ``bench/app`` (tags t0…), 3 layers, one shared."""
    base = images.make_layer(4 * 1024 * 1024, seed="bench-base", compress=False)
    for i in range(IMAGES):
        layers = [
            base,
            images.make_layer(2 * 1024 * 1024, seed=f"a{i}", compress=False),
            images.make_layer(1024 * 1024, seed=f"b{i}", compress=False),
        ]
        images.push_image(src, "bench/app", f"t{i}", layers=layers)


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


def syncer_bin() -> list[str]:
    """The syncer CLI of this environment."""
    return [sys.executable, "-m", "workers.cli"]


def skopeo_sync(
    src: RegistryProcess | CountingProxy,
    dst: RegistryProcess | CountingProxy,
    namespace: str,
    *options: str,
) -> list[str]:
    """skopeo sync of every tag of bench/app into dst/namespace (``options`` added)."""
    return [
        "skopeo",
        "sync",
        "--src",
        "docker",
        "--dest",
        "docker",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        *options,
        f"{src.host}/bench/app",
        f"{dst.host}/{namespace}",
    ]


@dataclass
class FaultRow:
    """One sync through the two fault-injecting proxies."""

    profile: str
    tool: str
    result: Measure
    src_requests: int
    dst_requests: int
    faults: dict[str, int]
    landed: int
    total: int

    @property
    def requests(self) -> int:
        """Requests seen by both proxies (faulted ones included)."""
        return self.src_requests + self.dst_requests

    @property
    def outcome(self) -> str:
        """``24 of 24 landed`` or ``failed 3 of 24 (exit 1)``, judged at the registries."""
        if self.landed == self.total and self.result.exit_code == 0:
            return f"{self.landed} of {self.total} landed"
        missing = self.total - self.landed
        return f"failed {missing} of {self.total} (exit {self.result.exit_code})"


def landed(src: RegistryProcess, dst: RegistryProcess, dst_repo: str, *, exact: bool) -> int:
    """How many of the bench tags are at ``dst_repo`` with every blob they reference, asked
    straight at the registries (not through the proxies); ``exact``: digest-identical too.

    skopeo is judged without ``exact``: it gzips the bench images' layers (plain tars under a
    gzip media type) and so rewrites their manifests; its copies never match by digest.
    """
    count = 0
    for i in range(IMAGES):
        want = images.manifest_digest(src, "bench/app", f"t{i}")
        got = images.manifest_digest(dst, dst_repo, f"t{i}")
        if want is None or got is None or (exact and got != want):
            continue
        if not images.walk_image(dst, dst_repo, f"t{i}").missing:
            count += 1
    return count


def fault_profiles(src: RegistryProcess, tmp: Path) -> list[FaultRow]:
    """The full sync of both tools through fault-injecting proxies on both sides: clean
    first, then at each of ``FAULT_RATES``; every profile gets a fresh destination registry
    (and fresh proxies), so nothing is already there and no blob can be mounted."""
    rows: list[FaultRow] = []
    for rate in [0.0, *FAULT_RATES]:
        profile = "clean (via proxies)" if rate == 0 else f"{rate:.0%} faults"
        print(f"fault profile: {profile}…", flush=True)
        dst = RegistryProcess(tmp / f"dst-faults-{round(rate * 100)}")
        with dst, CountingProxy(src) as src_proxy, CountingProxy(dst) as dst_proxy:
            config = OUT / f"faults-{round(rate * 100)}.yaml"
            config.write_text(
                yaml.safe_dump({f"{src_proxy.host}/bench/app": f"{dst_proxy.host}/ours/app"})
            )
            commands = {
                "syncer": [*syncer_bin(), "sync", f"--images={config}", "--proc=8"],
                "skopeo": skopeo_sync(
                    src_proxy, dst_proxy, "skopeo", "--keep-going", "--retry-times=2"
                ),
            }
            for tool, command in commands.items():
                src_proxy.reset()
                dst_proxy.reset()
                for side, proxy in (("src", src_proxy), ("dst", dst_proxy)):
                    proxy.chaos(rate, seed=f"{FAULT_SEED}-{side}-{tool}-{rate}", retry_after=1)
                try:
                    result = measure(command, timeout=FAULT_TIMEOUT)
                finally:
                    src_proxy.chaos(0)
                    dst_proxy.chaos(0)
                faults = src_proxy.fault_counts()
                for kind, n in dst_proxy.fault_counts().items():
                    faults[kind] = faults.get(kind, 0) + n
                repo = "ours/app" if tool == "syncer" else "skopeo/app"
                rows.append(
                    FaultRow(
                        profile,
                        tool,
                        result,
                        len(src_proxy.records),
                        len(dst_proxy.records),
                        dict(sorted(faults.items())),
                        landed(src, dst, repo, exact=tool == "syncer"),
                        IMAGES,
                    )
                )
    return rows


def fault_table(rows: list[FaultRow]) -> list[str]:
    """The fault profiles as a Markdown table, each run next to its tool's clean run."""
    clean = {row.tool: row for row in rows if row.profile.startswith("clean")}
    lines = [
        "| fault profile (both sides) | tool | seconds | time vs clean | requests (src+dst) "
        "| requests vs clean | faults injected | outcome |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = clean.get(row.tool)
        time_ratio = f"x{row.result.seconds / base.result.seconds:.1f}" if base else "-"
        request_ratio = f"x{row.requests / base.requests:.1f}" if base and base.requests else "-"
        kinds = ", ".join(f"{kind}: {n}" for kind, n in row.faults.items())
        injected = f"{sum(row.faults.values())} ({kinds})" if row.faults else "0"
        lines.append(
            f"| {row.profile} | {row.tool} | {row.result.seconds:.2f} | {time_ratio} "
            f"| {row.requests} ({row.src_requests}+{row.dst_requests}) | {request_ratio} "
            f"| {injected} | {row.outcome} |"
        )
    return lines


def measure_pool(src: RegistryProcess, dst: RegistryProcess, tmp: Path, pool: str) -> Measure:
    """``syncer plan --wait`` on one worker of ``pool`` (4 at once): wall time of the whole
    run (planning included) and the peak summed RSS of the worker's processes."""
    redis_dir = tmp / f"redis-{pool}"
    with RedisServer(redis_dir) as redis_server:
        # A worker copies only from/to registries it trusts (its auth file, or this list).
        allowed = {"SYNCER_ALLOWED_REGISTRIES": f"{src.host},{dst.host}"}
        env = syncer_env(redis_server.url, tmp / f"env-{pool}", extra=allowed)
        images_file = OUT / f"pool-{pool}.yaml"
        images_file.write_text(yaml.safe_dump({f"{src.host}/bench/app": f"{dst.host}/{pool}/app"}))
        worker = WorkerProcess(
            f"bench-{pool}", None, env, tmp / f"worker-{pool}.log", concurrency=4, pool=pool
        )
        peak = 0.0
        try:
            worker.start()
            started = time.monotonic()
            plan = subprocess.Popen(
                [*syncer_bin(), "plan", f"--images={images_file}", "--wait", "--json"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            while plan.poll() is None:
                rss = sum(p.memory_info().rss for p in group_members(worker.pgid))
                peak = max(peak, rss / 1024 / 1024)
                time.sleep(0.05)
            elapsed = time.monotonic() - started
        finally:
            worker.stop()
    return Measure(elapsed, peak, plan.returncode)


def main() -> int:
    """Run every scenario and print the table."""
    if not shutil.which("skopeo") or not os.path.exists(GNU_TIME):
        print("bench needs skopeo and GNU time (apt-get install skopeo time)", file=sys.stderr)
        return 2
    OUT.mkdir(exist_ok=True)
    rows: list[tuple[str, Measure, Measure | None]] = []
    with tempfile.TemporaryDirectory(prefix="syncer-bench-") as tmp:
        src, dst = RegistryProcess(Path(tmp) / "src"), RegistryProcess(Path(tmp) / "dst")
        with src, dst:
            print(f"seeding {IMAGES} images (3 layers, 7 MB each, one layer shared)…", flush=True)
            seed(src)
            config = OUT / "bench.yaml"
            config.write_text(yaml.safe_dump({f"{src.host}/bench/app": f"{dst.host}/ours/app"}))
            ours = [*syncer_bin(), "sync", f"--images={config}", "--proc=8"]
            theirs = skopeo_sync(src, dst, "skopeo")
            print("full sync…", flush=True)
            rows.append(("full sync", measure(ours), measure(theirs)))
            print("incremental sync…", flush=True)
            rows.append(("incremental (all present)", measure(ours), measure(theirs)))
            print("distributed: one worker, prefork vs threads (4 at once)…", flush=True)
            pools = {
                pool: measure_pool(src, dst, Path(tmp), pool) for pool in ("prefork", "threads")
            }

            faulty = fault_profiles(src, Path(tmp)) if FAULT_RATES else []

            print(f"big blob ({BIG_BLOB_MB} MB) vs small (6 MB)…", flush=True)
            push_big(src, "big/large", BIG_BLOB_MB * 1024 * 1024)
            push_big(src, "big/small", 6 * 1024 * 1024)
            small = measure(
                [*syncer_bin(), "copy", f"{src.host}/big/small:v1", f"{dst.host}/ours/small:v1"]
            )
            large = measure(
                [*syncer_bin(), "copy", f"{src.host}/big/large:v1", f"{dst.host}/ours/large:v1"]
            )
            sk_large = measure(
                [
                    "skopeo",
                    "copy",
                    "--src-tls-verify=false",
                    "--dest-tls-verify=false",
                    f"docker://{src.host}/big/large:v1",
                    f"docker://{dst.host}/skopeo/large:v1",
                ]
            )
            rows.append((f"copy {BIG_BLOB_MB} MB blob", large, sk_large))
            rows.append(("copy 6 MB blob", small, None))
            want = images.manifest_digest(src, "big/large", "v1")
            assert images.manifest_digest(dst, "ours/large", "v1") == want, (
                "big image digest differs"
            )
            assert images.manifest_digest(dst, "ours/app", "t0") == images.manifest_digest(
                src, "bench/app", "t0"
            )

    lines = [
        "| scenario | syncer s | skopeo s | time ratio "
        "| syncer RSS MB | skopeo RSS MB | RSS ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, mine, other in rows:
        if other:
            lines.append(
                f"| {name} | {mine.seconds:.2f} | {other.seconds:.2f} | "
                f"{mine.seconds / other.seconds:.2f} | {mine.peak_rss_mb:.1f} | "
                f"{other.peak_rss_mb:.1f} | {mine.peak_rss_mb / other.peak_rss_mb:.2f} |"
            )
        else:
            lines.append(
                f"| {name} | {mine.seconds:.2f} | - | - | {mine.peak_rss_mb:.1f} | - | - |"
            )
    lines.append("")
    lines.append(
        "| worker pool (plan --wait, 1 worker x 4) | seconds | worker RSS MB (all processes) |"
    )
    lines.append("|---|---|---|")
    for pool, result in pools.items():
        lines.append(f"| {pool} | {result.seconds:.2f} | {result.peak_rss_mb:.1f} |")
    if faulty:
        lines.append("")
        lines.extend(fault_table(faulty))
    growth = large.peak_rss_mb - small.peak_rss_mb
    verdict = large.peak_rss_mb < 100 and growth <= 10
    lines.append("")
    lines.append(
        f"big-blob memory: peak {large.peak_rss_mb:.1f} MB for {BIG_BLOB_MB} MB vs "
        f"{small.peak_rss_mb:.1f} MB for 6 MB (growth {growth:+.1f} MB): "
        f"{'flat' if verdict else 'NOT FLAT'} (limit: < 100 MB, growth ≤ 10 MB)"
    )
    report = "\n".join(lines)
    print("\n" + report)
    (OUT / "report.md").write_text(report + "\n")
    failed = (
        any(m.exit_code for _, m, o in rows)
        or not verdict
        or any(m.exit_code for m in pools.values())
        # syncer must land every image under faults too; skopeo's outcome is only reported
        or any(row.tool == "syncer" and row.landed < row.total for row in faulty)
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
