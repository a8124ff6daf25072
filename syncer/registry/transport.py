"""HTTP transport for one registry host: TLS mode, scheme discovery, auth, response → error,
in-place retries and the shared rate-limit gate.

This is the one place where HTTP responses become the typed errors of :mod:`syncer.registry.errors`
(:func:`raise_for_response`), and where requests' exceptions become :class:`TransportError`.

**Retries where the fault happens.** Every request whose body can be sent again (no body,
``bytes`` or ``str``: ping, token fetch, HEAD/GET manifest, tags and catalog pages, blob HEAD,
mount and upload POST, manifest PUT — the same bytes, so idempotent — upload DELETE) is
retried in place on a transient error (:func:`syncer.registry.errors.is_transient`) under
:data:`syncer.registry.retry.REQUEST_RETRIES`: exponential backoff with jitter, ``Retry-After``
honoured up to 30 s (a longer one is raised, for the image-level retry to wait out), never
past the copy's deadline (:func:`syncer.registry.retry.current_deadline`). A streamed GET is retried
only until its headers arrive — its body belongs to the caller. A streamed upload body (an
iterator) cannot be replayed, so it is not retried here; the blob code resumes it one layer up.

Why not urllib3's ``Retry`` (``HTTPAdapter(max_retries=Retry(...))``)? It works below this
layer and sees only status codes: it would resend a refused ``Authorization`` instead of
running the token flow again, cannot read the spec error codes of a body (``TOOMANYREQUESTS``
in a 400, ``UNAVAILABLE``), never sees a body that breaks after the headers (requests reads it
after urllib3 has returned), sleeps a ``Retry-After`` without our cap-then-defer rule, and
knows neither the shared host gate nor the copy's deadline. So the adapter keeps
``max_retries=0`` and the one :class:`~syncer.registry.retry.RetryPolicy` drives a small loop here.

**Rate limits are shared.** Before each request the transport waits at the process's
:class:`~syncer.registry.hostgate.Gate`; a 429 (or a 503 with ``Retry-After``: the one rule is
:func:`~syncer.registry.hostgate.pause_after`) pauses that host for every thread of the
process — and, with the Redis gate of the distributed mode, every worker.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import ssl
import threading
from collections.abc import Iterable
from typing import NoReturn
from urllib.parse import urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.ssl_ import create_urllib3_context

from syncer.registry import observe
from syncer.registry.auth import Authenticator
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
    call_with_retries,
    current_deadline,
    parse_retry_after,
)

log = logging.getLogger(__name__)

USER_AGENT = "image-syncer-py/0.1"
# Connections kept per host. Sockets are opened lazily, so a large pool costs nothing; it must
# cover the requests in flight at once — images at once x (blob workers + 1 manifest request):
# at most 256 (`--proc`, `--concurrency`) x (4 + 1) — or urllib3 opens a throw-away connection
# for each request past it (and warns).
POOL_SIZE = 256 * (4 + 1)
DEFAULT_TIMEOUT = (10.0, 120.0)  # (connect, read) seconds; read = max silence between bytes
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


def _retry_after(response: requests.Response) -> float | None:
    return parse_retry_after(response.headers.get("Retry-After"))


def _spec_errors(response: requests.Response, secrets: Iterable[str]) -> tuple[SpecError, ...]:
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
    response: requests.Response,
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
        self.session = requests.Session()  # trust_env: HTTP(S)_PROXY / NO_PROXY are honoured
        self.session.headers["User-Agent"] = USER_AGENT
        # ~/.netrc is not a source of registry credentials: requests would look it up (three
        # stat calls) on every request and, on a match, overwrite our Authorization header.
        self.session.auth = _NO_AUTH
        self._environment: dict[str, tuple[dict[str, str], bool | str]] = {}
        # Passed on every request: requests lets REQUESTS_CA_BUNDLE override a session's
        # ``verify`` (psf/requests#3829), which would silently drop a configured CA.
        self.verify: bool | str = False if settings.insecure else (settings.ca_file or True)
        self.session.verify = self.verify
        # max_retries=0: retries are ours (see the module docstring for why not urllib3's).
        adapter = _TLSContextAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        if settings.insecure:
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self.authenticator = Authenticator(
            registry, self.session, timeout, self.verify, gate=self.gate,
            retry_policy=retry_policy,
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
        plain_allowed = self.insecure or is_loopback(self.host)
        https = f"https://{self.host}"
        self.gate.wait(self.host)
        try:
            answer = limited(self.limit, lambda: self.session.get(
                f"{https}/v2/", timeout=self.timeout, allow_redirects=False, verify=self.verify
            ))
            answer.close()
            self._observe("GET", answer.url, answer.status_code)
            return https
        except requests.exceptions.SSLError as exc:
            tls_error: requests.RequestException = exc
        except requests.RequestException as exc:
            if not plain_allowed:
                self._observe("GET", f"{https}/v2/", None)
                raise self._transport_error("ping", exc) from None
            tls_error = exc
        if plain_allowed:
            http = f"http://{self.host}"
            try:
                answer = limited(self.limit, lambda: self.session.get(
                    f"{http}/v2/", timeout=self.timeout, allow_redirects=False
                ))
            except requests.RequestException as exc:
                # Neither scheme answered: a network fault (retried), not a TLS verdict.
                self._observe("GET", f"{http}/v2/", None)
                raise self._transport_error("ping", exc) from None
            self._observe("GET", answer.url, answer.status_code)
            with answer:
                # A TLS-only server answers plain HTTP with a 400; a registry answers 200 or
                # 401, or a transient 5xx/429 (a proxy or a registry in trouble: try again).
                if answer.status_code in (200, 401):
                    return http
                if answer.status_code >= 500 or answer.status_code in (408, 429):
                    self._observe("GET", answer.url, answer.status_code, failed=True)
                    self._raise_for(answer, "ping")
        self._observe("GET", f"{https}/v2/", None)
        raise self._transport_error("ping", tls_error) from None

    def _transport_error(self, what: str, exc: Exception) -> TransportError:
        if isinstance(exc, requests.exceptions.SSLError):
            return TransportError(
                f"{what}: TLS verification failed (configure ca_file, or insecure: true): "
                f"{_brief(exc)}",
                registry=self.registry,
                transient=False,
            )
        if isinstance(
            exc, requests.exceptions.ChunkedEncodingError | requests.exceptions.ContentDecodingError
        ):
            return TransportError(f"{what}: body cut short: {_brief(exc)}", registry=self.registry)
        return TransportError(
            f"{what}: {type(exc).__name__}: {_brief(exc)}", registry=self.registry
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        repository: str,
        scopes: Iterable[str],
        what: str,
        ok: Iterable[int] = (200,),
        headers: dict[str, str] | None = None,
        data=None,
        stream: bool = False,
        allow: Iterable[int] = (),
        registry_auth: bool = True,
    ) -> requests.Response:
        """Send one request, answering an auth challenge once, retrying transient failures.

        ``path`` is relative to the base URL (``/v2/...``) or an absolute URL (an upload
        Location). Statuses in ``ok`` are returned; those in ``allow`` are returned too (e.g.
        404 for an existence check); anything else raises through :func:`raise_for_response`.

        A request with a replayable body (None, bytes, str) is retried in place on transient
        errors (see the module docstring); an iterator body is sent once.
        ``registry_auth=False`` sends ``headers`` as given — no registry token is added and a
        401 is not answered with the token flow — for APIs beside the registry's (Harbor's).
        """
        url = path if path.startswith(("http://", "https://")) else self.base_url + path
        scope_key = tuple(scopes)
        allowed = set(ok) | set(allow)

        def attempt() -> requests.Response:
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

        def note(number: int, exc: BaseException, wait: float) -> None:
            reason = _brief(exc, 200)
            log.info(
                "retry %d/%d in %.2fs: %s at %s: %s",
                number, self.retry_policy.max_retries, wait, what, self.registry,
                reason, extra={"registry": self.registry, "error": reason},
            )
            watcher = observe.observer
            if watcher is not None:
                watcher.retried(self.registry)

        return call_with_retries(
            operation, self.retry_policy, on_retry=note, deadline=current_deadline()
        )

    def _attempt(
        self, method, url, repository, scope_key, what, allowed, headers, data, stream,
        registry_auth,
    ) -> requests.Response:
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

    def _raise_for(self, response: requests.Response, what: str) -> NoReturn:
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

    def _send(self, method, url, headers, data, stream, what) -> requests.Response:
        origin, netloc = _origin(url)
        self.gate.wait(netloc)
        try:
            # Within a slot of the registry's limits, if it has any (held until a streamed
            # body is closed: see syncer.registry.limits).
            response = limited(
                self.limit,
                lambda: self._dispatch(method, url, origin, headers, data, stream),
                stream=stream,
                ready=lambda: self.gate.wait(netloc),  # a 429 pause begun while waiting
            )
        except requests.RequestException as exc:
            self._observe(method, url, None)
            raise self._transport_error(what, exc) from None
        if observe.observer is not None:  # metrics off: this check is all it costs
            self._observe(method, url, response.status_code)
        return response

    def _dispatch(self, method, url, origin, headers, data, stream) -> requests.Response:
        """``session.request`` without its per-request cost: the request is prepared here and
        handed to ``session.send`` (which still follows redirects, dropping Authorization on
        another host, and keeps cookies), with the environment's proxies and CA bundle looked
        up once per origin. ``Session.request`` would re-merge every session setting through
        requests' Protocol ``isinstance`` checks and re-read the whole environment
        (``getproxies_environment``) on each call: together more CPU than the HTTP exchange."""
        proxies, verify = self._environment_for(origin, url)
        request = requests.PreparedRequest()
        # The steps of PreparedRequest.prepare, in its order, but an absolute URL made only
        # of URI characters (ours: names and digests checked by the reference parser, and
        # registry-issued Locations) is used as it is: requests' parse-and-requote (a Python
        # loop over every character of a long upload ``_state``) would give it back unchanged.
        request.prepare_method(method)
        if _PLAIN_URL.match(url):
            request.url = url
        else:
            request.prepare_url(url, None)
        request.prepare_headers({**self.session.headers, **headers})
        if self.session.cookies:
            request.prepare_cookies(self.session.cookies)
        else:  # what prepare_cookies leaves (redirects extract into it), minus the jar walk
            request._cookies = self.session.cookies
        request.prepare_body(data, None, None)
        if "@" in url:  # prepare_auth(None) only takes credentials from the URL's userinfo
            request.prepare_auth(None, url)
        request.prepare_hooks(self.session.hooks)
        return self.session.send(
            request, stream=stream, timeout=self.timeout, verify=verify, proxies=proxies,
            allow_redirects=True,
        )

    def _environment_for(self, origin: str, url: str) -> tuple[dict[str, str], bool | str]:
        """The proxies and ``verify`` value requests would derive from the environment for
        ``origin`` (``HTTP(S)_PROXY``/``NO_PROXY``; ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``
        when TLS is verified against the default store), computed on first use."""
        found = self._environment.get(origin)
        if found is None:
            proxies = dict(self.session.proxies)
            verify = self.verify
            if self.session.trust_env:
                proxies.update(requests.utils.get_environ_proxies(url))
                if verify is True:
                    verify = (
                        os.environ.get("REQUESTS_CA_BUNDLE")
                        or os.environ.get("CURL_CA_BUNDLE")
                        or True
                    )
            found = self._environment[origin] = (proxies, verify)
        return found

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
        self.session.close()


class _TLSContextAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` that uses one ``SSLContext`` per ``verify`` value and process, not
    one per connection.

    requests hands urllib3 a CA *path* (``ca_certs``, certifi's bundle by default), so every
    new HTTPS connection made a fresh context and parsed the whole bundle again — some 50 ms
    of CPU per connection, times the pool size per registry. Here the context (same settings:
    urllib3's defaults, CERT_REQUIRED with hostname check, the same CA file or directory; or
    CERT_NONE for an ``insecure`` registry) is made once and passed as ``ssl_context``.
    """

    # Shared by every adapter of the process (one per registry): an SSLContext is safe to
    # use from many threads and connections at once.
    _contexts: dict[bool | str, ssl.SSLContext] = {}
    _contexts_lock = threading.Lock()

    def _context(self, verify: bool | str) -> ssl.SSLContext:
        with self._contexts_lock:
            context = self._contexts.get(verify)
            if context is None:
                if verify is False:
                    context = create_urllib3_context(cert_reqs=ssl.CERT_NONE)
                else:
                    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
                    where = requests.utils.DEFAULT_CA_BUNDLE_PATH if verify is True else verify
                    try:
                        if os.path.isdir(where):
                            context.load_verify_locations(capath=where)
                        else:
                            context.load_verify_locations(cafile=where)
                    except OSError as exc:  # ssl.SSLError too: not a CA file
                        # What urllib3 would have met on connecting: a TLS error, not a crash.
                        raise requests.exceptions.SSLError(
                            f"cannot load the CA certificates {where}: {exc}"
                        ) from None
                self._contexts[verify] = context
            return context

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        """requests' pool key, with our shared context in place of a CA path."""
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        if host_params.get("scheme") == "https" and verify is not None:
            pool_kwargs.pop("ca_certs", None)
            pool_kwargs.pop("ca_cert_dir", None)
            pool_kwargs["ssl_context"] = self._context(verify)
        return host_params, pool_kwargs

    def cert_verify(self, conn, url, verify, cert) -> None:
        """As requests does, minus the CA path when the pool has our context (urllib3 would
        load the path into that context again on every connection)."""
        super().cert_verify(conn, url, verify, cert)
        if getattr(conn, "conn_kw", {}).get("ssl_context") is not None:
            conn.ca_certs = None
            conn.ca_cert_dir = None


