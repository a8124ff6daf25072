"""Workers trust no message blindly: real ``redis-server``, real ``syncer worker`` processes,
real registries, task messages forged straight into the broker from this test process.

Anyone who can write to Redis can enqueue a ``sync_image`` task. These tests play that
attacker: a Celery client of their own (the protocol the planner speaks) sends tasks naming a
destination the worker's auth file does not name; the worker must refuse them, record them
failed, and contact nothing — counted at a proxy in front of the untrusted registry and of the
source. With Celery's message signing on, an unsigned message and one signed by a key outside
the worker's cert store are refused before any task code runs, while a run planned by
``syncer plan`` (signing with the shared key) lands digest-identical.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.security.certificate import Certificate
from celery.security.key import PrivateKey
from celery.security.serialization import SecureSerializer
from celery.utils import uuid
from kombu.serialization import dumps

from syncer.plan.jobs import Job
from syncer.run.ledger import JobRecord
from tests.support import images
from tests.support.celery_workers import WorkerPool, WorkerProcess, run_syncer
from tests.support.clients import write_auth_file
from tests.support.ports import wait_until
from tests.support.tls import make_token_signing_material
from workers.redis_ledger import RedisLedger

pytestmark = pytest.mark.integration

SRC_REPO, DST_REPO = "src/app", "dst/app"
TASK, QUEUE = "syncer.sync_image", "syncer"


# --------------------------------------------------------------------------- fixtures




# --------------------------------------------------------------------------- helpers


def forge_task(broker_url: str, run_id: str, job: Job | dict, *,
               signer: tuple[Path, Path] | None = None) -> str:
    """Put a ``sync_image`` task message on the queue the way any Redis client could: the
    Celery protocol-2 message the planner sends, its body plain JSON, or signed with
    ``signer`` = (key, certificate) through Celery's own SecureSerializer. Returns its id."""
    app = Celery("forger", broker=str(broker_url), set_as_current=False)
    payload = job.to_dict() if isinstance(job, Job) else job
    task_id = uuid()
    headers, properties, body, _ = app.amqp.as_task_v2(task_id, TASK, args=(run_id, payload, 0))
    if signer is None:
        content_type, encoding, data = dumps(body, serializer="json")
    else:
        key, cert = signer
        serializer = SecureSerializer(PrivateKey(key.read_text()), Certificate(cert.read_text()),
                                      digest="sha256", serializer="json")
        content_type, encoding, data = "application/data", "utf-8", serializer.serialize(body)
    try:
        with app.producer_or_acquire() as producer:
            producer.publish(data, exchange=QUEUE, routing_key=QUEUE, headers=headers,
                             content_type=content_type, content_encoding=encoding,
                             declare=[app.amqp.queues[QUEUE]], retry=True, **properties)
    finally:
        app.close()
    return task_id


def new_run(url: str, run_id: str, *jobs: Job) -> RedisLedger:
    """A run in the ledger holding ``jobs`` (what the planner, or an attacker, writes)."""
    ledger = RedisLedger(redis.Redis.from_url(str(url)), run_id)
    ledger.begin(list(jobs), [])
    return ledger


def record_of(ledger: RedisLedger, job: Job) -> JobRecord:
    return next(r for r in ledger.records() if r.id == job.id)


def wait_complete(ledger: RedisLedger, pool: WorkerPool, timeout: float = 30) -> None:
    wait_until(lambda: ledger.summary().complete, timeout,
               f"run {ledger.run_id} to complete\n{pool.report()}")


def queue_is_drained(url: str) -> bool:
    """Nothing waiting and nothing delivered-but-unacknowledged (no redelivery loop)."""
    client = redis.Redis.from_url(str(url))
    return client.llen(QUEUE) == 0 and client.hlen("unacked") == 0


def touching(proxy, *needles: str) -> list:
    """The proxy's records whose path contains any of ``needles``."""
    return [r for r in proxy.records if any(n in r.path for n in needles)]


def signed_envelope(message: dict) -> list[bytes]:
    """Celery's ``auth`` envelope of a queued kombu message: signer, signature, inner content
    type, inner encoding, inner body (celery/security/serialization.py)."""
    assert message["properties"]["body_encoding"] == "base64"
    fields = base64.b64decode(base64.b64decode(message["body"])).split(b"\x00\x01", 4)
    return [base64.b64decode(fields[0]), base64.b64decode(fields[1]), *fields[2:]]


def make_signer(directory: Path) -> tuple[Path, Path, Path]:
    """An RSA key, its self-signed certificate, and a cert store (a directory holding only
    that certificate): ``(key, certificate, store)``."""
    material = make_token_signing_material(directory, common_name="image-syncer task signer")
    store = directory / "trusted"
    store.mkdir()
    shutil.copy(material.cert_path, store / "signer.pem")
    return material.key_path, material.cert_path, store


