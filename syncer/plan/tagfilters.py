"""Tag filters of a rule's long form: ``exclude``, ``semver``, ``latest`` and ``sort``.

image-syncer's keys select tags (all, a list, a ``/regex/``); users also ask to drop tags
by pattern, to keep a version range and to keep only the newest N (image-syncer issue #52).
Those are extensions written in a rule's *value*, so no key image-syncer accepts changes
meaning and nothing can collide with a tag::

    quay.io/a/b:
      to: quay.io/x/b            # a destination, or a list of them
      exclude: '-rc\\d*$'         # a regex or a list of them (re.search, like the key's /regex/)
      semver: '>=1.2 <2'         # npm-style range (semantic_version.NpmSpec)
      latest: 5                  # the newest 5 of what is left...
      sort: semver               # ...by version (default) or by the image's ``created`` time

They apply in that order to the tags the key selected: ``exclude`` drops every tag one of its
patterns matches, ``semver`` keeps the versions inside the range, ``latest`` keeps N. Only the
``created`` sort costs requests (see :mod:`syncer.plan.created`); the rest is arithmetic on
the tag list.

Versions. A tag is a version when it reads ``[v]MAJOR[.MINOR[.PATCH]][-PRERELEASE]`` with
numbers written without leading zeros: ``v1.2.3``, ``1.25`` (= 1.25.0), ``2`` (= 2.0.0),
``1.2.3-rc.1``. Anything else (``latest``, ``stable``, ``1.2.3.4``, ``1.2_3``) is *not a
version*: a ``semver`` filter or a ``semver`` sort skips it and the planner logs how many were
skipped. A ``-suffix`` is a pre-release in semver, so (npm's rule) a range keeps
``1.3.0-alpine`` only when one of its comparators names a pre-release of 1.3.0. Among equal
versions a tag that spells more components ranks newer (``1.2.0`` above ``1.2``), then the
tag text decides, so the order is total and stable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal

import semantic_version

Sort = Literal["semver", "created"]
SORTS: tuple[str, ...] = ("semver", "created")

_VERSION_RE = re.compile(
    r"^v?(0|[1-9]\d*)(?:\.(0|[1-9]\d*))?(?:\.(0|[1-9]\d*))?(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)
# ``v1.2`` inside a range: npm accepts the ``v``, semantic_version does not.
_RANGE_V_RE = re.compile(r"(?<![0-9A-Za-z.])v(?=\d)")


class FilterSyntaxError(ValueError):
    """A malformed filter value; the text says what is wrong (the caller names the key)."""


@dataclass(frozen=True)
class TagFilters:
    """The filters of one rule. Empty (false) when the rule has none."""

    exclude: tuple[str, ...] = ()
    semver: str = ""
    latest: int | None = None
    sort: Sort = "semver"

    def __bool__(self) -> bool:
        return bool(self.exclude or self.semver or self.latest is not None)

    @property
    def needs_created(self) -> bool:
        """True when choosing needs each candidate's ``created`` time (registry reads)."""
        return self.latest is not None and self.sort == "created"

    def __str__(self) -> str:
        """A human description, e.g. ``exclude /-rc/, semver ">=1.2 <2", latest 5 by semver``."""
        parts = [f"exclude /{pattern}/" for pattern in self.exclude]
        if self.semver:
            parts.append(f'semver "{self.semver}"')
        if self.latest is not None:
            parts.append(f"latest {self.latest} by {self.sort}")
        return ", ".join(parts)


NO_FILTERS = TagFilters()


def check_pattern(pattern: str) -> str:
    """``pattern`` when it is a usable regex; FilterSyntaxError otherwise."""
    if not pattern:
        raise FilterSyntaxError("empty regex")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise FilterSyntaxError(f"invalid regex {pattern!r}: {exc}") from None
    return pattern


def parse_range(text: str) -> semantic_version.NpmSpec:
    """An npm-style range (``>=1.2 <2``, ``^1.4``, ``~2.1``, ``1.x``, ``1.2 - 1.4``, ``a || b``).

    A ``v`` before a version is accepted, as npm does. FilterSyntaxError when malformed.
    """
    if not text.strip():
        raise FilterSyntaxError("empty semver range (write e.g. '>=1.2 <2' or '^1.4')")
    try:
        return semantic_version.NpmSpec(_RANGE_V_RE.sub("", text.strip()))
    except ValueError:
        raise FilterSyntaxError(
            f"invalid semver range {text!r}: expected npm syntax such as '>=1.2 <2', '^1.4', "
            "'~2.1', '1.x', '1.2 - 1.4' or 'a || b' (comparators separated by spaces)"
        ) from None


