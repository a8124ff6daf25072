"""Issue 7's headline: ``syncer`` on a hostile network, embedded and distributed.

A :class:`~tests.support.proxy.CountingProxy` sits in front of the source registry **and** in
front of the destination, each giving 30 % of the requests it sees a fault, drawn uniformly
from the five kinds of the issue: ``500``, ``503``, ``429`` (``Retry-After: 1``), a connection
reset before any response, and a body cut off part way (a blob or manifest GET whose response
ends early). Nothing else is tuned: the CLI runs with its default options, the workers with
the default Celery settings (no shortened visibility timeout or time limit).

The workload is 8 images in one repository: two multi-platform indexes (Docker manifest list
and OCI index, 2 platforms each), one image with a layer of several MB (its GET is cut and
must resume), five small ones; all share one base layer. Each test first runs the same sync
on a clean network into a separate destination, then under faults, and prints wall time and
request counts of both runs (a benchmark figure, not an assertion). What is asserted: exit
0, and every image digest-identical with every blob present, checked straight at the
registries (not through the proxies).
"""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import images
from tests.support.celery_workers import USER_DEFAULTS, WorkerPool, clean_env, run_syncer
from tests.support.clients import write_auth_file
from tests.support.proxy import CountingProxy
from tests.support.registry import RegistryProcess

pytestmark = pytest.mark.integration

SRC_REPO, DST_REPO = "hostile/app", "landed/app"
#: Fraction of requests that get a fault, on each side.
FAULT_RATE = 0.30
#: Every kind of fault of the issue, truncated bodies included.
FAULT_KINDS = ("500", "503", "429", "reset", "truncate")
BIG_LAYER = 4 * 1024 * 1024
#: How long one sync may take before the test gives up (it should take seconds).
RUN_TIMEOUT = 150


# --------------------------------------------------------------------------- workload


@functools.cache
def big_layer() -> bytes:
    """The several-MB layer (a plain tar of ``BIG_LAYER`` random bytes)."""
    return images.make_layer(BIG_LAYER, seed="hostile-big", compress=False)


#: Digest of the several-MB layer (its first GET is cut half way, on top of the chaos).
BIG_LAYER_DIGEST = images.sha256_digest(big_layer())


def seed_workload(src: RegistryProcess) -> dict[str, str]:
    """Push the 8 images to ``SRC_REPO``; returns tag -> manifest digest."""
    shared = images.make_layer(64 * 1024, seed="hostile-base")
    pushed: dict[str, str] = {}
    pushed["multi-docker"] = images.push_index(
        src, SRC_REPO, "multi-docker", media="docker", shared_layers=[shared]
    ).digest
    pushed["multi-oci"] = images.push_index(
        src, SRC_REPO, "multi-oci", media="oci", shared_layers=[shared]
    ).digest
    pushed["big"] = images.push_image(src, SRC_REPO, "big", layers=[shared, big_layer()]).digest
    for i in range(5):
        own = images.make_layer(8_000 + 997 * i, seed=f"hostile-small-{i}")
        pushed[f"small{i}"] = images.push_image(
            src, SRC_REPO, f"small{i}", layers=[shared, own]
        ).digest
    return pushed


def assert_landed(src: RegistryProcess, dst: RegistryProcess, pushed: dict[str, str]) -> None:
    """Every tag digest-identical on both registries (asked directly), every blob there."""
    for tag, digest in pushed.items():
        assert images.manifest_digest(src, SRC_REPO, tag) == digest
        got = images.manifest_digest(dst, DST_REPO, tag)
        assert got == digest, f"{tag}: source {digest}, destination {got}"
        fetched = images.get_manifest(dst, DST_REPO, digest)
        assert fetched is not None and images.sha256_digest(fetched.body) == digest
        contents = images.walk_image(dst, DST_REPO, tag)
        assert not contents.missing, f"{tag}: missing at the destination: {contents.missing}"


# --------------------------------------------------------------------------- measuring


@dataclass
class RunFigures:
    """Wall time and traffic of one sync, as seen by the two proxies."""

    label: str
    seconds: float
    exit_code: int
    output: str
    src_requests: int = 0
    dst_requests: int = 0
    src_faults: dict[str, int] = field(default_factory=dict)
    dst_faults: dict[str, int] = field(default_factory=dict)

    @classmethod
    def collect(
        cls,
        label: str,
        seconds: float,
        exit_code: int,
        output: str,
        src: CountingProxy,
        dst: CountingProxy,
    ) -> RunFigures:
        return cls(
            label,
            seconds,
            exit_code,
            output,
            src_requests=len(src.records),
            dst_requests=len(dst.records),
            src_faults=src.fault_counts(),
            dst_faults=dst.fault_counts(),
        )

    def line(self) -> str:
        faults = sum(self.src_faults.values()) + sum(self.dst_faults.values())
        return (
            f"{self.label:<28} exit {self.exit_code}  {self.seconds:6.1f} s  "
            f"requests src {self.src_requests:4d} dst {self.dst_requests:4d}  "
            f"faults {faults:3d} (src {self.src_faults}, dst {self.dst_faults})"
        )


