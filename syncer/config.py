"""Config files: the auth file and the images file (JSON or YAML), validated with marshmallow.

Two layouts, as in image-syncer:

* the legacy single file (``--config``): ``{"auth": {...}, "images": {...}}``;
* split files: ``--auth FILE`` (``registry[/namespace]`` → entry) and ``--images FILE``
  (source → destination). ``--images`` alone is fine (anonymous access / docker's config.json).

The format follows the extension: ``.json`` is JSON; ``.yaml``, ``.yml`` and anything else
YAML (which also reads most JSON). Duplicate keys are errors, not "the last one wins".

Every mistake is collected and reported at once in one :class:`ConfigError`, one line each:
``<file as given>: <key path>: <what is wrong>``, e.g.
``images.yaml: images["quay.io/a/b:/[/"]: invalid tag regex: unterminated character set at
position 0``. Key paths start with ``auth`` or ``images`` in both layouts. Values of
``password`` are never echoed.

Image rules (the key is the source, the value one destination or a list of them)::

    quay.io/a/b: quay.io/x/b                 all tags
    quay.io/a/b:v1,v2: quay.io/x/b           listed tags
    quay.io/a/b:v1,v2: quay.io/x/b:n1,n2     retag, paired left to right (counts must match)
    quay.io/a/b@sha256:<hex>: quay.io/x/b    by digest (optionally ``quay.io/x/b:one-tag``)
    quay.io/a/b:/^v1\\./: quay.io/x/b         tag regex between slashes
    harbor:8443/project/*: acr.io/mirror     every repository under a namespace, all tags
    quay.io/a/b: ""                          default destination (``--registry``/``--namespace``)

A tag regex is Python ``re`` applied with :func:`re.search`, i.e. unanchored like Go's
``MatchString`` that image-syncer uses: ``/v1/`` matches ``xv1y``; write ``/^v1$/`` to match a
whole tag. The regex starts after the first ``:/`` (a host's ``:port`` is never followed by
``/``) and ends at the key's final ``/``, so it may itself contain ``/`` and ``:``.

``${VAR}`` / ``$VAR`` are expanded from the environment in ``username``, ``password`` and
destinations (not in source keys, whose regexes may end with ``$``); ``$$`` is a literal ``$``.
An undefined variable is an error. A relative ``ca_file`` is relative to the auth file's folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from marshmallow import RAISE, Schema, ValidationError, fields

from syncer.credentials import AuthEntry, Credentials
from syncer.errors import ConfigError, ReferenceError_
from syncer.reference import (
    Repository,
    is_registry_segment,
    split_repository,
    validate_digest,
    validate_tag,
)

PathArg = str | os.PathLike[str] | None

# -- the parsed rules (pure data) ---------------------------------------------------------------


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
    ``Repository(registry, namespace)`` and ``selector`` is :data:`ALL_TAGS`.
    """

    key: str
    source: Repository
    selector: TagSelector
    destinations: tuple[Destination, ...]
    wildcard: bool = False


@dataclass
class SyncConfig:
    """A validated configuration: credentials/TLS per registry prefix, and the rules."""

    auth_entries: list[AuthEntry]
    rules: list[Rule]


# -- loading ------------------------------------------------------------------------------------


def load_config(
    config: PathArg = None,
    auth: PathArg = None,
    images: PathArg = None,
    *,
    environ: Mapping[str, str] = os.environ,
) -> SyncConfig:
    """Load ``--config FILE`` (legacy) or ``--auth FILE`` + ``--images FILE``.

    Raises :class:`ConfigError` listing every problem found in every file given.
    """
    if config and (auth or images):
        raise ConfigError(
            "--config cannot be combined with --auth/--images: the legacy single file holds "
            "both sections; use either --config FILE or --auth FILE --images FILE"
        )
    if not config and not images:
        if auth:
            raise ConfigError("--auth needs --images: the images file holds the rules to sync")
        raise ConfigError("nothing to sync: give --config FILE, or --images FILE (and --auth FILE)")
    problems: list[str] = []
    if config:
        path = os.fspath(config)
        doc = _read(path, problems)
        entries, rules = [], []
        if doc is not None and _top_is_mapping(doc, path, problems, '"auth" and "images"'):
            for field_name, messages in _LegacyFileSchema().validate(doc).items():
                for message in _messages(messages):
                    if message == _UNKNOWN:
                        message = 'unknown top-level key (expected "auth" and "images")'
                    problems.append(f"{path}: {_key_path(field_name)}: {message}")
            if isinstance(doc.get("auth"), dict):
                entries = _parse_auth(doc["auth"], path, environ, problems)
            if isinstance(doc.get("images"), dict):
                rules = _parse_images(doc["images"], path, environ, problems)
    else:
        entries = _load_section(auth, "auth", environ, problems) if auth else []
        rules = _load_section(images, "images", environ, problems)
    if problems:
        raise ConfigError(problems)
    return SyncConfig(auth_entries=entries, rules=rules)


