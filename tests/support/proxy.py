"""A counting, fault-injecting HTTP reverse proxy in front of a test registry.

Point the client at ``proxy.host`` / ``proxy.url`` instead of the registry. Every request
is forwarded to the upstream registry with bodies streamed both ways (``Content-Length``
or chunked), absolute ``Location``/``Link`` URLs of the upstream are rewritten to the
proxy, and each request is recorded as a :class:`ProxyRecord` so tests can assert on
traffic ("no PUT/PATCH/POST to /blobs/ happened"). Faults can be injected with
:meth:`CountingProxy.fail_next`, :meth:`CountingProxy.reset_next` and
:meth:`CountingProxy.delay_next`.

Absolute-form request lines (``GET http://host/v2/ HTTP/1.1``) are accepted too: they are
forwarded to the host they name (the upstream or any other), with responses passed through
unchanged, so the proxy also works as a plain-HTTP forward proxy (``HTTP_PROXY=proxy.url``)
in front of several registries. Such requests carry that host in
:attr:`ProxyRecord.absolute_host`. ``CONNECT`` (HTTPS tunnelling) is not supported.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Literal

from .httpserver import BackgroundServer
from .ports import LOOPBACK
from .registry import Credentials, RegistryProcess, RegistrySession

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "expect",
        "host",
    }
)
_CHUNK = 64 * 1024


@dataclass
class ProxyRecord:
    """One request seen by the proxy.

    ``status`` is the status returned to the client (0 when the connection was reset or
    the upstream could not be reached before a status was known); ``injected`` names the
    fault kind when the proxy answered by itself. ``absolute_host`` is the ``host:port``
    of an absolute-form request line (forward-proxy use), empty for origin-form requests.
    """

    method: str
    path: str
    query: str
    status: int
    injected: str | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    request_headers: dict[str, str] = field(default_factory=dict)
    started: float = 0.0
    absolute_host: str = ""

    @property
    def uri(self) -> str:
        """Path plus ``?query`` if any."""
        return f"{self.path}?{self.query}" if self.query else self.path


@dataclass
class _Fault:
    kind: Literal["status", "reset", "delay"]
    remaining: int
    status: int = 503
    path_contains: str | None = None
    method: str | None = None
    retry_after: str | None = None
    seconds: float = 0.0
    body: bytes = b""
    skip: int = 0  # matching requests let through before the fault applies

    def matches(self, method: str, uri: str) -> bool:
        return (
            self.remaining > 0
            and (self.method is None or self.method == method)
            and (self.path_contains is None or self.path_contains in uri)
        )


class CountingProxy:
    """Reverse proxy on ``127.0.0.1:<free port>`` forwarding to one registry.

    Args:
        upstream: a :class:`RegistryProcess` (its URL, CA and users are used) or a base
            URL such as ``http://127.0.0.1:5000``.
        ca_file: CA to verify an HTTPS upstream given as URL.
        users: credentials of an upstream given as URL (for :meth:`admin`).
        admin_user: which of ``users`` :meth:`admin` logs in as.

    The proxy itself always speaks plain HTTP.
    """

    def __init__(
        self,
        upstream: RegistryProcess | str,
        *,
        ca_file: str | Path | None = None,
        users: dict[str, str] | None = None,
        admin_user: str = "admin",
        timeout: float = 60.0,
    ) -> None:
        if isinstance(upstream, RegistryProcess):
            self.registry: RegistryProcess | None = upstream
            self.upstream_url = upstream.url
            ca_file = ca_file or upstream.ca_file
            users = users if users is not None else upstream.users
            admin_credentials = upstream.admin_credentials
        else:
            self.registry = None
            self.upstream_url = upstream.rstrip("/")
            admin_credentials = (
                (admin_user, users[admin_user]) if users and admin_user in users else None
            )
        parts = urllib.parse.urlsplit(self.upstream_url)
        self.upstream_scheme = parts.scheme
        self.upstream_host = parts.netloc
        self.upstream_ca_file = Path(ca_file) if ca_file else None
        self.users: dict[str, str] = dict(users or {})
        self.admin_credentials: Credentials | None = admin_credentials
        self.timeout = timeout
        self.port = 0
        self._records: list[ProxyRecord] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._background: BackgroundServer | None = None
        self._admin: RegistrySession | None = None

    # -- addresses / sessions ----------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` of the proxy (use it as the registry host)."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}"

    @property
    def ca_file(self) -> Path | None:
        """Always None: the proxy serves plain HTTP."""
        return None

    def admin(self) -> RegistrySession:
        """A cached session through the proxy with the upstream's admin credentials."""
        if self._admin is None:
            self._admin = RegistrySession(self.url, self.admin_credentials)
        return self._admin

    def session(self, user: str | None = None, password: str | None = None) -> RegistrySession:
        """A new session through the proxy as ``user`` (anonymous if None)."""
        if user is None:
            return RegistrySession(self.url)
        return RegistrySession(self.url, (user, password or self.users[user]))

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> CountingProxy:
        """Start serving in a daemon thread."""
        handler = type("_BoundProxyHandler", (_ProxyHandler,), {"proxy": self})
        self._background = BackgroundServer(handler, "counting-proxy").start()
        self.port = self._background.port
        return self

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._background is not None:
            self._background.stop()
            self._background = None
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- records -------------------------------------------------------------------

    @property
    def records(self) -> list[ProxyRecord]:
        """A copy of everything recorded so far, in arrival order of responses."""
        with self._lock:
            return list(self._records)

    def reset(self) -> None:
        """Forget recorded requests (faults stay armed)."""
        with self._lock:
            self._records.clear()

    def count(
        self,
        method: str | Iterable[str] | None = None,
        path_contains: str = "",
        *,
        status: int | None = None,
        injected: bool | None = None,
    ) -> int:
        """Count recorded requests.

        Args:
            method: one method, several (e.g. ``("PUT", "PATCH", "POST")``) or None.
            path_contains: substring of path+query.
            status: only requests answered with this status.
            injected: True = only injected faults, False = only forwarded requests.
        """
        methods = None if method is None else {method} if isinstance(method, str) else set(method)
        methods = {m.upper() for m in methods} if methods is not None else None
        return sum(
            1
            for r in self.records
            if (methods is None or r.method in methods)
            and path_contains in r.uri
            and (status is None or r.status == status)
            and (injected is None or (r.injected is not None) == injected)
        )

    def requests_matching(self, method: str | None, path_substring: str = "") -> int:
        """Same signature as :meth:`RegistryProcess.requests_matching`."""
        return self.count(method, path_substring)

    def _record(self, record: ProxyRecord) -> None:
        with self._lock:
            self._records.append(record)

    # -- faults --------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        path_contains: str | None = None,
        *,
        method: str | None = None,
        retry_after: float | str | None = None,
        body: bytes | None = None,
        after: int = 0,
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` without forwarding,
        after letting ``after`` matching requests through.

        ``retry_after`` adds a ``Retry-After`` header (use with 429/503). The default body
        is a registry-style JSON error.
        """
        if body is None:
            body = json.dumps(
                {"errors": [{"code": "UNAVAILABLE", "message": f"injected {status}"}]}
            ).encode()
        fault = _Fault(
            "status",
            n,
            status=status,
            path_contains=path_contains,
            method=method.upper() if method else None,
            retry_after=None if retry_after is None else str(retry_after),
            body=body,
            skip=after,
        )
        with self._lock:
            self._faults.append(fault)

    def reset_next(
        self, n: int = 1, path_contains: str | None = None, *, method: str | None = None
    ) -> None:
        """Abort the next ``n`` matching requests by resetting the TCP connection."""
        with self._lock:
            self._faults.append(
                _Fault("reset", n, path_contains=path_contains, method=method and method.upper())
            )

    def delay_next(
        self,
        n: int,
        seconds: float,
        path_contains: str | None = None,
        *,
        method: str | None = None,
    ) -> None:
        """Sleep ``seconds`` before forwarding each of the next ``n`` matching requests."""
        with self._lock:
            self._faults.append(
                _Fault(
                    "delay",
                    n,
                    seconds=seconds,
                    path_contains=path_contains,
                    method=method and method.upper(),
                )
            )

    def clear_faults(self) -> None:
        """Disarm every pending fault."""
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, uri: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, uri):
                    if fault.skip > 0:
                        fault.skip -= 1
                        continue
                    fault.remaining -= 1
                    return fault
        return None

    # -- forwarding helpers ----------------------------------------------------------

    def _connect(self, scheme: str = "", netloc: str = "") -> http.client.HTTPConnection:
        """A connection to the upstream, or to ``scheme://netloc`` (absolute-form requests)."""
        scheme, netloc = scheme or self.upstream_scheme, netloc or self.upstream_host
        host, sep, port = netloc.rpartition(":")
        if not sep or not port.isdigit():
            host, port = netloc, ""
        if scheme == "https":
            ca_file = self.upstream_ca_file if netloc == self.upstream_host else None
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            return http.client.HTTPSConnection(
                host, int(port or 443), timeout=self.timeout, context=context
            )
        return http.client.HTTPConnection(host, int(port or 80), timeout=self.timeout)

    def rewrite_url(self, value: str) -> str:
        """Replace the upstream's base URL in ``value`` with the proxy's."""
        for scheme in ("http", "https"):
            value = value.replace(f"{scheme}://{self.upstream_host}", self.url)
        return value


def _iter_chunked(rfile: Any) -> Iterator[bytes]:
    """Decode an HTTP/1.1 chunked request body from ``rfile``."""
    while True:
        line = rfile.readline(65537)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return
        remaining = size
        while remaining:
            data = rfile.read(min(remaining, _CHUNK))
            if not data:
                raise ConnectionError("client closed mid-chunk")
            remaining -= len(data)
            yield data
        rfile.readline(3)


def _iter_length(rfile: Any, length: int) -> Iterator[bytes]:
    remaining = length
    while remaining > 0:
        data = rfile.read(min(remaining, _CHUNK))
        if not data:
            raise ConnectionError("client closed mid-body")
        remaining -= len(data)
        yield data


class _ProxyHandler(BaseHTTPRequestHandler):
    proxy: CountingProxy
    protocol_version = "HTTP/1.1"
    server_version = "test-counting-proxy/1.0"

    def log_message(self, format: str, *args: Any) -> None:
        """Keep pytest output quiet."""

    def _body(self) -> tuple[Iterator[bytes], bool, int | None]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return _iter_chunked(self.rfile), True, None
        length = int(self.headers.get("Content-Length") or 0)
        return _iter_length(self.rfile, length), False, length

    def _abort_connection(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def _proxy(self) -> None:
        proxy = self.proxy
        target = self.path
        scheme = netloc = ""
        if target.startswith(("http://", "https://")):
            parts = urllib.parse.urlsplit(target)
            scheme, netloc = parts.scheme, parts.netloc
            target = urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))
        path, _, query = target.partition("?")
        method = self.command
        record = ProxyRecord(
            method=method,
            path=path,
            query=query,
            status=0,
            request_headers={k: v for k, v in self.headers.items()},
            started=time.time(),
            absolute_host=netloc,
        )
        body, chunked, length = self._body()

        fault = proxy._take_fault(method, target)
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.seconds)
        elif fault is not None:
            with contextlib.suppress(ConnectionError, OSError):
                record.request_bytes = sum(len(c) for c in body)
            record.injected = fault.kind
            if fault.kind == "reset":
                proxy._record(record)
                self._abort_connection()
                return
            record.status = fault.status
            proxy._record(record)
            self.send_response(fault.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(fault.body)))
            self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
            if fault.retry_after is not None:
                self.send_header("Retry-After", fault.retry_after)
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(fault.body)
            return

        conn = proxy._connect(scheme, netloc)
        try:
            try:
                conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                conn.putheader("Host", netloc or proxy.upstream_host)
                for key, value in self.headers.items():
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        conn.putheader(key, value)
                if chunked:
                    conn.putheader("Transfer-Encoding", "chunked")
                elif length is not None and (length > 0 or method in ("POST", "PUT", "PATCH")):
                    conn.putheader("Content-Length", str(length))
                conn.endheaders()
                for chunk in body:
                    record.request_bytes += len(chunk)
                    conn.send(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                if chunked:
                    conn.send(b"0\r\n\r\n")
                upstream = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                record.status = 502
                record.injected = None
                proxy._record(record)
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.send_error(502, f"upstream error: {exc}")
                return

            record.status = upstream.status
            proxy._record(record)
            self._relay(upstream, record)
        finally:
            conn.close()

    def _relay(self, upstream: http.client.HTTPResponse, record: ProxyRecord) -> None:
        proxy = self.proxy
        self.send_response_only(upstream.status, upstream.reason)
        length = upstream.getheader("Content-Length")
        no_body = (
            self.command == "HEAD"
            or upstream.status in (204, 304)
            or (100 <= upstream.status < 200)
        )
        for key, value in upstream.getheaders():
            lower = key.lower()
            if lower in HOP_BY_HOP:
                continue
            if lower in ("location", "link", "content-location") and not record.absolute_host:
                value = proxy.rewrite_url(value)  # a forward proxy passes them through as-is
            self.send_header(key, value)
        stream_chunked = not no_body and length is None
        if stream_chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if no_body:
            return
        try:
            while True:
                data = upstream.read1(_CHUNK)
                if not data:
                    break
                record.response_bytes += len(data)
                self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data) if stream_chunked else data)
            if stream_chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (OSError, http.client.HTTPException):
            self.close_connection = True

    do_GET = _proxy
    do_HEAD = _proxy
    do_POST = _proxy
    do_PUT = _proxy
    do_PATCH = _proxy
    do_DELETE = _proxy
    do_OPTIONS = _proxy