def report(clean: RunFigures, hostile: RunFigures) -> str:
    """The clean and hostile runs side by side (printed; ``-s`` shows it)."""
    ratio_time = hostile.seconds / clean.seconds if clean.seconds else float("inf")
    clean_total = clean.src_requests + clean.dst_requests
    hostile_total = hostile.src_requests + hostile.dst_requests
    ratio_requests = hostile_total / clean_total if clean_total else float("inf")
    return "\n".join(
        [
            "",
            clean.line(),
            hostile.line(),
            f"{'hostile / clean':<28} time x{ratio_time:.1f}, requests x{ratio_requests:.1f}",
        ]
    )


def big_layer_traffic(src_proxy: CountingProxy, dst_proxy: CountingProxy) -> str:
    """Bytes of the several-MB layer moved in the last run: sent by the source proxy (a
    resumed download moves little more than the layer once) and carried by upload requests
    through the destination proxy (it is the only blob of more than 1 MiB)."""
    size = len(big_layer())
    sent = src_proxy.bytes_sent("GET", BIG_LAYER_DIGEST)
    gets = [r for r in src_proxy.records if r.method == "GET" and BIG_LAYER_DIGEST in r.path]
    ranged = sum(1 for r in gets if "Range" in r.request_headers)
    uploads = [
        r
        for r in dst_proxy.records
        if r.method in ("PUT", "PATCH")
        and "/blobs/uploads/" in r.path
        and r.request_bytes > 1024 * 1024
    ]
    pushed = sum(r.request_bytes for r in uploads)
    return "\n".join(
        [
            f"{'big layer, source':<28} {sent:,} bytes sent for {size:,} (x{sent / size:.2f}) "
            f"in {len(gets)} GETs, {ranged} with Range; faults "
            f"{[r.fault for r in gets if r.fault]}",
            f"{'big layer, destination':<28} {pushed:,} bytes in {len(uploads)} upload "
            f"requests; faults {[(r.method, r.fault) for r in uploads if r.fault]}",
        ]
    )


def failure_details(figures: RunFigures, *proxies: CountingProxy) -> str:
    """What a failed run printed, and the faults around the end of the run."""
    lines = [f"{figures.label}: exit {figures.exit_code} after {figures.seconds:.1f} s"]
    if len(figures.output) > 12_000:  # the summary (stdout) first, then the log's end
        lines.append(figures.output[:4000] + "\n[...]\n" + figures.output[-8000:])
    else:
        lines.append(figures.output)
    for name, proxy in zip(("source", "destination"), proxies, strict=True):
        faulted = [r for r in proxy.records if r.fault]
        lines.append(f"--- last faults at the {name} proxy ({len(faulted)} in all):")
        lines.extend(f"    {r.fault:>8} {r.method} {r.uri}" for r in faulted[-15:])
    return "\n".join(lines)