def start_worker(pool: WorkerPool, name: str, auth: Path | None, *extra_args: str,
                 wait: bool = True) -> WorkerProcess:
    """Start ``syncer worker`` with extra command-line arguments (stopped with the pool)."""
    worker = WorkerProcess(name, auth, pool.env, pool.directory / f"{name}.log")
    worker.argv += list(extra_args)
    pool.workers.append(worker)
    return worker.start(wait=wait)


# --------------------------------------------------------------------------- allowlist


@pytest.mark.timeout(90)
@pytest.mark.parametrize("worker_pool", ["threads", "prefork"])
def test_forged_task_to_an_untrusted_registry_is_refused_and_nothing_is_pushed(
        make_registry, make_proxy, redis_server, cluster, tmp_path, worker_pool):
    src, dst, evil = make_registry(), make_registry(), make_registry()
    legit = images.push_image(src, SRC_REPO, "v1", seed="legit")
    private = images.push_image(src, SRC_REPO, "private", seed="private")
    src_proxy, evil_proxy = make_proxy(src), make_proxy(evil)
    auth = write_auth_file(tmp_path / "auth.json", src_proxy, dst)  # evil is not in it
    pool = cluster(redis_server)
    # prefork: the refusal is raised in a child and rebuilt in the parent (it must survive)
    (worker,) = pool.start_many(["w1"], auth, pool=worker_pool)
    assert (f"copies only from and to: {src_proxy.host}, {dst.host}"
            in worker.log_text()), worker.log_text()

    good = Job(f"{src_proxy.host}/{SRC_REPO}:v1", f"{dst.host}/{DST_REPO}:v1")
    forged = Job(f"{src_proxy.host}/{SRC_REPO}:private", f"{evil_proxy.host}/loot/app:private")
    ledger = new_run(redis_server, "run-forged-0001", good, forged)
    forge_task(redis_server, ledger.run_id, forged)
    forge_task(redis_server, ledger.run_id, good)
    # And one naming no run at all: refused and logged, nothing written to Redis for it.
    stray = Job(f"{src_proxy.host}/{SRC_REPO}:private", f"{evil_proxy.host}/loot/app:stray")
    forge_task(redis_server, "run-that-does-not-exist", stray)

    wait_complete(ledger, pool)
    reason = f"refused: destination registry {evil_proxy.host} is not in this worker's allowlist"
    refused = record_of(ledger, forged)
    assert (refused.state, refused.reason, refused.attempts) == ("failed", reason, 0)
    landed = record_of(ledger, good)
    assert (landed.state, landed.digest) == ("synced", legit.digest)
    assert images.manifest_digest(dst, DST_REPO, "v1") == legit.digest
    assert not images.walk_image(dst, DST_REPO, "v1").missing
    summary = ledger.summary()
    assert (summary.total, summary.synced, summary.failed) == (2, 1, 1)

    worker.wait_for_log(r"run-that-does-not-exist.*nothing recorded", 20, "the stray refusal")
    wait_until(lambda: queue_is_drained(redis_server), 10, "the queue to drain")
    # Nothing contacted the untrusted registry; the private image was never even read.
    assert evil_proxy.records == []
    assert images.catalog(evil) == []
    assert touching(src_proxy, "private", private.digest, *private.blob_digests) == []
    assert touching(src_proxy, "/manifests/v1")  # the legit job did go through the proxy
    client = redis.Redis.from_url(str(redis_server))
    assert not list(client.scan_iter("syncer:run:run-that-does-not-exist:*"))

    log = worker.log_text()
    assert f"{reason} (run 'run-forged-0001')" in log
    assert log.count("is not in this worker's allowlist (run ") == 2  # ours, one per task


@pytest.mark.timeout(90)
def test_worker_without_auth_or_allowlist_refuses_everything_until_told(
        make_registry, redis_server, cluster, tmp_path):
    src, dst = make_registry(), make_registry()
    pushed = images.push_image(src, SRC_REPO, "v1")
    pool = cluster(redis_server)
    job = Job(f"{src.host}/{SRC_REPO}:v1", f"{dst.host}/{DST_REPO}:v1")

    # No auth file, no allowlist (and an empty docker config): it starts, and says so.
    blind = start_worker(pool, "w0", None)
    assert "trusts no registry and will refuse every task" in blind.log_text()
    first = new_run(redis_server, "run-blind-0001", job)
    forge_task(redis_server, first.run_id, job)
    wait_complete(first, pool)
    assert record_of(first, job).reason == (
        f"refused: source registry {src.host} is not in this worker's allowlist")
    assert images.manifest_digest(dst, DST_REPO, "v1") is None
    blind.stop()

    # A bad entry stops the worker before it starts, with the reason.
    bad = run_syncer(pool.env, "worker", "--allow-registry", "https://x.example.com", timeout=30)
    assert bad.returncode == 2
    assert "without a scheme" in bad.stderr and "Traceback" not in bad.stderr

    # --allow-registry (repeatable; HOST/NAMESPACE narrows to a namespace) opens exactly that.
    told = start_worker(pool, "w1", None, "--allow-registry", src.host,
                        "--allow-registry", f"{dst.host}/dst")
    assert f"copies only from and to: {src.host}, {dst.host}/dst" in told.log_text()
    elsewhere = Job(job.source, f"{dst.host}/elsewhere/app:v1")
    second = new_run(redis_server, "run-told-0001", job, elsewhere)
    forge_task(redis_server, second.run_id, job)
    forge_task(redis_server, second.run_id, elsewhere)
    wait_complete(second, pool)
    assert record_of(second, job).state == "synced"
    assert images.manifest_digest(dst, DST_REPO, "v1") == pushed.digest
    assert record_of(second, elsewhere).reason == (
        f"refused: destination {dst.host}/elsewhere/app is outside the namespaces this "
        f"worker's allowlist names for {dst.host}")
    assert images.manifest_digest(dst, "elsewhere/app", "v1") is None


