"""HTTP/1.1 for the registry transport, on the standard library's :mod:`http.client`.

What a registry client needs from HTTP, and nothing more: keep-alive connections pooled per
origin, TLS with one :class:`ssl.SSLContext` per trust setting and process, a connect and a
read timeout, the environment's proxies (``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``ALL_PROXY`` /
``NO_PROXY``, looked up once per origin), and redirects (a blob GET is usually redirected to
object storage) that drop ``Authorization`` when they leave the origin.

**Why not requests (or urllib3 directly).** A sync is thousands of small requests, and on a
2-core machine the registries and we share the CPU, so our CPU per request is wall time. We
measured one keep-alive HEAD on loopback: requests 1.3 ms of CPU, our tuned use of it 0.78 ms,
urllib3's connection pool 0.50 ms, http.client with the pool below 0.30 ms. The layers in
between re-parse and re-quote every URL, merge header dicts, build Retry, Timeout and
adapter objects — none of which this client uses: its retries, redirects' credential rule
and timeouts are its own (:mod:`syncer.registry.transport`). What http.client does not do —
pooling, a dropped-connection check, proxies, redirects, cut-short detection — is here.

Failures without a (complete) answer are :class:`WireError`, with a ``kind``: ``tls`` (the
certificate was refused: not transient), ``connect``, ``reset``, ``timeout``, ``cut`` (a body
shorter than announced), ``protocol`` (a malformed answer), ``redirects``.

Not supported: cookies (registries do not need them; docker and skopeo keep none either),
``https://`` proxies (TLS to the proxy itself) and SOCKS proxies — they are refused with a
clear error; content codings (we ask for ``identity``, as the digest is of the bytes sent).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import select
import socket
import ssl
import threading
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

from syncer.registry.heads import Connection, TLSConnection

DEFAULT_TIMEOUT = (10.0, 120.0)  # (connect, read) seconds; read = max silence between bytes
MAX_REDIRECTS = 10
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # safe to send twice
_ORIGIN_RE = re.compile(r"^(([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*))")
# An http(s) URL with a host and only RFC 3986 characters: sent as it is, nothing to quote.
_PLAIN_URL = re.compile(r"^https?://[A-Za-z0-9.:\[\]-]+/[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*$")
# What may stay unquoted in a request target (RFC 3986 reserved and unreserved, and '%').
_SAFE_TARGET = "!#$%&'()*+,/:;=?@[]~"
_DEFAULT_PORTS = {"http": 80, "https": 443}


class WireError(Exception):
    """A request that got no complete HTTP answer. ``kind``: ``tls``, ``connect``, ``reset``,
    ``timeout``, ``cut``, ``protocol``, ``proxy`` or ``redirects``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Response:
    """One HTTP answer: ``status_code``, ``headers`` (case-insensitive ``get``), the final
    ``url`` after redirects, and the body — already read (``content``) unless the request
    was streamed, then read with :meth:`read` / :meth:`iter_content`.

    The connection goes back to its pool as soon as the body has been read to its end;
    :meth:`close` before that drops the connection (its unread rest cannot be skipped).
    """

    def __init__(self, raw: http.client.HTTPResponse, url: str,
                 connection: http.client.HTTPConnection, pool: _Pool):
        self.status_code: int = raw.status
        self.headers = raw.headers  # syncer.registry.heads.Headers: get() ignores case
        self.url = url
        self._raw: http.client.HTTPResponse | None = raw
        self._connection: http.client.HTTPConnection | None = connection
        self._pool = pool
        self._content: bytes | None = None

    @property
    def content(self) -> bytes:
        """The whole body (read on first use if the request was streamed)."""
        if self._content is None:
            self._content = b"".join(self.iter_content(256 * 1024))
        return self._content

    def json(self) -> Any:
        """The body parsed as JSON (``ValueError`` when it is not JSON)."""
        return json.loads(self.content or b"null")

    def read(self, amount: int) -> bytes:
        """Up to ``amount`` bytes of the body; ``b""`` at its end. A body that ends before its
        ``Content-Length`` (or a broken chunked body) raises ``WireError("cut")``."""
        raw = self._raw
        if raw is None:
            return b""
        announced = raw.length
        try:
            data = raw.read(amount)
        except http.client.IncompleteRead as exc:
            self._drop()
            raise WireError("cut", f"body cut short after {len(exc.partial)} more bytes") \
                from None
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            raise _wire_error(exc) from None
        if not data and amount and announced:
            self._drop()
            raise WireError("cut", f"body cut short: {announced} bytes missing")
        if raw.isclosed():
            self._release()
        return data

    def iter_content(self, chunk_size: int) -> Iterator[bytes]:
        """The body in pieces of at most ``chunk_size`` bytes (all of it, if already read)."""
        if self._content is not None:
            yield self._content
            return
        while True:
            data = self.read(chunk_size)
            if not data:
                return
            yield data

    def _release(self) -> None:
        """The body has been read: the connection can serve the next request."""
        raw, connection = self._raw, self._connection
        self._raw = self._connection = None
        if raw is None or connection is None:
            return
        if raw.will_close or connection.sock is None:
            connection.close()
        else:
            self._pool.put(connection)

    def _drop(self) -> None:
        raw, connection = self._raw, self._connection
        self._raw = self._connection = None
        if raw is not None:
            raw.close()
        if connection is not None:
            connection.close()

    def close(self) -> None:
        """Done with this answer: an unread body drops its connection."""
        raw = self._raw
        if raw is None:
            return
        if raw.isclosed():
            self._release()
        else:
            self._drop()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Pool:
    """Idle keep-alive connections to one origin (through one proxy, with one trust
    setting), newest first; at most ``size`` kept."""

    def __init__(self, size: int):
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._size = size

    def take(self) -> http.client.HTTPConnection | None:
        """An idle connection the server has not closed meanwhile, or None."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                connection = self._idle.pop()
            if not _is_dropped(connection.sock):
                return connection
            connection.close()

    def put(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self._size:
                self._idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


def _is_dropped(sock: socket.socket | None) -> bool:
    """True when an idle connection's socket is gone or readable: an idle HTTP/1.1
    connection has nothing to read unless the server closed it (EOF) or broke protocol."""
    if sock is None:
        return True
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True


class _Route:
    """How to reach one origin: directly or through a proxy, and with which TLS context."""

    def __init__(self, scheme: str, host: str, port: int, context: ssl.SSLContext | None,
                 proxy: str | None, timeout: tuple[float, float], pool_size: int):
        self.scheme, self.host, self.port = scheme, host, port
        self.context = context
        self.timeout = timeout
        self.pool = _Pool(pool_size)
        self.proxy_headers: dict[str, str] = {}
        self.proxy: tuple[str, int] | None = None
        if proxy:
            self.proxy, self.proxy_headers = _parse_proxy(proxy)
        # Plain HTTP through a proxy: absolute-form request targets to the proxy.
        self.absolute_form = self.proxy is not None and scheme == "http"

    def connect(self) -> http.client.HTTPConnection:
        """A new connection, connected (TLS handshake done) within the connect timeout;
        then the read timeout applies to every wait for bytes."""
        connect_timeout, read_timeout = self.timeout
        host, port = self.proxy or (self.host, self.port)
        connection: http.client.HTTPConnection
        if self.scheme == "https":
            connection = TLSConnection(
                host, port, timeout=connect_timeout, context=self.context)
            if self.proxy is not None:
                connection.set_tunnel(self.host, self.port, headers=self.proxy_headers)
        else:
            connection = Connection(host, port, timeout=connect_timeout)
        try:
            connection.connect()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            if self.proxy is not None and "Tunnel connection failed" in str(exc):
                raise WireError("proxy", f"proxy refused the tunnel: {exc}") from None
            raise _wire_error(exc, connecting=True) from None
        connection.sock.settimeout(read_timeout)
        return connection


class HttpClient:
    """Sends requests over pooled connections; one per registry transport (thread-safe).

    ``verify``: True (the system store plus certifi's bundle, or ``REQUESTS_CA_BUNDLE`` /
    ``CURL_CA_BUNDLE`` when set), a CA file or directory (only that CA), or False (no check).
    """

    def __init__(self, *, timeout: tuple[float, float] = DEFAULT_TIMEOUT, pool_size: int = 64,
                 user_agent: str = ""):
        self.timeout = timeout
        self.pool_size = pool_size
        self.user_agent = user_agent
        self._routes: dict[tuple[str, bool | str], _Route] = {}
        self._lock = threading.Lock()

    def send(self, method: str, url: str, headers: dict[str, str], body: Any = None, *,
             stream: bool = False, verify: bool | str = True,
             follow_redirects: bool = True) -> Response:
        """Send one request; the answer's body is read unless ``stream``.

        ``body``: None, bytes, str (UTF-8), or an iterable of bytes (sent as it comes, with
        ``Content-Length`` from ``len(body)`` when it has one, else chunked). An exception
        raised by an iterable body propagates as it is (the source failed, not the wire).
        Redirects are followed (``follow_redirects``) up to :data:`MAX_REDIRECTS`: 303 (and
        301/302 after a POST) as a GET without body, the others with the same method and body
        when it can be sent again; ``Authorization`` is dropped on leaving the origin.
        """
        for _ in range(MAX_REDIRECTS + 1):
            response = self._exchange(method, url, headers, body, stream, verify)
            location = response.headers.get("Location")
            if not (follow_redirects and response.status_code in _REDIRECTS and location):
                return response
            to_get = response.status_code == 303 or (
                response.status_code in (301, 302) and method == "POST")
            if body is not None and not isinstance(body, bytes | str) and not to_get:
                return response  # an iterable body is spent: the caller decides
            response.close()
            target = urljoin(url, location)
            if to_get:
                method, body = ("HEAD" if method == "HEAD" else "GET"), None
                headers = {k: v for k, v in headers.items()
                           if k.lower() not in ("content-type", "content-length")}
            if _leaves_origin(url, target):
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise WireError("redirects", f"more than {MAX_REDIRECTS} redirects")

    def _exchange(self, method: str, url: str, headers: dict[str, str], body: Any,
                  stream: bool, verify: bool | str) -> Response:
        route, target = self._route(url, verify)
        sent = {"User-Agent": self.user_agent, **headers} if self.user_agent else dict(headers)
        if route.absolute_form:
            sent.update(route.proxy_headers)
        if isinstance(body, str):
            body = body.encode()
        elif body is not None and not isinstance(body, bytes):
            if hasattr(body, "__len__"):
                sent["Content-Length"] = str(len(body))
            body = _SourceGuard(body)
        pooled = route.pool.take()
        connection = pooled or route.connect()
        while True:
            try:
                connection.request(method, target, body, sent)
                raw = connection.getresponse()
                break
            except _SourceFailed as failed:
                connection.close()
                raise failed.error from None
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                error = _wire_error(exc)
                # A pooled connection the server closed while it was idle, its FIN still on
                # the way when _Pool.take looked: no answer at all. A request without a body
                # and with a safe method is sent once more on a new connection (RFC 9112
                # 9.3.1; Go's net/http does the same); anything else is the caller's to retry.
                if pooled is None or error.kind != "reset" or body is not None \
                        or method not in _REPLAYABLE:
                    raise error from None
                pooled = None
                connection = route.connect()
        response = Response(raw, url, connection, route.pool)
        if not stream:
            _ = response.content  # read now: the connection goes back to its pool
        return response

    def _route(self, url: str, verify: bool | str) -> tuple[_Route, str]:
        """The route to ``url``'s origin (made on first use) and the request target."""
        origin, scheme, netloc = split_origin(url)
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise WireError("protocol", f"not an http(s) URL: {url.split('?')[0][:80]}")
        key = (origin, verify if scheme == "https" else False)
        route = self._routes.get(key)
        if route is None:
            with self._lock:
                route = self._routes.get(key)
                if route is None:
                    route = self._routes[key] = self._new_route(scheme, netloc, verify)
        if not _PLAIN_URL.match(url):
            url = _requote(url)
        if route.absolute_form:
            return route, url.split("#", 1)[0]
        return route, (url[len(origin):] or "/").split("#", 1)[0]

    def _new_route(self, scheme: str, netloc: str, verify: bool | str) -> _Route:
        parts = urlsplit(f"{scheme}://{netloc}")
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        context = tls_context(verify) if scheme == "https" else None
        return _Route(scheme, host, port, context, environment_proxy(scheme, netloc),
                      self.timeout, self.pool_size)

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            routes = list(self._routes.values())
        for route in routes:
            route.pool.close()


