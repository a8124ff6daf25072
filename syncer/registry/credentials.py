"""Where credentials come from: auth-file entries and docker's ``config.json``.

An auth entry is keyed by ``registry`` or ``registry/namespace``; for a given repository the
entry with the **longest matching prefix** wins (so ``harbor:8443/team-a`` can carry other
credentials than ``harbor:8443``). When no entry carries credentials, docker's config.json
(``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``) is asked, in docker's order:
its credential helper for the registry (``credHelpers[host]``, else ``credsStore``; see
:mod:`syncer.registry.credhelpers`), then the inline ``auths`` entry (also when the helper has
nothing for the registry), else anonymous. A configured helper that is missing or fails is an
error (:class:`~syncer.registry.credhelpers.CredentialHelperError`), as it is for docker.

Secrets never leave this module in printable form: :class:`Credentials` hides them in
``repr`` so a log line or traceback that shows one prints ``***``, and :func:`mask_secrets` is
the one rule that masks known secrets in free text (registry error messages, log lines).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from syncer.registry.credhelpers import HelperCache, HelperSecret
from syncer.registry.reference import normalize_registry

# docker login stores Docker Hub credentials under this legacy key.
_DOCKER_HUB_CONFIG_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io")
#: Shorter secrets are not masked: replacing every "ab" of a text would mangle it and hide
#: nothing worth hiding.
MIN_SECRET_LENGTH = 3
MASK = "***"


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret of at least :data:`MIN_SECRET_LENGTH` characters replaced
    by ``***``, longest first (so a secret that contains another is masked whole)."""
    ordered = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
    for secret in ordered:
        text = text.replace(secret, MASK)
    return text


@dataclass(frozen=True)
class Credentials:
    """A username/password pair, or an OAuth2 refresh token (docker's ``identitytoken``)."""

    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def __repr__(self) -> str:
        return f"Credentials(username={'***' if self.username else ''!r}, secret=***)"

    def __bool__(self) -> bool:
        return bool(self.username or self.password or self.identity_token)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secret strings, for scrubbing them out of any text."""
        return tuple(s for s in (self.password, self.identity_token) if s)


@dataclass(frozen=True)
class AuthEntry:
    """One entry of an auth file: how to talk to ``prefix`` (``registry[/namespace]``)."""

    prefix: str
    credentials: Credentials = field(default_factory=Credentials)
    insecure: bool = False
    ca_file: str | None = None
    #: Per-registry limits (set on a registry-wide entry only; see syncer.registry.limits).
    max_concurrency: int | None = None
    requests_per_second: float | None = None

    @property
    def registry(self) -> str:
        """The registry host part of the prefix."""
        return self.prefix.split("/", 1)[0]


def _matches(prefix: str, registry: str, repository: str) -> bool:
    host, _, namespace = prefix.partition("/")
    if normalize_registry(host) != registry:
        return False
    if not namespace:
        return True
    return repository == namespace or repository.startswith(namespace.rstrip("/") + "/")


class CredentialStore:
    """Answers "which credentials and TLS settings for this repository?".

    ``entries`` come from the auth file (already validated and ``$VAR``-expanded);
    ``docker_config`` is a path to docker's config.json, ``None`` for the default location,
    or ``False`` to ignore docker's config entirely. ``helper_timeout`` bounds one credential
    helper run (default: ``SYNCER_CREDENTIAL_HELPER_TIMEOUT`` or 30 s).
    """

    def __init__(
        self,
        entries: list[AuthEntry] | None = None,
        docker_config: str | Path | bool | None = None,
        *,
        helper_timeout: float | None = None,
    ):
        self._entries = sorted(entries or [], key=lambda e: len(e.prefix), reverse=True)
        config = _load_docker_config(docker_config)
        self._docker_auths = config.auths
        self._helpers = HelperCache(
            config.creds_store, config.cred_helpers, config_path=config.path,
            timeout=helper_timeout,
        )
        # (helper cache version, secrets): rebuilt only when a helper's answers change.
        # Two threads may rebuild at once: harmless, each result is tagged with the version
        # read before it was built, so a tuple is never taken for newer than it is.
        self._secrets: tuple[int, tuple[str, ...]] | None = None

    def entry_for(self, registry: str, repository: str = "") -> AuthEntry:
        """The settings for ``registry/repository``: longest matching auth-file prefix, with
        docker config.json credentials filled in when the entry carries none.

        Raises :class:`~syncer.registry.credhelpers.CredentialHelperError` when docker's
        credential helper for the registry is missing or fails.
        """
        registry = normalize_registry(registry)
        entry = next((e for e in self._entries if _matches(e.prefix, registry, repository)), None)
        if entry is None:
            entry = AuthEntry(prefix=registry)
        if not entry.credentials:
            docker = self._docker_credentials(registry)
            if docker:
                entry = dataclasses.replace(entry, credentials=docker)
        return entry

    def _docker_credentials(self, registry: str) -> Credentials | None:
        """docker's credentials for ``registry``: its helper's, else the inline entry's."""
        answer = self._helpers.get(registry)
        if answer is not None:
            return _helper_credentials(answer)
        return self._docker_auths.get(registry)

    def registry_settings(self, registry: str) -> AuthEntry:
        """The registry-wide entry (for TLS decisions and limits, which are per host, not per
        namespace)."""
        registry = normalize_registry(registry)
        candidates = [e for e in self._entries if normalize_registry(e.registry) == registry]
        insecure = any(e.insecure for e in candidates)
        ca_file = next((e.ca_file for e in candidates if e.ca_file), None)
        concurrency = next((e.max_concurrency for e in candidates if e.max_concurrency), None)
        rate = next((e.requests_per_second for e in candidates if e.requests_per_second), None)
        return AuthEntry(prefix=registry, insecure=insecure, ca_file=ca_file,
                         max_concurrency=concurrency, requests_per_second=rate)

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The auth-file keys (``registry`` or ``registry/namespace``) as written."""
        return tuple(entry.prefix for entry in self._entries)

    @property
    def docker_registries(self) -> tuple[str, ...]:
        """Registries docker's config.json holds credentials for (normalised): inline
        ``auths`` and ``credHelpers`` keys (``credsStore`` names no registry)."""
        return tuple(sorted({*self._docker_auths, *self._helpers.cred_helpers}))

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret this store knows, for scrubbing log text.

        The same tuple is returned until a credential helper's answers change (the auth file
        and config.json entries are fixed at construction): this is asked for every log
        record and every error response.
        """
        version = self._helpers.version
        cached = self._secrets
        if cached is not None and cached[0] == version:
            return cached[1]
        found: list[str] = []
        for entry in self._entries:
            found.extend(entry.credentials.secrets)
        for creds in self._docker_auths.values():
            found.extend(creds.secrets)
        found.extend(self._helpers.secrets)  # what credential helpers answered so far
        secrets = tuple(found)
        self._secrets = (version, secrets)
        return secrets