def load_auth_file(
    path: PathArg,
    *,
    section: Literal["auth"] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> list[AuthEntry]:
    """Only the auth entries: of an auth file, or (``section="auth"``) of a legacy config's
    ``auth`` section. ``None`` gives no entries. Raises :class:`ConfigError`."""
    if not path:
        return []
    problems: list[str] = []
    if section:
        file = os.fspath(path)
        doc = _read(file, problems)
        entries: list[AuthEntry] = []
        if doc is not None and _top_is_mapping(doc, file, problems, '"auth" and "images"'):
            value = doc.get("auth") or {}
            if isinstance(value, dict):
                entries = _parse_auth(value, file, environ, problems)
            else:
                problems.append(f"{file}: auth: Not a valid mapping type.")
    else:
        entries = _load_section(path, "auth", environ, problems)
    if problems:
        raise ConfigError(problems)
    return entries


def parse_rule(
    source: str, destination: str | Sequence[str], *, environ: Mapping[str, str] = os.environ
) -> Rule:
    """Parse one images-file entry; raises :class:`ConfigError` (lines start ``images[...]``)."""
    problems: list[str] = []
    rules = _parse_images({source: destination}, "", environ, problems)
    if problems:
        raise ConfigError([p.removeprefix(": ") for p in problems])
    return rules[0]


def _load_section(
    path_arg: PathArg, section: str, environ: Mapping[str, str], problems: list[str]
) -> list:
    """The entries (``section="auth"``) or rules (``"images"``) of one split file."""
    path = os.fspath(path_arg)  # type: ignore[arg-type]
    doc = _read(path, problems)
    if doc is None or not _top_is_mapping(doc, path, problems, _SECTION_SHAPE[section]):
        return []
    if any(isinstance(doc.get(name), dict) for name in ("auth", "images")):
        problems.append(f'{path}: top level has "auth"/"images" sections: this is a legacy '
                        "single file, pass it with --config")
        return []
    if section == "auth":
        return _parse_auth(doc, path, environ, problems)
    return _parse_images(doc, path, environ, problems)


_SECTION_SHAPE = {"auth": "registry[/namespace] -> entry", "images": "source -> destination"}


def _top_is_mapping(doc: Any, path: str, problems: list[str], shape: str) -> bool:
    if isinstance(doc, dict):
        return True
    problems.append(f"{path}: top level must be a mapping ({shape}), got {_type_name(doc)}")
    return False


def _read(path: str, problems: list[str]) -> Any:
    """The parsed document, or None after recording why there is none."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        problems.append(f"{path}: file not found")
        return None
    except UnicodeDecodeError:
        problems.append(f"{path}: not UTF-8 text")
        return None
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror or type(exc).__name__}")
        return None
    duplicates: list[str] = []
    try:
        if path.lower().endswith(".json"):
            hook = _json_pairs(duplicates)
            doc = json.loads(text, object_pairs_hook=hook) if text.strip() else None
        else:
            loader = _StrictLoader(text)
            try:
                doc = loader.get_single_data()
            finally:
                loader.dispose()
            duplicates = loader.duplicates
    except json.JSONDecodeError as exc:
        problems.append(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")
        return None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.append(f"{path}: invalid YAML{where}: {_one_line(exc.problem or exc.context)}")
        return None
    except yaml.YAMLError as exc:
        problems.append(f"{path}: invalid YAML: {_one_line(str(exc))}")
        return None
    problems.extend(f"{path}: {dup}" for dup in duplicates)
    if doc is None:
        problems.append(f"{path}: file is empty")
    return doc


def _json_pairs(duplicates: list[str]):
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                duplicates.append(f"duplicate key {_quote(key)}")
            seen.add(key)
        return dict(pairs)

    return hook


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys instead of keeping the last silently."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    line = key_node.start_mark.line + 1
                    self.duplicates.append(f"duplicate key {_quote(key)} at line {line}")
                seen.add(key)
        return super().construct_mapping(node, deep)


# -- schemas ------------------------------------------------------------------------------------

_UNKNOWN = "Unknown field."
_AUTH_FIELDS = "username, password, insecure, ca_file"


class _LegacyFileSchema(Schema):
    """The legacy ``--config`` file: two sections."""

    class Meta:
        unknown = RAISE

    auth = fields.Dict(load_default=None, allow_none=True)
    images = fields.Dict(required=True)


class _AuthEntrySchema(Schema):
    """One auth entry."""

    class Meta:
        unknown = RAISE

    username = fields.String(load_default="", allow_none=True)
    password = fields.String(load_default="", allow_none=True)
    insecure = fields.Boolean(load_default=False)
    ca_file = fields.String(load_default=None, allow_none=True)


class _DestinationsField(fields.Field):
    """A destination string or a non-empty list of them; null means the default destination."""

    def __init__(self) -> None:
        super().__init__(allow_none=True)

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list):
            raise ValidationError("Not a valid destination: expected a string or a list.")
        if not value:
            raise ValidationError("empty list of destinations")
        bad = {i: ["Not a valid string."] for i, v in enumerate(value) if not isinstance(v, str)}
        if bad:
            raise ValidationError(bad)  # type: ignore[arg-type]
        return tuple(value)


_DESTINATIONS = _DestinationsField()


# -- auth ---------------------------------------------------------------------------------------


def _parse_auth(
    section: dict, path: str, environ: Mapping[str, str], problems: list[str]
) -> list[AuthEntry]:
    entries: list[AuthEntry] = []
    base_dir = Path(path).parent
    for key, value in section.items():
        where = f"auth[{_quote(key)}]"

        def bad(suffix: str, message: str, where: str = where) -> None:
            problems.append(_one_line(f"{path}: {where}{suffix}: {message}"))

        key_problem = _auth_key_problem(key)
        if key_problem:
            bad("", key_problem)
        if not isinstance(value, dict):
            bad("", f"must be a mapping with {_AUTH_FIELDS}, got {_type_name(value)}")
            continue
        try:
            data = _AuthEntrySchema().load(value)
        except ValidationError as exc:
            for sub, message in _flatten(exc.messages):
                if message == _UNKNOWN:
                    message = f"Unknown field (allowed: {_AUTH_FIELDS})."
                bad(sub, message)
            data = {"username": "", "password": "", "insecure": False, "ca_file": None}
            data.update(exc.valid_data or {})  # type: ignore[arg-type]
        username, errors = _expand(data.get("username") or "", environ, secret=False)
        for message in errors:
            bad(".username", message)
        password, errors = _expand(data.get("password") or "", environ, secret=True)
        for message in errors:
            bad(".password", message)
        ca_file = data.get("ca_file")
        if ca_file:
            ca_file = str(base_dir / Path(ca_file).expanduser())
            if not os.path.isfile(ca_file):
                bad(".ca_file", f"file not found: {ca_file}")
        if not key_problem and isinstance(key, str):
            creds = Credentials(username=username, password=password)
            entries.append(AuthEntry(key, creds, bool(data.get("insecure")), ca_file or None))
    return entries


def _auth_key_problem(key: Any) -> str | None:
    """Why ``key`` is not ``registry[/namespace]``, or None."""
    if not isinstance(key, str):
        return f"key must be a string registry[/namespace], got {_type_name(key)}"
    if "://" in key:
        return "write the registry without a URL scheme (host[:port][/namespace])"
    host, _, namespace = key.partition("/")
    if not is_registry_segment(host):
        return (f"{host!r} is not a registry host: it needs a '.' or a ':port', or must be "
                "'localhost' (a bare name means a Docker Hub namespace)")
    try:
        split_repository(f"{host}/x")
    except ReferenceError_:
        return f"invalid registry host {host!r} (expected host[:port])"
    if namespace:
        try:
            split_repository(key)
        except ReferenceError_:
            return f"invalid namespace {namespace!r}"
    return None


# -- images -------------------------------------------------------------------------------------


class _Bad(ValueError):
    """A problem with one source or destination text."""


def _parse_images(
    section: dict, path: str, environ: Mapping[str, str], problems: list[str]
) -> list[Rule]:
    if not section:
        problems.append(f"{path}: images: empty: no source -> destination rule to sync")
        return []
    rules: list[Rule] = []
    for key, value in section.items():
        where = f"images[{_quote(key)}]"

        def bad(suffix: str, message: str, where: str = where) -> None:
            problems.append(_one_line(f"{path}: {where}{suffix}: {message}"))

        texts: tuple[str, ...] = ()
        try:
            texts = _DESTINATIONS.deserialize(value) or ("",)
        except ValidationError as exc:
            for sub, message in _flatten(exc.messages):
                bad(sub, message)
        if not isinstance(key, str):
            bad("", f"source must be a string, got {_type_name(key)}")
            continue
        try:
            source, selector, wildcard = _parse_source(key)
        except (_Bad, ReferenceError_) as exc:
            bad("", str(exc))
            continue
        destinations: list[Destination] = []
        for index, text in enumerate(texts):
            suffix = f"[{index}]" if isinstance(value, list) else ""
            expanded, errors = _expand(text, environ, secret=False)
            for message in errors:
                bad(suffix, message)
            if errors:
                continue
            try:
                destinations.append(_parse_destination(expanded, selector, wildcard))
            except (_Bad, ReferenceError_) as exc:
                bad(suffix, str(exc))
        if texts and len(destinations) == len(texts):
            rules.append(Rule(key, source, selector, tuple(destinations), wildcard))
    return rules


def _parse_source(text: str) -> tuple[Repository, TagSelector, bool]:
    """``repo``, ``repo:t1,t2``, ``repo:/regex/``, ``repo@digest`` or ``registry/namespace/*``."""
    if not text or text != text.strip():
        raise _Bad("source is empty or has surrounding spaces")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        raise _Bad("a source is not a URL: drop the scheme (host[:port]/repository)")
    cut = text.find(":/")
    if cut != -1:  # a host's ":port" is followed by digits, so ":/" can only open a regex
        repo_text, rest = text[:cut], text[cut + 2 :]
        if not rest.endswith("/"):
            raise _Bad("a tag regex must be enclosed in slashes: repository:/regex/")
        pattern = rest[:-1]
        if not pattern:
            raise _Bad("empty tag regex")
        _no_wildcard(repo_text, "a tag regex")
        repo = split_repository(repo_text)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise _Bad(f"invalid tag regex: {exc}") from None
        return repo, TagSelector("regex", pattern=pattern), False
    if "@" in text:
        repo_text, digest = text.rsplit("@", 1)
        try:
            validate_digest(digest)
        except ReferenceError_:
            raise _Bad(f"invalid digest {digest!r}: expected sha256:<64 lowercase hex>") from None
        if repo_text.rfind(":") > repo_text.rfind("/"):
            raise _Bad("name either tags or a digest, not both")
        _no_wildcard(repo_text, "a digest")
        return split_repository(repo_text), TagSelector("digest", digest=digest), False
    repo_text, tags = _split_tags(text)
    if repo_text == "*" or repo_text.endswith("/*"):
        if tags:
            raise _Bad("a namespace wildcard (registry/namespace/*) takes every tag, no tags")
        return _namespace(repo_text[:-2]), ALL_TAGS, True
    _no_wildcard(repo_text, "tags" if tags else "a repository")
    selector = TagSelector("tags", tags=tags) if tags else ALL_TAGS
    return split_repository(repo_text), selector, False


def _parse_destination(text: str, selector: TagSelector, wildcard: bool) -> Destination:
    """A destination, checked against the source's selector (retag counts, digests)."""
    if text == "":
        return Destination()
    if text != text.strip():
        raise _Bad(f"destination {text!r} has surrounding spaces")
    if "*" in text:
        raise _Bad(f"destination {text!r}: '*' is only allowed at the end of a source")
    if "@" in text:  # the failed-images file writes digest jobs as dst@<same digest>
        text, digest = text.rsplit("@", 1)
        if selector.kind != "digest" or digest != selector.digest:
            raise _Bad("a destination cannot name a digest (a digest source keeps its digest)")
    repo_text, tags = _split_tags(text)
    try:
        repo = split_repository(repo_text)
    except ReferenceError_ as exc:
        raise _Bad(f"invalid destination: {exc}") from None
    if tags:
        if wildcard or selector.kind in ("all", "regex"):
            what = "a tag regex" if selector.kind == "regex" else "all tags"
            raise _Bad(f"destination names tags but the source selects {what}: cannot pair them")
        wanted = len(selector.tags) if selector.kind == "tags" else 1
        if len(tags) != wanted:
            have = f"{wanted} source tags" if selector.kind == "tags" else "a digest (one image)"
            raise _Bad(f"retag needs one destination tag per source tag: {have}, "
                       f"{len(tags)} destination tags")
    return Destination(repo, tags)


def _split_tags(text: str) -> tuple[str, tuple[str, ...]]:
    """``repo:t1,t2`` → (``repo``, tags). Only a colon after the last ``/`` starts tags."""
    colon = text.rfind(":")
    if colon <= text.rfind("/"):
        return text, ()
    tags = tuple(tag.strip() for tag in text[colon + 1 :].split(","))
    for tag in tags:
        if not tag:
            raise _Bad("empty tag in tag list")
        try:
            validate_tag(tag)
        except ReferenceError_:
            hint = " (for a pattern write :/regex/)" if any(c in tag for c in "*?^$[(|") else ""
            raise _Bad(f"invalid tag {tag!r}{hint}") from None
    return text[:colon], tags


def _no_wildcard(repo_text: str, what: str) -> None:
    if "*" in repo_text:
        raise _Bad(f"'*' is only allowed as the last path segment (registry/namespace/*), "
                   f"not with {what}")


def _namespace(prefix: str) -> Repository:
    """``registry/namespace`` of a wildcard source as ``Repository(registry, namespace)``."""
    if not prefix:
        raise _Bad("a wildcard needs a namespace: registry/namespace/*")
    if "*" in prefix:
        raise _Bad("'*' is only allowed once, as the last path segment (registry/namespace/*)")
    try:
        placeholder = split_repository(f"{prefix}/x")
    except ReferenceError_:
        raise _Bad(f"invalid namespace {prefix!r} before '/*'") from None
    namespace = placeholder.path[: -len("/x")]
    if not namespace:
        raise _Bad("a wildcard needs a namespace: registry/namespace/*")
    return Repository(placeholder.registry, namespace)


# -- small helpers ------------------------------------------------------------------------------

_VAR_RE = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*)|(\{))")


def _expand(text: str, environ: Mapping[str, str], *, secret: bool) -> tuple[str, list[str]]:
    """Expand ``${VAR}``/``$VAR`` (``$$`` → ``$``); returns the text and problems.

    For a secret a variable is named only when the whole value is ``${NAME}``: otherwise the
    "name" may be part of a password that contains a ``$``.
    """
    errors: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        dollar, braced, bare, malformed = match.groups()
        if dollar:
            return "$"
        if malformed:
            errors.append("malformed ${...}: write ${NAME}, or $$ for a literal $")
            return match.group(0)
        name = braced or bare
        if name in environ:
            return environ[name]
        if secret and not (braced and match.group(0) == text):
            errors.append("refers to an undefined environment variable (write $$ for a literal $)")
        else:
            errors.append(f'undefined environment variable "{name}"')
        return match.group(0)

    value = _VAR_RE.sub(substitute, text)
    return value, list(dict.fromkeys(errors))


def _flatten(messages: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """marshmallow's nested error messages → (key path suffix, message) pairs."""
    if isinstance(messages, dict):
        for key, value in messages.items():
            if key != "_schema":
                sub = where + (f".{key}" if isinstance(key, str) else f"[{key}]")
            else:
                sub = where
            yield from _flatten(value, sub)
    elif isinstance(messages, list):
        for value in messages:
            yield from _flatten(value, where)
    else:
        yield where, str(messages)


def _messages(messages: Any) -> Iterator[str]:
    for _, message in _flatten(messages):
        yield message


def _key_path(key: Any) -> str:
    plain = isinstance(key, str) and re.fullmatch(r"[A-Za-z_]\w*", key)
    return key if plain else f"[{_quote(key)}]"


def _quote(value: Any) -> str:
    """``"text"`` with quotes and control characters escaped (backslashes left readable)."""
    text = str(value).replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) + '"'


def _one_line(text: str) -> str:
    return " ".join(str(text).split("\n"))


def _type_name(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")
