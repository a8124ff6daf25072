"""Image rules: what one images-file entry means, parsed from its text.

A rule's key is the source as written, its value one destination or a list::

    quay.io/a/b: quay.io/x/b                 all tags
    quay.io/a/b:v1,v2: quay.io/x/b           listed tags
    quay.io/a/b:v1,v2: quay.io/x/b:n1,n2     retag, paired left to right (counts must match)
    quay.io/a/b@sha256:<hex>: quay.io/x/b    by digest (optionally ``quay.io/x/b:one-tag``)
    quay.io/a/b:/^v1\\./: quay.io/x/b         tag regex between slashes
    harbor:8443/project/*: acr.io/mirror     every repository under a namespace, all tags
    quay.io/a/b: ""                          default destination (``--registry``/``--namespace``)
    quay.io/a/b: {to: quay.io/x/b, latest: 5}   long form: tag filters (:mod:`tagfilters`)

A tag regex is Python ``re`` applied with :func:`re.search`, i.e. unanchored like Go's
``MatchString`` that image-syncer uses: ``/v1/`` matches ``xv1y``; write ``/^v1$/`` to match a
whole tag. The regex starts after the first ``:/`` (a host's ``:port`` is never followed by
``/``) and ends at the key's final ``/``, so it may itself contain ``/`` and ``:``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from syncer.plan.tagfilters import NO_FILTERS, TagFilters
from syncer.registry.errors import ReferenceError_
from syncer.registry.reference import Repository, split_repository, validate_digest, validate_tag


@dataclass(frozen=True)
class TagSelector:
    """Which tags of the source a rule selects.

    ``kind`` is ``"all"`` (list every tag), ``"tags"`` (``tags``, in the order written),
    ``"regex"`` (listed tags for which ``re.search(pattern, tag)`` matches) or ``"digest"``.
    """

    kind: Literal["all", "tags", "regex", "digest"] = "all"
    tags: tuple[str, ...] = ()
    pattern: str = ""
    digest: str = ""

    def __str__(self) -> str:
        """The suffix written after the repository: ``""``, ``:a,b``, ``:/re/``, ``@sha256:…``."""
        if self.kind == "tags":
            return ":" + ",".join(self.tags)
        if self.kind == "regex":
            return f":/{self.pattern}/"
        if self.kind == "digest":
            return "@" + self.digest
        return ""


ALL_TAGS = TagSelector()


@dataclass(frozen=True)
class Destination:
    """Where a rule copies to: a repository, optionally with explicit (retag) tags.

    ``repository`` is ``None`` for the default destination (an empty string in the file),
    which the planner turns into ``default_registry/default_namespace/<source's last name>``.
    """

    repository: Repository | None = None
    tags: tuple[str, ...] = ()

    @property
    def is_default(self) -> bool:
        """True for the default destination."""
        return self.repository is None

    def __str__(self) -> str:
        """As an images-file value (``""`` for the default destination)."""
        if self.repository is None:
            return ""
        return str(self.repository) + (":" + ",".join(self.tags) if self.tags else "")


@dataclass(frozen=True)
class Rule:
    """One images-file entry: ``key`` (the source as written) → ``destinations``.

    For a namespace wildcard (``registry/namespace/*``, ``wildcard=True``) ``source`` is
    ``Repository(registry, namespace)`` and ``selector`` is :data:`ALL_TAGS`. ``filters``
    (the long form's ``exclude``/``semver``/``latest``) narrow what ``selector`` selects.
    """

    key: str
    source: Repository
    selector: TagSelector
    destinations: tuple[Destination, ...]
    wildcard: bool = False
    filters: TagFilters = NO_FILTERS
    # The long form's ``referrers: true/false``; None: as the command line says.
    referrers: bool | None = None


class RuleSyntaxError(ValueError):
    """A problem with one source or destination text."""


def parse_source(text: str) -> tuple[Repository, TagSelector, bool]:
    """``repo``, ``repo:t1,t2``, ``repo:/regex/``, ``repo@digest`` or ``registry/namespace/*``."""
    if not text or text != text.strip():
        raise RuleSyntaxError("source is empty or has surrounding spaces")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        raise RuleSyntaxError("a source is not a URL: drop the scheme (host[:port]/repository)")
    cut = text.find(":/")
    if cut != -1:  # a host's ":port" is followed by digits, so ":/" can only open a regex
        repo_text, rest = text[:cut], text[cut + 2 :]
        if not rest.endswith("/"):
            raise RuleSyntaxError("a tag regex must be enclosed in slashes: repository:/regex/")
        pattern = rest[:-1]
        if not pattern:
            raise RuleSyntaxError("empty tag regex")
        no_wildcard(repo_text, "a tag regex")
        repo = split_repository(repo_text)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise RuleSyntaxError(f"invalid tag regex: {exc}") from None
        return repo, TagSelector("regex", pattern=pattern), False
    if "@" in text:
        repo_text, digest = text.rsplit("@", 1)
        try:
            validate_digest(digest)
        except ReferenceError_:
            raise RuleSyntaxError(
                f"invalid digest {digest!r}: expected sha256:<64 lowercase hex>"
            ) from None
        if repo_text.rfind(":") > repo_text.rfind("/"):
            raise RuleSyntaxError("name either tags or a digest, not both")
        no_wildcard(repo_text, "a digest")
        return split_repository(repo_text), TagSelector("digest", digest=digest), False
    repo_text, tags = split_tags(text)
    if repo_text == "*" or repo_text.endswith("/*"):
        if tags:
            raise RuleSyntaxError(
                "a namespace wildcard (registry/namespace/*) takes every tag, no tags"
            )
        return namespace_repository(repo_text[:-2]), ALL_TAGS, True
    no_wildcard(repo_text, "tags" if tags else "a repository")
    selector = TagSelector("tags", tags=tags) if tags else ALL_TAGS
    return split_repository(repo_text), selector, False


def parse_destination(text: str, selector: TagSelector, wildcard: bool) -> Destination:
    """A destination, checked against the source's selector (retag counts, digests)."""
    if text == "":
        return Destination()
    if text != text.strip():
        raise RuleSyntaxError(f"destination {text!r} has surrounding spaces")
    if "*" in text:
        raise RuleSyntaxError(f"destination {text!r}: '*' is only allowed at the end of a source")
    if "@" in text:  # the failed-images file writes digest jobs as dst@<same digest>
        text, digest = text.rsplit("@", 1)
        if selector.kind != "digest" or digest != selector.digest:
            raise RuleSyntaxError(
                "a destination cannot name a digest (a digest source keeps its digest)"
            )
    repo_text, tags = split_tags(text)
    try:
        repo = split_repository(repo_text)
    except ReferenceError_ as exc:
        raise RuleSyntaxError(f"invalid destination: {exc}") from None
    if tags:
        if wildcard or selector.kind in ("all", "regex"):
            what = "a tag regex" if selector.kind == "regex" else "all tags"
            raise RuleSyntaxError(
                f"destination names tags but the source selects {what}: cannot pair them"
            )
        wanted = len(selector.tags) if selector.kind == "tags" else 1
        if len(tags) != wanted:
            have = f"{wanted} source tags" if selector.kind == "tags" else "a digest (one image)"
            raise RuleSyntaxError(
                f"retag needs one destination tag per source tag: {have}, "
                f"{len(tags)} destination tags"
            )
    return Destination(repo, tags)


def split_tags(text: str) -> tuple[str, tuple[str, ...]]:
    """``repo:t1,t2`` → (``repo``, tags). Only a colon after the last ``/`` starts tags."""
    colon = text.rfind(":")
    if colon <= text.rfind("/"):
        return text, ()
    tags = tuple(tag.strip() for tag in text[colon + 1 :].split(","))
    for tag in tags:
        if not tag:
            raise RuleSyntaxError("empty tag in tag list")
        try:
            validate_tag(tag)
        except ReferenceError_:
            hint = " (for a pattern write :/regex/)" if any(c in tag for c in "*?^$[(|") else ""
            raise RuleSyntaxError(f"invalid tag {tag!r}{hint}") from None
    return text[:colon], tags


def no_wildcard(repo_text: str, what: str) -> None:
    """Refuse a ``*`` anywhere but at the end of a namespace source."""
    if "*" in repo_text:
        raise RuleSyntaxError(
            f"'*' is only allowed as the last path segment (registry/namespace/*), not with {what}"
        )


def namespace_repository(prefix: str) -> Repository:
    """``registry/namespace`` of a wildcard source as ``Repository(registry, namespace)``."""
    if not prefix:
        raise RuleSyntaxError("a wildcard needs a namespace: registry/namespace/*")
    if "*" in prefix:
        raise RuleSyntaxError(
            "'*' is only allowed once, as the last path segment (registry/namespace/*)"
        )
    try:
        placeholder = split_repository(f"{prefix}/x")
    except ReferenceError_:
        raise RuleSyntaxError(f"invalid namespace {prefix!r} before '/*'") from None
    namespace = placeholder.path[: -len("/x")]
    if not namespace:
        raise RuleSyntaxError("a wildcard needs a namespace: registry/namespace/*")
    return Repository(placeholder.registry, namespace)