class _NoAuth(requests.auth.AuthBase):
    """Leaves a request as it is (set as the session's auth so requests skips ~/.netrc)."""

    def __call__(self, request):
        return request


_NO_AUTH = _NoAuth()
_ORIGIN_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)")
# An http(s) URL with a host and only RFC 3986 characters: nothing for requests to requote.
_PLAIN_URL = re.compile(r"^https?://[A-Za-z0-9.:\[\]-]+/[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*$")


def _origin(url: str) -> tuple[str, str]:
    """``(scheme://netloc, netloc)`` of an absolute URL (a cheaper ``urlparse``)."""
    match = _ORIGIN_RE.match(url)
    if match is None:
        return "", ""
    return match[0], match[2]


def _is_replayable(data) -> bool:
    """True for a body requests can send again: none, bytes, text, or form fields."""
    return data is None or isinstance(data, bytes | str | dict | list | tuple)


# A URL's query, up to whitespace, a quote or a parenthesis (how urllib3 and requests end a
# URL in their messages: "... with url: /path?X-Amz-Signature=... (Caused by ...)").
_URL_QUERY = re.compile(r"\?[^\s'\"()]+")


def _brief(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s text on one line, every URL query replaced by ``?…``, cut to ``limit``.

    A blob GET is redirected to object storage with a presigned URL whose query *is* a
    credential (S3's ``X-Amz-Signature``, GCS's ``X-Goog-Signature``, Azure's ``sig``), and
    urllib3 names the URL in "Max retries exceeded with url: …": without this it would reach
    the exception, the ledger and the log lines.
    """
    text = _URL_QUERY.sub("?…", " ".join(str(exc).split()))
    return text if len(text) <= limit else text[:limit] + "…"
