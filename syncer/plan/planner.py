"""Rules → jobs: list tags (in parallel), apply selectors, retag, fan out to destinations.

* all tags / regex: the source's tags are listed (``re.search`` for a regex, like image-syncer's
  Go ``MatchString``); zero tags gives no jobs and no failure.
* explicit tags: no listing; a retag pairs source and destination tags left to right.
* digest: one job per destination, ``src@digest → dst@digest`` (or ``dst:tag`` when the
  destination names one tag).
* ``registry/namespace/*``: the repositories under the namespace are listed, each becomes an
  all-tags rule; a destination ``D`` becomes ``D/<source path relative to the namespace>``
  (``harbor/proj/*: acr/mirror`` copies ``harbor/proj/team/app`` to ``acr/mirror/team/app``).
  Paths the lister returns outside the namespace are ignored.
* an empty destination is ``<default registry>/<default namespace>/<source's last name>``.
* tag filters (a rule's long form: ``exclude``, ``semver``, ``latest``; see
  :mod:`syncer.plan.tagfilters`) narrow what a listing rule selected, per repository (so per
  repository of a namespace wildcard too). Each filtered repository logs one line saying how
  many tags were kept and why the others went. ``latest`` with ``sort: created`` reads each
  candidate's image (:mod:`syncer.plan.created`), in parallel like the listings; a tag that
  vanished meanwhile is dropped, any other read error fails that repository's rule.

A listing error becomes a :class:`PlanFailure` for that rule's destinations; the rest go on.
A failure's ``source``/``destination`` are written as images-file key and value, so a
failed-images file can be fed back as ``--images``. Jobs come out in rule order, then tag order
as listed, then destination order; a (source, destination) pair appears once, and a second
source aiming at an already planned destination tag is a failure (two images racing for one
tag), not a job.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from typing import Protocol, TypeVar

from syncer.plan.jobs import Job, Plan, PlanFailure
from syncer.plan.rules import ALL_TAGS, Destination, Rule, TagSelector
from syncer.plan.tagfilters import TagSelection, filter_tags, keep_latest_by_created
from syncer.registry.errors import NotFoundError, ReferenceError_
from syncer.registry.mediatypes import PlatformFilter
from syncer.registry.reference import TAG_RE, Repository, split_repository
from syncer.registry.referrers import ReferrerPolicy, is_referrer_tag

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
log = logging.getLogger(__name__)


class Lister(Protocol):
    """What the planner needs from registries. Any exception means "could not list"."""

    def list_tags(self, repo: Repository) -> list[str]:
        """Every tag of ``repo``, in the registry's order."""
        ...

    def list_repositories(self, registry: str, namespace: str) -> list[str]:
        """Full repository paths (``proj/team/app``) under ``namespace`` on ``registry``."""
        ...

    def image_created(self, repo: Repository, tag: str) -> datetime | None:
        """When ``repo:tag`` was built (its config's ``created``), None when it does not say.

        Only asked for rules with ``latest`` + ``sort: created``; a vanished tag raises
        :class:`~syncer.registry.errors.NotFoundError`.
        """
        ...


