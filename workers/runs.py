"""A distributed run seen from the command line: create it, enqueue its jobs, follow it.

Kept apart from :mod:`workers.cli` so that the embedded commands (``copy``, ``sync``) do not
import Redis and Celery at all — they start faster and smaller.

Following a run (:func:`wait_for`) also keeps it alive: the follower runs a reaper
(:mod:`workers.reaper`) that enqueues again the jobs of lost workers, and it gives up with
:class:`RunStalled` when nothing moves for ``stall_timeout`` seconds. *Progress* is any job
changing state (started, retried, recovered, finished) or bytes moving in a copy in flight
(workers feed the run's ``activity`` counter every couple of seconds while a blob streams),
so an hour-long copy of one big layer is progress, and a job waiting for a worker that never
comes — or running on a worker wedged without moving a byte — is not.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable

import redis

from syncer.plan.jobs import Job, Plan
from syncer.run.ledger import FINAL_STATES, JobRecord, RunSummary
from syncer.run.progress import ProgressView
from workers.context import redis_client
from workers.redis_ledger import RUNS_KEY, RedisLedger, indexed_runs
from workers.settings import DEFAULT_STALL_TIMEOUT


class RunStalled(Exception):
    """No progress for ``idle`` seconds; ``unfinished`` are the jobs not yet final."""

    def __init__(self, summary: RunSummary, unfinished: list[JobRecord], idle: float):
        self.summary = summary
        self.unfinished = unfinished
        self.idle = idle
        super().__init__(f"run {summary.run_id}: no progress for {idle:.0f}s, "
                         f"{len(unfinished)} image(s) not finished")


def new_run_id() -> str:
    """A sortable, unique run id such as ``run-20261128-031500-3f9a``."""
    return time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def open_ledger(run_id: str) -> RedisLedger:
    """The ledger of ``run_id`` in the configured Redis."""
    return RedisLedger(redis_client(), run_id)


def recent_runs(limit: int = 20, *, records: bool = True) -> list[RunSummary]:
    """Summaries of the newest runs still in Redis, newest first (``records``: see
    :func:`~workers.redis_ledger.indexed_runs`)."""
    return indexed_runs(redis_client(), RUNS_KEY, limit, records=records)


#: Task messages per Redis pipeline (an ``LPUSH`` each) when enqueueing, and ``task-sent``
#: events per ``task.multi`` event message.
ENQUEUE_BATCH = 1000


def _task_args(run_id: str, job: Job, retries: int) -> tuple[tuple, str]:
    """The task's arguments, and their ``argsrepr`` (what Flower and the logs show)."""
    return (run_id, job.to_dict(), retries), f"({run_id!r}, {job.label!r})"


def send_job(run_id: str, job: Job, retries: int, *, producer=None) -> None:
    """Send one ``sync_image`` task for ``job`` of run ``run_id`` (through ``producer``, a
    kombu producer of the app, when given)."""
    from workers.tasks import sync_image

    args, argsrepr = _task_args(run_id, job, retries)
    sync_image.apply_async(args=args, argsrepr=argsrepr, producer=producer)


def send_jobs(run_id: str, jobs: Iterable[Job], retries: int, *,
              batch: int = ENQUEUE_BATCH, producer=None) -> int:
    """Send one ``sync_image`` task per job, pipelined; returns how many were sent.

    The task messages are those :func:`send_job` sends — same headers, serializer and
    signature (``SYNCER_SECURITY_*``, :mod:`workers.signing`); the test
    ``test_batched_messages_are_those_apply_async_sends`` compares them — sent through one
    producer inside kombu's ``Producer.batch``, which buffers their ``LPUSH`` commands and
    runs ``batch`` of them per pipeline: one round trip per pipeline instead of one (and a
    new Redis client) per message. :class:`_BatchSender` also skips the per-call set-up of
    ``apply_async``, which costs more CPU than the publishing itself. Their ``task-sent``
    events (for Flower) carry the same fields but travel ``batch`` to a message, as the
    ``task.multi`` events Celery workers send for their own task events (Celery's event
    receivers, Flower's too, read both). With a kombu (< 5.7) or a transport without batch
    publishing, each message is ``apply_async`` on one producer.

    A pipeline that fails part-way raises ``kombu.exceptions.BatchPublishError``: some of its
    messages may be queued. ``producer``: the app's producer to use (default: one from the
    app's pool).
    """
    from workers.app import app
    from workers.tasks import sync_image

    sent = 0
    with app.producer_or_acquire(producer) as chosen:
        batching = getattr(chosen, "batch", None)
        if batching is None:
            for job in jobs:
                send_job(run_id, job, retries, producer=chosen)
                sent += 1
            return sent
        sender = _BatchSender(app, app.tasks[sync_image.name], chosen, batch)
        try:
            with batching(max_size=batch):
                for job in jobs:
                    sender.send(*_task_args(run_id, job, retries))
                    sent += 1
            sender.flush_events()
        finally:
            sender.close()
    return sent