class _SourceFailed(Exception):
    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class _SourceGuard:
    """Wraps an iterable body so that its own failures are told apart from the socket's."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        iterator = iter(self._chunks)
        while True:
            try:
                chunk = next(iterator)
            except StopIteration:
                return
            except Exception as exc:
                raise _SourceFailed(exc) from exc
            yield chunk


def _wire_error(exc: BaseException, *, connecting: bool = False) -> WireError:
    """The :class:`WireError` for a socket or http.client failure."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ssl.SSLCertVerificationError):
        return WireError("tls", f"TLS verification failed: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
        # A handshake refused (a plain-HTTP server, no shared protocol): asking again gets
        # the same answer. An EOF in the handshake is a dropped connection (below).
        return WireError("tls", f"TLS error: {text}")
    if isinstance(exc, TimeoutError | socket.timeout):
        return WireError("timeout", f"{'connect' if connecting else 'read'} timed out")
    if isinstance(exc, http.client.IncompleteRead):
        return WireError("cut", "body cut short")
    if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError):
        return WireError("reset", f"connection closed by the server ({type(exc).__name__})")
    if connecting:
        return WireError("connect", f"cannot connect: {text}")
    if isinstance(exc, http.client.HTTPException):
        return WireError("protocol", f"{type(exc).__name__}: {text}")
    return WireError("reset", f"{type(exc).__name__}: {text}")


