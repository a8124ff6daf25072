"""Distributed liveness with the settings a user gets by default — the Redis visibility
timeout (4,500 s), heartbeat (10 s, TTL 30 s), reaper (10 s) and redelivery cap (3) are NOT
shortened: a SIGKILLed worker's images run again within two minutes; a poison image that
kills its worker every time is failed after the cap and the run ends; ``plan --wait`` gives up
on a run that no longer moves and names what is left.

Real ``redis-server``, real ``syncer worker`` processes, real registries; the reaper and its
ledger decisions are also driven directly against Redis with a fake ``requeue``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import psutil
import pytest
import redis

from syncer.plan.jobs import Job
from syncer.run.ledger import RunSummary
from tests.integration.test_distributed import (
    DST_REPO,
    SRC_REPO,
    assert_all_at_destination,
    assert_counted_once,
    ledger_of,
    plan,
    push_tags,
    records_by_tag,
    status,
    write_json,
)
from tests.support.celery_workers import USER_DEFAULTS, run_syncer
from tests.support.httpserver import BackgroundServer
from tests.support.ports import wait_until
from workers.liveness import (
    INSTANCES_KEY,
    Heartbeat,
    LivenessSettings,
    alive_key,
    hold,
    holds_key,
)
from workers.reaper import Reaper
from workers.redis_ledger import RedisLedger
from workers.runs import RunStalled, wait_for

pytestmark = pytest.mark.integration




def trusting_auth(path: Path, *hosts: str) -> Path:
    """An auth file naming ``hosts`` (open registries: no credentials), so that each worker's
    allowlist admits them."""
    return write_json(path, {host: {} for host in hosts})


# --------------------------------------------------------------------------- a dead worker


@pytest.mark.timeout(150)
def test_sigkilled_worker_images_run_again_within_two_minutes(make_registry, make_proxy,
                                                             redis_server, cluster, tmp_path):
    src, dst = make_registry(), make_registry()
    pushed = push_tags(src, 8)
    proxy = make_proxy(src)
    victim_tag = "t03"
    layer = pushed[victim_tag].layer_digests[0]
    # The victim's layer GET hangs: the worker is mid-copy, holding that blob's upload lock.
    proxy.delay_next(1, 110.0, f"/blobs/{layer}", method="GET")
    auth = trusting_auth(tmp_path / "auth.json", proxy.host, dst.host)
    rules = write_json(tmp_path / "images.json",
                       {f"{proxy.host}/{SRC_REPO}": f"{dst.host}/{DST_REPO}"})
    pool = cluster(redis_server, **USER_DEFAULTS)
    workers = pool.start_many(["w1", "w2"], auth)
    assert "SYNCER_VISIBILITY_TIMEOUT" not in pool.env and "SYNCER_CELERY_CONFIG" not in pool.env

    run_id = plan(pool.env, auth, rules)["run_id"]
    ledger = ledger_of(redis_server, run_id)
    client = redis.Redis.from_url(str(redis_server))
    wait_until(lambda: any(client.scan_iter(match=f"syncer:bloblock:*{layer}")), 30,
               "the victim's blob lock")
    time.sleep(0.5)
    record = records_by_tag(ledger)[victim_tag]
    assert record.state == "running" and record.attempts == 1
    victim = next(w for w in workers if w.node == record.worker)
    survivor = next(w for w in workers if w is not victim)

    killed_at = time.monotonic()
    victim.kill()
    # Only the survivor's reaper can heal the run: nothing here reaps, no planner waits.
    wait_until(lambda: ledger.summary().complete, 120, "the run to complete", interval=0.5)
    healed = time.monotonic() - killed_at
    print(f"run complete {healed:.1f}s after SIGKILL of {victim.node}'s process group")
    assert healed < 120

    shown = status(pool.env, run_id)
    assert shown["_exit"] == 0, shown["_output"] + pool.report()
    assert_counted_once(shown, 8, blobs_per_image=2)
    records = records_by_tag(ledger)
    again = records[victim_tag]
    assert (again.state, again.attempts, again.worker) == ("synced", 2, survivor.node)
    assert again.digest == pushed[victim_tag].digest
    assert ledger.losses(again.id) == 1  # counted once, by the reaper
    assert_all_at_destination(src, dst, pushed)
    assert survivor.running
    log = survivor.log_text()
    assert f"worker {victim.node}#" in log and "lost" in log, log[-3000:]
    assert "enqueued again" in log

    # The victim's original message is still in kombu's ``unacked`` hash and would come back
    # after the visibility timeout (75 min). Put it back now, as kombu's restore does (a
    # test-only peek at kombu's Redis layout): the late duplicate must change nothing.
    blob_gets = proxy.count("GET", f"/blobs/{layer}")
    stale = client.hgetall("unacked")
    assert stale, "the victim's original message should still be unacknowledged"
    for tag, raw in stale.items():
        message, _exchange, routing_key = json.loads(raw)
        client.lpush(routing_key or "syncer", json.dumps(message))
        client.hdel("unacked", tag)
        client.zrem("unacked_index", tag)
    victim_label = f"{proxy.host}/{SRC_REPO}:{victim_tag} -> {dst.host}/{DST_REPO}:{victim_tag}"
    wait_until(lambda: f"{victim_label}: already final" in survivor.log_text(), 30,
               "the late duplicate to be acknowledged")
    assert proxy.count("GET", f"/blobs/{layer}") == blob_gets  # nothing copied again
    assert records_by_tag(ledger)[victim_tag].attempts == 2
    assert status(pool.env, run_id)["synced"] == 8


# --------------------------------------------------------------------------- a poison job


class PoisonRegistry:
    """A stand-in source registry whose manifest endpoint SIGKILLs the ``syncer worker``
    process that asks (found as the peer of the socket, which root may look up)."""

    def __init__(self) -> None:
        self.kills: list[int] = []
        handler = type("_Bound", (_PoisonHandler,), {"stand_in": self})
        self.server = BackgroundServer(handler, "poison-registry")

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``."""
        return self.server.host

    def peer_pid(self, client_port: int) -> int | None:
        """The pid owning the client end of a connection to this server."""
        for conn in psutil.net_connections(kind="tcp4"):
            if (conn.pid and conn.laddr and conn.raddr and conn.laddr.port == client_port
                    and conn.raddr.port == self.server.port):
                return conn.pid
        return None


