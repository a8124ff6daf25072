"""HTTP transport for one registry host: TLS mode, scheme discovery, auth, response → error.

This is the one place where HTTP responses become the typed errors of :mod:`syncer.errors`
(:func:`raise_for_response`), and where requests' exceptions become :class:`TransportError`.
It does not retry: retrying is the job of :mod:`syncer.retry`, one layer up, so retry layers
never stack.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import requests
from requests.adapters import HTTPAdapter

from syncer.auth import Authenticator
from syncer.credentials import CredentialStore
from syncer.errors import (
    AuthenticationError,
    NotFoundError,
    RateLimitedError,
    RegistryError,
    ServerError,
    SpecError,
    TransportError,
)
from syncer.reference import api_host

USER_AGENT = "image-syncer-py/0.1"
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
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def _spec_errors(response: requests.Response) -> tuple[SpecError, ...]:
    try:
        body = json.loads(response.content[:65536] or b"{}")
    except ValueError:
        return ()
    items = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(items, list):
        return ()
    return tuple(
        SpecError(str(e.get("code", "")), str(e.get("message", ""))[:200])
        for e in items
        if isinstance(e, dict)
    )


def raise_for_response(response: requests.Response, registry: str, what: str) -> None:
    """Raise the typed error for a non-2xx ``response``; ``what`` names the operation."""
    status = response.status_code
    if status < 400:
        return
    errors = _spec_errors(response)
    codes = {e.code for e in errors}
    detail = "; ".join(f"{e.code}: {e.message}" if e.message else e.code for e in errors)
    message = f"{what}: HTTP {status}" + (f" ({detail})" if detail else "")
    kwargs = {"registry": registry, "status": status, "errors": errors}
    if status == 429 or "TOOMANYREQUESTS" in codes:
        raise RateLimitedError(message, retry_after=_retry_after(response), **kwargs)
    if status in (401, 403) or codes & {"UNAUTHORIZED", "DENIED"}:
        raise AuthenticationError(message, **kwargs)
    if status == 404 or codes & _NOT_FOUND_CODES:
        raise NotFoundError(message, **kwargs)
    if status >= 500 or status == 408 or codes & _TRANSIENT_CODES:
        raise ServerError(message, retry_after=_retry_after(response), **kwargs)
    raise RegistryError(message, **kwargs)


class Transport:
    """Sends requests to one registry host with the right scheme, TLS settings and auth.

    TLS is verified unless the registry is marked ``insecure``; a ``ca_file`` adds a private
    CA. Plain HTTP is used only for ``insecure`` registries and loopback hosts (as docker
    does), and only after the host proved it speaks the registry API over HTTP.
    """

    def __init__(
        self,
        registry: str,
        store: CredentialStore,
        *,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        pool_size: int = 32,
    ):
        self.registry = registry
        self.host = api_host(registry)
        self.store = store
        self.timeout = timeout
        settings = store.registry_settings(registry)
        self.insecure = settings.insecure
        self.session = requests.Session()  # trust_env: HTTP(S)_PROXY / NO_PROXY are honoured
        self.session.headers["User-Agent"] = USER_AGENT
        # Passed on every request: requests lets REQUESTS_CA_BUNDLE override a session's
        # ``verify`` (psf/requests#3829), which would silently drop a configured CA.
        self.verify: bool | str = False if settings.insecure else (settings.ca_file or True)
        self.session.verify = self.verify
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        if settings.insecure:
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self.authenticator = Authenticator(registry, self.session, timeout, self.verify)
        self._base_url: str | None = None
        self._base_lock = threading.Lock()

    @property
    def base_url(self) -> str:
        """``https://host`` or (insecure / loopback over plain HTTP) ``http://host``."""
        if self._base_url is None:
            with self._base_lock:
                if self._base_url is None:
                    self._base_url = self._discover_scheme()
        return self._base_url

    def _discover_scheme(self) -> str:
        https = f"https://{self.host}"
        try:
            self.session.get(
                f"{https}/v2/", timeout=self.timeout, allow_redirects=False, verify=self.verify
            )
            return https
        except requests.exceptions.SSLError as exc:
            tls_error = exc
        except requests.RequestException as exc:
            if not (self.insecure or is_loopback(self.host)):
                raise self._transport_error("ping", exc) from None
            tls_error = exc
        if self.insecure or is_loopback(self.host):
            http = f"http://{self.host}"
            try:
                answer = self.session.get(
                    f"{http}/v2/", timeout=self.timeout, allow_redirects=False
                )
            except requests.RequestException:
                answer = None
            # A TLS-only server answers plain HTTP with a 400; a registry answers 200 or 401.
            if answer is not None and answer.status_code in (200, 401):
                return http
        raise self._transport_error("ping", tls_error) from None

    def _transport_error(self, what: str, exc: Exception) -> TransportError:
        if isinstance(exc, requests.exceptions.SSLError):
            return TransportError(
                f"{what}: TLS verification failed (configure ca_file, or insecure: true): "
                f"{_short(exc)}",
                registry=self.registry,
                transient=False,
            )
        if isinstance(
            exc, requests.exceptions.ChunkedEncodingError | requests.exceptions.ContentDecodingError
        ):
            return TransportError(f"{what}: body cut short: {_short(exc)}", registry=self.registry)
        return TransportError(
            f"{what}: {type(exc).__name__}: {_short(exc)}", registry=self.registry
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
    ) -> requests.Response:
        """Send one request, answering an auth challenge once.

        ``path`` is relative to the base URL (``/v2/...``) or an absolute URL (an upload
        Location). Statuses in ``ok`` are returned; those in ``allow`` are returned too (e.g.
        404 for an existence check); anything else raises through :func:`raise_for_response`.
        """
        url = path if path.startswith(("http://", "https://")) else self.base_url + path
        scope_key = tuple(scopes)
        credentials = self.store.entry_for(self.registry, repository).credentials
        sent_headers = dict(headers or {})
        auth = self.authenticator.header_for(scope_key, credentials)
        if auth:
            sent_headers["Authorization"] = auth
        response = self._send(method, url, sent_headers, data, stream, what)
        if response.status_code == 401:
            if _is_consumed_stream(data):
                response.close()
                # The body iterator was spent on the refused attempt; a retry of the whole
                # operation (one layer up) will carry the now cached token.
                raise ServerError(
                    f"{what}: token expired during upload", registry=self.registry, status=401
                )
            response.close()
            sent_headers["Authorization"] = self.authenticator.answer_challenge(
                response, scope_key, credentials
            )
            response = self._send(method, url, sent_headers, data, stream, what)
        allowed = set(ok) | set(allow)
        if response.status_code not in allowed:
            try:
                raise_for_response(response, self.registry, what)
                raise RegistryError(
                    f"{what}: unexpected HTTP {response.status_code}",
                    registry=self.registry,
                    status=response.status_code,
                )
            finally:
                response.close()
        return response

    def _send(self, method, url, headers, data, stream, what) -> requests.Response:
        try:
            return self.session.request(
                method,
                url,
                headers=headers,
                data=data,
                stream=stream,
                timeout=self.timeout,
                verify=self.verify,
            )
        except requests.RequestException as exc:
            raise self._transport_error(what, exc) from None

    def close(self) -> None:
        """Close pooled connections."""
        self.session.close()


def _is_consumed_stream(data) -> bool:
    return data is not None and not isinstance(data, bytes | str | dict | list | tuple)


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "…"
