"""Following a run reads counts, not records: ``RedisLedger.tally`` / ``counts`` answer the
summary's numbers in one round trip without reading a job record; a final state renews every
key's expiry inside the same script that writes it (one round trip)."""

from __future__ import annotations

import redis

from syncer.plan.jobs import Job, PlanFailure
from workers.redis_ledger import RUNS_KEY, RedisLedger, indexed_runs

RESULT = {"status": "synced", "digest": "sha256:" + "e" * 64, "blobs_copied": 2,
          "bytes_copied": 500, "manifests_pushed": 1}


def counting_sends(monkeypatch) -> list[object]:
    """One entry per round trip (a command, or a whole pipeline)."""
    sends: list[object] = []
    send = redis.connection.Connection.send_packed_command

    def counting(connection, command, *args, **kwargs):
        sends.append(command)
        return send(connection, command, *args, **kwargs)

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting)
    return sends


def test_counts_are_the_summarys_without_its_records(redis_server, monkeypatch):
    client = redis.Redis.from_url(str(redis_server))
    jobs = [Job(f"src.io/a/app:{i}", f"dst.io/b/app:{i}") for i in range(6)]
    ledger = RedisLedger(client, "run-tally")
    ledger.begin(jobs, [PlanFailure("src.io/a/gone", "dst.io/b/gone", "NAME_UNKNOWN")])
    ledger.mark_running(jobs[0].id, "w1")
    ledger.mark_done(jobs[0].id, RESULT)
    ledger.mark_running(jobs[1].id, "w1")
    ledger.mark_done(jobs[1].id, {**RESULT, "status": "skipped"})
    ledger.mark_running(jobs[2].id, "w1")
    ledger.mark_failed(jobs[2].id, "denied")
    ledger.mark_running(jobs[3].id, "w1")
    ledger.mark_running(jobs[4].id, "w1")
    ledger.mark_retrying(jobs[4].id, "HTTP 503")
    ledger.mark_running("not-a-job", "w1")  # a stray state is not a job of the run
    ledger.counts()  # loads the script once per server

    sends = counting_sends(monkeypatch)
    tally = ledger.tally()
    assert len(sends) == 1  # one script: counts and progress together
    full = ledger.summary()
    counted = tally.summary
    assert (counted.failures, counted.succeeded) == ([], [])
    assert full.failures and full.succeeded
    same = {**full.to_dict(), "failures": [], "succeeded": [], "duration_seconds": 0}
    assert {**counted.to_dict(), "duration_seconds": 0} == same
    assert (counted.synced, counted.skipped, counted.failed, counted.running) == (1, 1, 2, 2)
    assert tally.progress == ledger.progress()

    listed = indexed_runs(client, RUNS_KEY, records=False)
    assert [r.run_id for r in listed] == ["run-tally"] and listed[0].failures == []
    assert indexed_runs(client, RUNS_KEY)[0].failures == full.failures


def test_a_final_state_renews_every_expiry_in_one_round_trip(redis_server, monkeypatch):
    client = redis.Redis.from_url(str(redis_server))
    job = Job("src.io/a/app:1", "dst.io/b/app:1")
    ledger = RedisLedger(client, "run-expiry", ttl=1000)
    ledger.begin([job], [])
    ledger.mark_running(job.id, "w1", holder="w1#x")
    ledger.add_activity(10)
    for name in ("meta", "jobs", "state", "attempts", "worker", "activity"):
        client.expire(ledger.key(name), 5)
    RedisLedger(client, "run-other").mark_failed("x", "y")  # loads the script on the server

    sends = counting_sends(monkeypatch)
    assert ledger.mark_done(job.id, RESULT) is True
    assert len(sends) == 1
    for name in ("meta", "jobs", "state", "reason", "digest", "attempts", "worker", "holder",
                 "final", "counters", "activity"):
        assert 5 < client.ttl(ledger.key(name)) <= 1000, name
    assert ledger.summary().complete
