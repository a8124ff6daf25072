"""Distributed mode end to end: real ``redis-server``, real ``syncer worker`` processes (Celery,
prefork), real registries, the real ``syncer plan`` / ``status`` / ``flower`` commands.

What is checked is what an operator relies on: several workers share a run and every image
arrives digest-identical; a worker SIGKILLed mid-copy or a Redis restart does not lose or
double-count an image; permanent failures are not retried, transient ones are (with backoff);
Flower shows the run's tasks without secrets; no password ever reaches Redis or a log.

The ledger is read straight from Redis (``RedisLedger``) where ``status --json`` does not
carry a field (the worker that ran a job, the number of attempts).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from syncer.registry.retry import REQUEST_RETRIES
from syncer.run.ledger import JobRecord
from tests.support import BASIC_USERS, TEST_PASSWORDS, TOKEN_USERS, images
from tests.support.celery_workers import FlowerProcess, run_syncer
from tests.support.clients import write_auth_file
from tests.support.ports import wait_until
from tests.support.registry import RedisServer, RedisUrl
from workers.redis_ledger import RedisLedger

pytestmark = pytest.mark.integration

SRC_REPO, DST_REPO = "src/app", "dst/app"


# --------------------------------------------------------------------------- fixtures




@pytest.fixture
def persistent_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisUrl]:
    """A ``redis-server`` with an always-fsynced AOF: queued messages survive a restart."""
    server = RedisServer(tmp_path_factory.mktemp("redis-aof"), persistent=True)
    try:
        server.start()
        yield RedisUrl(server)
    finally:
        server.stop()


# --------------------------------------------------------------------------- helpers


def write_json(path: Path, document: dict) -> Path:
    path.write_text(json.dumps(document, indent=2))
    return path


def push_tags(reg, count: int, *, shared: bytes | None = None, prefix: str = "t") -> dict:
    """Push ``count`` small images ``<prefix>00..`` to SRC_REPO; tag -> PushedImage."""
    pushed = {}
    for i in range(count):
        tag = f"{prefix}{i:02d}"
        own = images.make_layer(1500 + 37 * i, seed=f"own-{tag}")
        pushed[tag] = images.push_image(reg, SRC_REPO, tag,
                                        layers=[shared, own] if shared else [own])
    return pushed


def ledger_of(url: str, run_id: str) -> RedisLedger:
    return RedisLedger(redis.Redis.from_url(str(url)), run_id)


def records_by_tag(ledger: RedisLedger) -> dict[str, JobRecord]:
    """The run's job records keyed by source tag (``...:t07`` -> ``t07``)."""
    found = {}
    for record in ledger.records():
        tag = record.source.rsplit(":", 1)[1]
        assert tag not in found, f"two jobs for source tag {tag}"
        found[tag] = record
    return found


def plan(env, auth: Path, images_file: Path, *args: str, timeout: float = 120) -> dict:
    """``syncer plan --json`` (plus ``args``); returns the parsed JSON, asserting exit 0
    unless ``--wait`` was given (then the caller checks the exit code in ``["_exit"]``)."""
    done = run_syncer(env, "plan", "--auth", str(auth), "--images", str(images_file), "--json",
                      *args, timeout=timeout)
    if "--wait" not in args:
        assert done.returncode == 0, done.stdout + done.stderr
    try:
        result = json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"plan printed no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    result["_exit"] = done.returncode
    result["_output"] = done.stdout + done.stderr
    return result


