"""The Redis ledger and blob coordinator against a real redis-server: each job's final state
and counters count once, late duplicates change nothing, the upload lock excludes."""

from __future__ import annotations

import threading
import time

import redis

from syncer.jobs import Job, PlanFailure
from syncer.redis_coordinator import RedisBlobCoordinator
from syncer.redis_ledger import RedisLedger

JOBS = [Job(f"src.io/a/app:{i}", f"dst.io/b/app:{i}") for i in range(3)]
RESULT = {
    "status": "synced",
    "digest": "sha256:" + "e" * 64,
    "blobs_copied": 2,
    "bytes_copied": 500,
    "manifests_pushed": 1,
}


def test_final_states_count_once_and_duplicates_are_quiet(redis_server):
    client = redis.Redis.from_url(str(redis_server))
    ledger = RedisLedger(client, "run-test")
    failure = PlanFailure("src.io/a/missing", "dst.io/b/missing", "NAME_UNKNOWN")
    ledger.begin(JOBS, [failure], retries=2)

    ledger.mark_running(JOBS[0].id, "w1@host")
    assert ledger.mark_done(JOBS[0].id, RESULT) is True
    # A redelivered copy of the same job: runs, "succeeds" again, must change nothing.
    ledger.mark_running(JOBS[0].id, "w2@host")
    assert ledger.mark_done(JOBS[0].id, {**RESULT, "status": "skipped"}) is False
    assert ledger.mark_failed(JOBS[0].id, "late") is False

    ledger.mark_running(JOBS[1].id, "w2@host")
    ledger.mark_retrying(JOBS[1].id, "HTTP 503")
    ledger.mark_running(JOBS[1].id, "w2@host")
    assert ledger.mark_failed(JOBS[1].id, "denied") is True

    summary = ledger.summary()
    assert (summary.total, summary.synced, summary.failed, summary.pending) == (4, 1, 2, 1)
    assert (summary.bytes_copied, summary.blobs_copied) == (500, 2)
    records = {r.id: r for r in ledger.records()}
    assert records[JOBS[0].id].worker == "w1@host" and records[JOBS[0].id].attempts == 1
    assert records[JOBS[1].id].attempts == 2 and records[JOBS[1].id].reason == "denied"
    assert not summary.finished_at

    ledger.mark_done(JOBS[2].id, RESULT)
    done = ledger.summary()
    assert done.complete and done.finished_at > 0
    assert client.ttl(ledger.key("state")) > 0  # every key expires


def test_blob_lock_excludes_and_holders_are_shared(redis_server):
    client = redis.Redis.from_url(str(redis_server))
    first, second = RedisBlobCoordinator(client), RedisBlobCoordinator(client, poll=0.01)
    inside: list[str] = []
    overlap = threading.Event()

    def hold(coordinator, name):
        with coordinator.lock("dst.io", "sha256:abc"):
            if inside:
                overlap.set()
            inside.append(name)
            time.sleep(0.2)
            inside.remove(name)

    threads = [threading.Thread(target=hold, args=(c, n)) for c, n in ((first, "a"), (second, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not overlap.is_set()
    assert client.get("syncer:bloblock:dst.io:sha256:abc") is None  # released

    first.record("dst.io", "b/app", "sha256:abc")
    assert second.holders("dst.io", "sha256:abc") == ["b/app"]
