"""``syncer schedule``: one run per period, never two at once, no burst after a pause.

Real ``syncer schedule`` processes (two of them, one schedule name: what two hosts running it
for availability look like), a real worker, Redis and registries, with a 2 s period. The
schedule's runs are read back from Redis (their ledgers' ``created_at`` / ``finished_at``) and
through ``syncer status``; the images are checked by digest at the destination.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import time

import pytest
import redis

from tests.support import images
from tests.support.celery_workers import SYNCER, GroupProcess, run_syncer
from tests.support.clients import write_auth_file
from tests.support.ports import wait_until
from workers.schedule import ScheduleStore, default_name, parse_every

pytestmark = pytest.mark.integration

SRC_REPO, DST_REPO = "src/app", "dst/app"
EVERY = 2.0


def test_durations_and_names():
    assert parse_every("30m") == 1800 and parse_every("1h30m") == 5400
    assert parse_every("2s") == 2 and parse_every("90") == 90 and parse_every("1d") == 86400
    for bad in ("", "soon", "5x", "0s", "m30", "1h 30m"):
        with pytest.raises(ValueError):
            parse_every(bad)
    assert default_name("/etc/syncer/harbor-to-acr.yaml") == "harbor-to-acr"
    assert default_name(None, "my images.json") == "my-images"


def run_times(client: redis.Redis, run_ids: list[str]) -> list[tuple[str, float, float, int]]:
    """``(run id, created_at, finished_at, period)`` in creation order (finished 0: not yet;
    period: the index of the period the run was started for)."""
    found = []
    for run_id in run_ids:
        meta = client.hgetall(f"syncer:run:{run_id}:meta")
        found.append((run_id, float(meta[b"created_at"]), float(meta.get(b"finished_at", 0)),
                      int(meta[b"schedule_period"])))
    return sorted(found, key=lambda item: item[1])


@pytest.mark.timeout(120)
def test_schedule_runs_once_per_period_never_overlapping(make_registry, make_proxy,
                                                         redis_server, cluster, tmp_path):
    src, dst = make_registry(), make_registry()
    pushed = {tag: images.push_image(src, SRC_REPO, tag) for tag in ("a", "b", "c")}
    proxy = make_proxy(src)
    # The first run's first blob download takes 5 s: that run spans two period starts.
    proxy.delay_next(1, 5.0, "/blobs/", method="GET")
    auth = write_auth_file(tmp_path / "auth.json", src, dst)
    document = json.loads(auth.read_text())
    document[proxy.host] = {}
    auth.write_text(json.dumps(document))
    rules = tmp_path / "mirror.json"
    rules.write_text(json.dumps({f"{proxy.host}/{SRC_REPO}": f"{dst.host}/{DST_REPO}"}))
    pool = cluster(redis_server)
    pool.start("w1", auth, concurrency=2)
    client = redis.Redis.from_url(str(redis_server))
    store = ScheduleStore(client, "mirror")

    # Two schedulers of one schedule (the name defaults to the images file's: "mirror").
    argv = [SYNCER, "schedule", "--auth", str(auth), "--images", str(rules), "--every", "2s"]
    schedulers = [GroupProcess(f"s{i}", argv, pool.env, tmp_path / f"s{i}.log").start()
                  for i in (1, 2)]
    try:
        wait_until(lambda: len(store.run_ids()) >= 1, 20, "the first run")
        first = store.run_ids()[0]
        # While the first run goes on, the next period start is skipped, and says why.
        logs = lambda: "".join(s.log_text() for s in schedulers)  # noqa: E731
        wait_until(lambda: f"skipped: run {first} is still running" in logs(), 15,
                   "a skipped period")
        wait_until(lambda: len(store.run_ids()) >= 3, 30, "two more runs")

        # Both schedulers stopped for three periods and more, then continued: one run for
        # the current period, not one per period missed.
        for s in schedulers:
            os.kill(s.pid, signal.SIGSTOP)
        stopped_in = int(time.time() // EVERY)
        time.sleep(3.5 * EVERY)
        for s in schedulers:
            os.kill(s.pid, signal.SIGCONT)
        woke_in = int(time.time() // EVERY)
        wait_until(lambda: any(t[3] > woke_in for t in run_times(client, store.run_ids(100))),
                   20, "the run of the period after the pause")
        assert "period(s) missed" in logs()
    finally:
        for s in schedulers:
            with_ok = s.running
            s.stop(grace=5.0)
            if with_ok:
                assert s.proc.returncode == 0, s.log_text()[-2000:]

    times = run_times(client, store.run_ids(100))
    periods = [t[3] for t in times]
    # No run for the periods slept through; one for the period the schedulers woke in (unless
    # a run of the period before the stop still ran then), and the next at the next start.
    assert not [p for p in periods if stopped_in < p < woke_in], (stopped_in, woke_in, periods)
    assert [p for p in periods if p >= woke_in][:2] in ([woke_in, woke_in + 1], [woke_in + 1])
    # One run per period, and never two at once (each starts after the previous finished).
    assert len(periods) == len(set(periods)) and periods == sorted(periods), times
    for (_, _, finished, _), (_, created, _, _) in itertools.pairwise(times):
        assert finished and created >= finished, times
    assert times[0][2] - times[0][1] >= 5.0  # the slow first run
    assert periods[1] - periods[0] >= 2  # a period skipped while it ran

    # Every image arrived; `syncer status` lists the schedule's runs and marks them.
    for tag, image in pushed.items():
        assert images.manifest_digest(dst, DST_REPO, tag) == image.digest
    listed = run_syncer(pool.env, "status", "--schedule", "mirror", "--json")
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)["runs"]
    assert {r["run_id"] for r in runs} == {t[0] for t in times}
    assert all(r["schedule"] == "mirror" for r in runs)
    assert sum(r["synced"] for r in runs) == 3  # the first run copied, the others skipped
    plain = run_syncer(pool.env, "status")
    assert re.search(rf"{times[0][0]}\s+done\s+3/3 images, 0 failed  schedule mirror",
                     plain.stdout), plain.stdout
    print(f"\nschedule every 2s: {len(times)} runs for periods {periods} (stopped in "
          f"{stopped_in}, woke in {woke_in}); first run {times[0][2] - times[0][1]:.1f}s")


def test_a_bad_config_stops_the_schedule_at_once(redis_server, tmp_path):
    rules = tmp_path / "broken.yaml"
    rules.write_text("not-a-registry/x: [\n")
    done = run_syncer({**os.environ, "SYNCER_BROKER_URL": str(redis_server)}, "schedule",
                      "--images", str(rules), "--every", "30m", timeout=30)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "broken.yaml" in done.stderr
    bad = run_syncer(dict(os.environ), "schedule", "--images", str(rules), "--every", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr
