"""Planning at scale: 20 repositories of 500 tags planned and enqueued by the real ``syncer plan``
against a real redis-server, then read back by ``syncer status``.

A real distribution registry holding 10,000 tags takes minutes to fill, and planning only lists
tags, so a stand-in serves the tags lists: paginated like a hosted registry (at most
:data:`PAGE_CAP` per page, ``Link: <...>; rel="next"`` until the last page — OCI distribution
spec, "Listing Tags"). What is asserted is correctness at scale — every job enqueued exactly
once, in a message a worker accepts, and the ledger's totals right — not the time; the times
are printed (``pytest -s``) for the README's figure.

Run ``python -m tests.integration.test_planning_scale`` for the figures alone.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from syncer.plan.jobs import Job
from tests.support.celery_workers import USER_DEFAULTS, run_syncer, syncer_env
from tests.support.httpserver import BackgroundServer, JsonHandler

REPOSITORIES = 20
TAGS_PER_REPOSITORY = 500
PAGE_CAP = 100  # Docker Hub's and Harbor's cap; distribution 3 pages by ``n`` too
QUEUE = "syncer"  # workers.settings.QUEUE
DESTINATION = "127.0.0.1:9/mirror"  # never contacted: planning lists sources only


def repository_names(count: int = REPOSITORIES) -> list[str]:
    """The stand-in's repositories, ``proj/app00`` … ."""
    return [f"proj/app{i:02d}" for i in range(count)]


def tag_names(count: int = TAGS_PER_REPOSITORY) -> list[str]:
    """Each repository's tags, in the lexical order a registry lists them."""
    return sorted(f"v{i}" for i in range(count))


class TagsRegistry(JsonHandler):
    """``GET /v2/`` and ``GET /v2/<name>/tags/list?n=&last=`` for :func:`repository_names`.

    Pages hold ``min(n, PAGE_CAP)`` tags after ``last``; every page but the last carries a
    ``Link`` header to the next one, as the spec describes.
    """

    protocol_version = "HTTP/1.1"  # keep-alive, like a real registry
    tags = tag_names()
    repositories = frozenset(repository_names())
    pages_served = 0

    def do_GET(self) -> None:
        """Serve the ping and the tags lists; anything else is NAME_UNKNOWN."""
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/v2/":
            return self.reply(200, {})
        name = url.path[len("/v2/"):-len("/tags/list")] if url.path.endswith("/tags/list") else ""
        if name not in self.repositories:
            return self.reply(404, {"errors": [{"code": "NAME_UNKNOWN", "message": name}]})
        query = urllib.parse.parse_qs(url.query)
        size = min(int(query.get("n", [PAGE_CAP])[0]), PAGE_CAP)
        last = query.get("last", [""])[0]
        remaining = [tag for tag in self.tags if tag > last] if last else list(self.tags)
        page = remaining[:size]
        headers = {}
        if len(remaining) > size:
            following = urllib.parse.urlencode({"n": size, "last": page[-1]})
            headers["Link"] = f'</v2/{name}/tags/list?{following}>; rel="next"'
        type(self).pages_served += 1
        return self.reply(200, {"name": name, "tags": page}, headers)


@pytest.fixture
def tags_registry() -> Iterator[BackgroundServer]:
    """The stand-in registry, serving on loopback."""
    TagsRegistry.pages_served = 0
    with BackgroundServer(TagsRegistry, "tags-registry") as server:
        yield server


def write_rules(directory: Path, source_host: str) -> Path:
    """An images file: every repository of the stand-in, all tags, to :data:`DESTINATION`."""
    path = directory / "images.json"
    rules = {f"{source_host}/{name}": f"{DESTINATION}/{name.split('/')[-1]}"
             for name in repository_names()}
    path.write_text(json.dumps(rules))
    auth = directory / "auth.json"
    auth.write_text(json.dumps({source_host: {"insecure": True}}))
    return path


def expected_jobs(source_host: str) -> set[tuple[str, str]]:
    """Every (source, destination) pair the plan must hold."""
    return {(f"{source_host}/{name}:{tag}", f"{DESTINATION}/{name.split('/')[-1]}:{tag}")
            for name in repository_names() for tag in tag_names()}


