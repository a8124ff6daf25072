"""docker's credential helpers: ``credsStore`` and ``credHelpers`` of ``config.json``.

``docker login`` with a helper configured stores the secret in the helper (the OS keychain,
``pass``, a cloud's token service) and leaves only ``"auths": {"host": {}}`` in config.json.
To read it we speak the helper protocol (github.com/docker/docker-credential-helpers,
``client.Get``): run ``docker-credential-<name> get``, write the server URL on stdin, read
``{"ServerURL": ..., "Username": ..., "Secret": ...}`` from stdout. A ``Username`` of
``<token>`` means ``Secret`` is an identity (OAuth2 refresh) token, not a password. A helper
that has nothing for the server exits non-zero printing ``credentials not found in native
keychain`` (the protocol's ``ErrCredentialsNotFound`` text): that is "no credentials", not an
error.

docker asks ``credHelpers[<host>]`` first, then ``credsStore`` (every registry); the server URL
it passes is the host (``registry.example.com:5000``), and ``https://index.docker.io/v1/`` for
Docker Hub. Answers are cached for the process (:class:`HelperCache`), one helper run per
registry and :data:`DEFAULT_TTL`, single-flight, so a thousand images cost one run; failures are
cached too, so a missing helper is reported, not run a thousand times.

Secrets never reach a message: an error names the helper, the registry and the config key,
and quotes the helper's own output only when it is a one-line error text, never JSON.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field

from syncer.registry.errors import AuthenticationError
from syncer.registry.singleflight import SingleFlight

#: Seconds a helper may take (``SYNCER_CREDENTIAL_HELPER_TIMEOUT``); cloud helpers make a
#: network call, so this is generous.
DEFAULT_TIMEOUT = 30.0
#: Seconds a helper's answer is reused: short-lived cloud tokens (GCR: an hour) stay fresh in
#: a long-running worker, while a run still costs one helper call per registry.
DEFAULT_TTL = 300.0
#: What the helper protocol says when it has nothing for the server.
NOT_FOUND_TEXT = "credentials not found in native keychain"
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
_MAX_OUTPUT = 64 * 1024


class CredentialHelperError(AuthenticationError):
    """A configured credential helper is missing, failed, timed out or answered nonsense."""


@dataclass(frozen=True)
class HelperSecret:
    """A helper's answer. ``username == "<token>"`` marks ``secret`` as an identity token."""

    username: str = field(default="", repr=False)
    secret: str = field(default="", repr=False)

    def __repr__(self) -> str:
        return "HelperSecret(***)"

    @property
    def is_identity_token(self) -> bool:
        """True when ``secret`` is an OAuth2 refresh token (docker's ``identitytoken``)."""
        return self.username == "<token>"


def helper_timeout() -> float:
    """``SYNCER_CREDENTIAL_HELPER_TIMEOUT`` (seconds) or :data:`DEFAULT_TIMEOUT`."""
    try:
        value = float(os.environ.get("SYNCER_CREDENTIAL_HELPER_TIMEOUT", ""))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


def server_url(registry: str) -> str:
    """What docker passes to a helper for ``registry`` (normalised host)."""
    return DOCKER_HUB_SERVER if registry == "docker.io" else registry