class _PoisonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stand_in: PoisonRegistry

    def log_message(self, format: str, *args) -> None:
        """Quiet."""

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/v2":
            self._answer(200, b"{}")
            return
        if "/manifests/" in self.path:
            pid = self.stand_in.peer_pid(self.client_address[1])
            if pid and pid != os.getpid() and "worker" in " ".join(psutil.Process(pid).cmdline()):
                os.kill(pid, signal.SIGKILL)
                self.stand_in.kills.append(pid)
                self.close_connection = True
                return
        self._answer(404, json.dumps({"errors": [{"code": "NAME_UNKNOWN"}]}).encode())

    do_HEAD = do_GET


@pytest.mark.timeout(120)
def test_poison_job_is_failed_after_the_cap_and_the_run_ends(make_registry, redis_server,
                                                             cluster, tmp_path):
    src, dst = make_registry(), make_registry()
    pushed = push_tags(src, 4)
    poison = PoisonRegistry()
    poison.server.start()
    try:
        auth = trusting_auth(tmp_path / "auth.json", src.host, dst.host, poison.host)
        poisoned = f"{poison.host}/src/poison:v1"
        rules = write_json(tmp_path / "images.json", {
            f"{src.host}/{SRC_REPO}": f"{dst.host}/{DST_REPO}",
            poisoned: f"{dst.host}/dst/poison",
        })
        pool = cluster(redis_server, **USER_DEFAULTS)
        # prefork: the copy runs in a pool child; Celery requeues a dead child's message at
        # once (task_reject_on_worker_lost), so every death is a redelivery.
        (worker,) = pool.start_many(["w1"], auth, pool="prefork")

        started = time.monotonic()
        result = plan(pool.env, auth, rules, "--wait", timeout=100)
        took = time.monotonic() - started
    finally:
        poison.server.stop()
    print(f"plan --wait ended after {took:.1f}s; {len(poison.kills)} worker processes killed")
    assert result["_exit"] == 1, result["_output"] + pool.report()
    assert (result["total"], result["synced"], result["failed"]) == (5, 4, 1)
    (failure,) = result["failures"]
    assert failure["source"] == poisoned
    assert failure["reason"] == "worker lost 4 times"  # the cap (3 redeliveries) + 1
    assert len(poison.kills) == 4
    assert worker.running and worker.pid not in poison.kills  # only pool children died
    record = {r.source: r for r in ledger_of(redis_server, result["run_id"]).records()}[poisoned]
    assert (record.state, record.attempts) == ("failed", 4)
    assert_all_at_destination(src, dst, pushed)
    assert "WorkerLostError" in worker.log_text() or "SIGKILL" in worker.log_text()


# --------------------------------------------------------------------------- a stalled run


