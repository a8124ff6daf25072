"""The metrics module on its own: off by default and free, names and labels as documented,
the request hook's operation classes, the listen-address parsing. (Scraped from real runs in
tests/integration/test_metrics.py.)"""

from __future__ import annotations

import pytest
import requests
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from syncer.copy.copier import CopyResult
from syncer.registry import observe
from syncer.run import metrics
from tests.support.ports import free_port


@pytest.fixture
def enabled():
    """Metrics enabled (no port, no file) for one test, then off again."""
    found = metrics.enable()
    try:
        yield found
    finally:
        metrics.disable()


def samples(registry) -> dict:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_off_by_default_and_the_record_functions_do_nothing():
    assert metrics.active() is None and observe.observer is None
    metrics.record_attempt(1.0, CopyResult("a", "b"))
    metrics.record_failure()
    metrics.record_image_retry()


def test_enable_installs_the_observer_and_disable_removes_it(enabled):
    assert observe.observer is enabled and metrics.active() is enabled
    with pytest.raises(RuntimeError):
        metrics.enable()


def test_names_labels_and_values(enabled):
    enabled.request("reg:5000", "GET", "blob", 200)
    enabled.request("reg:5000", "PUT", "manifest", 503)
    enabled.failed("reg:5000", "PUT", "manifest", 503)
    enabled.request("reg:5000", "HEAD", "manifest", None)
    enabled.retried("reg:5000")
    enabled.work({"blobs_copied": 2, "bytes_copied": 1000, "blobs_existing": 1,
                  "manifests_pushed": 1})
    metrics.record_attempt(0.3, CopyResult("a", "b", status="synced"))
    metrics.record_attempt(0.01, CopyResult("a", "c", status="skipped"))
    metrics.record_attempt(2.0, None)
    metrics.record_failure()
    metrics.record_image_retry()
    found = samples(enabled.registry)
    request = "syncer_registry_requests_total"
    assert found[(request, (("code", "200"), ("method", "GET"), ("operation", "blob"),
                            ("registry", "reg:5000")))] == 1
    assert found[(request, (("code", "none"), ("method", "HEAD"), ("operation", "manifest"),
                            ("registry", "reg:5000")))] == 1
    errors = {k: v for k, v in found.items() if k[0] == "syncer_registry_request_errors_total"}
    assert sorted(dict(k[1])["code"] for k in errors) == ["503", "none"]
    assert found[("syncer_registry_request_retries_total", (("registry", "reg:5000"),))] == 1
    assert found[("syncer_images_total", (("result", "synced"),))] == 1
    assert found[("syncer_images_total", (("result", "skipped"),))] == 1
    assert found[("syncer_images_total", (("result", "failed"),))] == 1
    assert found[("syncer_image_retries_total", ())] == 1
    assert found[("syncer_image_copy_seconds_count", (("result", "error"),))] == 1
    assert found[("syncer_image_copy_seconds_bucket", (("le", "0.5"), ("result", "synced")))] == 1
    assert found[("syncer_bytes_copied_total", ())] == 1000
    assert found[("syncer_blobs_total", (("result", "copied"),))] == 2
    assert found[("syncer_blobs_total", (("result", "existing"),))] == 1
    assert found[("syncer_blobs_total", (("result", "mounted"),))] == 0  # present at zero
    assert found[("syncer_manifests_pushed_total", ())] == 1


def test_served_on_a_port_until_disabled():
    port = free_port()
    metrics.enable(listen=f"127.0.0.1:{port}")
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "syncer_images_total" in text and "process_cpu_seconds_total" in text
    finally:
        metrics.disable()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_textfile_written_on_demand(tmp_path):
    path = tmp_path / "m.prom"
    metrics.enable(textfile=str(path))
    try:
        metrics.record_failure()
        metrics.write_textfile()
    finally:
        metrics.disable()
    assert 'syncer_images_total{result="failed"} 1.0' in path.read_text()
    assert "process_" not in path.read_text()  # the work only: no per-process collectors


@pytest.mark.parametrize(
    ("url", "operation"),
    [
        ("http://r/v2/", "ping"),
        ("https://r:5000/v2/_catalog?n=1000", "catalog"),
        ("/v2/library/nginx/tags/list?n=1000&last=a", "tags"),
        ("/v2/a/b/manifests/sha256:abc", "manifest"),
        ("/v2/a/blobs/sha256:abc", "blob"),
        ("/v2/a/blobs/uploads/?mount=sha256:abc&from=b", "upload"),
        ("http://r/v2/a/blobs/uploads/9f2c?_state=x&digest=sha256:abc", "upload"),
        ("http://r/api/v2.0/projects", "other"),
    ],
)
def test_operation_of(url, operation):
    assert observe.operation_of(url) == operation
    assert operation in observe.OPERATIONS


def test_parse_listen():
    assert metrics.parse_listen("9400") == ("127.0.0.1", 9400)
    assert metrics.parse_listen(9400) == ("127.0.0.1", 9400)
    assert metrics.parse_listen("0.0.0.0:9400") == ("0.0.0.0", 9400)
    assert metrics.parse_listen("[::1]:9400") == ("::1", 9400)
    for bad in ("", "http", "70000", "host:", "0"):
        with pytest.raises(ValueError):
            metrics.parse_listen(bad)
