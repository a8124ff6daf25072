"""A small Docker registry token server (the ``auth.token`` flow) for integration tests.

The server implements the Docker token specification well enough for distribution 2.8,
skopeo and the project's own client:

* ``GET /token?service=S&scope=repository:NAME:pull,push[&scope=...][&offline_token=true]``
  with optional HTTP Basic credentials;
* ``POST /token`` with an OAuth2 form (``grant_type=password`` or ``refresh_token``).

Tokens are RS256 JWTs signed with PyJWT whose header carries ``x5c`` (the base64 DER of
the signing certificate, issued by a throw-away CA that distribution trusts through its
``rootcertbundle``: :func:`tests.support.tls.make_token_signing_material`) or, with
``header_mode="kid"``, a libtrust ``kid``.

Hand-written because no packaged token server runs inside a test: the real ones (Harbor's
core, cesanta/docker_auth) are separate Go services, and the tests need per-test ACLs,
injected failures and a count of every token request, which they do not offer.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Literal

import jwt

from .httpserver import BackgroundServer
from .ports import LOOPBACK
from .tls import SigningMaterial, make_token_signing_material

#: Every action a default (non-restricted) user is granted.
ALL_ACTIONS: frozenset[str] = frozenset({"pull", "push", "delete", "*"})

#: Matches any authenticated user in ACL rules.
ANY_USER = "*"
#: The subject used for requests without credentials in ACL rules.
ANONYMOUS = ""


@dataclass(frozen=True)
class AclRule:
    """One allow/deny rule: ``user`` (or ``ANY_USER``/``ANONYMOUS``), name prefix, actions."""

    user: str
    actions: frozenset[str]
    prefix: str = ""
    allow: bool = True

    def matches(self, user: str, name: str) -> bool:
        """Return True if the rule applies to ``user`` acting on resource ``name``."""
        user_ok = user != ANONYMOUS if self.user == ANY_USER else self.user == user
        return user_ok and name.startswith(self.prefix)


@dataclass(frozen=True)
class Scope:
    """A parsed ``type:name:actions`` scope string."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope:
        """Parse ``repository:library/nginx:pull,push`` (names may contain ``:``)."""
        rtype, _, rest = text.partition(":")
        name, _, actions = rest.rpartition(":")
        if not rtype or not name:
            raise ValueError(f"bad scope {text!r}")
        return cls(rtype, name, tuple(a for a in actions.split(",") if a))


@dataclass
class TokenRequest:
    """What the token server saw for one request (for assertions in tests)."""

    method: str
    user: str | None
    service: str | None
    scopes: list[str]
    status: int
    granted: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Failure:
    remaining: int
    status: int