class _BufferedSentEvents:
    """The one method ``send_task_message`` calls on an event dispatcher, ``publish``, turned
    into Celery's buffered ``send``: ``task-sent`` events leave ``limit`` to a ``task.multi``
    message (what a worker's dispatcher does with its task events)."""

    def __init__(self, app, producer, limit: int):
        # Like the dispatcher send_task_message uses by default (app.amqp's): same host
        # name, pid, clock, exchange and serializer; publishing on the producer's channel.
        self.dispatcher = app.events.Dispatcher(channel=producer.channel,
                                                buffer_group=["task"], buffer_limit=limit)

    def publish(self, type: str, fields: dict, producer, **_options) -> None:
        """Buffer one event (published when ``limit`` are waiting, or at :meth:`flush`)."""
        self.dispatcher.send(type, **fields)

    def flush(self) -> None:
        """Publish the events still buffered."""
        self.dispatcher.flush()

    def close(self) -> None:
        """Stop publishing (the channel stays the producer's)."""
        self.dispatcher.close()


class _BatchSender:
    """Sends task messages as ``task.apply_async(args=…, argsrepr=…)`` does, with Celery's own
    message builder and publisher (``app.amqp.create_task_message`` / ``send_task_message``),
    but does once what ``apply_async`` and ``app.send_task`` redo per call.

    The steps mirror ``celery.app.task.Task.apply_async`` and ``celery.app.base.Celery.send_task``
    (Celery 5.7) for a call without countdown, eta, links or parent task. Where those
    would do more (eager mode, a task expiry, a result backend to notify, a call from inside
    a task, an overridden ``apply_async``), every message goes through ``apply_async``.
    Inside a publish batch nothing reaches Redis before the flush, so after the first message
    (which declares the queue, retried as configured) the rest are published without a
    per-message declare check and retry wrapper: a failed flush raises, it is not replayed.
    """

    def __init__(self, app, task, producer, events_per_message: int = ENQUEUE_BATCH):
        from celery import Task
        from celery.app.task import extract_exec_options
        from kombu.utils.uuid import uuid

        self.app, self.task, self.producer, self.uuid = app, task, producer, uuid
        self.amqp = app.amqp
        self.exec_options = extract_exec_options(task)
        self.first = True
        self.fast = (
            not app.conf.task_always_eager
            and app.current_worker_task is None
            and self.exec_options.get("expires") is None
            and bool(task.ignore_result)
            and type(task).apply_async is Task.apply_async
        )
        self.events = _BufferedSentEvents(app, producer, events_per_message) if self.fast else None

    def flush_events(self) -> None:
        """Publish the ``task-sent`` events still buffered."""
        if self.events is not None:
            self.events.flush()

    def close(self) -> None:
        """Release the event dispatcher."""
        if self.events is not None:
            self.events.close()

    def send(self, args: tuple, argsrepr: str) -> None:
        """Publish one message for ``args`` (into the producer's batch)."""
        if not self.fast:
            self.task.apply_async(args=args, argsrepr=argsrepr, producer=self.producer)
            return
        task, name = self.task, self.task.name
        # Task.apply_async: execution options under the call's own, ignore_result, shadow.
        options = dict(self.exec_options, argsrepr=argsrepr)
        shadow = task.shadow_name(args, None, options)
        options.setdefault("ignore_result", task.ignore_result)
        # Celery.send_task: limits and ignore_result leave the options, then routing.
        time_limit = options.pop("time_limit", None)
        soft_time_limit = options.pop("soft_time_limit", None)
        options.pop("expires", None)
        ignore_result = options.pop("ignore_result", None)
        options = self.amqp.router.route(options, name, args, None, task)
        task_id = self.uuid()
        message = self.amqp.create_task_message(
            task_id, name, args, None, None, None, None, None, None, 0, None, None, None,
            self.app.thread_oid, time_limit, soft_time_limit,
            self.app.conf.task_send_sent_event, None, None, shadow, None,
            ignore_result=ignore_result, replaced_task_nesting=0, **options,
        )
        if not self.first:
            options.update(declare=[], retry=False)
        self.first = False
        self.amqp.send_task_message(self.producer, name, message,
                                    event_dispatcher=self.events, **options)


