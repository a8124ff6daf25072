"""Which registries a worker copies from and to: its own decision, never the message's.

Anyone who can write to the broker (Redis) can enqueue a ``sync_image`` task. Unchecked, such a
task makes a worker copy a private image, with the worker's credentials, to any registry the
worker can reach. So every worker holds an allowlist and refuses a task whose source or
destination lies outside it: the job is recorded failed (when it belongs to a run in the
ledger), the refusal is logged, and no registry is contacted.

A worker's allowlist is

- the keys of **its own auth file** (``--auth`` / ``--config`` / ``SYNCER_AUTH_FILE``): a
  ``registry`` key allows the whole registry, a ``registry/namespace`` key only repositories
  under that namespace — the same prefix rule that picks credentials, so a key scoped to one
  Harbor project does not open the rest of that Harbor;
- when the auth file names no registry (or there is none): the registries docker's
  ``config.json`` holds credentials for — then those are the worker's credentials;
- plus every ``--allow-registry HOST[/NAMESPACE]`` (env ``SYNCER_ALLOWED_REGISTRIES``,
  comma-separated), e.g. for a public source that needs no credentials. ``*`` allows any
  registry, for those who knowingly want the old behaviour.

A worker with none of these trusts nothing: it starts, says so in its log, and refuses every
task. Hosts compare after normalisation (lower case, Docker Hub's aliases folded into
``docker.io``) and with their port: ``harbor`` and ``harbor:443`` are different entries.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery.exceptions import Reject

from syncer.plan.jobs import Job
from syncer.registry.errors import ConfigError, ReferenceError_
from syncer.registry.reference import (
    is_registry_segment,
    normalize_registry,
    parse_reference,
    split_repository,
)

if TYPE_CHECKING:
    from workers.redis_ledger import RedisLedger

ALLOW_ANY = "*"
INVALID_JOB = "refused: the task does not carry a valid job"
ENV_ALLOWED = "SYNCER_ALLOWED_REGISTRIES"

log = logging.getLogger("syncer.worker")


@dataclass(frozen=True)
class Allowlist:
    """Registries (``host``) and namespaces (``host/namespace``) a worker copies from and to."""

    prefixes: tuple[str, ...] = ()
    allow_any: bool = False

    def allows(self, registry: str, repository: str) -> bool:
        """True when ``registry/repository`` lies inside one of the prefixes."""
        if self.allow_any:
            return True
        registry = normalize_registry(registry)
        return any(_inside(prefix, registry, repository) for prefix in self.prefixes)

    def names_host(self, registry: str) -> bool:
        """True when some prefix names ``registry`` (possibly only some of its namespaces)."""
        registry = normalize_registry(registry)
        return any(prefix.partition("/")[0] == registry for prefix in self.prefixes)

    @property
    def empty(self) -> bool:
        """True when this allowlist allows nothing at all."""
        return not self.allow_any and not self.prefixes

    def __str__(self) -> str:
        if self.allow_any:
            return ALLOW_ANY
        return ", ".join(self.prefixes) if self.prefixes else "(nothing)"


def _inside(prefix: str, registry: str, repository: str) -> bool:
    host, _, namespace = prefix.partition("/")
    if host != registry:
        return False
    return not namespace or repository == namespace or repository.startswith(namespace + "/")


def parse_entry(text: str, origin: str) -> str:
    """Normalise one allowlist entry ``HOST[:PORT][/NAMESPACE]`` (``origin`` names where it
    came from, for the error). Raises :class:`ConfigError` for anything else."""
    entry = text.strip().rstrip("/")
    host, _, namespace = entry.partition("/")
    if "://" in entry:
        raise ConfigError(f"{origin}: {text!r}: write HOST[:PORT][/NAMESPACE], without a scheme")
    # The grammar of references (a bare first segment would be a Docker Hub namespace); the
    # namespace is kept as written: split_repository would turn docker.io/x into library/x.
    try:
        if not is_registry_segment(host):
            raise ReferenceError_(host)
        registry = split_repository(entry if namespace else f"{host}/x").registry
    except ReferenceError_:
        raise ConfigError(
            f"{origin}: {text!r} is not a registry HOST[:PORT][/NAMESPACE] (a host needs a '.' "
            "or a ':port', or is 'localhost')"
        ) from None
    return f"{registry}/{namespace}" if namespace else registry


def build_allowlist(
    auth_prefixes: Iterable[str],
    docker_registries: Iterable[str] = (),
    explicit: Iterable[str] = (),
) -> Allowlist:
    """The allowlist of a worker: its auth-file keys (else docker config.json's registries),
    plus ``explicit`` entries (``*`` allows any). Raises :class:`ConfigError` on a bad entry."""
    found: list[str] = [parse_entry(p, "auth file key") for p in auth_prefixes]
    if not found:
        found = [parse_entry(r, "docker config.json") for r in docker_registries]
    allow_any = False
    for item in explicit:
        if item.strip() == ALLOW_ANY:
            allow_any = True
        elif item.strip():
            found.append(parse_entry(item, "--allow-registry / " + ENV_ALLOWED))
    return Allowlist(tuple(dict.fromkeys(found)), allow_any)


def allowed_from_env(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The entries of ``SYNCER_ALLOWED_REGISTRIES`` (comma-separated; blanks ignored)."""
    return [item.strip() for item in environ.get(ENV_ALLOWED, "").split(",") if item.strip()]


def parse_job(job: Any) -> Job | None:
    """The :class:`Job` of a task's job dict; None for a malformed (forged?) one."""
    try:
        return Job.from_dict(job)
    except Exception:  # a forged message may carry anything
        return None


def refusal_reason(job: Any, allowlist: Allowlist) -> str | None:
    """Why a worker with ``allowlist`` must refuse ``job`` (a task's job dict), or None."""
    return job_refusal(parse_job(job), allowlist)


def job_refusal(parsed: Job | None, allowlist: Allowlist) -> str | None:
    """Why a worker with ``allowlist`` must refuse the job ``parsed`` from a task's message
    (:func:`parse_job`; None: the message carried no valid job), or None."""
    if parsed is None:
        return INVALID_JOB
    try:
        sides = [("source", parse_reference(parsed.source)),
                 ("destination", parse_reference(parsed.destination))]
    except Exception:  # a forged message may carry anything: never echo it into the ledger
        return INVALID_JOB
    for role, ref in sides:
        if allowlist.allows(ref.registry, ref.repository):
            continue
        if allowlist.names_host(ref.registry):
            return (f"refused: {role} {ref.registry}/{ref.repository} is outside the namespaces "
                    f"this worker's allowlist names for {ref.registry}")
        return f"refused: {role} registry {ref.registry} is not in this worker's allowlist"
    return None


@functools.cache
def worker_allowlist() -> Allowlist:
    """This worker process's allowlist (built once): its credential files plus the env."""
    from workers.context import load_worker_store

    store = load_worker_store()
    return build_allowlist(store.prefixes, store.docker_registries, allowed_from_env())


def announce(allowlist: Allowlist) -> None:
    """Say at start-up what the worker will copy from and to (a warning when nothing or all)."""
    if allowlist.allow_any:
        log.warning("allowlist '*': this worker copies from and to ANY registry; anyone who can "
                    "write to the broker can make it copy with its credentials")
    elif allowlist.empty:
        log.warning("this worker trusts no registry and will refuse every task: name registries "
                    "in its auth file (--auth) or with --allow-registry HOST")
    else:
        log.info("this worker copies only from and to: %s", allowlist)


class TaskRefused(Reject):
    """A task outside the worker's allowlist: the message is dropped, never requeued."""

    def __init__(self, reason: str, requeue: bool = False):
        # Celery rebuilds an exception raised in a prefork child from ``self.args``
        # (reason, requeue) in the parent: the signature must accept both.
        super().__init__(reason, requeue=False)


def _call(write: Callable[..., Any], *args: Any) -> Any:
    return write(*args)


def _belongs(ledger: RedisLedger, job_id: str) -> bool:
    # Only a job the run was created with is recorded: marking an unknown id final would
    # count it towards the run's total and could end the run early.
    return ledger.exists() and bool(ledger.redis.hexists(ledger.key("jobs"), job_id))


def _shown(value: Any, limit: int = 160) -> str:
    """A forged message's text, safe to log on one line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def enforce(
    job: Any, parsed: Job | None, ledger: RedisLedger, write: Callable[..., Any] = _call
) -> Job:
    """Refuse ``job`` (a task's job dict; ``parsed``: its :func:`parse_job`) of ``ledger``'s
    run unless this worker's allowlist allows both sides: record it failed (if the run knows
    it), log it, raise :class:`TaskRefused`. Returns the job when it is allowed.

    ``write(fn, *args)`` runs the ledger calls (the task passes its Redis-restart-tolerant one).
    """
    reason = job_refusal(parsed, worker_allowlist())
    if parsed is not None and reason is None:
        return parsed
    reason = reason or INVALID_JOB  # (never None here: a None job is refused)
    job_id = parsed.id if parsed is not None else ""
    recorded = bool(job_id) and write(_belongs, ledger, job_id)
    if recorded:
        write(ledger.mark_failed, job_id, reason)
    label = _shown(f"{job.get('source')} -> {job.get('destination')}"
                   if isinstance(job, dict) else job)
    log.error("%s: %s (run %s%s)", label, reason, _shown(ledger.run_id),
              "" if recorded else "; not a job of that run, nothing recorded")
    raise TaskRefused(reason)
