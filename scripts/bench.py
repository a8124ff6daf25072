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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.support import images
from tests.support.celery_workers import WorkerProcess, group_members, syncer_env
from tests.support.registry import RedisServer, RegistryProcess

IMAGES = int(os.environ.get("BENCH_IMAGES", "24"))
BIG_BLOB_MB = int(os.environ.get("BENCH_BIG_MB", "600"))
OUT = Path("bench-out")
GNU_TIME = "/usr/bin/time"  # Debian package "time"


@dataclass
class Measure:
    """One tool run."""

    seconds: float
    peak_rss_mb: float
    exit_code: int


def measure(command: list[str], env: dict | None = None) -> Measure:
    """Run ``command``; wall time and its peak RSS.

    The RSS comes from GNU time (``%M``): a child forked straight from this Python process
    would report this process's RSS at fork time as its own peak (Linux folds the pre-exec
    high-water mark into ``ru_maxrss``), hiding anything smaller.
    """
    with tempfile.NamedTemporaryFile("r") as report:
        started = time.monotonic()
        proc = subprocess.run(
            [GNU_TIME, "-f", "%M", "-o", report.name, *command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            check=False,
        )
        elapsed = time.monotonic() - started
        lines = [line for line in report.read().splitlines() if line.strip().isdigit()]
    if proc.returncode:
        tail = proc.stderr.decode(errors="replace")[-2000:]
        print(f"  ! {command[0]} exited {proc.returncode}: {tail}", file=sys.stderr)
    peak_kib = int(lines[-1]) if lines else 0
    return Measure(elapsed, peak_kib / 1024, proc.returncode)


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


def skopeo_sync(src: RegistryProcess, dst: RegistryProcess, namespace: str) -> list[str]:
    """skopeo sync of every tag of bench/app into dst/namespace."""
    return [
        "skopeo",
        "sync",
        "--src",
        "docker",
        "--dest",
        "docker",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        f"{src.host}/bench/app",
        f"{dst.host}/{namespace}",
    ]


def measure_pool(src: RegistryProcess, dst: RegistryProcess, tmp: Path, pool: str) -> Measure:
    """``syncer plan --wait`` on one worker of ``pool`` (4 at once): wall time of the whole
    run (planning included) and the peak summed RSS of the worker's processes."""
    redis_dir = tmp / f"redis-{pool}"
    with RedisServer(redis_dir) as redis_server:
        env = syncer_env(redis_server.url, tmp / f"env-{pool}")
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
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