def queued_jobs(client: redis.Redis) -> list[tuple[str, str, list]]:
    """``(task name, task id, args)`` of every message waiting in the queue (kombu's Redis
    list; a signed body would be Celery's ``auth`` envelope, these tests plan unsigned)."""
    found = []
    for raw in client.lrange(QUEUE, 0, -1):
        message = json.loads(raw)
        assert message["content-type"] == "application/json"
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        found.append((message["headers"]["task"], message["headers"]["id"], args))
    return found


class EventListener(threading.Thread):
    """Collects the task events published on Celery's event exchange (kombu's Redis fanout:
    PUBLISH to ``/<db>.celeryev/<routing key>``), as Flower would receive them."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.subscriber = redis.Redis.from_url(url).pubsub()
        self.subscriber.psubscribe("*celeryev*")
        self.events: list[dict] = []
        self.done = threading.Event()

    def run(self) -> None:
        """Read until :meth:`stop`."""
        while not self.done.is_set():
            item = self.subscriber.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if item is not None:
                body = json.loads(base64.b64decode(json.loads(item["data"])["body"]))
                self.events.extend(body if isinstance(body, list) else [body])

    def stop(self) -> list[dict]:
        """Read what is still waiting, stop, and return the events."""
        time.sleep(0.5)
        self.done.set()
        self.join(timeout=10)
        self.subscriber.close()
        return self.events


def timed(env: dict, *args: str) -> tuple[float, float, str]:
    """Run ``syncer ARGS``; (wall seconds, its CPU seconds, stdout), asserting it exits 0.

    On a busy machine the CPU time (user + system) is the steadier figure."""
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = run_syncer(env, *args, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    elapsed = time.perf_counter() - started
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert done.returncode == 0, f"syncer {args[0]} exited {done.returncode}:\n{done.stderr}"
    return elapsed, cpu, done.stdout


def plan_and_read(tmp_path: Path, broker_url: str, source_host: str) -> dict:
    """``syncer plan --json`` then ``syncer status --json`` of the run; the figures."""
    env = syncer_env(broker_url, tmp_path / "env", **USER_DEFAULTS)
    images = write_rules(tmp_path, source_host)
    figures: dict = {}
    figures["plan"], figures["plan_cpu"], out = timed(
        env, "plan", "--auth", str(tmp_path / "auth.json"), "--images", str(images), "--json")
    figures["planned"] = json.loads(out)
    figures["status"], figures["status_cpu"], out = timed(
        env, "status", figures["planned"]["run_id"], "--json")
    figures["summary"] = json.loads(out)
    # Interpreter and import start-up, paid by every command: ``syncer --help``.
    figures["startup"], figures["startup_cpu"], _ = timed(env, "--help")
    return figures


def describe(figures: dict) -> str:
    """One line of figures: wall time (CPU time of the command) for each command."""
    return ", ".join(f"{label} {figures[key]:.2f} s (CPU {figures[key + '_cpu']:.2f} s)"
                     for label, key in (("plan+enqueue", "plan"), ("status", "status"),
                                        ("start-up (--help)", "startup")))


@pytest.mark.timeout(180)
def test_ten_thousand_tags_are_planned_enqueued_once_and_counted(
        tags_registry, redis_server, tmp_path):
    listener = EventListener(str(redis_server))
    listener.start()
    figures = plan_and_read(tmp_path, str(redis_server), tags_registry.host)
    events = listener.stop()
    total = REPOSITORIES * TAGS_PER_REPOSITORY
    planned, status = figures["planned"], figures["summary"]
    assert planned["jobs"] == total and planned["failures"] == []
    # Listing followed every page of every repository (500 tags at 100 per page).
    assert TagsRegistry.pages_served == REPOSITORIES * (TAGS_PER_REPOSITORY // PAGE_CAP)

    client = redis.Redis.from_url(str(redis_server))
    queued = queued_jobs(client)
    assert len(queued) == total  # exactly one message per job …
    assert {name for name, _, _ in queued} == {"syncer.sync_image"}
    run_ids = {args[0] for _, _, args in queued}
    assert run_ids == {planned["run_id"]}
    pairs = [(args[1]["source"], args[1]["destination"]) for _, _, args in queued]
    assert len(set(pairs)) == total  # … no job twice …
    assert set(pairs) == expected_jobs(tags_registry.host)  # … and none missing
    assert all(Job.from_dict(args[1]).source for _, _, args in queued)
    # Flower hears of each of them once: a task-sent event per queued task id.
    sent = [event["uuid"] for event in events if event["type"] == "task-sent"]
    assert len(sent) == total and set(sent) == {task_id for _, task_id, _ in queued}

    # The ledger: every job pending, the totals right, the run listed.
    prefix = f"syncer:run:{planned['run_id']}:"
    assert client.hlen(prefix + "jobs") == total
    assert client.hlen(prefix + "state") == total
    assert set(client.hvals(prefix + "state")) == {b"pending"}
    assert (status["total"], status["pending"], status["synced"], status["failed"]) == (
        total, total, 0, 0)
    assert client.zscore("syncer:runs", planned["run_id"]) is not None

    print(f"\n{total} tags, {REPOSITORIES} repositories, {PAGE_CAP} per page: {describe(figures)}")


def _without_ids(message: dict) -> dict:
    """A queued kombu message without what differs per message: the task id and kombu's
    delivery tag."""
    message["properties"].pop("delivery_tag")
    message["properties"].pop("correlation_id", None)
    for name in ("id", "root_id"):
        message["headers"].pop(name, None)
    return message


def _events(raw: bytes) -> list[dict]:
    """The events a published ``celeryev`` message carries (one, or a ``task.multi`` list),
    without their task ids, clocks and timestamps."""
    body = json.loads(base64.b64decode(json.loads(raw)["body"]))
    events = body if isinstance(body, list) else [body]
    for event in events:
        for name in ("uuid", "root_id", "clock", "timestamp"):
            event.pop(name)
    return events


def test_batched_messages_are_those_apply_async_sends(redis_server):
    """``send_jobs`` (pipelined, Celery's builder without apply_async's per-call set-up)
    queues the task message ``apply_async`` does, apart from the ids, the first batched
    message and a later one alike; their task-sent events carry the same fields, in one
    ``task.multi`` message."""
    from workers.app import app
    from workers.runs import send_job, send_jobs

    client = redis.Redis.from_url(str(redis_server))
    subscriber = client.pubsub()
    subscriber.psubscribe("*celeryev*")
    assert subscriber.get_message(timeout=5)["type"] == "psubscribe"
    job = Job("src.io/team/app:v1", "dst.io/mirror/app:v1")
    with app.connection_for_write(str(redis_server)) as connection:
        producer = app.amqp.Producer(connection, auto_declare=False)
        send_job("run-a", job, 2, producer=producer)  # apply_async, one round trip
        assert send_jobs("run-a", [job, job], 2, producer=producer) == 2
    # LPUSH, and workers BRPOP: the oldest message is the last of the list.
    queued = [json.loads(raw) for raw in reversed(client.lrange(QUEUE, 0, -1))]
    assert len({m["headers"]["id"] for m in queued}) == 3
    single, first, later = (_without_ids(m) for m in queued)
    assert first == single and later == single
    assert single["headers"]["argsrepr"] == f"('run-a', '{job.label}')"
    published = []
    while (item := subscriber.get_message(timeout=2)) is not None:
        published.append(item)
    subscriber.close()
    assert [item["channel"].rsplit(b"/", 1)[1] for item in published] == [
        b"task.sent", b"task.multi"]
    (sent,) = _events(published[0]["data"])
    assert sent["type"] == "task-sent" and sent["args"] == single["headers"]["argsrepr"]
    assert _events(published[1]["data"]) == [sent, sent]


def _main() -> None:
    """Print the figures: a private redis-server, the stand-in, ``syncer plan`` / ``status``."""
    from tests.support.registry import RedisServer

    with tempfile.TemporaryDirectory() as directory, \
            RedisServer(Path(directory) / "redis") as server, \
            BackgroundServer(TagsRegistry, "tags-registry") as registry:
        for attempt in range(int(os.environ.get("ROUNDS", "3"))):
            server_client = redis.Redis.from_url(server.url)
            server_client.flushall()
            work = Path(directory) / f"round{attempt}"
            work.mkdir()
            figures = plan_and_read(work, server.url, registry.host)
            print(f"round {attempt + 1}: {describe(figures)}", file=sys.stderr)


if __name__ == "__main__":
    _main()
