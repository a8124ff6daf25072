"""The Redis ledger and blob coordinator against a real redis-server: each job's final state
and counters count once, late duplicates change nothing, lost workers are counted and capped;
the upload lock excludes, is kept alive atomically by one keeper thread, and a waiter
respects its deadline and stops waiting once the work it waited for is done."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from syncer.plan.jobs import Job, PlanFailure
from syncer.registry.errors import TimeLimitExceeded
from workers.redis_coordinator import RedisBlobCoordinator
from workers.redis_ledger import RedisLedger

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


def test_blob_lock_keep_alive_outlives_its_ttl_and_a_waiter_respects_its_deadline(redis_server):
    client = redis.Redis.from_url(str(redis_server))
    holder = RedisBlobCoordinator(client, lock_ttl=0.6)
    waiter = RedisBlobCoordinator(client, poll=0.02)
    name = "syncer:bloblock:dst.io:manifest:b/app@sha256:abc"
    with holder.lock("dst.io", "manifest:b/app@sha256:abc"):
        time.sleep(1.5)  # > 2 TTLs: only the watchdog's atomic reacquire keeps it
        assert 0 < client.pttl(name) <= 600
        started = time.monotonic()
        soon = time.monotonic() + 0.3
        with pytest.raises(TimeLimitExceeded), waiter.lock("dst.io", "manifest:b/app@sha256:abc",
                                                           deadline=soon):
            pytest.fail("entered a held lock")
        assert 0.2 <= time.monotonic() - started < 1.0
        # A deadline already past: no wait at all.
        past = time.monotonic() - 1
        with pytest.raises(TimeLimitExceeded), waiter.lock("dst.io", "manifest:b/app@sha256:abc",
                                                           deadline=past):
            pass
    assert client.get(name) is None
    # Free: a past deadline still gets a free lock (the copy's own checks end it).
    with waiter.lock("dst.io", "manifest:b/app@sha256:abc", deadline=time.monotonic() - 1):
        assert client.get(name) is not None


def test_a_waiter_stops_waiting_once_the_work_is_done_and_convoys_are_short(redis_server):
    """``until`` ends a wait without the lock (the holder did what the waiter wanted), and
    waiters queued behind short holds poll briefly at first: twelve copies that each need a
    key for a moment get through in well under the twelve default 0.2 s polls a fixed pause
    would cost them."""
    client = redis.Redis.from_url(str(redis_server))
    holder, waiter = RedisBlobCoordinator(client), RedisBlobCoordinator(client)
    name = "syncer:bloblock:dst.io:sha256:feed"
    done = threading.Event()
    asked: list[float] = []

    def placed() -> bool:
        asked.append(time.monotonic())
        return done.is_set()

    with holder.lock("dst.io", "sha256:feed"):
        threading.Timer(0.3, done.set).start()
        started = time.monotonic()
        with waiter.lock("dst.io", "sha256:feed", deadline=started + 30, until=placed) as held:
            waited = time.monotonic() - started
            assert held is False
            assert client.get(name) is not None  # still the holder's: the waiter took nothing
        assert 0.3 <= waited < 1.5
        assert len(asked) >= 3  # asked between tries, not only once

    entered: list[float] = []

    def brief() -> None:
        with RedisBlobCoordinator(client).lock("dst.io", "sha256:convoy"):
            entered.append(time.monotonic())
            time.sleep(0.005)

    started = time.monotonic()
    threads = [threading.Thread(target=brief) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(entered) == 12
    assert time.monotonic() - started < 12 * 0.2 / 2


def test_one_keeper_thread_extends_every_lock_held_and_forgets_released_ones(redis_server):
    client = redis.Redis.from_url(str(redis_server))
    coordinator = RedisBlobCoordinator(client, lock_ttl=0.6)
    names = [f"syncer:bloblock:dst.io:sha256:{i}" for i in range(5)]
    before = threading.active_count()
    with coordinator.lock("dst.io", "sha256:0"), coordinator.lock("dst.io", "sha256:1"), \
            coordinator.lock("dst.io", "sha256:2"), coordinator.lock("dst.io", "sha256:3"):
        with coordinator.lock("dst.io", "sha256:4"):
            pass  # released at once: the keeper must not bring it back
        assert threading.active_count() == before + 1  # one keeper, not one thread per lock
        time.sleep(1.5)  # > 2 TTLs
        assert all(0 < client.pttl(n) <= 600 for n in names[:4])
        assert client.exists(names[4]) == 0
    assert client.exists(*names) == 0


def test_blob_lock_max_wait_and_redis_failure_degrade_to_unlocked(redis_server):
    client = redis.Redis.from_url(str(redis_server))
    holder = RedisBlobCoordinator(client)
    impatient = RedisBlobCoordinator(client, poll=0.02, max_wait=0.2)
    with holder.lock("dst.io", "sha256:def"):
        started = time.monotonic()
        with impatient.lock("dst.io", "sha256:def", deadline=time.monotonic() + 60):
            waited = time.monotonic() - started
        assert 0.1 <= waited < 1.0  # went on unlocked after max_wait, long before the deadline
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=None)
    with RedisBlobCoordinator(dead).lock("dst.io", "sha256:def", deadline=time.monotonic() + 5):
        pass  # Redis unreachable: unlocked, no error


def test_lost_starts_are_counted_and_capped(redis_server):
    client = redis.Redis.from_url(str(redis_server))
    ledger = RedisLedger(client, "run-lost")
    ledger.begin(JOBS, [], retries=2)
    poison, recovered, retried = (job.id for job in JOBS)
    assert ledger.job(poison) == JOBS[0]  # the whole job is kept, for a reaper

    # A start whose previous start never reached an outcome counts a lost worker.
    assert ledger.mark_running(poison, "w1", holder="w1#a", max_redeliveries=2).action == "run"
    for lost in (1, 2):
        verdict = ledger.mark_running(poison, "w1", holder="w1#b", max_redeliveries=2)
        assert (verdict.action, verdict.lost) == ("run", lost)
    verdict = ledger.mark_running(poison, "w1", holder="w1#c", max_redeliveries=2)
    assert (verdict.action, verdict.lost) == ("capped", 3)
    record = {r.id: r for r in ledger.records()}[poison]
    assert (record.state, record.reason, record.attempts) == ("failed", "worker lost 3 times", 3)
    assert ledger.mark_running(poison, "w2", holder="w2#a").action == "final"

    # The reaper path: started on a lost instance -> counted once, pending again, requeue.
    ledger.mark_running(recovered, "w1", holder="w1#dead")
    assert ledger.note_lost(recovered, "w1#other").action == "elsewhere"
    verdict = ledger.note_lost(recovered, "w1#dead", reason="worker w1 lost", max_redeliveries=3)
    assert (verdict.action, verdict.lost) == ("requeue", 1)
    record = {r.id: r for r in ledger.records()}[recovered]
    assert (record.state, record.reason) == ("pending", "worker w1 lost")
    # ...and its next start is not counted again.
    assert ledger.mark_running(recovered, "w2", holder="w2#a").lost == 1
    assert ledger.losses(recovered) == 1
    assert ledger.mark_done(recovered, RESULT)
    assert ledger.note_lost(recovered, "w2#a").action == "final"

    # A retrying job (its countdown message died with the worker): requeue, nothing counted.
    ledger.mark_running(retried, "w1", holder="w1#dead")
    ledger.mark_retrying(retried, "HTTP 503")
    assert ledger.note_lost(retried, "w1#dead").action == "requeue"
    assert ledger.losses(retried) == 0
    assert ledger.mark_running(retried, "w2", holder="w2#a").action == "run"

    summary = ledger.summary()
    assert (summary.failed, summary.synced, summary.running) == (1, 1, 1)
    ledger.add_activity(1000)
    ledger.add_activity(24)
    assert ledger.activity() == 1024 and client.ttl(ledger.key("activity")) > 0
    assert client.ttl(ledger.key("lost")) > 0 and client.ttl(ledger.key("holder")) > 0


def test_a_large_run_is_created_and_summarised_in_a_few_round_trips(redis_server, monkeypatch):
    """``begin`` writes thousands of jobs in chunked HSETs (one transaction); ``summary``
    counts from the states and reads records only for final jobs, ignoring a state written
    for an id that is not a job of the run; ``progress`` moves with states and bytes."""
    import workers.redis_ledger as ledger_module

    monkeypatch.setattr(ledger_module, "BEGIN_CHUNK", 700)  # several chunks per hash
    client = redis.Redis.from_url(str(redis_server))
    jobs = [Job(f"src.io/a/app:{i}", f"dst.io/b/app:{i}") for i in range(2500)]
    failures = [PlanFailure(f"src.io/a/gone{i}", f"dst.io/b/gone{i}", "NAME_UNKNOWN")
                for i in range(3)]
    ledger = RedisLedger(client, "run-large")
    sends: list[object] = []  # one per round trip: a command, or a whole pipeline
    send = redis.connection.Connection.send_packed_command

    def counting(connection, command, *args, **kwargs):
        sends.append(command)
        return send(connection, command, *args, **kwargs)

    client.ping()  # the connection's own set-up (HELLO, CLIENT …) is not the ledger's
    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting)
    ledger.begin(jobs, failures, retries=1)
    assert len(sends) == 1  # one transaction, not a command per field
    assert client.hlen(ledger.key("jobs")) == 2503
    assert client.hget(ledger.key("state"), jobs[-1].id) == b"pending"

    ledger.mark_running(jobs[0].id, "w1")
    ledger.mark_done(jobs[1].id, RESULT)
    before = ledger.progress()
    ledger.mark_running(jobs[2].id, "w1")
    ledger.mark_retrying(jobs[2].id, "HTTP 503")
    assert ledger.progress() != before
    moved = ledger.progress()
    ledger.add_activity(10)
    assert ledger.progress() != moved
    # A stray start for an id that is not a job of this run (a forged or misrouted message).
    ledger.mark_running("not-a-job", "w1")

    ledger.summary()  # loads the script once per server
    sends.clear()
    summary = ledger.summary()
    assert len(sends) == 2  # the counts (one script), then the records of the final jobs
    assert (summary.total, summary.synced, summary.failed, summary.running) == (2503, 1, 3, 2)
    assert summary.pending == 2503 - 4
    assert [r.destination for r in summary.succeeded] == [jobs[1].destination]
    assert summary.succeeded[0].digest == RESULT["digest"]
    assert sorted(r.reason for r in summary.failures) == ["NAME_UNKNOWN"] * 3
    assert summary.bytes_copied == 500
    records = {r.id: r for r in ledger.records()}
    assert len(records) == 2503 and records[jobs[2].id].state == "retrying"