@pytest.mark.timeout(90)
def test_plan_wait_gives_up_on_a_stalled_run_and_names_the_image(make_registry, make_proxy,
                                                                 redis_server, cluster,
                                                                 tmp_path):
    src, dst = make_registry(), make_registry()
    push_tags(src, 3)
    proxy = make_proxy(src)
    stuck = "t01"
    # A wedged copy: the worker waits on a source that answers nothing (no state change, no
    # byte moves) for far longer than the stall timeout.
    proxy.delay_next(1, 60.0, f"/manifests/{stuck}", method="GET")
    auth = trusting_auth(tmp_path / "auth.json", proxy.host, dst.host)
    rules = write_json(tmp_path / "images.json",
                       {f"{proxy.host}/{SRC_REPO}": f"{dst.host}/{DST_REPO}"})
    pool = cluster(redis_server, **USER_DEFAULTS)
    pool.start_many(["w1"], auth)
    label = f"{proxy.host}/{SRC_REPO}:{stuck}"

    started = time.monotonic()
    result = plan(pool.env, auth, rules, "--wait", "--stall-timeout", "4", timeout=60)
    took = time.monotonic() - started
    assert result["_exit"] == 1, result["_output"] + pool.report()
    assert result["stalled"] is True and result["synced"] == 2 and not result["complete"]
    assert [(u["source"], u["state"]) for u in result["unfinished"]] == [(label, "running")]
    assert "no progress for" in result["_output"] and label in result["_output"]
    assert 4 <= took < 30, took

    # `status --watch` too, with the stall time from the environment.
    shown = run_syncer({**pool.env, "SYNCER_STALL_TIMEOUT": "3"}, "status", result["run_id"],
                       "--watch", timeout=30)
    assert shown.returncode == 1, shown.stdout + shown.stderr
    assert "no progress for" in shown.stderr and label in shown.stderr


def test_bytes_in_flight_are_progress(redis_server):
    """A copy that moves bytes (a big blob) is progress; a run that stops moving is stalled."""
    client = redis.Redis.from_url(str(redis_server))
    ledger = RedisLedger(client, "run-stall")
    job = Job("src.io/a/big:1", "dst.io/b/big:1")
    ledger.begin([job], [])
    ledger.mark_running(job.id, "w1", holder="w1#x")
    feeding = threading.Event()

    def feed() -> None:  # the worker's ActivityReporter, every 0.2 s for 1.5 s
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            ledger.add_activity(1 << 20)
            time.sleep(0.2)
        feeding.set()

    threading.Thread(target=feed, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(RunStalled) as stalled:
        wait_for(ledger, show_progress=False, poll=0.05, stall_timeout=0.6, reap=lambda: 0)
    assert feeding.is_set()  # not stalled while bytes moved (1.5 s > 0.6 s)
    assert time.monotonic() - started >= 1.5 + 0.6 - 0.1
    assert [r.id for r in stalled.value.unfinished] == [job.id]
    assert isinstance(stalled.value.summary, RunSummary)


# --------------------------------------------------------------------------- the reaper


def test_reaper_claims_a_silent_instance_once_and_requeues_what_it_held(redis_server):
    client = redis.Redis.from_url(str(redis_server))
    settings = LivenessSettings(heartbeat_interval=0.3, heartbeat_ttl=0.5, reap_interval=0.1,
                                max_redeliveries=1)
    ledger = RedisLedger(client, "run-reap")
    running, retrying, done, poison = (Job(f"src.io/a/app:{i}", f"dst.io/b/app:{i}")
                                       for i in range(4))
    ledger.begin([running, retrying, done, poison], [], retries=5)
    dead, live = "w1@host#dead", "w2@host#live"
    Heartbeat(client, dead, settings).beat()  # then it "dies": no more beats
    heartbeat = Heartbeat(client, live, settings).start()
    try:
        for job in (running, retrying, done, poison):
            hold(client, dead, ledger.run_id, job.id)
            ledger.mark_running(job.id, "w1@host", holder=dead)
        ledger.mark_retrying(retrying.id, "HTTP 503")
        ledger.mark_done(done.id, {"status": "synced"})
        client.hset(ledger.key("lost"), poison.id, 1)  # already lost once: the cap is 1

        sent: list[tuple[str, Job, int]] = []
        now = [0.0]
        reapers = [Reaper(client, lambda *a: sent.append(a), settings, clock=lambda: now[0])
                   for _ in range(2)]
        assert [r.reap_once() for r in reapers] == [0, 0]  # alive
        time.sleep(0.7)  # the dead one's key expires; the live one keeps beating
        assert [r.reap_once() for r in reapers] == [0, 0]  # silent, but only a suspect yet
        now[0] += settings.heartbeat_interval
        assert [r.reap_once() for r in reapers] == [2, 0]  # claimed by exactly one reaper
    finally:
        heartbeat.stop(clean=True)

    assert sorted((run, job.source, retries) for run, job, retries in sent) == [
        (ledger.run_id, running.source, 5), (ledger.run_id, retrying.source, 5)]
    records = {r.id: r for r in ledger.records()}
    assert (records[running.id].state, records[running.id].reason) == ("pending",
                                                                       "worker w1@host lost")
    assert ledger.losses(running.id) == 1 and ledger.losses(retrying.id) == 0
    assert (records[poison.id].state, records[poison.id].reason) == ("failed",
                                                                     "worker lost 2 times")
    assert records[done.id].state == "synced"
    assert not client.exists(holds_key(dead)) and not client.sismember(INSTANCES_KEY, dead)
    assert not client.exists(alive_key(live)) and not client.sismember(INSTANCES_KEY, live)