def default_target(
    registry: str | None = None,
    namespace: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> tuple[str | None, str | None]:
    """The default destination registry and namespace: the flags, else ``DEFAULT_REGISTRY`` /
    ``DEFAULT_NAMESPACE`` from the environment. Empty values count as unset."""
    return (registry or environ.get("DEFAULT_REGISTRY") or None,
            namespace or environ.get("DEFAULT_NAMESPACE") or None)


def default_destination(
    source: Repository, registry: str | None, namespace: str | None
) -> Repository:
    """``registry/namespace/<last name of source>``; ValueError when a default is missing
    or does not make a valid repository."""
    if not registry or not namespace:
        raise ValueError(
            "empty destination needs a default registry and namespace "
            "(--registry/--namespace or DEFAULT_REGISTRY/DEFAULT_NAMESPACE)"
        )
    name = source.path.rsplit("/", 1)[-1]
    text = f"{registry.strip('/')}/{namespace.strip('/')}/{name}"
    try:
        repo = split_repository(text)
    except ReferenceError_ as exc:
        raise ValueError(f"invalid default destination: {exc}") from None
    if repo.path != f"{namespace.strip('/')}/{name}":  # registry was read as a Docker Hub name
        raise ValueError(f"default registry {registry!r} is not a registry host")
    return repo


def select_tags(selector: TagSelector, listed: Sequence[str]) -> list[str]:
    """The tags a selector keeps from ``listed`` (explicit tags need no listing)."""
    if selector.kind == "tags":
        return list(selector.tags)
    if selector.kind == "regex":
        pattern = re.compile(selector.pattern)
        return [tag for tag in listed if pattern.search(tag)]
    if selector.kind == "all":
        return list(listed)
    return []


@dataclass(frozen=True)
class _Unit:
    """One concrete source repository of a rule (a wildcard rule gives several)."""

    rule: Rule
    source: Repository
    destinations: tuple[Destination, ...]

    @property
    def label(self) -> str:
        """The source as an images-file key."""
        return str(self.source) + str(self.rule.selector)


class _Builder:
    """Collects jobs and failures: dedupes pairs, refuses two sources for one tag."""

    def __init__(self, platforms: PlatformFilter, force: bool,
                 referrers: ReferrerPolicy = ReferrerPolicy()):  # noqa: B008 - frozen
        self.platforms, self.force, self.referrers = platforms, force, referrers
        # The policy per rule switch (None: the command line's), built once, not per job.
        self._policies: dict[bool | None, ReferrerPolicy] = {
            None: referrers,
            referrers.enabled: referrers,
            not referrers.enabled: replace(referrers, enabled=not referrers.enabled),
        }
        self.plan = Plan()
        self._pairs: set[tuple[str, str]] = set()
        self._owner: dict[str, str] = {}

    def job(self, source: str, destination: str, referrers: bool | None = None) -> None:
        """A job (``referrers``: the rule's own switch, None: the command line's)."""
        if (source, destination) in self._pairs:
            return
        owner = self._owner.get(destination)
        if owner is not None and "@" not in destination:
            self.fail(source, destination, f"{destination} is already the destination of {owner}")
            return
        self._pairs.add((source, destination))
        self._owner[destination] = source
        self.plan.jobs.append(
            Job(source, destination, self.platforms, self.force, self._policies[referrers])
        )

    def fail(self, source: str, destination: str, reason: str) -> None:
        if (source, destination) in self._pairs:
            return
        self._pairs.add((source, destination))
        self.plan.failures.append(PlanFailure(source, destination, reason))


def plan(
    rules: Sequence[Rule],
    lister: Lister,
    *,
    default_registry: str | None = None,
    default_namespace: str | None = None,
    platforms: PlatformFilter = PlatformFilter(),  # noqa: B008 - frozen, safe as a default
    force: bool = False,
    parallelism: int = 8,
    referrers: ReferrerPolicy = ReferrerPolicy(),  # noqa: B008 - frozen, safe as a default
) -> Plan:
    """Turn ``rules`` into jobs, listing namespaces then tags with ``parallelism`` threads."""
    builder = _Builder(platforms, force, referrers)
    wildcards = {(r.source.registry, r.source.path) for r in rules if r.wildcard}
    catalogs = _parallel(
        {key: partial(_catalog, lister, *key) for key in sorted(wildcards)}, parallelism
    )
    units: list[_Unit] = []
    for rule in rules:
        if rule.wildcard:
            units.extend(_expand_wildcard(rule, catalogs[(rule.source.registry, rule.source.path)],
                                          builder))
        else:
            units.append(_Unit(rule, rule.source, rule.destinations))
    to_list = {u.source: None for u in units if u.rule.selector.kind in ("all", "regex")}
    listings = _parallel(
        {repo: partial(_listed, lister, repo) for repo in to_list}, parallelism
    )
    selected = _select(units, listings, lister, parallelism, referrers.enabled)
    for index, unit in enumerate(units):
        _unit_jobs(unit, selected.get(index), default_registry, default_namespace, builder)
    return builder.plan


def _listed(lister: Lister, repo: Repository) -> list[str]:
    return list(lister.list_tags(repo))  # list(): a lazy lister fails inside the pool


def _catalog(lister: Lister, registry: str, namespace: str) -> list[str]:
    return list(lister.list_repositories(registry, namespace))


def _select(
    units: Sequence[_Unit],
    listings: Mapping[Repository, list[str] | Exception],
    lister: Lister,
    parallelism: int,
    referrers_on: bool = True,
) -> dict[int, list[str] | Exception]:
    """The tags each listing unit keeps (by unit index): its selector, then its filters.

    Created times are read once per (repository, tag) for every unit that sorts by them,
    all on one thread pool.
    """
    selections: dict[int, TagSelection | list[str] | Exception] = {}
    for index, unit in enumerate(units):
        listed = listings.get(unit.source)
        if listed is None or isinstance(listed, Exception):
            if listed is not None:
                selections[index] = listed
            continue
        tags = select_tags(unit.rule.selector, listed)
        follows = unit.rule.referrers if unit.rule.referrers is not None else referrers_on
        if follows and unit.rule.selector.kind in ("all", "regex"):
            # Referrer tags travel with their subject (merged into the destination's own
            # referrers tag): copied as images too, they would overwrite that merge.
            tags = [tag for tag in tags if not is_referrer_tag(tag)]
        filters = unit.rule.filters
        selections[index] = filter_tags(filters, tags) if filters else tags
    wanted = {
        (units[i].source, tag): None
        for i, found in selections.items()
        if isinstance(found, TagSelection) and found.pending_created
        for tag in found.tags
    }
    if wanted:
        log.info(
            "reading the created time of %d tags in %d repositories for 'sort: created' "
            "(one manifest GET per tag, one config GET per distinct image)",
            len(wanted), len({repo for repo, _ in wanted}),
        )
    created = _parallel(
        {key: partial(lister.image_created, *key) for key in wanted}, parallelism
    )
    result: dict[int, list[str] | Exception] = {}
    for index, found in selections.items():
        if not isinstance(found, TagSelection):
            result[index] = found
            continue
        unit = units[index]
        if found.pending_created:
            finished = _by_created(unit, found, created)
            if isinstance(finished, Exception):
                result[index] = finished
                continue
            found = finished
        log.info("%s (%s): %s", unit.label, unit.rule.filters, found.summary())
        result[index] = found.tags
    return result


def _by_created(
    unit: _Unit,
    found: TagSelection,
    created: Mapping[tuple[Repository, str], datetime | Exception | None],
) -> TagSelection | Exception:
    """Finish a ``sort: created`` selection from the times read, or the error that stops it."""
    times: dict[str, datetime | None] = {}
    for tag in found.tags:
        when = created[(unit.source, tag)]
        if isinstance(when, NotFoundError):
            continue  # deleted since it was listed: nothing to copy
        if isinstance(when, Exception):
            return _CreatedReadError(
                f"read the created time of {unit.source}:{tag}: {_reason(when)}"
            )
        times[tag] = when
    return keep_latest_by_created(unit.rule.filters, found, times)


class _CreatedReadError(Exception):
    """A candidate's created time could not be read (the rule's repository fails)."""


def _expand_wildcard(rule: Rule, listed: list[str] | Exception, builder: _Builder) -> list[_Unit]:
    """Each repository under the namespace as an all-tags unit with nested destinations."""
    if isinstance(listed, Exception):
        for dest in rule.destinations:
            builder.fail(rule.key, str(dest), _reason(listed))
        return []
    namespace = rule.source.path
    units = []
    for path in listed:
        if not path.startswith(namespace + "/"):
            continue
        relative = path[len(namespace) + 1 :]
        nested = tuple(
            d if d.repository is None
            else Destination(Repository(d.repository.registry, f"{d.repository.path}/{relative}"))
            for d in rule.destinations
        )
        source = Repository(rule.source.registry, path)
        nested_rule = Rule(str(source), source, ALL_TAGS, nested, filters=rule.filters,
                           referrers=rule.referrers)
        units.append(_Unit(nested_rule, source, nested))
    return units


def _unit_jobs(
    unit: _Unit,
    listed: list[str] | Exception | None,
    default_registry: str | None,
    default_namespace: str | None,
    builder: _Builder,
) -> None:
    """Jobs (or failures) of one concrete source: tag order, then destination order."""
    targets: list[tuple[Destination, Repository]] = []
    for dest in unit.destinations:
        if dest.repository is not None:
            targets.append((dest, dest.repository))
            continue
        try:
            targets.append((dest, default_destination(unit.source, default_registry,
                                                      default_namespace)))
        except ValueError as exc:
            builder.fail(unit.label, "", str(exc))
    selector = unit.rule.selector
    source = str(unit.source)
    if selector.kind == "digest":
        for dest, repo in targets:
            target = f"{repo}:{dest.tags[0]}" if dest.tags else f"{repo}@{selector.digest}"
            builder.job(f"{source}@{selector.digest}", target, unit.rule.referrers)
        return
    if isinstance(listed, Exception):
        reason = _reason(listed)
        if unit.rule.filters:  # the failed-images file keeps the key, not the long form
            reason += f" (the rule's tag filters: {unit.rule.filters})"
        for _, repo in targets:
            builder.fail(unit.label, str(repo), reason)
        return
    tags = select_tags(selector, []) if listed is None else listed
    named = [(dest, str(repo)) for dest, repo in targets]  # rendered once, not per tag
    for index, tag in enumerate(tags):
        if not TAG_RE.match(tag):
            for _, repo_text in named:
                reason = f"registry listed invalid tag {tag!r}"
                builder.fail(f"{source}:{tag}", repo_text, reason)
            continue
        for dest, repo_text in named:
            builder.job(f"{source}:{tag}", f"{repo_text}:{dest.tags[index] if dest.tags else tag}",
                        unit.rule.referrers)


def _parallel(calls: dict[K, Callable[[], T]], parallelism: int) -> dict[K, T | Exception]:
    """Run ``calls`` on a thread pool; each result is the value or the exception raised."""
    if not calls:
        return {}
    results: dict[K, T | Exception] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(parallelism, len(calls)))) as pool:
        # Each call runs in a copy of the caller's context, so the log context (and any
        # deadline) follows it into the pool's thread, as in syncer.copy.copier.
        futures = {
            key: pool.submit(contextvars.copy_context().run, call) for key, call in calls.items()
        }
        for key, future in futures.items():
            try:
                results[key] = future.result()
            except Exception as exc:  # any listing error becomes a PlanFailure
                results[key] = exc
    return results


def _reason(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