def status(env, run_id: str, *, watch: bool = False, timeout: float = 120) -> dict:
    """``syncer status RUN --json [--watch]``; parsed JSON plus ``_exit`` / ``_output``."""
    args = ["status", run_id, "--json", *(["--watch"] if watch else [])]
    done = run_syncer(env, *args, timeout=timeout)
    try:
        result = json.loads(done.stdout)
    except ValueError:
        pytest.fail(f"status printed no JSON (exit {done.returncode}):\n"
                    f"{done.stdout}\n{done.stderr}")
    result["_exit"] = done.returncode
    result["_output"] = done.stdout + done.stderr
    return result


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped does not count)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_all_at_destination(src, dst, tags) -> dict[str, str]:
    """Every tag digest-identical on both sides, all blobs present; tag -> digest."""
    digests = {}
    for tag in tags:
        want = images.manifest_digest(src, SRC_REPO, tag)
        got = images.manifest_digest(dst, DST_REPO, tag)
        assert want is not None and got == want, f"{tag}: source {want}, destination {got}"
        assert not images.walk_image(dst, DST_REPO, tag).missing
        digests[tag] = got
    return digests


def assert_counted_once(summary: dict, total: int, blobs_per_image: int) -> None:
    """Each image final exactly once and its counters added exactly once."""
    assert summary["complete"] and summary["total"] == total
    assert summary["failed"] == 0, summary["failures"]
    assert summary["synced"] + summary["skipped"] == total
    sources = [item["source"] for item in summary["succeeded"]]
    assert len(sources) == len(set(sources)) == total
    # Single-platform images: a synced job pushed one manifest and handled each blob once.
    assert summary["manifests_pushed"] == summary["synced"]
    handled = summary["blobs_copied"] + summary["blobs_mounted"] + summary["blobs_existing"]
    assert handled == blobs_per_image * summary["synced"]


def redis_values(client: redis.Redis) -> Iterator[tuple[bytes, bytes, bool]]:
    """``(key, text, decoded)`` for every key of the database and every value of every type;
    what kombu keeps base64-encoded (task message bodies, in the queue lists and in the
    ``unacked`` hash) is also yielded decoded, with ``decoded=True``."""
    for key in client.scan_iter(count=500):
        kind = client.type(key).decode()
        if kind == "string":
            values = [client.get(key)]
        elif kind == "hash":
            values = [v for pair in client.hgetall(key).items() for v in pair]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "none":
            # Gone between SCAN and TYPE (mid-run: a blob lock let go, a lease expired): it
            # holds nothing any more, but its name is still checked below.
            values = []
        else:
            pytest.fail(f"unexpected Redis type {kind} for {key!r}")
        yield key, key, False
        for value in values:
            if value is None:
                continue
            yield key, value, False
            for body in _kombu_bodies(value):
                yield key, body, True