@contextlib.contextmanager
def chaos_on(src_proxy: CountingProxy, dst_proxy: CountingProxy) -> Iterator[None]:
    """30 % faults of the five kinds on both sides, from fixed seeds, for the block (off again
    after it, also on failure); and, so that a body cut part way surely happens where it hurts
    most, the first GET of the several-MB layer is cut half way (armed faults come before the
    chaos draw)."""
    src_proxy.truncate_next(1, BIG_LAYER_DIGEST, method="GET", after_bytes=BIG_LAYER // 2)
    src_proxy.chaos(FAULT_RATE, kinds=FAULT_KINDS, seed="hostile-src", retry_after=1)
    dst_proxy.chaos(FAULT_RATE, kinds=FAULT_KINDS, seed="hostile-dst", retry_after=1)
    try:
        yield
    finally:
        src_proxy.chaos(0)
        dst_proxy.chaos(0)


def write_rules(directory: Path, src_proxy: CountingProxy, dst_proxy: CountingProxy) -> Path:
    """The images rule: the source repository through ``src_proxy`` to the destination
    through ``dst_proxy``."""
    directory.mkdir(parents=True, exist_ok=True)
    rules = directory / "images.json"
    rules.write_text(json.dumps({f"{src_proxy.host}/{SRC_REPO}": f"{dst_proxy.host}/{DST_REPO}"}))
    return rules


def _measured(
    label: str,
    env: Mapping[str, str],
    args: list[str],
    src_proxy: CountingProxy,
    dst_proxy: CountingProxy,
) -> RunFigures:
    """Run ``syncer ARGS`` (at most ``RUN_TIMEOUT`` seconds) with the proxies' records reset
    first; its wall time, exit code (-1: timed out), output and the proxies' counts."""
    src_proxy.reset()
    dst_proxy.reset()
    started = time.monotonic()
    try:
        done = run_syncer(env, *args, timeout=RUN_TIMEOUT)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        code = -1
        output = f"TIMED OUT after {RUN_TIMEOUT} s\n{_text(exc.stdout)}{_text(exc.stderr)}"
    seconds = time.monotonic() - started
    return RunFigures.collect(label, seconds, code, output, src_proxy, dst_proxy)


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


# --------------------------------------------------------------------------- embedded


def embedded_sync(
    label: str, directory: Path, src_proxy: CountingProxy, dst_proxy: CountingProxy
) -> RunFigures:
    """``syncer sync --auth --images`` with default options, in an environment isolated from
    the machine's settings (only the auth file written here provides credentials)."""
    rules = write_rules(directory, src_proxy, dst_proxy)
    auth = write_auth_file(directory / "auth.json", src_proxy, dst_proxy)
    args = ["sync", "--auth", str(auth), "--images", str(rules)]
    return _measured(label, clean_env(directory), args, src_proxy, dst_proxy)


@pytest.mark.timeout(2 * RUN_TIMEOUT + 60)
def test_embedded_sync_survives_30_percent_faults_on_both_sides(
    make_registry, make_proxy, tmp_path
):
    src = make_registry(auth="htpasswd")
    clean_dst, dst = make_registry(auth="htpasswd"), make_registry(auth="htpasswd")
    pushed = seed_workload(src)
    src_proxy = make_proxy(src)
    clean_proxy, dst_proxy = make_proxy(clean_dst), make_proxy(dst)

    clean = embedded_sync("embedded, clean network", tmp_path / "clean", src_proxy, clean_proxy)
    assert clean.exit_code == 0, failure_details(clean, src_proxy, clean_proxy)
    assert_landed(src, clean_dst, pushed)
    assert "8 images: 8 synced" in clean.output, clean.output

    with chaos_on(src_proxy, dst_proxy):
        hostile = embedded_sync("embedded, 30 % faults", tmp_path / "hostile", src_proxy, dst_proxy)
    print(report(clean, hostile))
    print(big_layer_traffic(src_proxy, dst_proxy))
    # The faults really happened, on both sides, truncated bodies included.
    assert sum(hostile.src_faults.values()) and sum(hostile.dst_faults.values())
    assert hostile.exit_code == 0, failure_details(hostile, src_proxy, dst_proxy)
    assert "8 images: 8 synced" in hostile.output, hostile.output
    assert_landed(src, dst, pushed)
    assert src_proxy.count("GET", BIG_LAYER_DIGEST, kind="truncate") >= 1


# --------------------------------------------------------------------------- distributed


def distributed_sync(
    label: str,
    directory: Path,
    pool: WorkerPool,
    auth: Path,
    src_proxy: CountingProxy,
    dst_proxy: CountingProxy,
) -> RunFigures:
    """``syncer plan --auth --images --wait --json`` (default options) against ``pool``."""
    rules = write_rules(directory, src_proxy, dst_proxy)
    args = ["plan", "--auth", str(auth), "--images", str(rules), "--wait", "--json"]
    return _measured(label, pool.env, args, src_proxy, dst_proxy)


def plan_summary(figures: RunFigures) -> dict:
    """The JSON summary ``plan --wait --json`` printed (the last JSON object of stdout)."""
    start = figures.output.find("{")
    assert start >= 0, figures.output
    return json.JSONDecoder().raw_decode(figures.output[start:])[0]


@pytest.mark.timeout(2 * RUN_TIMEOUT + 90)
def test_two_workers_survive_30_percent_faults_on_both_sides(
    make_registry, make_proxy, redis_server, cluster, tmp_path
):
    src = make_registry(auth="htpasswd")
    clean_dst, dst = make_registry(auth="htpasswd"), make_registry(auth="htpasswd")
    pushed = seed_workload(src)
    src_proxy = make_proxy(src)
    clean_proxy, dst_proxy = make_proxy(clean_dst), make_proxy(dst)
    # One auth file for the workers and the planner, naming every registry they may use.
    auth = write_auth_file(tmp_path / "auth.json", src_proxy, clean_proxy, dst_proxy)
    # The default Celery settings: no shortened visibility timeout or time limit, no faster
    # sweep for expired messages.
    default_cluster = cluster(redis_server, **USER_DEFAULTS)
    default_cluster.start_many(["w1", "w2"], auth)

    clean = distributed_sync(
        "2 workers, clean network",
        tmp_path / "clean",
        default_cluster,
        auth,
        src_proxy,
        clean_proxy,
    )
    assert clean.exit_code == 0, failure_details(clean, src_proxy, clean_proxy)
    summary = plan_summary(clean)
    assert (summary["total"], summary["synced"], summary["failed"]) == (8, 8, 0), summary
    assert_landed(src, clean_dst, pushed)

    with chaos_on(src_proxy, dst_proxy):
        hostile = distributed_sync(
            "2 workers, 30 % faults",
            tmp_path / "hostile",
            default_cluster,
            auth,
            src_proxy,
            dst_proxy,
        )
    print(report(clean, hostile))
    print(big_layer_traffic(src_proxy, dst_proxy))
    assert sum(hostile.src_faults.values()) and sum(hostile.dst_faults.values())
    assert hostile.exit_code == 0, (
        failure_details(hostile, src_proxy, dst_proxy) + "\n" + default_cluster.report()
    )
    summary = plan_summary(hostile)
    assert (summary["total"], summary["synced"], summary["failed"]) == (8, 8, 0), summary
    assert_landed(src, dst, pushed)
    assert src_proxy.count("GET", BIG_LAYER_DIGEST, kind="truncate") >= 1
