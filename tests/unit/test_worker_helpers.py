"""Small worker-side helpers that need no Redis server: the bytes-in-flight reporter, the
Redis-outage fallback, the follower's reap throttle, and scrubbing of Celery's text logs."""

from __future__ import annotations

import io
import logging
import threading
import time

import redis

from workers.liveness import ActivityReporter, LivenessSettings
from workers.reaper import Reaper
from workers.redis_util import RedisOutage, text

SECRET = "S3cr3t-Passw0rd"


def test_activity_is_counted_in_the_stream_and_written_by_its_own_thread():
    written: list[int] = []
    writer = threading.current_thread()
    threads: set[threading.Thread] = set()

    def add(count: int) -> None:
        threads.add(threading.current_thread())
        written.append(count)

    reporter = ActivityReporter(add, every=0.05)
    with reporter:
        for _ in range(10):
            reporter(100)  # never writes: the callback runs between two chunks of a blob
        deadline = time.monotonic() + 5
        while not written and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sum(written) == 1000 and writer not in threads  # flushed in the background
        reporter(24)
    assert sum(written) == 1024  # what was left is written on exit


def test_a_failing_redis_does_not_fail_the_reporter():
    def add(count: int) -> None:
        raise redis.ConnectionError("down")

    with ActivityReporter(add, every=0.01) as reporter:
        reporter(5)
        time.sleep(0.05)


def test_an_outage_falls_back_for_the_backoff_and_warns_once(caplog):
    now = [100.0]
    outage = RedisOutage(logging.getLogger("test.outage"), "not shared for %.0fs (Redis: %s)",
                         backoff=10.0, clock=lambda: now[0])
    assert outage.usable()
    with caplog.at_level(logging.WARNING, logger="test.outage"):
        outage.failed(redis.ConnectionError("x"))
        now[0] += 5
        outage.failed(redis.TimeoutError("y"))  # the same outage: extended, not announced
    assert not outage.usable()
    assert [r.getMessage() for r in caplog.records] == [
        "not shared for 10s (Redis: ConnectionError)"]
    now[0] += 10
    assert outage.usable()


def test_text_of_a_reply():
    assert (text(b"run-1"), text("run-1"), text(3)) == ("run-1", "run-1", "3")


def test_a_followers_reaper_makes_a_pass_per_interval(monkeypatch):
    now = [0.0]
    settings = LivenessSettings(reap_interval=10.0)
    reaper = Reaper(redis.Redis(), lambda *a: None, settings, clock=lambda: now[0])
    passes: list[float] = []
    monkeypatch.setattr(reaper, "safe_reap", lambda: passes.append(now[0]) or 0)
    for _ in range(50):  # a follower polling every 0.5 s for 25 s
        reaper.reap_when_due()
        now[0] += 0.5
    assert passes == [0.0, 10.0, 20.0]


def test_liveness_defaults_come_from_the_settings():
    from workers import settings

    assert LivenessSettings() == LivenessSettings.from_conf({}) == LivenessSettings(
        settings.DEFAULT_HEARTBEAT_INTERVAL, settings.DEFAULT_HEARTBEAT_TTL,
        settings.DEFAULT_REAP_INTERVAL, settings.DEFAULT_MAX_REDELIVERIES)


def test_celery_text_logs_are_scrubbed():
    from celery import signals

    from workers.cli import scrub_celery_logs

    stream = io.StringIO()
    logger = logging.getLogger("test.celery.task")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    receiver = scrub_celery_logs(lambda: (SECRET,))
    try:
        signals.after_setup_task_logger.send(sender=None, logger=logger, loglevel="INFO",
                                             logfile=None, format="", colorize=False)
        logger.warning("connecting with %s", SECRET)
    finally:
        signals.after_setup_logger.disconnect(receiver)
        signals.after_setup_task_logger.disconnect(receiver)
        logger.removeHandler(handler)
    assert stream.getvalue() == "connecting with ***\n"
