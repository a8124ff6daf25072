"""``--log-format json`` from the real commands: ``syncer sync`` and a ``syncer worker`` (Celery's
own lines included) write one parseable JSON object per line, with the run id, the image, the
registry, the attempt and the error where they apply — and a password never appears, not
even when a registry echoes it back in an error message."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support import images
from tests.support.celery_workers import clean_env, run_syncer

pytestmark = pytest.mark.integration

# Characters JSON escapes (a quote, a backslash) and one it may (non-ASCII): the secret must be
# gone in every spelling.
SECRET = 'r0b0t"pa\\ss-wörd'


def json_lines(text: str) -> list[dict]:
    """Every non-empty line parsed as a JSON object (fails on any other line)."""
    parsed = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(item, dict), line
        assert {"time", "level", "logger", "message"} <= set(item), line
        parsed.append(item)
    return parsed


def assert_no_secret(where: str, text: str) -> None:
    for form in (SECRET, json.dumps(SECRET)[1:-1], json.dumps(SECRET, ensure_ascii=False)[1:-1]):
        assert form not in text, f"the password ({form!r}) is in {where}"


def echoing_denial() -> bytes:
    """A 403 whose error message repeats the password (a registry that logs too much)."""
    return json.dumps({"errors": [{"code": "DENIED",
                                   "message": f"password {SECRET} rejected for robot"}]}).encode()


def write_auth(path: Path, hosts_with_secret: list[str], open_hosts: list[str]) -> Path:
    document = {host: {} for host in open_hosts}
    document.update({host: {"username": "robot", "password": SECRET}
                     for host in hosts_with_secret})
    path.write_text(json.dumps(document))
    return path


def test_sync_json_lines_carry_the_fields_and_never_the_password(make_registry, make_proxy,
                                                                tmp_path):
    src, good, bad = make_registry(), make_registry(), make_registry()
    images.push_image(src, "src/app", "v1")
    denying = make_proxy(bad)
    denying.fail_next(100, 403, "/dst/app/", method="PUT", body=echoing_denial())
    auth = write_auth(tmp_path / "auth.json", [denying.host], [src.host, good.host])
    (tmp_path / "images.json").write_text(json.dumps(
        {f"{src.host}/src/app:v1": [f"{good.host}/dst/app", f"{denying.host}/dst/app"]}))

    done = run_syncer(clean_env(tmp_path), "sync", "--auth", str(auth),
                      "--images", str(tmp_path / "images.json"), "--log-format", "json",
                      timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 synced" in done.stdout and "1 failed" in done.stdout
    assert denying.count(status=403) >= 1  # the echoing registry was reached
    assert_no_secret("stderr", done.stderr)
    # The registry's echo is masked in the error itself, so the summary and the failure
    # reason (the ledger, Redis, the failed-images file) never carry it either.
    assert_no_secret("stdout", done.stdout)
    assert "***" in done.stdout
    lines = json_lines(done.stderr)

    run_ids = {line.get("run_id") for line in lines}
    assert len(run_ids) == 1 and run_ids.pop().startswith("local-"), lines  # on every line
    synced = [line for line in lines if line["message"].startswith("synced ")]
    assert len(synced) == 1, lines
    assert synced[0]["level"] == "INFO" and synced[0]["logger"] == "syncer.run.embedded"
    assert synced[0]["image"] == f"{src.host}/src/app:v1 -> {good.host}/dst/app:v1"
    assert synced[0]["attempt"] == 1 and "error" not in synced[0]

    failed = [line for line in lines if line["level"] == "ERROR"]
    assert len(failed) == 1, lines
    failure = failed[0]
    assert failure["image"] == f"{src.host}/src/app:v1 -> {denying.host}/dst/app:v1"
    assert failure["registry"] == denying.host
    assert failure["attempt"] == 1  # DENIED is permanent: no retry
    assert "403" in failure["error"] and "DENIED" in failure["error"]
    assert "password *** rejected" in failure["error"]  # scrubbed, not dropped
    assert failure["message"] == f"failed {failure['image']}: {failure['error']}"


def test_worker_and_plan_json_logs(make_registry, redis_server, cluster, tmp_path):
    """A worker with SYNCER_LOG_FORMAT=json: Celery's lines (ready, task received/succeeded)
    and the syncer's are all JSON; the sync line names the run, the image and the attempt."""
    src, dst = make_registry(), make_registry()
    images.push_image(src, "src/app", "v1")
    auth = write_auth(tmp_path / "auth.json", [], [src.host, dst.host])
    worker_auth = write_auth(tmp_path / "worker-auth.json", ["127.0.0.1:1"],
                             [src.host, dst.host])  # a password the worker knows, unused
    rules = tmp_path / "images.json"
    rules.write_text(json.dumps({f"{src.host}/src/app": f"{dst.host}/dst/app"}))
    pool = cluster(redis_server)
    worker = pool.start("jw", worker_auth, extra_env={"SYNCER_LOG_FORMAT": "json"})

    planned = run_syncer(pool.env, "plan", "--auth", str(auth), "--images", str(rules),
                         "--wait", "--json", "--log-format", "json")
    assert planned.returncode == 0, planned.stdout + planned.stderr + pool.report()
    run_id = json.loads(planned.stdout)["run_id"]
    # plan's stderr: its own JSON lines, plus the plain "run …: N images enqueued" notice.
    plan_lines = [x for x in planned.stderr.splitlines() if not x.startswith("run ")]
    json_lines("\n".join(plan_lines))

    worker.stop()
    log = worker.log_text()
    assert_no_secret("the worker log", log)
    # Celery prints its shutdown notice with a raw write to *stdout* (the test's log file
    # holds both streams); every log line — on stderr — is JSON.
    notice = re.compile(r"worker: \w+ shutdown \(MainProcess\)")
    lines = json_lines("\n".join(x for x in log.splitlines() if not notice.fullmatch(x)))
    assert any(line["message"].endswith(" ready.") and line["logger"].startswith("celery")
               for line in lines), lines
    synced = [line for line in lines if line["message"].startswith("synced ")]
    assert len(synced) == 1, lines
    assert synced[0]["run_id"] == run_id and synced[0]["attempt"] == 1
    assert synced[0]["image"] == f"{src.host}/src/app:v1 -> {dst.host}/dst/app:v1"
    assert synced[0]["logger"] == "syncer.worker"