def split_origin(url: str) -> tuple[str, str, str]:
    """``(scheme://netloc, scheme, netloc)`` of an absolute URL (a cheaper ``urlsplit``);
    empty strings for a relative one."""
    match = _ORIGIN_RE.match(url)
    return (match[1], match[2], match[3]) if match else ("", "", "")


def _leaves_origin(old: str, new: str) -> bool:
    """True when a redirect from ``old`` to ``new`` must not carry credentials: another
    host, port or scheme — except http→https on the same host with default ports (what
    requests allows too)."""
    a, b = urlsplit(old), urlsplit(new)
    if a.hostname != b.hostname:
        return True
    a_port = a.port or _DEFAULT_PORTS.get(a.scheme)
    b_port = b.port or _DEFAULT_PORTS.get(b.scheme)
    if a.scheme == b.scheme:
        return a_port != b_port
    return not (a.scheme == "http" and b.scheme == "https" and a_port == 80 and b_port == 443)


def _requote(url: str) -> str:
    """``url`` with every character outside RFC 3986 percent-encoded (as UTF-8); existing
    ``%XX`` escapes are kept as they are."""
    return quote(url, safe=_SAFE_TARGET)


def _parse_proxy(proxy: str) -> tuple[tuple[str, int], dict[str, str]]:
    """``(host, port)`` of an ``http://[user:password@]host[:port]`` proxy and the
    ``Proxy-Authorization`` header its credentials call for."""
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if parts.scheme != "http" or not parts.hostname:
        raise WireError("proxy", f"unsupported proxy {parts.scheme}://{parts.hostname or ''} "
                                 "(only http:// proxies are supported)")
    headers = {}
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(pair).decode()
    return (parts.hostname, parts.port or 80), headers