class TokenServer:
    """Threaded Docker token server listening on ``127.0.0.1:<free port>``.

    Args:
        users: ``{username: password}`` accepted via HTTP Basic / OAuth2 password grant.
        directory: where the signing key and certificate are written (a temp dir).
        service: the registry's ``auth.token.service`` (default ``aud``).
        issuer: the registry's ``auth.token.issuer`` (``iss`` claim).
        permissions: per-user default actions; users not listed get :data:`ALL_ACTIONS`.
        anonymous: actions granted without credentials; ``None`` refuses anonymous
            requests with 401.
        expires_in: token lifetime in seconds (note distribution allows 60 s leeway).
        header_mode: ``"x5c"`` (certificate chain) or ``"kid"`` (libtrust key id).
    """

    def __init__(
        self,
        users: Mapping[str, str],
        directory: Path,
        *,
        service: str = "test-registry",
        issuer: str = "test-token-issuer",
        permissions: Mapping[str, Iterable[str]] | None = None,
        anonymous: Iterable[str] | None = None,
        expires_in: int = 300,
        header_mode: Literal["x5c", "kid"] = "x5c",
        signing: SigningMaterial | None = None,
    ) -> None:
        self.users: dict[str, str] = dict(users)
        self.service = service
        self.issuer = issuer
        self.expires_in = expires_in
        self.header_mode = header_mode
        self.signing = signing or make_token_signing_material(directory)
        self.rules: list[AclRule] = []
        for user in self.users:
            actions = (permissions or {}).get(user, ALL_ACTIONS)
            self.rules.append(AclRule(user, frozenset(actions)))
        self.anonymous_allowed = anonymous is not None
        if anonymous is not None:
            self.rules.append(AclRule(ANONYMOUS, frozenset(anonymous)))
        self.requests: list[TokenRequest] = []
        self._refresh_tokens: dict[str, str] = {}
        self._failures: list[_Failure] = []
        self._lock = threading.Lock()
        self._background: BackgroundServer | None = None
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> TokenServer:
        """Bind to a free loopback port and serve in a daemon thread."""
        handler = type("_BoundTokenHandler", (_TokenHandler,), {"token_server": self})
        self._background = BackgroundServer(handler, "token-server").start()
        self.port = self._background.port
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._background is not None:
            self._background.stop()
            self._background = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def realm(self) -> str:
        """The token endpoint URL (``auth.token.realm``)."""
        return f"http://{LOOPBACK}:{self.port}/token"

    # -- counters ------------------------------------------------------------------

    @property
    def token_requests(self) -> int:
        """Number of requests made to ``/token`` (successful or not) since the last reset."""
        with self._lock:
            return len(self.requests)

    @property
    def tokens_issued(self) -> int:
        """Number of ``/token`` requests answered with 200."""
        with self._lock:
            return sum(1 for r in self.requests if r.status == 200)

    def reset_counts(self) -> None:
        """Forget recorded requests (``token_requests`` drops to 0)."""
        with self._lock:
            self.requests.clear()

    # -- ACL -----------------------------------------------------------------------

    def grant(self, user: str, actions: Iterable[str], prefix: str = "") -> None:
        """Allow ``user`` (or ``ANY_USER``/``ANONYMOUS``) ``actions`` on names with ``prefix``."""
        with self._lock:
            self.rules.append(AclRule(user, frozenset(actions), prefix, allow=True))
            if user == ANONYMOUS:
                self.anonymous_allowed = True

    def deny(self, user: str, actions: Iterable[str], prefix: str = "") -> None:
        """Deny ``actions`` to ``user`` (or ``ANY_USER``) on names starting with ``prefix``.

        Deny rules win over allow rules.
        """
        with self._lock:
            self.rules.append(AclRule(user, frozenset(actions), prefix, allow=False))

    def deny_push(self, user: str = ANY_USER, prefix: str = "") -> None:
        """Shortcut: deny ``push``/``delete`` to ``user`` on names starting with ``prefix``."""
        self.deny(user, ("push", "delete", "*"), prefix)

    def allowed_actions(self, user: str, name: str) -> set[str]:
        """Actions the ACL grants ``user`` (``ANONYMOUS`` for none) on resource ``name``."""
        with self._lock:
            rules = list(self.rules)
        allowed: set[str] = set()
        denied: set[str] = set()
        for rule in rules:
            if rule.matches(user, name):
                (allowed if rule.allow else denied).update(rule.actions)
        return allowed - denied

    def fail_next(self, n: int = 1, status: int = 503) -> None:
        """Answer the next ``n`` token requests with ``status`` (for retry tests)."""
        with self._lock:
            self._failures.append(_Failure(n, status))

    # -- token issuing -------------------------------------------------------------

    def check_credentials(self, user: str, password: str) -> bool:
        """Return True if ``user``/``password`` match the configured users."""
        expected = self.users.get(user)
        return expected is not None and secrets.compare_digest(expected, password)

    def issue(self, user: str, service: str, scopes: Iterable[str]) -> tuple[str, list[dict]]:
        """Sign a token for ``user`` (``ANONYMOUS`` for none) covering the granted scopes."""
        access: list[dict[str, Any]] = []
        for text in scopes:
            try:
                scope = Scope.parse(text)
            except ValueError:
                continue
            allowed = self.allowed_actions(user, scope.name)
            granted = [a for a in scope.actions if a in allowed]
            if granted:
                access.append({"type": scope.type, "name": scope.name, "actions": granted})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": service,  # distribution 2.8 only understands a single string audience
            "exp": now + self.expires_in,
            "nbf": now - 1,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        headers: dict[str, Any]
        if self.header_mode == "kid":
            headers = {"kid": self.signing.kid}
        else:
            headers = {"x5c": self.signing.x5c}
        token = jwt.encode(claims, self.signing.key, algorithm="RS256", headers=headers)
        return token, access

    def new_refresh_token(self, user: str) -> str:
        """Create a refresh token usable with ``POST /token grant_type=refresh_token``."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._refresh_tokens[token] = user
        return token

    def user_for_refresh_token(self, token: str) -> str | None:
        """Return the user a refresh token was issued to, or None."""
        with self._lock:
            return self._refresh_tokens.get(token)

    def _take_failure(self) -> int | None:
        with self._lock:
            for failure in self._failures:
                if failure.remaining > 0:
                    failure.remaining -= 1
                    return failure.status
            return None

    def _record(self, entry: TokenRequest) -> None:
        with self._lock:
            self.requests.append(entry)


class _TokenHandler(BaseHTTPRequestHandler):
    token_server: TokenServer
    protocol_version = "HTTP/1.1"
    server_version = "test-token-server/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        """Keep pytest output quiet."""

    def _send_json(
        self, status: int, body: Mapping[str, Any], extra: Mapping[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _basic_credentials(self) -> tuple[str, str] | None:
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value:
            return None
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        return (user, password) if sep else None

    def _answer(
        self,
        method: str,
        user: str | None,
        password: str | None,
        service: str | None,
        scopes: list[str],
        *,
        refresh_user: str | None = None,
        want_refresh: bool = False,
    ) -> None:
        server = self.token_server
        entry = TokenRequest(method, user, service, scopes, 0)
        injected = server._take_failure()
        if injected is not None:
            entry.status = injected
            server._record(entry)
            self._send_json(injected, {"errors": [{"code": "UNAVAILABLE", "message": "injected"}]})
            return
        if refresh_user is not None:
            subject = refresh_user
        elif user is not None:
            if not server.check_credentials(user, password or ""):
                entry.status = 401
                server._record(entry)
                self._send_json(
                    401,
                    {"errors": [{"code": "UNAUTHORIZED", "message": "invalid credentials"}]},
                    {"WWW-Authenticate": 'Basic realm="test-token-server"'},
                )
                return
            subject = user
        elif server.anonymous_allowed:
            subject = ANONYMOUS
        else:
            entry.status = 401
            server._record(entry)
            self._send_json(
                401,
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                {"WWW-Authenticate": 'Basic realm="test-token-server"'},
            )
            return
        token, access = server.issue(subject, service or server.service, scopes)
        entry.status = 200
        entry.granted = access
        server._record(entry)
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": server.expires_in,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if want_refresh and subject != ANONYMOUS:
            body["refresh_token"] = server.new_refresh_token(subject)
        self._send_json(200, body)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path.rstrip("/") != "/token":
            self._send_json(404, {"errors": [{"code": "NOT_FOUND"}]})
            return
        query = urllib.parse.parse_qs(url.query)
        scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
        service = query.get("service", [None])[0]
        creds = self._basic_credentials()
        want_refresh = query.get("offline_token", ["false"])[0].lower() == "true"
        user, password = creds if creds else (None, None)
        self._answer("GET", user, password, service, scopes, want_refresh=want_refresh)

    def do_POST(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode() if length else ""
        if url.path.rstrip("/") != "/token":
            self._send_json(404, {"errors": [{"code": "NOT_FOUND"}]})
            return
        form = urllib.parse.parse_qs(raw)

        def one(key: str) -> str | None:
            return form.get(key, [None])[0]

        scopes = [s for s in (one("scope") or "").split(" ") if s]
        grant_type = one("grant_type")
        service = one("service")
        if grant_type == "refresh_token":
            refresh_user = self.token_server.user_for_refresh_token(one("refresh_token") or "")
            if refresh_user is None:
                entry = TokenRequest("POST", None, service, scopes, 401)
                self.token_server._record(entry)
                self._send_json(401, {"errors": [{"code": "UNAUTHORIZED"}]})
                return
            self._answer("POST", None, None, service, scopes, refresh_user=refresh_user)
        elif grant_type == "password":
            self._answer(
                "POST",
                one("username") or "",
                one("password") or "",
                service,
                scopes,
                want_refresh=one("access_type") == "offline",
            )
        else:
            self.token_server._record(TokenRequest("POST", None, service, scopes, 400))
            self._send_json(400, {"error": "unsupported_grant_type"})