# --------------------------------------------------------------------------- signing


@pytest.mark.timeout(120)
def test_signed_messages_run_and_unsigned_or_foreign_ones_are_rejected(
        make_registry, make_proxy, redis_server, cluster, tmp_path):
    key, cert, store = make_signer(tmp_path / "signer")
    other_key, other_cert, _ = make_signer(tmp_path / "stranger")  # not in the cert store
    pool = cluster(redis_server, extra={
        "SYNCER_SECURITY_KEY": str(key),
        "SYNCER_SECURITY_CERTIFICATE": str(cert),
        "SYNCER_SECURITY_CERT_STORE": str(store),
    })
    src, dst = make_registry(), make_registry()
    dst_proxy = make_proxy(dst)
    pushed = {tag: images.push_image(src, SRC_REPO, tag) for tag in ("v1", "v2", "v3")}
    auth = write_auth_file(tmp_path / "auth.json", src, dst_proxy)
    rules = tmp_path / "images.json"
    rules.write_text(json.dumps({f"{src.host}/{SRC_REPO}:v1,v2": f"{dst_proxy.host}/{DST_REPO}"}))

    # 1. The planner signs: what waits in Redis is Celery's 'auth' envelope, not plain JSON.
    done = run_syncer(pool.env, "plan", "--auth", str(auth), "--images", str(rules), "--json",
                      timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = json.loads(done.stdout)["run_id"]
    client = redis.Redis.from_url(str(redis_server))
    queued = [json.loads(raw) for raw in client.lrange(QUEUE, 0, -1)]
    assert len(queued) == 2
    assert {m["content-type"] for m in queued} == {"application/data"}
    for message in queued:
        signer, signature, inner_type, _, body = signed_envelope(message)
        assert signer.startswith(b"image-syncer tests image-syncer task signer ")  # issuer serial
        assert len(signature) == 256 and inner_type == b"application/json"  # RSA-2048, JSON
        assert f"{src.host}/{SRC_REPO}:v".encode() in body

    # 2. A worker with the same key material verifies and runs them, end to end.
    (worker,) = pool.start_many(["w1"], auth)
    assert f"message signing on: signing with {cert}" in worker.log_text()
    ledger = RedisLedger(client, run_id)
    wait_complete(ledger, pool)
    summary = ledger.summary()
    assert (summary.synced, summary.failed) == (2, 0), [r.reason for r in ledger.records()]
    for tag in ("v1", "v2"):
        assert images.manifest_digest(dst, DST_REPO, tag) == pushed[tag].digest
        assert not images.walk_image(dst, DST_REPO, tag).missing

    # 3. An unsigned message and one signed by a stranger, both for a job the allowlist
    #    would accept: rejected on arrival, never run, never redelivered, nothing pushed.
    before = len(dst_proxy.records)
    job = Job(f"{src.host}/{SRC_REPO}:v3", f"{dst_proxy.host}/{DST_REPO}:v3")
    forged = new_run(redis_server, "run-unsigned-0001", job)
    forge_task(redis_server, forged.run_id, job)
    worker.wait_for_log(r"Refusing to deserialize untrusted content of type json", 20,
                        "the unsigned message to be refused")
    forge_task(redis_server, forged.run_id, job, signer=(other_key, other_cert))
    worker.wait_for_log(r"Unknown certificate", 20, "the foreign signature to be refused")
    wait_until(lambda: queue_is_drained(redis_server), 10, "the queue to drain")
    assert record_of(forged, job).state == "pending"  # no task code ran for it
    assert record_of(forged, job).attempts == 0
    assert len(dst_proxy.records) == before
    assert images.manifest_digest(dst, DST_REPO, "v3") is None
    assert worker.running

    # Key paths may be logged, the key itself never.
    pool.stop_all()
    log = pool.logs() + done.stdout + done.stderr
    for path in (key, other_key):
        body = [line for line in path.read_text().splitlines() if "-----" not in line]
        assert body and not any(line in log for line in body), f"key material of {path} logged"
