"""Prometheus metrics, scraped from real runs: ``syncer sync --metrics-port/--metrics-file`` and
``syncer worker --metrics-port`` (threads and prefork pools), against real registries behind
counting proxies.

The metrics must tell what happened, so every figure is checked against an independent count:
requests by registry, method and status code against what each proxy recorded; images against
the run's summary; bytes against the upload bodies the destination's proxy carried; retries
and errors against the faults the proxy injected.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from syncer.registry.retry import REQUEST_RETRIES
from tests.support import images
from tests.support.celery_workers import SYNCER, clean_env, run_syncer
from tests.support.clients import write_auth_file
from tests.support.ports import free_port, wait_until

pytestmark = pytest.mark.integration

SRC_REPO, DST_REPO = "src/app", "dst/app"
Samples = dict[tuple[str, frozenset], float]


# --------------------------------------------------------------------------- helpers


def parse(text: str) -> Samples:
    """Exposition text -> {(sample name, labels): value}, with the real Prometheus parser."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def scrape(port: int) -> Samples:
    response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    response.raise_for_status()
    return parse(response.text)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def add(*many: Samples) -> Samples:
    summed: Counter = Counter()
    for samples in many:
        summed.update(samples)
    return dict(summed)


def request_counts(samples: Samples, registry: str, name="syncer_registry_requests_total"):
    """{(method, code): count} of one registry, summed over operations."""
    counts: Counter = Counter()
    for (n, labels), value in samples.items():
        found = dict(labels)
        if n == name and found.get("registry") == registry and value:
            counts[(found["method"], found["code"])] += int(value)
    return dict(counts)


def proxy_counts(proxy) -> dict[tuple[str, str], int]:
    """{(method, status): count} of what the proxy saw."""
    return dict(Counter((r.method, str(r.status)) for r in proxy.records))


def uploaded_bytes(proxy) -> int:
    """Bytes of blob upload bodies (PATCH/PUT to /blobs/uploads/) the proxy carried."""
    return sum(r.request_bytes for r in proxy.records
               if r.method in ("PATCH", "PUT") and "/blobs/uploads/" in r.path)


def push_tags(reg, count: int, shared: bytes) -> dict:
    return {
        f"t{i:02d}": images.push_image(
            reg, SRC_REPO, f"t{i:02d}",
            layers=[shared, images.make_layer(2000 + 51 * i, seed=f"own-{i}")],
        )
        for i in range(count)
    }


# --------------------------------------------------------------------------- embedded