def environment_proxy(scheme: str, netloc: str) -> str | None:
    """The proxy the environment names for ``scheme://netloc`` (``<scheme>_proxy`` or
    ``all_proxy``, either case), or None — also when ``no_proxy`` matches the host."""
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy:
        return None
    if urllib.request.proxy_bypass_environment(netloc, proxies):
        return None
    host = urlsplit(f"//{netloc}").hostname or netloc
    if host != netloc and urllib.request.proxy_bypass_environment(host, proxies):
        return None
    return proxy


_contexts: dict[bool | str, ssl.SSLContext] = {}
_contexts_lock = threading.Lock()


def tls_context(verify: bool | str) -> ssl.SSLContext:
    """The process's one :class:`ssl.SSLContext` for ``verify`` (made on first use: loading
    a CA bundle costs tens of milliseconds, so never once per connection). An unreadable CA
    file is a ``WireError("tls")``."""
    with _contexts_lock:
        context = _contexts.get(verify)
        if context is not None:
            return context
        if verify is False:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif verify is True:
            context = ssl.create_default_context()  # the system store (SSL_CERT_FILE/DIR)
            bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
            if bundle is None:
                try:
                    import certifi

                    bundle = certifi.where()
                except ImportError:
                    bundle = None
            if bundle:
                _load_ca(context, bundle)
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname check, CERT_REQUIRED
            _load_ca(context, verify)
        _contexts[verify] = context
        return context


def _load_ca(context: ssl.SSLContext, where: str) -> None:
    try:
        if os.path.isdir(where):
            context.load_verify_locations(capath=where)
        else:
            context.load_verify_locations(cafile=where)
    except OSError as exc:  # ssl.SSLError too: not a CA file
        raise WireError("tls", f"cannot load the CA certificates {where}: {exc}") from None