def run_helper(name: str, registry: str, *, where: str, timeout: float) -> HelperSecret | None:
    """Ask ``docker-credential-<name>`` for ``registry``'s credentials.

    Returns None when the helper has none. ``where`` names the config key that chose the
    helper (for messages). Raises :class:`CredentialHelperError`.
    """
    program = f"docker-credential-{name}"

    def error(problem: str) -> CredentialHelperError:
        return CredentialHelperError(
            f"docker credential helper {program} ({where}) {problem}", registry=registry
        )

    path = shutil.which(program)
    if path is None:
        raise error("is not on PATH: install it, or remove that entry from config.json")
    try:
        done = subprocess.run(
            [path, "get"],
            input=server_url(registry).encode(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise error(f"did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise error(f"could not be run: {exc.strerror or type(exc).__name__}") from None
    stdout = done.stdout[:_MAX_OUTPUT].decode("utf-8", "replace").strip()
    if done.returncode != 0:
        said = stdout or done.stderr[:_MAX_OUTPUT].decode("utf-8", "replace").strip()
        if NOT_FOUND_TEXT in said:
            return None
        raise error(f"failed (exit {done.returncode}){_quote_error(said)}")
    try:
        doc = json.loads(stdout)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("Secret", ""), str):
        raise error('answered something that is not {"Username": ..., "Secret": ...}')
    username, secret = str(doc.get("Username") or ""), str(doc.get("Secret") or "")
    if not username and not secret:
        return None
    return HelperSecret(username, secret)


def _quote_error(text: str) -> str:
    """``: <text>`` for a helper's error message, when it is safe to repeat.

    Helpers print a one-line error; anything that looks like a JSON answer (which could hold
    a secret) or runs long is not repeated.
    """
    line = text.splitlines()[0].strip() if text else ""
    if not line or line.startswith(("{", "[")) or "secret" in line.lower():
        return ""
    return ": " + (line if len(line) <= 200 else line[:200] + "…")


# (valid until, by time.monotonic(); the answer or the error to raise again)
_Answer = tuple[float, HelperSecret | CredentialHelperError | None]


class HelperCache:
    """Helper answers per registry for this process: reused for ``ttl`` seconds, fetched
    single-flight (one run per registry however many threads ask at once), errors included."""

    def __init__(
        self,
        creds_store: str | None,
        cred_helpers: dict[str, str],
        *,
        config_path: str = "config.json",
        timeout: float | None = None,
        ttl: float = DEFAULT_TTL,
    ):
        self.creds_store = creds_store or None
        self.cred_helpers = dict(cred_helpers)
        self.config_path = config_path
        self.timeout = timeout
        self.ttl = ttl
        self._answers: dict[str, _Answer] = {}
        #: Bumped after each change of the answers (so a secrets list built from them knows
        #: when it is out of date: see CredentialStore.secrets).
        self.version = 0
        self._flights: SingleFlight[str] = SingleFlight()  # one helper run per registry
        self._lock = threading.Lock()

    def helper_for(self, registry: str) -> tuple[str, str] | None:
        """(helper name, config key naming it) for ``registry``, or None."""
        if registry in self.cred_helpers:
            return self.cred_helpers[registry], f'credHelpers["{registry}"] in {self.config_path}'
        if self.creds_store:
            return self.creds_store, f"credsStore in {self.config_path}"
        return None

    def get(self, registry: str) -> HelperSecret | None:
        """The helper's credentials for ``registry`` (None: no helper, or it has none).

        Raises :class:`CredentialHelperError` (the same one for ``ttl`` seconds).
        """
        chosen = self.helper_for(registry)
        if chosen is None:
            return None
        answer = self._fresh(registry)
        if answer is None:
            with self._flights.lock(registry):
                answer = self._fresh(registry)
                if answer is None:
                    try:
                        value: HelperSecret | CredentialHelperError | None = run_helper(
                            chosen[0], registry, where=chosen[1],
                            timeout=self.timeout or helper_timeout(),
                        )
                    except CredentialHelperError as exc:
                        value = exc
                    answer = (time.monotonic() + self.ttl, value)
                    with self._lock:
                        self._answers[registry] = answer
                        self.version += 1  # after the write: a reader of it sees the answer
        value = answer[1]
        if isinstance(value, CredentialHelperError):
            # A copy per raise: re-raising one instance from many threads would grow (and
            # share) its traceback.
            raise copy.copy(value).with_traceback(None)
        return value

    def _fresh(self, registry: str) -> _Answer | None:
        with self._lock:
            answer = self._answers.get(registry)
        return answer if answer is not None and answer[0] > time.monotonic() else None

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret fetched so far (for scrubbing text)."""
        with self._lock:
            answers = list(self._answers.values())
        return tuple(v.secret for _, v in answers if isinstance(v, HelperSecret) and v.secret)