@pytest.mark.timeout(90)
def test_sync_metrics_match_what_the_proxies_saw(make_registry, make_proxy, tmp_path):
    """``syncer sync --metrics-port --metrics-file``: the endpoint answers while the run is
    under way, and the final figures equal the proxies' counts, the summary, the faults."""
    src, dst = make_registry(), make_registry()
    pushed = push_tags(src, 3, images.make_layer(20_000, seed="shared"))
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    auth = write_auth_file(tmp_path / "auth.json", src_proxy, dst_proxy)
    (tmp_path / "images.json").write_text(json.dumps({
        f"{src_proxy.host}/{SRC_REPO}": f"{dst_proxy.host}/{DST_REPO}",
        f"{src_proxy.host}/src/ghost:v1": f"{dst_proxy.host}/dst/ghost:v1",  # does not exist
    }))
    # t01's manifest PUT fails 5 times (REQUEST_RETRIES: 5 tries): 4 in-place retries, then
    # one image-level retry.
    in_place = REQUEST_RETRIES.max_retries + 1
    dst_proxy.fail_next(in_place, 503, f"/{DST_REPO}/manifests/t01", method="PUT")
    # t02's manifest PUT is held 3 s: the run is still going when the endpoint is scraped.
    dst_proxy.delay_next(1, 3.0, f"/{DST_REPO}/manifests/t02", method="PUT")
    port, textfile = free_port(), tmp_path / "syncer.prom"

    run = subprocess.Popen(
        [SYNCER, "sync", "--auth", str(auth), "--images", str(tmp_path / "images.json"),
         "--metrics-port", str(port), "--metrics-file", str(textfile), "--retries", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(tmp_path),
    )
    try:
        live: list[Samples] = []

        def scraped() -> bool:
            try:
                live.append(scrape(port))
            except requests.RequestException:
                assert run.poll() is None, "sync ended before its endpoint answered"
                return False
            return True

        wait_until(scraped, 20, "the sync's metrics endpoint", interval=0.1)
        assert run.poll() is None, "the scrape must happen while the sync runs"
        assert ("syncer_images_total", frozenset({("result", "failed")})) in live[0]
        assert total(live[0], "process_resident_memory_bytes") > 0  # the process collector
        out, err = run.communicate(timeout=60)
    finally:
        run.kill()
        run.wait()
    assert run.returncode == 1, out + err  # the ghost image failed
    assert "3 synced" in out and "1 failed" in out, out
    for tag, image in pushed.items():
        assert images.manifest_digest(dst, DST_REPO, tag) == image.digest

    final = parse(textfile.read_text())
    # Images: 3 synced, 1 failed (not found: permanent, one attempt); one image-level retry.
    assert total(final, "syncer_images_total", result="synced") == 3
    assert total(final, "syncer_images_total", result="skipped") == 0
    assert total(final, "syncer_images_total", result="failed") == 1
    assert total(final, "syncer_image_retries_total") == 1
    assert total(final, "syncer_image_copy_seconds_count", result="synced") == 3
    assert total(final, "syncer_image_copy_seconds_count", result="error") == 2  # t01, ghost
    assert total(final, "syncer_image_copy_seconds_sum", result="synced") >= 3.0  # t02 held
    # Blobs, counted as the work happens: each of the 4 attempts that reached the blobs
    # (t00, t02, t01 twice) handled its 3; 7 distinct blobs were uploaded, once each.
    uploads = dst_proxy.count("PUT", "/blobs/uploads/", status=201)
    assert uploads == 7
    assert total(final, "syncer_blobs_total", result="copied") == uploads
    assert total(final, "syncer_blobs_total", result="mounted") == 0
    assert total(final, "syncer_blobs_total", result="existing") == 4 * 3 - uploads
    assert total(final, "syncer_bytes_copied_total") == uploaded_bytes(dst_proxy) > 20_000
    assert total(final, "syncer_manifests_pushed_total") == 3
    # Requests: per registry, method and status code, exactly what each proxy saw.
    for proxy in (src_proxy, dst_proxy):
        assert request_counts(final, proxy.host) == proxy_counts(proxy), proxy.host
    errors = request_counts(final, dst_proxy.host, "syncer_registry_request_errors_total")
    assert errors == {("PUT", "503"): in_place}
    # The ghost's manifest answered 404: an error where the copy needed the manifest (GET),
    # not where an existence check expects a 404 (HEAD).
    ghost = Counter((r.method, "404") for r in src_proxy.records
                    if "/src/ghost/manifests/" in r.path and r.status == 404)
    assert sum(ghost.values()) >= 1
    assert request_counts(final, src_proxy.host, "syncer_registry_request_errors_total") == {
        key: n for key, n in ghost.items() if key[0] == "GET"}
    assert total(final, "syncer_registry_request_retries_total", registry=dst_proxy.host) == (
        REQUEST_RETRIES.max_retries)
    assert total(final, "syncer_registry_requests_total", registry=dst_proxy.host,
                 method="PUT", operation="manifest", code="503") == in_place
    # The operation label names the API call: e.g. the planner's tag listings.
    assert total(final, "syncer_registry_requests_total", registry=src_proxy.host,
                 method="GET", operation="tags") == src_proxy.count("GET", "/tags/list") >= 1


def test_sync_without_metrics_options_loads_no_prometheus(make_registry, tmp_path):
    """Metrics are off by default: a sync without the options never imports
    prometheus_client (so the transport's hook stays None and costs nothing)."""
    src, dst = make_registry(), make_registry()
    images.push_image(src, SRC_REPO, "v1")
    auth = write_auth_file(tmp_path / "auth.json", src, dst)
    (tmp_path / "images.json").write_text(
        json.dumps({f"{src.host}/{SRC_REPO}:v1": f"{dst.host}/{DST_REPO}:v1"}))
    code = (
        "import sys\n"
        "from syncer.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "finally:\n"
        "    print('PROMETHEUS_LOADED=' + str('prometheus_client' in sys.modules))\n"
    )
    done = subprocess.run(
        [str(Path(SYNCER).with_name("python")), "-c", code, "sync", "--auth", str(auth),
         "--images", str(tmp_path / "images.json")],
        capture_output=True, text=True, timeout=60, check=False, env=clean_env(tmp_path),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 synced" in done.stdout
    assert "PROMETHEUS_LOADED=False" in done.stdout, done.stdout + done.stderr


# --------------------------------------------------------------------------- workers


@pytest.mark.timeout(120)
def test_worker_metrics_threads_and_prefork_add_up(make_registry, make_proxy, redis_server,
                                                   cluster, tmp_path):
    """Two workers — threads pool (``--metrics-port`` from SYNCER_METRICS_PORT) and a prefork
    pool (children counting into prometheus_client's multiprocess files) — each serve their
    own /metrics; together they account for every image of the run and every request the
    proxies saw."""
    src, dst = make_registry(), make_registry()
    pushed = push_tags(src, 6, images.make_layer(15_000, seed="shared"))
    src_proxy, dst_proxy = make_proxy(src), make_proxy(dst)
    auth = write_auth_file(tmp_path / "auth.json", src_proxy, dst_proxy)
    # Explicit tags: the planner lists nothing, so the proxies see the workers' traffic only.
    rules = tmp_path / "images.json"
    destination = f"{dst_proxy.host}/{DST_REPO}"
    rules.write_text(json.dumps({f"{src_proxy.host}/{SRC_REPO}:{tag}": destination
                                 for tag in pushed}))
    pool = cluster(redis_server)
    ports = {"prefork": free_port(), "threads": free_port()}
    started = [pool.start(kind, auth, pool=kind, concurrency=2, wait=False,
                          extra_env={"SYNCER_METRICS_PORT": str(port)})
               for kind, port in ports.items()]
    for worker in started:
        worker.wait_ready()
    # Both workers are consuming when the run is enqueued, and an image takes a second or
    # so (0.1 s per source request): the six jobs are shared.
    src_proxy.latency(0.1)
    planned = run_syncer(pool.env, "plan", "--auth", str(auth), "--images", str(rules), "--json")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    run_id = json.loads(planned.stdout)["run_id"]

    watched = run_syncer(pool.env, "status", run_id, "--watch", "--json", timeout=90)
    summary = json.loads(watched.stdout)
    assert watched.returncode == 0 and summary["synced"] == 6, watched.stdout + pool.report()
    for tag, image in pushed.items():
        assert images.manifest_digest(dst, DST_REPO, tag) == image.digest

    by_kind = {kind: scrape(port) for kind, port in ports.items()}
    both = add(*by_kind.values())
    # A prefork worker serves the sum over its children (the multiprocess collector) and no
    # per-process collectors; a threads worker serves its process's figures too.
    assert total(by_kind["threads"], "process_resident_memory_bytes") > 0
    assert total(by_kind["prefork"], "process_resident_memory_bytes") == 0
    assert total(both, "syncer_images_total", result="synced") == 6
    assert total(both, "syncer_images_total", result="failed") == 0
    assert total(both, "syncer_image_copy_seconds_count", result="synced") == 6
    assert total(both, "syncer_blobs_total", result="copied") == summary["blobs_copied"]
    assert total(both, "syncer_blobs_total", result="existing") == summary["blobs_existing"]
    assert total(both, "syncer_bytes_copied_total") == summary["bytes_copied"]
    assert summary["bytes_copied"] == uploaded_bytes(dst_proxy)
    for proxy in (src_proxy, dst_proxy):
        assert request_counts(both, proxy.host) == proxy_counts(proxy), proxy.host
    # Each worker's own figures: both copied (so the prefork children's counts did reach
    # the main process's endpoint).
    for kind, samples in by_kind.items():
        assert total(samples, "syncer_images_total", result="synced") >= 1, kind


def test_worker_refuses_a_busy_metrics_port(redis_server, cluster, tmp_path):
    """A port already taken stops the worker before it starts, with a one-line reason."""
    import socket

    pool = cluster(redis_server)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_syncer(pool.env, "worker", "--metrics-port", str(port), timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"--metrics-port {port}" in done.stderr
    assert "Traceback" not in done.stderr
