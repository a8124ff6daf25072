"""Registry authentication: the 401 challenge, Basic, and the Docker Bearer token flow.

The flow (distribution's ``docs/spec/auth/token.md``, used by Docker Hub, Harbor, ACR, GHCR):

1. A request without (valid) credentials answers 401 with
   ``WWW-Authenticate: Bearer realm="https://auth/token",service="registry",scope="..."``.
2. We GET ``realm?service=...&scope=repository:<name>:pull,push`` — the scope parameter may
   repeat (a cross-repo mount needs ``pull`` on the source repository as well) — sending Basic
   credentials if we have any, or POST an OAuth2 refresh token (docker's ``identitytoken``).
3. The answer is ``{"token"|"access_token": ..., "expires_in": seconds}``; the token is cached
   per scope set until shortly before it expires, and the request is retried once with
   ``Authorization: Bearer <token>``.

A ``Basic`` challenge is answered with the credentials directly, and from then on sent up front.
Redirects are followed by :mod:`syncer.registry.wire`, which drops ``Authorization`` when the
origin changes — that matters because real registries redirect blob GETs to object storage.

Token fetches are *single-flight* per scope set: when many threads need a token for the same
scopes at once (a run starting, a token expiring), one fetches it under a lock per scope key
and the others wait for it and use it. A fetch is retried in place under
:data:`~syncer.registry.retry.REQUEST_RETRIES`; a 429 from the token server becomes a
:class:`~syncer.registry.errors.RateLimitedError` carrying its ``Retry-After`` and pauses the
token server's host in the shared :class:`~syncer.registry.hostgate.Gate` (the registry's rule:
:func:`~syncer.registry.hostgate.pause_after`). Messages name status codes only: no
credential, token or refresh token ever reaches an exception or a log line.
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlencode, urlparse

from syncer.registry import observe
from syncer.registry.credentials import Credentials
from syncer.registry.errors import (
    AuthenticationError,
    RateLimitedError,
    ServerError,
    TransportError,
)
from syncer.registry.hostgate import Gate, HostGate, pause_after
from syncer.registry.reference import api_host
from syncer.registry.retry import (
    REQUEST_RETRIES,
    RetryPolicy,
    parse_retry_after,
    retry_in_place,
)
from syncer.registry.singleflight import SingleFlight
from syncer.registry.wire import HttpClient, Response, WireError

log = logging.getLogger(__name__)

# Refresh a token this many seconds before the registry would reject it.
_EXPIRY_MARGIN = 10.0
# distribution's default when the token server omits expires_in (token.md: "defaults to 60").
_DEFAULT_EXPIRES_IN = 60.0
_PARAM_RE = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


@dataclass(frozen=True)
class Challenge:
    """A parsed ``WWW-Authenticate`` header."""

    scheme: str  # "basic" or "bearer", lower-cased
    params: dict[str, str]


def parse_challenge(header: str | None) -> Challenge | None:
    """Parse ``WWW-Authenticate``; None when absent or unparseable."""
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
        for m in _PARAM_RE.finditer(rest)
    }
    return Challenge(scheme.lower(), params)


def repository_scope(repository: str, actions: str) -> str:
    """A token scope such as ``repository:library/nginx:pull,push``."""
    return f"repository:{repository}:{actions}"


class TokenCache:
    """Thread-safe cache of bearer tokens keyed by the requested scope set."""

    def __init__(self) -> None:
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, scopes: tuple[str, ...]) -> str | None:
        """The cached token for ``scopes`` if it has not (nearly) expired."""
        with self._lock:
            found = self._tokens.get(scopes)
        if found and found[1] > time.monotonic():
            return found[0]
        return None

    def put(self, scopes: tuple[str, ...], token: str, expires_in: float) -> None:
        """Remember ``token`` for ``scopes`` for ``expires_in`` seconds (minus a margin)."""
        deadline = time.monotonic() + max(expires_in - _EXPIRY_MARGIN, 1.0)
        with self._lock:
            self._tokens[scopes] = (token, deadline)


class Authenticator:
    """Produces ``Authorization`` headers for one registry host.

    ``header_for`` answers from what is already known (a cached token, or Basic once the
    registry asked for Basic); ``answer_challenge`` runs the flow after a 401. ``gate`` is the
    process's rate-limit gate (shared with the transports), ``retry_policy`` the in-place
    policy for token fetches.
    """

    def __init__(
        self,
        registry: str,
        http: HttpClient,
        verify: bool | str = True,
        *,
        gate: Gate | None = None,
        retry_policy: RetryPolicy = REQUEST_RETRIES,
    ):
        self.registry = registry
        self._verify = verify
        self._http = http
        self._gate: Gate = gate if gate is not None else HostGate()
        self._policy = retry_policy
        self._tokens = TokenCache()
        self._scheme: str | None = None  # learnt from the first challenge
        self._bearer_params: dict[str, str] = {}
        self._flights: SingleFlight[tuple[str, ...]] = SingleFlight()

    def header_for(self, scopes: tuple[str, ...], credentials: Credentials) -> str | None:
        """The Authorization header to send up front, if any is known to be wanted.

        Once the registry has shown a Bearer challenge, a token for new scopes is fetched
        here, before the request: a streamed upload body cannot be replayed after a 401.
        """
        if self._scheme == "basic" and credentials:
            return basic_header(credentials)
        if self._scheme == "bearer":
            token = self._tokens.get(scopes)
            if token is None and self._bearer_params:
                token = self._token(self._bearer_params, scopes, credentials)
            return f"Bearer {token}" if token else None
        return None

    def answer_challenge(
        self,
        response: Response,
        scopes: tuple[str, ...],
        credentials: Credentials,
        rejected: str | None = None,
    ) -> str:
        """Given a 401, return the header to retry with, or raise AuthenticationError.

        ``rejected`` is the Authorization header the refused request carried: a cached token
        other than that one (fetched meanwhile by another thread) is used without a fetch.
        """
        challenge = parse_challenge(response.headers.get("WWW-Authenticate"))
        if challenge is None:
            raise AuthenticationError(
                "401 without a WWW-Authenticate challenge", registry=self.registry, status=401
            )
        self._scheme = challenge.scheme
        if challenge.scheme == "basic":
            if not credentials:
                raise AuthenticationError(
                    "authentication required and no credentials configured",
                    registry=self.registry,
                    status=401,
                )
            return basic_header(credentials)
        if challenge.scheme != "bearer":
            raise AuthenticationError(
                f"unsupported auth scheme {challenge.scheme!r}", registry=self.registry, status=401
            )
        # Realm and service are per registry; the scope comes from our request, not theirs.
        self._bearer_params = {k: v for k, v in challenge.params.items() if k != "scope"}
        return f"Bearer {self._token(challenge.params, scopes, credentials, rejected)}"

    def _token(
        self,
        params: dict[str, str],
        scopes: tuple[str, ...],
        credentials: Credentials,
        rejected: str | None = None,
    ) -> str:
        """A token for ``scopes``: cached, or fetched by exactly one thread at a time."""
        with self._flights.lock(scopes):
            cached = self._tokens.get(scopes)
            if cached is not None and f"Bearer {cached}" != rejected:
                return cached  # another thread fetched it while we waited
            token, expires_in = retry_in_place(
                lambda: self._fetch_token(params, scopes, credentials), self._policy,
                registry=self.registry, what="token fetch",
            )
            self._tokens.put(scopes, token, expires_in)
            return token

    def _fetch_token(
        self, params: dict[str, str], scopes: tuple[str, ...], credentials: Credentials
    ) -> tuple[str, float]:
        realm = params.get("realm")
        if not realm:
            raise AuthenticationError(
                "Bearer challenge without realm", registry=self.registry, status=401
            )
        query: list[tuple[str, str]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        query.extend(("scope", s) for s in scopes)
        # A private CA configured for the registry also covers a token server on the same
        # host; any other realm (auth.docker.io, …) is verified against the system store.
        realm_host = urlparse(realm).netloc
        same_host = realm_host == api_host(self.registry)
        verify = self._verify if (same_host or self._verify is False) else True
        self._gate.wait(realm_host)
        try:
            if credentials.identity_token:
                form = urlencode([
                    *query,
                    ("grant_type", "refresh_token"),
                    ("client_id", "image-syncer-py"),
                    ("refresh_token", credentials.identity_token),
                ])
                response = self._http.send(
                    "POST", realm,
                    {"Content-Type": "application/x-www-form-urlencoded"}, form, verify=verify,
                )
            else:
                headers = {"Authorization": basic_header(credentials)} if credentials else {}
                url = realm + ("&" if "?" in realm else "?") + urlencode(query)
                response = self._http.send("GET", url, headers, verify=verify)
        except WireError as exc:
            if observe.observer is not None:
                observe.observer.request(self.registry, _token_method(credentials), "token",
                                         None)
            raise TransportError(
                f"token server unreachable: {exc.kind}", registry=self.registry,
                transient=exc.kind != "tls",
            ) from None
        watcher = observe.observer
        if watcher is not None:
            method = _token_method(credentials)
            watcher.request(self.registry, method, "token", response.status_code)
            if response.status_code != 200:
                watcher.failed(self.registry, method, "token", response.status_code)
        with response:
            return self._read_token(response, realm_host, credentials)

    def _read_token(
        self, response: Response, realm_host: str, credentials: Credentials
    ) -> tuple[str, float]:
        status = response.status_code
        if status in (401, 403):
            who = "the configured credentials were" if credentials else "anonymous access was"
            raise AuthenticationError(
                f"token server refused: {who} rejected (HTTP {status})",
                registry=self.registry,
                status=status,
            )
        asked = parse_retry_after(response.headers.get("Retry-After"))
        # A rate-limited (or overloaded) token server: every thread holds back, as for the
        # registry itself.
        pause_after(self._gate, realm_host, status, asked)
        if status == 429:
            raise RateLimitedError(
                "token server answered HTTP 429", registry=self.registry, status=429,
                retry_after=asked,
            )
        if status >= 500 or status == 408:
            raise ServerError(
                f"token server answered HTTP {status}",
                registry=self.registry,
                status=status,
                retry_after=asked,
            )
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if status != 200 or not token:
            raise AuthenticationError(
                f"token server gave no token (HTTP {status})",
                registry=self.registry,
                status=status,
            )
        return str(token), float(body.get("expires_in") or _DEFAULT_EXPIRES_IN)


def basic_header(credentials: Credentials) -> str:
    """The ``Authorization: Basic`` value for ``credentials``."""
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _token_method(credentials: Credentials) -> str:
    """The method of a token fetch: POST for an OAuth2 refresh token, else GET."""
    return "POST" if credentials.identity_token else "GET"