def enqueue(plan: Plan, retries: int) -> RedisLedger:
    """Create a run for ``plan`` and send one ``sync_image`` task per job (pipelined)."""
    ledger = open_ledger(new_run_id())
    ledger.begin(plan.jobs, plan.failures, retries=retries)
    send_jobs(ledger.run_id, plan.jobs, retries)
    return ledger


def planner_reaper(client: redis.Redis) -> Callable[[], int]:
    """The reaper of a follower (no instance of its own), with the workers' settings: call it
    at every look at the run; it makes a pass every ``syncer_reap_interval``
    (``SYNCER_REAP_INTERVAL``) seconds (:meth:`~workers.reaper.Reaper.reap_when_due`)."""
    from workers.app import app
    from workers.liveness import LivenessSettings
    from workers.reaper import Reaper

    return Reaper(client, send_job, LivenessSettings.from_conf(app.conf)).reap_when_due


class _ProgressWatch:
    """Remembers when the run last moved (a job's state or attempts, or bytes in flight)."""

    def __init__(self, stall_timeout: float | None, clock: Callable[[], float]):
        self.stall_timeout = stall_timeout
        self.clock = clock
        self._seen: object = None
        self._moved_at = clock()

    def observe(self, fingerprint: object) -> None:
        """Note the run's current shape (:meth:`RedisLedger.progress`); any difference from
        the last one is progress."""
        if fingerprint != self._seen:
            self._seen, self._moved_at = fingerprint, self.clock()

    @property
    def idle(self) -> float:
        """Seconds since the run last moved."""
        return self.clock() - self._moved_at

    @property
    def stalled(self) -> bool:
        """True once idle for longer than the stall timeout (never, if there is none)."""
        return bool(self.stall_timeout) and self.idle > self.stall_timeout


def wait_for(
    ledger: RedisLedger,
    *,
    show_progress: bool,
    poll: float = 0.2,
    stall_timeout: float | None = None,
    reap: Callable[[], int] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> RunSummary:
    """Poll the ledger until every job is final (riding out a Redis restart); return the
    final summary.

    A poll reads the run's counts only (:meth:`RedisLedger.tally`, one script, no job record:
    about a millisecond, so ``poll`` can be short — a run ends at most ``poll`` seconds after
    its last job); the full summary is read once, at the end (or for the stall report).
    ``reap()`` runs at every poll (by default :func:`planner_reaper`, which throttles itself;
    pass ``reap=lambda: 0`` for none). Raises :class:`RunStalled` after ``stall_timeout``
    seconds without progress (None: the default, 600 s; 0: wait forever), and
    :class:`~workers.redis_ledger.RunNotFound` if the run vanishes.
    """
    if reap is None:
        reap = planner_reaper(ledger.redis)
    if stall_timeout is None:
        stall_timeout = DEFAULT_STALL_TIMEOUT
    watch = _ProgressWatch(stall_timeout, clock)
    with ProgressView(ledger.counts, enabled=show_progress):
        while True:
            try:
                tally = ledger.tally()
                watch.observe(tally.progress)
                if tally.summary.complete or watch.stalled:
                    summary = ledger.summary()
                    if summary.complete:
                        return summary
                    if watch.stalled:
                        unfinished = [r for r in ledger.records()
                                      if r.state not in FINAL_STATES]
                        raise RunStalled(summary, unfinished, watch.idle)
            except redis.ConnectionError:
                pass  # Redis restarting: keep waiting
            reap()
            time.sleep(poll)
