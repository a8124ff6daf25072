"""HTTP transport for one registry host: TLS mode, scheme discovery, auth, response → error,
in-place retries and the shared rate-limit gate.

This is the one place where HTTP responses become the typed errors of :mod:`syncer.registry.errors`
(:func:`raise_for_response`), and where failures of the wire
(:class:`~syncer.registry.wire.WireError`: no complete answer) become :class:`TransportError`.
HTTP itself is :mod:`syncer.registry.wire`.

**Retries where the fault happens.** Every request whose body can be sent again (no body,
``bytes`` or ``str``: ping, token fetch, HEAD/GET manifest, tags and catalog pages, blob HEAD,
mount and upload POST, manifest PUT — the same bytes, so idempotent — upload DELETE) is
retried in place on a transient error (:func:`syncer.registry.errors.is_transient`) under
:data:`syncer.registry.retry.REQUEST_RETRIES`: exponential backoff with jitter, ``Retry-After``
honoured up to 30 s (a longer one is raised, for the image-level retry to wait out), never
past the copy's deadline (:func:`syncer.registry.retry.current_deadline`). A streamed GET is retried
only until its headers arrive — its body belongs to the caller. A streamed upload body (an
iterator) cannot be replayed, so it is not retried here; the blob code resumes it one layer up.

Why here and not in the HTTP layer (as urllib3's ``Retry`` would)? Below this layer only
status codes are seen: a refused ``Authorization`` would be resent instead of running the
token flow again, the spec error codes of a body (``TOOMANYREQUESTS`` in a 400,
``UNAVAILABLE``) and a body that breaks after the headers go unseen, and neither the shared
host gate nor the copy's deadline is known. So :mod:`~syncer.registry.wire` never retries and
the one :class:`~syncer.registry.retry.RetryPolicy` drives a small loop here.

**Rate limits are shared.** Before each request the transport waits at the process's
:class:`~syncer.registry.hostgate.Gate`; a 429 (or a 503 with ``Retry-After``: the one rule is
:func:`~syncer.registry.hostgate.pause_after`) pauses that host for every thread of the
process — and, with the Redis gate of the distributed mode, every worker.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import threading
from collections.abc import Iterable
from typing import NoReturn
from urllib.parse import urlparse

from syncer.registry import observe
from syncer.registry.auth import Authenticator, repository_scope
from syncer.registry.credentials import CredentialStore, mask_secrets
from syncer.registry.errors import (
    AuthenticationError,
    NotFoundError,
    RateLimitedError,
    RegistryError,
    ServerError,
    SpecError,
    TransportError,
)
from syncer.registry.hostgate import Gate, HostGate, pause_after
from syncer.registry.limits import Limit, Limiter, limited
from syncer.registry.reference import api_host
from syncer.registry.retry import (
    REQUEST_RETRIES,
    RetryPolicy,
    parse_retry_after,
    retry_in_place,
)
from syncer.registry.wire import DEFAULT_TIMEOUT, HttpClient, Response, WireError, split_origin

log = logging.getLogger(__name__)

USER_AGENT = "image-syncer-py/0.1"
# Connections kept per host. Sockets are opened lazily, so a large pool costs nothing; it must
# cover the requests in flight at once — images at once x (blob workers + 1 manifest request):
# at most 256 (`--proc`, `--concurrency`) x (4 + 1) — or connections past it are closed after
# one request and opened again for the next.
POOL_SIZE = 256 * (4 + 1)
_NOT_FOUND_CODES = {"NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "BLOB_UPLOAD_UNKNOWN"}
_TRANSIENT_CODES = {"TOOMANYREQUESTS", "UNAVAILABLE", "UNKNOWN"}


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and 127.0.0.0/8 / ::1 hosts (with or without a port)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _retry_after(response: Response) -> float | None:
    return parse_retry_after(response.headers.get("Retry-After"))


def _spec_errors(response: Response, secrets: Iterable[str]) -> tuple[SpecError, ...]:
    """The spec error entries of ``response``'s body, each message masked of ``secrets`` and
    then cut to 200 characters (in that order: a cut first could leave a secret's prefix)."""
    try:
        body = json.loads(response.content[:65536] or b"{}")
    except ValueError:
        return ()
    items = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return ()
    secrets = tuple(secrets)
    return tuple(
        SpecError(str(e.get("code", "")), mask_secrets(str(e.get("message", "")), secrets)[:200])
        for e in items
        if isinstance(e, dict)
    )


def raise_for_response(
    response: Response,
    registry: str,
    what: str,
    secrets: Iterable[str] = (),
    *,
    retry_after: float | None = None,
) -> None:
    """Raise the typed error for a non-2xx ``response``; ``what`` names the operation.

    The registry's own error messages are free text: a registry (or a proxy in front of it)
    that echoes what it was sent could put a credential there. Every known ``secrets`` value
    is masked before the text reaches the exception, and so the ledger, Redis and summaries.
    ``retry_after``: the response's ``Retry-After`` when the caller has parsed it already.
    """
    status = response.status_code
    if status < 400:
        return
    if retry_after is None:
        retry_after = _retry_after(response)
    errors = _spec_errors(response, secrets)
    codes = {e.code for e in errors}
    detail = "; ".join(f"{e.code}: {e.message}" if e.message else e.code for e in errors)
    message = f"{what}: HTTP {status}" + (f" ({detail})" if detail else "")
    kwargs = {"registry": registry, "status": status, "errors": errors}
    if status == 429 or "TOOMANYREQUESTS" in codes:
        raise RateLimitedError(message, retry_after=retry_after, **kwargs)
    if status in (401, 403) or codes & {"UNAUTHORIZED", "DENIED"}:
        raise AuthenticationError(message, **kwargs)
    if status == 404 or codes & _NOT_FOUND_CODES:
        raise NotFoundError(message, **kwargs)
    if status >= 500 or status == 408 or codes & _TRANSIENT_CODES:
        raise ServerError(message, retry_after=retry_after, **kwargs)
    raise RegistryError(message, **kwargs)


class _Settled(Exception):
    """Carries an error out of the request loop untouched: the auth step's token fetch was
    already retried in place, and a second loop around it would stack retry layers."""

    def __init__(self, error: RegistryError):
        super().__init__(str(error))
        self.error = error


class Transport:
    """Sends requests to one registry host with the right scheme, TLS settings and auth.

    TLS is verified unless the registry is marked ``insecure``; a ``ca_file`` adds a private
    CA. Plain HTTP is used only for ``insecure`` registries and loopback hosts (as docker
    does), and only after the host proved it speaks the registry API over HTTP.

    ``gate`` is the process's rate-limit gate (one is made when none is given);
    ``retry_policy`` the in-place policy for replayable requests and token fetches;
    ``limiter`` the process's per-registry limiter (the auth file's ``max_concurrency`` /
    ``requests_per_second``; one is made when none is given).
    """

    def __init__(
        self,
        registry: str,
        store: CredentialStore,
        *,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        pool_size: int = POOL_SIZE,
        gate: Gate | None = None,
        retry_policy: RetryPolicy = REQUEST_RETRIES,
        limiter: Limiter | None = None,
    ):
        self.registry = registry
        self.host = api_host(registry)
        self.store = store
        self.timeout = timeout
        self.gate: Gate = gate if gate is not None else HostGate()
        self.retry_policy = retry_policy
        settings = store.registry_settings(registry)
        self.insecure = settings.insecure
        # The auth file's max_concurrency / requests_per_second: None (no cost) when unset.
        self.limit = (limiter or Limiter()).bind(
            registry, Limit(settings.max_concurrency, settings.requests_per_second)
        )
        # HTTP(S)_PROXY / NO_PROXY are honoured (syncer.registry.wire).
        self.http = HttpClient(timeout=timeout, pool_size=pool_size, user_agent=USER_AGENT)
        self.verify: bool | str = False if settings.insecure else (settings.ca_file or True)
        self.authenticator = Authenticator(
            registry, self.http, self.verify, gate=self.gate, retry_policy=retry_policy,
        )
        self._base_url: str | None = None
        self._base_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        """``https://host`` or (insecure / loopback over plain HTTP) ``http://host``."""
        if self._base_url is None:
            with self._base_lock:
                if self._base_url is None:
                    self._base_url = self._retrying(self._discover_scheme, "ping")
        return self._base_url

    def _discover_scheme(self) -> str:
        loopback = is_loopback(self.host)
        https, http = f"https://{self.host}", f"http://{self.host}"
        self.gate.wait(self.host)
        if not (self.insecure or loopback):
            try:
                self._ping(https)
            except WireError as exc:
                self._observe("GET", f"{https}/v2/", None)
                raise self._transport_error("ping", exc) from None
            return https
        # Plain HTTP is allowed: TLS first, as docker does for an insecure registry — but a
        # registry on this machine is most often plain HTTP (``registry:2`` on localhost:5000,
        # or a local tunnel or relay to a far one), so there plain HTTP goes first and saves a
        # TLS handshake bound to fail, a round trip through a tunnel (nothing leaves the host,
        # and a ping carries no credentials). A TLS-only server answers plain HTTP with a 400
        # (or hangs up).
        failures: dict[str, WireError] = {}
        for base in (http, https) if loopback else (https, http):
            try:
                answer = self._ping(base)
            except WireError as exc:
                failures[base] = exc
                continue
            status = answer.status_code
            if base == https or status in (200, 401):
                return base
            if status >= 500 or status in (408, 429):  # a proxy or a registry in trouble
                self._observe("GET", answer.url, status, failed=True)
                self._raise_for(answer, "ping")
        if http in failures:
            # Neither scheme answered: a network fault (retried), not a TLS verdict.
            self._observe("GET", f"{http}/v2/", None)
            raise self._transport_error("ping", failures[http]) from None
        self._observe("GET", f"{https}/v2/", None)
        raise self._transport_error("ping", failures[https]) from None

    def _ping(self, base: str) -> Response:
        """``GET /v2/`` at ``base``, observed. Raises WireError when nothing answers."""
        answer = limited(self.limit, lambda: self.http.send(
            "GET", f"{base}/v2/", {}, verify=self.verify, follow_redirects=False
        ))
        self._observe("GET", answer.url, answer.status_code)
        return answer

    def _transport_error(self, what: str, exc: WireError) -> TransportError:
        if exc.kind == "tls":
            return TransportError(
                f"{what}: TLS verification failed (configure ca_file, or insecure: true): "
                f"{_brief(exc)}",
                registry=self.registry,
                transient=False,
            )
        if exc.kind in ("redirects", "proxy"):
            return TransportError(f"{what}: {_brief(exc)}", registry=self.registry,
                                  transient=exc.kind == "proxy")
        if exc.kind == "cut":
            return TransportError(f"{what}: body cut short: {_brief(exc)}", registry=self.registry)
        return TransportError(f"{what}: {_brief(exc)}", registry=self.registry)

    def request(
        self,
        method: str,
        path: str,
        *,
        repository: str,
        what: str,
        access: str = "pull",
        scopes: Iterable[str] | None = None,
        ok: Iterable[int] = (200,),
        headers: dict[str, str] | None = None,
        data=None,
        stream: bool = False,
        allow: Iterable[int] = (),
        registry_auth: bool = True,
    ) -> Response:
        """Send one request, answering an auth challenge once, retrying transient failures.

        ``path`` is relative to the base URL (``/v2/...``) or an absolute URL (an upload
        Location). Statuses in ``ok`` are returned; those in ``allow`` are returned too (e.g.
        404 for an existence check); anything else raises through :func:`raise_for_response`.
        The token asked for is ``access`` (``pull``, ``pull,push``) to ``repository``, unless
        ``scopes`` names the scopes (a mount's source repository, the catalog, none).

        A request with a replayable body (None, bytes, str) is retried in place on transient
        errors (see the module docstring); an iterator body is sent once.
        ``registry_auth=False`` sends ``headers`` as given — no registry token is added and a
        401 is not answered with the token flow — for APIs beside the registry's (Harbor's).
        """
        url = path if path.startswith(("http://", "https://")) else self.base_url + path
        scope_key = (
            (repository_scope(repository, access),) if scopes is None else tuple(scopes)
        )
        allowed = set(ok) | set(allow)

        def attempt() -> Response:
            return self._attempt(
                method, url, repository, scope_key, what, allowed, headers, data, stream,
                registry_auth,
            )

        try:
            if not _is_replayable(data):
                return attempt()
            return self._retrying(attempt, what)
        except _Settled as settled:
            raise settled.error from None

    def _retrying(self, operation, what: str):
        """Run ``operation`` under the in-place policy, bounded by the current deadline."""
        return retry_in_place(operation, self.retry_policy, registry=self.registry, what=what,
                              describe=lambda exc: _brief(exc, 200))

    def _attempt(
        self, method, url, repository, scope_key, what, allowed, headers, data, stream,
        registry_auth,
    ) -> Response:
        sent_headers = dict(headers or {})
        credentials = self.store.entry_for(self.registry, repository).credentials
        if registry_auth:
            try:
                auth = self.authenticator.header_for(scope_key, credentials)
            except RegistryError as exc:
                raise _Settled(exc) from None
            if auth:
                sent_headers["Authorization"] = auth
        response = self._send(method, url, sent_headers, data, stream, what)
        if response.status_code == 401 and registry_auth:
            response.close()
            try:
                answer = self.authenticator.answer_challenge(
                    response, scope_key, credentials, sent_headers.get("Authorization")
                )
            except RegistryError as exc:
                raise _Settled(exc) from None
            if not _is_replayable(data):
                # The body iterator was spent on the refused attempt; a retry of the whole
                # operation (one layer up) will carry the now cached token.
                raise ServerError(
                    f"{what}: token expired during upload", registry=self.registry, status=401
                )
            sent_headers["Authorization"] = answer
            response = self._send(method, url, sent_headers, data, stream, what)
        if response.status_code not in allowed:
            self._observe(method, url, response.status_code, failed=True)
            try:
                self._raise_for(response, what)
            finally:
                response.close()
        return response

    def _raise_for(self, response: Response, what: str) -> NoReturn:
        """The error path of a response the caller does not accept: pause the answering host
        if the response says so (:func:`~syncer.registry.hostgate.pause_after`), then raise
        its typed error. ``Retry-After`` is parsed once, here, for both."""
        status = response.status_code
        asked = _retry_after(response)
        host = urlparse(response.url).netloc or self.host
        paused = pause_after(self.gate, host, status, asked)
        if paused is not None:
            log.info("%s: HTTP %d, pausing requests to %s for %.1fs", self.registry, status,
                     host, paused, extra={"registry": self.registry})
        raise_for_response(response, self.registry, what, self.store.secrets, retry_after=asked)
        raise RegistryError(
            f"{what}: unexpected HTTP {status}", registry=self.registry, status=status
        )

    def _send(self, method, url, headers, data, stream, what) -> Response:
        netloc = _origin(url)[1]
        self.gate.wait(netloc)
        try:
            # Within a slot of the registry's limits, if it has any (held until a streamed
            # body is closed: see syncer.registry.limits).
            response = limited(
                self.limit,
                lambda: self.http.send(method, url, headers, data, stream=stream,
                                       verify=self.verify),
                stream=stream,
                ready=lambda: self.gate.wait(netloc),  # a 429 pause begun while waiting
            )
        except WireError as exc:
            self._observe(method, url, None)
            raise self._transport_error(what, exc) from None
        if observe.observer is not None:  # metrics off: this check is all it costs
            self._observe(method, url, response.status_code)
        return response

    def _observe(self, method: str, url: str, status: int | None, *, failed: bool = False) -> None:
        """Tell the installed :mod:`~syncer.registry.observe` observer, if any, about a request
        (``failed``: a response the caller does not accept; None: no response at all)."""
        watcher = observe.observer
        if watcher is None:
            return
        operation = observe.operation_of(url)
        if failed and status is not None:
            watcher.failed(self.registry, method, operation, status)
        else:
            watcher.request(self.registry, method, operation, status)

    def close(self) -> None:
        """Close pooled connections."""
        self.http.close()


def _origin(url: str) -> tuple[str, str]:
    """``(scheme://netloc, netloc)`` of an absolute URL (``("", "")`` for a relative one)."""
    origin, _, netloc = split_origin(url)
    return origin, netloc


def _is_replayable(data) -> bool:
    """True for a body that can be sent again: none, bytes or text (not an iterator)."""
    return data is None or isinstance(data, bytes | str)


# A URL's query, up to whitespace, a quote or a parenthesis (how HTTP libraries end a URL in
# their messages: "... with url: /path?X-Amz-Signature=... (Caused by ...)").
_URL_QUERY = re.compile(r"\?[^\s'\"()]+")


def _brief(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s text on one line, every URL query replaced by ``?…``, cut to ``limit``.

    A blob GET is redirected to object storage with a presigned URL whose query *is* a
    credential (S3's ``X-Amz-Signature``, GCS's ``X-Goog-Signature``, Azure's ``sig``), and
    an HTTP error text may name the URL (a proxy's refusal, say): without this it would reach
    the exception, the ledger and the log lines.
    """
    text = _URL_QUERY.sub("?…", " ".join(str(exc).split()))
    return text if len(text) <= limit else text[:limit] + "…"
