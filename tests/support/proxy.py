"""A counting, fault-injecting HTTP reverse proxy in front of a test registry.

Point the client at ``proxy.host`` / ``proxy.url`` instead of the registry. Every request
is forwarded to the upstream registry with bodies streamed both ways (``Content-Length``
or chunked), absolute ``Location``/``Link`` URLs of the upstream are rewritten to the
proxy, and each request is recorded as a :class:`ProxyRecord` so tests can assert on
traffic ("no PUT/PATCH/POST to /blobs/ happened"). Faults can be injected with
:meth:`CountingProxy.fail_next` (a status), :meth:`CountingProxy.reset_next` (a dropped
connection), :meth:`CountingProxy.delay_next`, :meth:`CountingProxy.truncate_next` (a body
cut short) and :meth:`CountingProxy.corrupt_next` (a wrong byte in a body), or at random
with :meth:`CountingProxy.chaos`; :meth:`CountingProxy.latency` delays every request.
``Range`` requests pass through untouched (the registry answers ``206``).

Absolute-form request lines (``GET http://host/v2/ HTTP/1.1``) are accepted too: they are
forwarded to the host they name (the upstream or any other), with responses passed through
unchanged, so the proxy also works as a plain-HTTP forward proxy (``HTTP_PROXY=proxy.url``)
in front of several registries. Such requests carry that host in
:attr:`ProxyRecord.absolute_host`. ``CONNECT`` (HTTPS tunnelling) is not supported.

Hand-written because no packaged proxy does this job in-process: Toxiproxy injects faults
at the TCP level only (it cannot fail the third blob ``PATCH``, rewrite ``Location``/``Link``
or count requests per path), and mitmproxy is a separate, heavy process scripted by addons.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
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
    fault kind: ``"status"`` or ``"reset"`` when the proxy answered by itself (the upstream
    never saw the request), ``"truncate"`` or ``"corrupt"`` when the upstream's response
    was forwarded but its body cut short or altered. ``response_bytes`` counts the body
    bytes actually sent to the client. ``absolute_host`` is the ``host:port`` of an
    absolute-form request line (forward-proxy use), empty for origin-form requests.
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

    @property
    def fault(self) -> str | None:
        """The injected fault as a chaos kind: ``"500"``/``"503"``/``"429"`` (status
        faults by their status), ``"reset"``, ``"truncate"``, ``"corrupt"``; None if clean."""
        if self.injected == "status":
            return str(self.status)
        return self.injected


#: Faults applied once the upstream's response headers are known (the request is forwarded).
_RESPONSE_KINDS = frozenset({"truncate", "corrupt"})
#: Kinds :meth:`CountingProxy.chaos` understands; numeric ones are statuses.
CHAOS_KINDS = ("500", "503", "429", "reset", "truncate")


@dataclass
class _Fault:
    kind: Literal["status", "reset", "delay", "truncate", "corrupt"]
    remaining: int
    status: int = 503
    path_contains: str | None = None
    method: str | None = None
    retry_after: str | None = None
    seconds: float = 0.0
    body: bytes = b""
    skip: int = 0  # matching requests let through before the fault applies
    offset: int = 0  # truncate: body bytes sent before the cut; corrupt: the byte flipped

    def matches(self, method: str, uri: str) -> bool:
        return (
            self.remaining > 0
            and (self.method is None or self.method == method)
            and (self.path_contains is None or self.path_contains in uri)
        )


@dataclass
class _Chaos:
    """State of :meth:`CountingProxy.chaos`."""

    rate: float
    kinds: tuple[str, ...]
    rng: random.Random
    path_contains: str | None = None
    retry_after: str | None = "1"
    methods: frozenset[str] | None = None

    def matches(self, method: str, uri: str) -> bool:
        return (self.methods is None or method in self.methods) and (
            self.path_contains is None or self.path_contains in uri
        )


@dataclass
class _Decision:
    """What the proxy does with one request: forwarded unless ``fault`` says otherwise."""

    fault: _Fault | None = None
    #: A chaos body fault (truncate/corrupt) to apply when the response has a body;
    #: ``fallback`` is the request-phase kind used when it has none.
    chaos_body: str | None = None
    fallback: _Fault | None = None


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
        self._chaos: _Chaos | None = None
        self._latency = 0.0
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
        kind: str | None = None,
    ) -> int:
        """Count recorded requests.

        Args:
            method: one method, several (e.g. ``("PUT", "PATCH", "POST")``) or None.
            path_contains: substring of path+query.
            status: only requests answered with this status.
            injected: True = only requests that got a fault (of any kind), False = only
                clean ones.
            kind: only faults of this kind (see :attr:`ProxyRecord.fault`: ``"503"``,
                ``"reset"``, ``"truncate"``, ...).
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
            and (kind is None or r.fault == kind)
        )

    def fault_counts(self) -> dict[str, int]:
        """Injected faults recorded so far, by kind (see :attr:`ProxyRecord.fault`)."""
        counts: dict[str, int] = {}
        for record in self.records:
            if record.fault is not None:
                counts[record.fault] = counts.get(record.fault, 0) + 1
        return dict(sorted(counts.items()))

    def bytes_sent(self, method: str | None = "GET", path_contains: str = "") -> int:
        """Response body bytes sent to clients for matching requests (e.g. every GET of
        one blob: a Range-resumed download must move only the missing bytes)."""
        return sum(
            r.response_bytes
            for r in self.records
            if (method is None or r.method == method.upper()) and path_contains in r.uri
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
            body = _error_body(status)
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

    def truncate_next(
        self,
        n: int = 1,
        path_contains: str | None = None,
        *,
        method: str | None = None,
        after_bytes: int = 0,
        after: int = 0,
    ) -> None:
        """Forward the next ``n`` matching requests, but cut each response body off after
        ``after_bytes`` bytes: the headers (with the full ``Content-Length``) are sent, then
        the connection is closed. ``after`` matching requests are let through first.

        Only a ``2xx`` response with more than ``after_bytes`` body bytes can be cut (a
        ``HEAD``, a ``201``/``202`` without body, a 404 pass through and do not consume the
        fault). ``Range`` requests are forwarded as-is, so a ``206`` can be cut too.
        """
        self._arm_body_fault("truncate", n, path_contains, method, offset=after_bytes,
                             after=after)

    def corrupt_next(
        self,
        n: int = 1,
        path_contains: str | None = None,
        *,
        method: str | None = None,
        at_byte: int = 0,
        after: int = 0,
    ) -> None:
        """Forward the next ``n`` matching requests, but flip every bit of the response
        body's byte at offset ``at_byte`` (same length, wrong content, so a digest check is
        the only way to notice). Applies, like :meth:`truncate_next`, only to ``2xx``
        responses whose body is longer than ``at_byte``."""
        self._arm_body_fault("corrupt", n, path_contains, method, offset=at_byte, after=after)

    def chaos(
        self,
        rate: float,
        *,
        kinds: Iterable[str] = CHAOS_KINDS,
        seed: int | str | None = None,
        path_contains: str | None = None,
        retry_after: float | str | None = 1,
        methods: Iterable[str] | None = None,
    ) -> None:
        """Give each matching request, independently, a fault with probability ``rate``
        (``chaos(0)`` turns it off); the kind is drawn uniformly from ``kinds``:

        - ``"500"``, ``"503"``, ``"429"`` (any status as a string): answered by the proxy,
          never forwarded; a 429 carries ``Retry-After: retry_after`` (None: none);
        - ``"reset"``: the connection is reset before any response (never forwarded);
        - ``"truncate"`` / ``"corrupt"``: forwarded, the body cut part way (at a random
          offset) or one random byte flipped. Only a response with a body can get these:
          a request that cannot have one (anything but GET) gets one of the other kinds
          instead, and so does a GET whose response turns out to have none (a 404, an
          empty body): it is then answered with that kind after being forwarded. With no
          other kind in ``kinds``, such a request goes through untouched.

        Draws come from ``random.Random(seed)`` owned by this proxy, so a seed makes the
        sequence of decisions reproducible (which request gets which still depends on
        the order in which concurrent requests arrive). Armed faults (:meth:`fail_next`
        and friends) take precedence. Count what happened with ``count(injected=True)``,
        ``count(kind="truncate")`` or :meth:`fault_counts`.
        """
        kinds = tuple(str(k) for k in kinds)
        for kind in kinds:
            if not (kind.isdigit() or kind in ("reset", "truncate", "corrupt")):
                raise ValueError(f"unknown chaos kind {kind!r}")
        if rate > 0 and not kinds:
            raise ValueError("chaos needs at least one kind")
        with self._lock:
            if rate <= 0:
                self._chaos = None
                return
            self._chaos = _Chaos(
                rate=min(rate, 1.0),
                kinds=kinds,
                rng=random.Random(seed),
                path_contains=path_contains,
                retry_after=None if retry_after is None else str(retry_after),
                methods=None if methods is None else frozenset(m.upper() for m in methods),
            )

    def latency(self, seconds: float) -> None:
        """Delay every request by ``seconds`` before handling it (0 turns it off), like a
        registry that far away; armed :meth:`delay_next` delays add to it."""
        with self._lock:
            self._latency = max(0.0, seconds)

    def clear_faults(self) -> None:
        """Disarm every pending fault and turn chaos off (latency stays)."""
        with self._lock:
            self._faults.clear()
            self._chaos = None

    def _arm_body_fault(
        self,
        kind: Literal["truncate", "corrupt"],
        n: int,
        path_contains: str | None,
        method: str | None,
        *,
        offset: int,
        after: int,
    ) -> None:
        """Arm a response-body fault (:meth:`truncate_next`, :meth:`corrupt_next`)."""
        fault = _Fault(kind, n, path_contains=path_contains, method=method and method.upper(),
                       skip=after, offset=offset)
        with self._lock:
            self._faults.append(fault)

    def _consume(self, applies: Callable[[_Fault], bool]) -> _Fault | None:
        """The first armed fault for which ``applies(fault)``, consumed: a fault still
        letting matching requests through (``skip``) lets this one through and is not
        returned. Call with the lock held."""
        for fault in self._faults:
            if not applies(fault):
                continue
            if fault.skip > 0:
                fault.skip -= 1
                continue
            fault.remaining -= 1
            return fault
        return None

    def _take_fault(self, method: str, uri: str) -> _Fault | None:
        """The first armed request-phase fault matching this request, consumed."""
        with self._lock:
            return self._consume(
                lambda fault: fault.kind not in _RESPONSE_KINDS and fault.matches(method, uri))

    def _take_response_fault(
        self, method: str, uri: str, status: int, body_length: int | None
    ) -> _Fault | None:
        """The first armed body fault (truncate/corrupt) that can apply to this response."""
        if method == "HEAD" or not 200 <= status < 300 or body_length == 0:
            return None

        def applies(fault: _Fault) -> bool:
            return (
                fault.kind in _RESPONSE_KINDS
                and fault.matches(method, uri)
                # nothing to cut or flip at an offset past the end of the body
                and (body_length is None or fault.offset < body_length)
            )

        with self._lock:
            return self._consume(applies)

    def _decide(self, method: str, uri: str) -> _Decision:
        """Armed faults first, then a chaos draw."""
        fault = self._take_fault(method, uri)
        if fault is not None:
            return _Decision(fault=fault)
        with self._lock:
            chaos = self._chaos
            if chaos is None or not chaos.matches(method, uri):
                return _Decision()
            if chaos.rng.random() >= chaos.rate:
                return _Decision()
            kind = chaos.rng.choice(chaos.kinds)
            plain = [k for k in chaos.kinds if k not in _RESPONSE_KINDS]
            fallback = self._chaos_fault(chaos, chaos.rng.choice(plain)) if plain else None
        if kind in _RESPONSE_KINDS:
            if method == "GET":
                return _Decision(chaos_body=kind, fallback=fallback)
            return _Decision(fault=fallback)  # no body to cut: another kind instead
        return _Decision(fault=self._chaos_fault(chaos, kind))

    @staticmethod
    def _chaos_fault(chaos: _Chaos, kind: str) -> _Fault:
        if kind == "reset":
            return _Fault("reset", 0)
        status = int(kind)
        return _Fault(
            "status",
            0,
            status=status,
            retry_after=chaos.retry_after if status == 429 else None,
            body=_error_body(status),
        )

    def _chaos_offset(self, body_length: int | None) -> int:
        """A random offset inside a body of ``body_length`` bytes (unknown: the first 64 KiB)."""
        with self._lock:
            rng = self._chaos.rng if self._chaos is not None else random.Random()
            return rng.randrange(max(1, body_length or _CHUNK))

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


def _error_body(status: int) -> bytes:
    """A registry-style JSON error body for an injected status."""
    code = "TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE"
    return json.dumps({"errors": [{"code": code, "message": f"injected {status}"}]}).encode()


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

    def handle(self) -> None:
        """Serve the connection; a client that hangs up mid-answer (it gave up, or its retry
        is already under way) is routine here, not worth a traceback."""
        with contextlib.suppress(ConnectionError, TimeoutError):
            super().handle()

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

        if proxy._latency > 0:
            time.sleep(proxy._latency)
        decision = proxy._decide(method, target)
        fault = decision.fault
        if fault is not None and fault.kind == "delay":
            time.sleep(fault.seconds)
        elif fault is not None:
            with contextlib.suppress(ConnectionError, OSError):
                record.request_bytes = sum(len(c) for c in body)
            self._answer_fault(fault, record)
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

            body_length = self._response_body_length(upstream)
            cut_at = flip_at = None
            armed = proxy._take_response_fault(method, target, upstream.status, body_length)
            if armed is not None:
                cut_at = armed.offset if armed.kind == "truncate" else None
                flip_at = armed.offset if armed.kind == "corrupt" else None
            elif decision.chaos_body is not None:
                if 200 <= upstream.status < 300 and body_length != 0:
                    offset = proxy._chaos_offset(body_length)
                    cut_at = offset if decision.chaos_body == "truncate" else None
                    flip_at = offset if decision.chaos_body == "corrupt" else None
                elif decision.fallback is not None:
                    # No body to cut: the response is dropped and another kind answered.
                    self._answer_fault(decision.fallback, record)
                    return
            record.status = upstream.status
            proxy._record(record)
            self._relay(upstream, record, body_length, cut_at=cut_at, flip_at=flip_at)
        finally:
            conn.close()

    def _answer_fault(self, fault: _Fault, record: ProxyRecord) -> None:
        """Answer with a request-phase fault (status or reset); the request body is read."""
        record.injected = fault.kind
        if fault.kind == "reset":
            self.proxy._record(record)
            self._abort_connection()
            return
        record.status = fault.status
        self.proxy._record(record)
        self.send_response(fault.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(fault.body)))
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        if fault.retry_after is not None:
            self.send_header("Retry-After", fault.retry_after)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(fault.body)

    def _response_body_length(self, upstream: http.client.HTTPResponse) -> int | None:
        """Body bytes the client will get: 0 without a body, None when not announced."""
        if (
            self.command == "HEAD"
            or upstream.status in (204, 304)
            or (100 <= upstream.status < 200)
        ):
            return 0
        length = upstream.getheader("Content-Length")
        return int(length) if length is not None and length.strip().isdigit() else None

    def _relay(
        self,
        upstream: http.client.HTTPResponse,
        record: ProxyRecord,
        body_length: int | None,
        *,
        cut_at: int | None = None,
        flip_at: int | None = None,
    ) -> None:
        """Send the upstream response on; cut the body after ``cut_at`` bytes (then close
        the connection) or flip the byte at ``flip_at``. ``record.injected`` is set only
        when the fault really happened (a body shorter than announced may end first)."""
        proxy = self.proxy
        self.send_response_only(upstream.status, upstream.reason)
        no_body = body_length == 0 and upstream.getheader("Content-Length") is None
        for key, value in upstream.getheaders():
            lower = key.lower()
            if lower in HOP_BY_HOP:
                continue
            if lower in ("location", "link", "content-location") and not record.absolute_host:
                value = proxy.rewrite_url(value)  # a forward proxy passes them through as-is
            self.send_header(key, value)
        stream_chunked = not no_body and body_length is None
        if stream_chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if body_length == 0:
            return
        sent = 0
        try:
            while True:
                if cut_at is not None and sent >= cut_at:
                    # Cut: the client was promised more (Content-Length or an unfinished
                    # chunked stream) and sees the connection end instead.
                    record.injected = "truncate"
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                data = upstream.read1(_CHUNK)
                if not data:
                    break
                if cut_at is not None and sent + len(data) > cut_at:
                    data = data[: cut_at - sent]
                if flip_at is not None and sent <= flip_at < sent + len(data):
                    altered = bytearray(data)
                    altered[flip_at - sent] ^= 0xFF
                    data = bytes(altered)
                    record.injected = "corrupt"
                # Counted before the write: a client that has read the last byte must find
                # it counted (the count is rolled back if the write fails).
                record.response_bytes = sent + len(data)
                try:
                    self.wfile.write(
                        b"%x\r\n%b\r\n" % (len(data), data) if stream_chunked else data)
                except (OSError, http.client.HTTPException):
                    record.response_bytes = sent
                    raise
                sent += len(data)
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