def parse_version(tag: str) -> semantic_version.Version | None:
    """The version a tag names (see the module docstring), or None when it is not one."""
    match = _VERSION_RE.match(tag)
    if match is None:
        return None
    major, minor, patch, pre = match.groups()
    try:
        return semantic_version.Version(
            major=int(major),
            minor=int(minor or 0),
            patch=int(patch or 0),
            prerelease=tuple(pre.split(".")) if pre else (),
        )
    except ValueError:  # e.g. a numeric pre-release identifier with a leading zero
        return None


def _version_key(
    tag: str, version: semantic_version.Version | None
) -> tuple[semantic_version.Version, int, str]:
    """Sort key of a version tag: the version, then how many components it spells, then text."""
    assert version is not None
    core = tag.lstrip("v").split("-", 1)[0]
    return version, core.count(".") + 1, tag


@dataclass
class TagSelection:
    """What the filters kept of one repository's tags, and why the rest went.

    ``tags`` keeps the order the tags were listed in. ``pending_created`` is True between
    :func:`filter_tags` and :func:`keep_latest_by_created` for a ``created`` sort.
    """

    listed: int
    tags: list[str] = field(default_factory=list)
    excluded: int = 0
    outside_range: int = 0
    not_versions: int = 0
    beyond_latest: int = 0
    unknown_created: int = 0
    pending_created: bool = False

    def summary(self) -> str:
        """E.g. ``5 of 62 tags selected (10 excluded, 7 not versions, 40 beyond latest)``."""
        why = [
            f"{count} {what}"
            for count, what in (
                (self.excluded, "excluded"),
                (self.not_versions, "skipped as not versions"),
                (self.outside_range, "outside the range"),
                (self.beyond_latest, "beyond latest"),
                (self.unknown_created, "without a created time, ranked oldest"),
            )
            if count
        ]
        return f"{len(self.tags)} of {self.listed} tags selected" + (
            f" ({', '.join(why)})" if why else ""
        )


def filter_tags(filters: TagFilters, tags: Sequence[str]) -> TagSelection:
    """Apply ``exclude``, ``semver`` and (for a semver sort) ``latest`` to ``tags``.

    For a ``created`` sort the result holds the candidates with ``pending_created`` set:
    read their created times, then call :func:`keep_latest_by_created`.
    """
    selection = TagSelection(listed=len(tags))
    kept = list(tags)
    if filters.exclude:
        patterns = [re.compile(p) for p in filters.exclude]
        before = len(kept)
        kept = [tag for tag in kept if not any(p.search(tag) for p in patterns)]
        selection.excluded = before - len(kept)
    by_semver = filters.latest is not None and filters.sort == "semver"
    # Each tag's version is parsed once, shared by the range, the latest filter and its sort.
    versions = {tag: parse_version(tag) for tag in kept} if filters.semver or by_semver else {}

    def version_key(tag: str) -> tuple[semantic_version.Version, int, str]:
        return _version_key(tag, versions[tag])

    if filters.semver:
        spec = parse_range(filters.semver)
        selection.not_versions = sum(1 for tag in kept if versions[tag] is None)
        kept = [tag for tag in kept if versions[tag] is not None]
        before = len(kept)
        kept = [tag for tag in kept if spec.match(versions[tag])]
        selection.outside_range = before - len(kept)
    if filters.latest is not None and by_semver:
        versions_only = [tag for tag in kept if versions[tag] is not None]
        selection.not_versions += len(kept) - len(versions_only)
        newest = set(sorted(versions_only, key=version_key, reverse=True)[: filters.latest])
        selection.beyond_latest = len(versions_only) - len(newest)
        kept = [tag for tag in versions_only if tag in newest]
    selection.tags = kept
    selection.pending_created = filters.needs_created
    return selection


def keep_latest_by_created(
    filters: TagFilters, selection: TagSelection, created: Mapping[str, datetime | None]
) -> TagSelection:
    """Keep the ``latest`` candidates with the newest ``created`` time.

    A candidate missing from ``created`` vanished between listing and reading (dropped); one
    mapped to None has no readable time and ranks oldest. Ties keep the later tag text first.
    """
    assert filters.latest is not None
    present = [tag for tag in selection.tags if tag in created]
    unknown = sum(1 for tag in present if created[tag] is None)
    floor = datetime.min

    def key(tag: str) -> tuple[bool, datetime, str]:
        when = created[tag]
        return when is not None, _naive_utc(when) if when else floor, tag

    newest = set(sorted(present, key=key, reverse=True)[: filters.latest])
    return replace(
        selection,
        tags=[tag for tag in present if tag in newest],
        beyond_latest=len(present) - len(newest),
        unknown_created=unknown,
        pending_created=False,
    )


def _naive_utc(when: datetime) -> datetime:
    """A comparable naive UTC datetime (aware and naive datetimes do not compare)."""
    if when.tzinfo is None:
        return when
    return (when - when.utcoffset()).replace(tzinfo=None)  # type: ignore[operator]