def docker_config_path() -> Path:
    """Where docker keeps config.json: ``$DOCKER_CONFIG`` or ``~/.docker``."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"


@dataclass(frozen=True)
class _DockerConfig:
    """What config.json says about credentials."""

    path: str = ""
    auths: dict[str, Credentials] = field(default_factory=dict)
    creds_store: str | None = None
    cred_helpers: dict[str, str] = field(default_factory=dict)


def _load_docker_config(path: str | Path | bool | None) -> _DockerConfig:
    if path is False:
        return _DockerConfig()
    path = docker_config_path() if path in (None, True) else Path(path)  # type: ignore[arg-type]
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return _DockerConfig()
    if not isinstance(doc, dict):
        return _DockerConfig()
    auths = doc.get("auths")
    found: dict[str, Credentials] = {}
    for key, value in (auths.items() if isinstance(auths, dict) else ()):
        if not isinstance(value, dict):
            continue
        creds = _docker_entry_credentials(value)
        if creds:
            found[_config_key_registry(key)] = creds
    store = doc.get("credsStore")
    helpers = doc.get("credHelpers")
    return _DockerConfig(
        path=str(path),
        auths=found,
        creds_store=store if isinstance(store, str) and store else None,
        cred_helpers={
            _config_key_registry(key): name
            for key, name in (helpers.items() if isinstance(helpers, dict) else ())
            if isinstance(key, str) and isinstance(name, str) and name
        },
    )


def _config_key_registry(key: str) -> str:
    """A config.json key (``https://index.docker.io/v1/``, ``https://host/``, ``host``) as
    a normalised registry."""
    host = "docker.io" if key in _DOCKER_HUB_CONFIG_KEYS else _strip_scheme(key)
    return normalize_registry(host)


def _helper_credentials(answer: HelperSecret) -> Credentials:
    """A helper's answer as credentials: ``<token>`` marks an identity (refresh) token."""
    if answer.is_identity_token:
        return Credentials(identity_token=answer.secret)
    return Credentials(username=answer.username, password=answer.secret)


def _strip_scheme(key: str) -> str:
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            key = key[len(scheme) :]
    return key.split("/", 1)[0]


def _docker_entry_credentials(value: dict) -> Credentials:
    username = str(value.get("username") or "")
    password = str(value.get("password") or "")
    token = str(value.get("identitytoken") or "")
    encoded = value.get("auth")
    if encoded and not (username and password):
        try:
            username, _, password = base64.b64decode(encoded).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return Credentials()
    return Credentials(username=username, password=password, identity_token=token)