def _kombu_bodies(raw: bytes) -> Iterator[bytes]:
    """Base64 message bodies anywhere in a JSON value (a message, or ``[message, ...]``)."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            encoding = (item.get("properties") or {}).get("body_encoding")
            if encoding == "base64" and isinstance(item.get("body"), str):
                yield base64.b64decode(item["body"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def scan_redis_for_passwords(client: redis.Redis, when: str) -> dict[bytes, list[bytes]]:
    """Assert no test password in any key or value; returns the decoded message bodies per key
    (so a caller can check the scan really looked inside the task messages)."""
    bodies: dict[bytes, list[bytes]] = {}
    for key, value, decoded in redis_values(client):
        assert_no_password(f"Redis key {key!r} ({when})", value)
        if decoded:
            bodies.setdefault(key, []).append(value)
    return bodies


def assert_no_password(where: str, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    for secret in TEST_PASSWORDS:
        assert secret.encode() not in data, f"test password found in {where}"
        assert base64.b64encode(secret.encode()) not in data, f"base64 password in {where}"


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(120)
def test_two_workers_share_a_run_and_status_agrees(make_registry, redis_server, cluster,
                                                   tmp_path):
    src, dst = make_registry(), make_registry()
    shared = images.make_layer(30_000, seed="shared-base")
    pushed = push_tags(src, 22, shared=shared)
    auth = write_auth_file(tmp_path / "auth.json", src, dst)
    rules = write_json(tmp_path / "images.json",
                       {f"{src.host}/{SRC_REPO}": f"{dst.host}/{DST_REPO}"})
    pool = cluster(redis_server)
    w1, w2 = pool.start_many(["w1", "w2"], auth)

    result = plan(pool.env, auth, rules, "--wait")
    assert result["_exit"] == 0, result["_output"] + pool.report()
    run_id = result["run_id"]
    assert result["synced"] == 22 and result["failed"] == 0 and result["complete"]

    digests = assert_all_at_destination(src, dst, pushed)
    assert digests == {tag: image.digest for tag, image in pushed.items()}

    # Both worker processes executed jobs (the node name that last started each job).
    records = records_by_tag(ledger_of(redis_server, run_id))
    assert set(records) == set(pushed)
    by_worker = {r.worker for r in records.values()}
    assert by_worker == {w1.node, w2.node}, by_worker
    assert all(r.state == "synced" and r.attempts == 1 for r in records.values())

    # `syncer status` (a separate process) agrees with the destination.
    shown = status(pool.env, run_id)
    assert shown["_exit"] == 0, shown["_output"]
    assert shown["run_id"] == run_id
    assert (shown["total"], shown["synced"], shown["skipped"], shown["failed"]) == (22, 22, 0, 0)
    assert shown["pending"] == 0 and shown["running"] == 0 and shown["complete"]
    for item in shown["succeeded"]:
        tag = item["destination"].rsplit(":", 1)[1]
        assert item["destination"] == f"{dst.host}/{DST_REPO}:{tag}"
        assert item["digest"] == digests[tag]
    assert {i["destination"].rsplit(":", 1)[1] for i in shown["succeeded"]} == set(pushed)

    # Counted once, and the shared base layer crossed the wire once although both workers
    # needed it at the same time (the Redis upload lock; the others found it there).
    assert_counted_once(shown, 22, blobs_per_image=3)
    assert shown["blobs_copied"] == 1 + 2 * 22
    assert shown["blobs_existing"] == 21 and shown["blobs_mounted"] == 0
    own_bytes = sum(len(img.config) + len(img.layers[1]) for img in pushed.values())
    assert shown["bytes_copied"] == len(shared) + own_bytes

    # Without a run id, `syncer status` lists the runs Redis knows.
    listed = run_syncer(pool.env, "status", "--json", timeout=60)
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)["runs"]
    assert [(r["run_id"], r["complete"], r["synced"]) for r in runs] == [(run_id, True, 22)]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("worker_pool", ["threads", "prefork"])
def test_sigkilled_worker_mid_copy_is_redelivered_and_counted_once(
        make_registry, make_proxy, redis_server, cluster, tmp_path, worker_pool):
    src, dst = make_registry(), make_registry()
    pushed = push_tags(src, 12)
    proxy = make_proxy(src)
    victim_tag = "t05"
    # The victim's source manifest GET (its first source request) hangs: its copy is in
    # progress when the worker dies, with nothing pushed and no blob lock held yet.
    proxy.delay_next(1, 30.0, f"/manifests/{victim_tag}", method="GET")
    auth = write_auth_file(tmp_path / "auth.json", proxy, dst)  # the worker's allowlist
    rules = write_json(tmp_path / "images.json",
                       {f"{proxy.host}/{SRC_REPO}": f"{dst.host}/{DST_REPO}"})
    visibility = 10
    pool = cluster(redis_server, visibility_timeout=visibility)
    workers = pool.start_many(["w1", "w2"], auth, pool=worker_pool)

    planned_at = time.monotonic()
    run_id = plan(pool.env, auth, rules)["run_id"]
    ledger = ledger_of(redis_server, run_id)

    def victim_in_flight() -> bool:
        record = records_by_tag(ledger)[victim_tag]
        return record.state == "running" and bool(record.worker)

    wait_until(victim_in_flight, 30, "the victim job to be running")
    time.sleep(1.0)  # the destination HEAD answered; the delayed GET is hanging in the proxy
    record = records_by_tag(ledger)[victim_tag]
    assert record.state == "running" and record.attempts == 1
    victim = next(w for w in workers if w.node == record.worker)
    survivor = next(w for w in workers if w is not victim)
    children = victim.child_pids()
    if worker_pool == "prefork":
        assert len(children) == 2, "the prefork pool of the victim"

    killed = victim.kill()
    assert {victim.pid, *children} <= killed
    assert not [pid for pid in killed if alive(pid)]

    shown = status(pool.env, run_id, watch=True, timeout=90)
    assert shown["_exit"] == 0, shown["_output"] + pool.report()
    assert_counted_once(shown, 12, blobs_per_image=2)
    assert shown["synced"] == 12  # nothing was at the destination before
    # The victim's message was delivered after planning began and came back only once the
    # visibility timeout had passed since that delivery.
    assert time.monotonic() - planned_at >= visibility

    records = records_by_tag(ledger)
    victim_record = records[victim_tag]
    assert victim_record.state == "synced"
    assert victim_record.attempts == 2  # started on the victim, finished on the survivor
    assert victim_record.worker == survivor.node
    assert victim_record.digest == pushed[victim_tag].digest
    assert all(r.attempts >= 1 and r.state == "synced" for r in records.values())
    assert survivor.running
    assert_all_at_destination(src, dst, pushed)


@pytest.mark.timeout(150)
def test_redis_restart_during_a_run(make_registry, make_proxy, persistent_redis, cluster,
                                    tmp_path):
    src, dst = make_registry(), make_registry()
    pushed = push_tags(src, 16)
    proxy = make_proxy(src)
    # Each copy takes about a second, so the run is still going when Redis goes away.
    proxy.delay_next(16, 1.0, f"/{SRC_REPO}/manifests/t", method="GET")
    auth = write_auth_file(tmp_path / "auth.json", proxy, dst)  # the worker's allowlist
    rules = write_json(tmp_path / "images.json",
                       {f"{proxy.host}/{SRC_REPO}": f"{dst.host}/{DST_REPO}"})
    pool = cluster(persistent_redis, visibility_timeout=10)
    workers = pool.start_many(["w1", "w2"], auth)

    run_id = plan(pool.env, auth, rules)["run_id"]
    ledger = ledger_of(persistent_redis, run_id)
    wait_until(lambda: ledger.summary().done >= 3, 30, "a few images to finish")
    before = ledger.summary()
    assert before.done < 16, "the run finished before the restart; slow it down"

    persistent_redis.stop()
    time.sleep(1.5)  # workers see the broker gone mid-run
    persistent_redis.start()
    assert ledger_of(persistent_redis, run_id).summary().total == 16  # the AOF kept the run

    shown = status(pool.env, run_id, watch=True, timeout=100)
    assert shown["_exit"] == 0, shown["_output"] + pool.report()
    assert_counted_once(shown, 16, blobs_per_image=2)
    assert_all_at_destination(src, dst, pushed)
    digests = {i["destination"].rsplit(":", 1)[1]: i["digest"] for i in shown["succeeded"]}
    assert digests == {tag: image.digest for tag, image in pushed.items()}
    for worker in workers:
        assert worker.running, f"{worker.name} died with Redis"
        log = worker.log_text()
        assert log.count("Connected to redis://") >= 2, f"{worker.name} did not reconnect"


@pytest.mark.timeout(90)
def test_permanent_failure_once_transient_retried_with_backoff(make_registry, make_proxy,
                                                               redis_server, cluster, tmp_path):
    src, dst = make_registry(), make_registry()
    good = images.push_image(src, SRC_REPO, "v1", seed="v1")
    proxy = make_proxy(src)
    # Each attempt retries a request in place (REQUEST_RETRIES: 5 tries) before the image is
    # retried: 2 attempts x 5 failures, then a clean third attempt.
    in_place = REQUEST_RETRIES.max_retries + 1
    proxy.fail_next(2 * in_place, status=503, path_contains="/manifests/v1")
    auth = write_auth_file(tmp_path / "auth.json", proxy, dst)  # the worker's allowlist
    rules = write_json(tmp_path / "images.json",
                       {f"{proxy.host}/{SRC_REPO}:v1,nope": f"{dst.host}/{DST_REPO}"})
    pool = cluster(redis_server)
    (worker,) = pool.start_many(["w1"], auth)

    result = plan(pool.env, auth, rules, "--retries", "3", "--wait")
    assert result["_exit"] == 1, result["_output"] + pool.report()
    assert (result["total"], result["synced"], result["failed"]) == (2, 1, 1)
    (failure,) = result["failures"]
    assert failure["source"] == f"{proxy.host}/{SRC_REPO}:nope"
    assert "not found" in failure["reason"].lower(), failure["reason"]

    records = records_by_tag(ledger_of(redis_server, result["run_id"]))
    missing, flaky = records["nope"], records["v1"]
    assert (missing.state, missing.attempts) == ("failed", 1)  # permanent: never retried
    assert "not found" in missing.reason.lower()
    assert (flaky.state, flaky.attempts, flaky.reason) == ("synced", 3, "")
    assert flaky.digest == good.digest == images.manifest_digest(dst, DST_REPO, "v1")
    assert images.manifest_digest(dst, DST_REPO, "nope") is None
    assert proxy.count(None, "/manifests/nope") == 1  # its GET: a 404 is not retried

    # Image backoff: 1 s base, doubling, jittered to [d/2, d]: >= 0.5 s, then >= 1 s between
    # the last try of one attempt and the first of the next.
    tries = [r for r in proxy.records if r.method == "GET" and r.path.endswith("/manifests/v1")]
    assert [r.status for r in tries] == [503] * 2 * in_place + [200]
    assert tries[in_place].started - tries[in_place - 1].started >= 0.5 - 0.05
    assert tries[2 * in_place].started - tries[2 * in_place - 1].started >= 1.0 - 0.05
    log = worker.log_text()
    assert "retry 1/3" in log and "retry 2/3" in log and "retry 3/3" not in log
    assert f"failed {proxy.host}/{SRC_REPO}:nope" in log


@pytest.mark.timeout(120)
def test_flower_lists_the_runs_tasks_without_secrets(make_registry, redis_server, cluster,
                                                     tmp_path):
    src, dst = make_registry(auth="htpasswd"), make_registry()
    pushed = push_tags(src, 4)
    auth = write_auth_file(tmp_path / "auth.json", src, dst)
    rules = write_json(tmp_path / "images.json",
                       {f"{src.host}/{SRC_REPO}": f"{dst.host}/{DST_REPO}"})
    pool = cluster(redis_server)
    flower = FlowerProcess(pool.env, pool.directory / "flower.log",
                           basic_auth=("watcher", "flower-pass-9"))
    try:
        flower.start()
        (worker,) = pool.start_many(["w1"], auth)
        # Flower sees events only while it runs: wait until it has heard the worker's heartbeat.
        wait_until(lambda: worker.node in flower.online_workers(), 30, "flower to see w1")

        result = plan(pool.env, auth, rules, "--wait")
        assert result["_exit"] == 0, result["_output"] + pool.report()
        run_id = result["run_id"]
        expected = {f"{src.host}/{SRC_REPO}:{tag} -> {dst.host}/{DST_REPO}:{tag}"
                    for tag in pushed}

        assert flower.get("/api/tasks", auth=False).status_code == 401
        tasks: dict = {}

        def listed() -> bool:
            response = flower.get("/api/tasks")
            response.raise_for_status()
            tasks.clear()
            tasks.update(response.json())
            return sum(t.get("state") == "SUCCESS" for t in tasks.values()) >= len(pushed)

        wait_until(listed, 20, "flower to list every task as succeeded", interval=0.3)
        raw = flower.get("/api/tasks").text
        assert_no_password("flower /api/tasks", raw)
        mine = {uid: t for uid, t in tasks.items() if run_id in (t.get("args") or "")}
        assert len(mine) == len(pushed)
        labels = set()
        for task in mine.values():
            assert task["name"] == "syncer.sync_image"
            assert task["state"] == "SUCCESS" and task["worker"] == worker.node
            label = next(lbl for lbl in expected if lbl in task["args"])
            labels.add(label)
        assert labels == expected
        for uid in mine:  # a task's detail page carries the same, and no secret either
            detail = flower.get(f"/api/task/info/{uid}")
            assert detail.status_code == 200
            assert_no_password("flower task info", detail.text)
    finally:
        flower.stop(grace=5.0)
        print(f"--- flower ({flower.log_path}):\n{flower.log_text()[-3000:]}")
    assert_no_password("flower log", flower.log_text())


@pytest.mark.timeout(120)
def test_no_password_reaches_redis_logs_or_output(make_registry, make_proxy, redis_server,
                                                  cluster, tmp_path):
    src, dst = make_registry(auth="htpasswd"), make_registry(auth="token")
    pushed = push_tags(src, 3)
    # The source is reached through a proxy that holds one copy back, so Redis can be read
    # while a task message sits in kombu's ``unacked`` hash.
    proxy = make_proxy(src)
    slow = "t01"
    # Long enough that a loaded CI machine still reads Redis before the copy goes on.
    proxy.delay_next(1, 8.0, f"/manifests/{slow}", method="GET")
    auth = write_json(tmp_path / "auth.json", {
        proxy.host: {"username": "admin", "password": BASIC_USERS["admin"]},
        dst.host: {"username": "admin", "password": TOKEN_USERS["admin"]},
    })
    rules = write_json(tmp_path / "images.json", {
        f"{proxy.host}/{SRC_REPO}": f"{dst.host}/{DST_REPO}",
        f"{proxy.host}/{SRC_REPO}:nope": f"{dst.host}/{DST_REPO}",  # a failure path too
    })
    pool = cluster(redis_server)
    client = redis.Redis.from_url(str(redis_server))

    # 1. Planned with no worker running: the four task messages wait in the queue.
    planned = plan(pool.env, auth, rules)
    assert planned["jobs"] == 4
    assert_no_password("plan output", planned["_output"])
    assert client.llen("syncer") == 4
    bodies = scan_redis_for_passwords(client, "queued")
    assert len(bodies.get(b"syncer", [])) == 4  # every queued body was decoded and checked
    assert all(f"{proxy.host}/{SRC_REPO}:".encode() in body for body in bodies[b"syncer"])

    # 2. Mid-run: the slow job's message is delivered but not acknowledged yet.
    pool.start_many(["w1", "w2"], auth)
    ledger = ledger_of(redis_server, planned["run_id"])
    wait_until(lambda: records_by_tag(ledger)[slow].state == "running", 30, "the slow job")
    bodies = scan_redis_for_passwords(client, "mid-run")
    unacked = b"".join(bodies.get(b"unacked", []))
    assert f"{proxy.host}/{SRC_REPO}:{slow}".encode() in unacked

    # 3. Finished.
    shown = status(pool.env, planned["run_id"], watch=True, timeout=90)
    assert shown["_exit"] == 1, shown["_output"] + pool.report()  # the 'nope' image failed
    assert (shown["synced"], shown["failed"]) == (3, 1)
    assert_no_password("status output", shown["_output"])
    for tag, image in pushed.items():
        assert images.manifest_digest(dst, DST_REPO, tag) == image.digest
    scan_redis_for_passwords(client, "finished")
    kinds = {client.type(key).decode() for key in client.scan_iter()}
    assert {"hash", "set", "zset"} <= kinds  # the ledger, blob holders, the runs index
    assert set(client.info("keyspace")) == {"db0"}  # nothing hidden in another database

    pool.stop_all()  # flush and close the logs before reading them whole
    logs = pool.logs()
    assert "synced" in logs and "failed" in logs
    assert_no_password("worker logs", logs)
