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

The image rules themselves (forms, tag regexes) are parsed by :mod:`syncer.plan.rules`. A
rule's value may also be a mapping, the long form, which adds tag filters
(:mod:`syncer.plan.tagfilters`)::

    quay.io/a/b: {to: quay.io/x/b, exclude: '-rc', semver: '>=1.2 <2', latest: 5, sort: semver}

``to`` takes what a short value takes (a destination or a list; ``""`` is the default
destination). Filters need a key that lists tags (``repo``, ``repo:/regex/``,
``namespace/*``): a key that names tags or a digest has nothing to filter.

``${VAR}`` / ``$VAR`` are expanded from the environment in ``username``, ``password`` and
destinations (not in source keys, whose regexes may end with ``$``); ``$$`` is a literal ``$``.
An undefined variable is an error. A relative ``ca_file`` is relative to the auth file's folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from marshmallow import RAISE, Schema, ValidationError, fields, validate

from syncer.plan.documents import (
    error_messages,
    flatten,
    key_path,
    one_line,
    quote,
    read,
    top_is_mapping,
    type_name,
)
from syncer.plan.rules import Destination, Rule, RuleSyntaxError, parse_destination, parse_source
from syncer.plan.tagfilters import (
    NO_FILTERS,
    SORTS,
    FilterSyntaxError,
    TagFilters,
    check_pattern,
    parse_range,
)
from syncer.registry.credentials import AuthEntry, Credentials
from syncer.registry.errors import ConfigError, ReferenceError_
from syncer.registry.reference import is_registry_segment, split_repository

PathArg = str | os.PathLike[str] | None


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
        doc = read(path, problems)
        entries, rules = [], []
        if doc is not None and top_is_mapping(doc, path, problems, '"auth" and "images"'):
            for field_name, messages in _LegacyFileSchema().validate(doc).items():
                for message in error_messages(messages):
                    if message == _UNKNOWN:
                        message = 'unknown top-level key (expected "auth" and "images")'
                    problems.append(f"{path}: {key_path(field_name)}: {message}")
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
        doc = read(file, problems)
        entries: list[AuthEntry] = []
        if doc is not None and top_is_mapping(doc, file, problems, '"auth" and "images"'):
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
    source: str,
    destination: str | Sequence[str] | Mapping[str, Any],
    *,
    environ: Mapping[str, str] = os.environ,
) -> Rule:
    """Parse one images-file entry (short or long form); raises :class:`ConfigError` (lines
    start ``images[...]``)."""
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
    doc = read(path, problems)
    if doc is None or not top_is_mapping(doc, path, problems, _SECTION_SHAPE[section]):
        return []
    if any(isinstance(doc.get(name), dict) for name in ("auth", "images")):
        problems.append(
            f'{path}: top level has "auth"/"images" sections: this is a legacy '
            "single file, pass it with --config"
        )
        return []
    if section == "auth":
        return _parse_auth(doc, path, environ, problems)
    return _parse_images(doc, path, environ, problems)


_SECTION_SHAPE = {"auth": "registry[/namespace] -> entry", "images": "source -> destination"}


# -- schemas ------------------------------------------------------------------------------------

_UNKNOWN = "Unknown field."
_AUTH_FIELDS = "username, password, insecure, ca_file, max_concurrency, requests_per_second"


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
    # Per-registry limits (syncer.registry.limits): a boolean is refused, a quoted count too.
    max_concurrency = fields.Integer(
        load_default=None, allow_none=True, strict=True, validate=validate.Range(min=1)
    )
    requests_per_second = fields.Float(
        load_default=None, allow_none=True, validate=validate.Range(min=0, min_inclusive=False)
    )


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


class _PatternsField(fields.Field):
    """``exclude``: one regex or a non-empty list of them, each compiled to check it."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise ValidationError("expected a regex or a non-empty list of regexes")
        bad: dict[int, list[str]] = {}
        for index, item in enumerate(items):
            try:
                check_pattern(item if isinstance(item, str) else "")
            except FilterSyntaxError as exc:
                bad[index] = [str(exc) if isinstance(item, str) else "Not a valid string."]
        if bad:
            raise ValidationError(bad if isinstance(value, list) else bad[0])  # type: ignore[arg-type]
        return tuple(items)


class _RangeField(fields.Field):
    """``semver``: an npm-style range, parsed to check it."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> str:
        if not isinstance(value, str):
            raise ValidationError(
                f"must be a string, got {type_name(value)} (quote it in YAML: semver: '>=1.2 <2')"
            )
        try:
            parse_range(value)
        except FilterSyntaxError as exc:
            raise ValidationError(str(exc)) from None
        return value


class _CountField(fields.Field):
    """``latest``: a whole number of tags, at least 1 (``true`` is not a number here)."""

    def _deserialize(self, value: Any, attr: Any, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(f"expected a whole number of tags, got {type_name(value)}")
        if value < 1:
            raise ValidationError("must be at least 1")
        return value


class _LongFormSchema(Schema):
    """A rule's value as a mapping: destinations plus tag filters."""

    class Meta:
        unknown = RAISE

    to = _DestinationsField()
    exclude = _PatternsField()
    semver = _RangeField()
    latest = _CountField()
    sort = fields.String(validate=validate.OneOf(SORTS, error="must be one of: {choices}"))
    # Copy the images' referrers (signatures, SBOMs…): overrides --referrers for this rule.
    referrers = fields.Boolean(truthy={True}, falsy={False})


_LONG_FORM_FIELDS = ", ".join(_LongFormSchema._declared_fields)


# -- auth ---------------------------------------------------------------------------------------


def _parse_auth(
    section: dict, path: str, environ: Mapping[str, str], problems: list[str]
) -> list[AuthEntry]:
    entries: list[AuthEntry] = []
    base_dir = Path(path).parent
    for key, value in section.items():
        where = f"auth[{quote(key)}]"

        def bad(suffix: str, message: str, where: str = where) -> None:
            problems.append(one_line(f"{path}: {where}{suffix}: {message}"))

        key_problem = _auth_key_problem(key)
        if key_problem:
            bad("", key_problem)
        if not isinstance(value, dict):
            bad("", f"must be a mapping with {_AUTH_FIELDS}, got {type_name(value)}")
            continue
        try:
            data = _AuthEntrySchema().load(value)
        except ValidationError as exc:
            for sub, message in flatten(exc.messages):
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
        limits = {k: data.get(k) for k in ("max_concurrency", "requests_per_second")}
        if isinstance(key, str) and "/" in key and any(v is not None for v in limits.values()):
            bad("", "max_concurrency and requests_per_second limit a whole registry: set them "
                    f"on the {key.split('/', 1)[0]!r} entry")
        if not key_problem and isinstance(key, str):
            creds = Credentials(username=username, password=password)
            entries.append(AuthEntry(key, creds, bool(data.get("insecure")), ca_file or None,
                                     **limits))
    return entries


def _auth_key_problem(key: Any) -> str | None:
    """Why ``key`` is not ``registry[/namespace]``, or None."""
    if not isinstance(key, str):
        return f"key must be a string registry[/namespace], got {type_name(key)}"
    if "://" in key:
        return "write the registry without a URL scheme (host[:port][/namespace])"
    host, _, namespace = key.partition("/")
    if not is_registry_segment(host):
        return (
            f"{host!r} is not a registry host: it needs a '.' or a ':port', or must be "
            "'localhost' (a bare name means a Docker Hub namespace)"
        )
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


def _parse_images(
    section: dict, path: str, environ: Mapping[str, str], problems: list[str]
) -> list[Rule]:
    if not section:
        problems.append(f"{path}: images: empty: no source -> destination rule to sync")
        return []
    rules: list[Rule] = []
    for key, value in section.items():
        where = f"images[{quote(key)}]"

        def bad(suffix: str, message: str, where: str = where) -> None:
            problems.append(one_line(f"{path}: {where}{suffix}: {message}"))

        texts: tuple[str, ...] = ()
        filters: TagFilters | None = NO_FILTERS
        to_where = ""
        referrers = value.get("referrers") if isinstance(value, dict) else None
        if isinstance(value, dict):
            value, filters, texts = _long_form(value, bad)
            to_where = ".to"
        else:
            try:
                texts = _DESTINATIONS.deserialize(value) or ("",)
            except ValidationError as exc:
                for sub, message in flatten(exc.messages):
                    bad(sub, message)
        if not isinstance(key, str):
            bad("", f"source must be a string, got {type_name(key)}")
            continue
        try:
            source, selector, wildcard = parse_source(key)
        except (RuleSyntaxError, ReferenceError_) as exc:
            bad("", str(exc))
            continue
        if filters and selector.kind in ("tags", "digest"):
            what = "names its tags" if selector.kind == "tags" else "names a digest"
            bad("", f"the key {what}: tag filters ({filters}) need a key that lists tags "
                    "(repository, repository:/regex/ or registry/namespace/*)")
            continue
        destinations: list[Destination] = []
        for index, text in enumerate(texts):
            suffix = to_where + (f"[{index}]" if isinstance(value, list) else "")
            expanded, errors = _expand(text, environ, secret=False)
            for message in errors:
                bad(suffix, message)
            if errors:
                continue
            try:
                destinations.append(parse_destination(expanded, selector, wildcard))
            except (RuleSyntaxError, ReferenceError_) as exc:
                bad(suffix, str(exc))
        if filters is not None and texts and len(destinations) == len(texts):
            rules.append(Rule(key, source, selector, tuple(destinations), wildcard, filters,
                              referrers if isinstance(referrers, bool) else None))
    return rules


def _long_form(
    value: dict, bad: Callable[[str, str], None]
) -> tuple[Any, TagFilters | None, tuple[str, ...]]:
    """A long-form value → (the ``to`` value, its filters, its destination texts).

    Problems go to ``bad``; filters are None when they are unusable (the rule is then dropped,
    though its destinations are still checked so every mistake is reported at once).
    """
    to_value = value.get("to")
    try:
        data = _LongFormSchema().load(value)
        usable = True
    except ValidationError as exc:
        for sub, message in flatten(exc.messages):
            if message == _UNKNOWN:
                message = f"Unknown field (allowed: {_LONG_FORM_FIELDS})."
            bad(sub, message)
        data, usable = dict(exc.valid_data or {}), False  # type: ignore[call-overload]
    if "to" not in value:
        bad("", 'missing "to": the destination(s) of the rule ("" for the default destination)')
        return None, None, ()
    if "sort" in data and "latest" not in value:
        bad(".sort", "sort orders the tags for latest: give latest N as well")
        usable = False
    texts = (data.get("to") or ("",)) if "to" in data else ()
    if not usable:
        return to_value, None, texts
    filters = TagFilters(
        exclude=data.get("exclude", ()),
        semver=data.get("semver", ""),
        latest=data.get("latest"),
        sort=data.get("sort", "semver"),
    )
    return to_value, filters, texts


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
