"""A loopback HTTP server on raw sockets, for tests that must decide exactly what a server
sends and when it closes: each accepted connection runs a handler on its own thread, and the
server counts the connections it accepts. ``response`` / ``chunked`` build answers byte by
byte; ``keep_alive`` and ``echo`` are the common handlers."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tests.support.tls import ServerTLS

LOOPBACK = "127.0.0.1"


@dataclass
class Request:
    """One request as the server read it (header names lower-cased)."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    chunked: bool


class Connection:
    """The server side of one accepted connection."""

    def __init__(self, sock: socket.socket, server: LoopServer):
        self.sock = sock
        self.server = server
        self.rfile = sock.makefile("rb")

    def read_request(self) -> Request | None:
        """The next request on the connection, or None when the client closed it first.
        ``EOFError`` when it closes in the middle of a request."""
        line = self.rfile.readline(65536)
        if not line:
            return None
        method, target, _version = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while True:
            line = self.rfile.readline(65536)
            if not line:
                raise EOFError("headers cut short")
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        if chunked:
            body = self._read_chunked()
        else:
            body = self._read_exactly(int(headers.get("content-length", "0")))
        request = Request(method, target, headers, body, chunked)
        self.server.record(request)
        return request

    def _read_exactly(self, size: int) -> bytes:
        data = self.rfile.read(size)
        if len(data) < size:
            raise EOFError("body cut short")
        return data

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise EOFError("chunked body cut short")
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while True:  # trailers, up to the empty line
                    line = self.rfile.readline(1024)
                    if not line:
                        raise EOFError("chunked body cut short")
                    if line in (b"\r\n", b"\n"):
                        return b"".join(parts)
            parts.append(self._read_exactly(size))
            if self._read_exactly(2) != b"\r\n":
                raise ValueError("chunk not followed by CRLF")

    def send(self, data: bytes) -> None:
        """Write ``data`` to the client."""
        self.sock.sendall(data)

    def close(self) -> None:
        """Close the connection (FIN to the client)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.rfile.close()
        self.sock.close()


class LoopServer:
    """Accepts on ``127.0.0.1:<free port>`` and runs ``handler(connection)`` in a thread per
    connection (after the TLS handshake when ``tls`` is given). ``accepted`` counts the TCP
    connections, ``requests`` every request read. :meth:`stop` wakes and joins every thread."""

    def __init__(self, handler: Callable[[Connection], None], tls: ssl.SSLContext | None = None):
        self.handler = handler
        self.tls = tls
        self.accepted = 0
        self.requests: list[Request] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server((LOOPBACK, 0), backlog=128)
        self._listener.settimeout(0.05)
        self.port = int(self._listener.getsockname()[1])
        thread = threading.Thread(target=self._accept, name=f"loop-{self.port}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def url(self, path: str = "/", scheme: str = "http") -> str:
        """``scheme://127.0.0.1:PORT/path``."""
        return f"{scheme}://{LOOPBACK}:{self.port}{path}"

    def record(self, request: Request) -> None:
        """Remember a request (thread-safe)."""
        with self._lock:
            self.requests.append(request)

    def track(self, sock: socket.socket) -> None:
        """Have :meth:`stop` shut ``sock`` down too (a proxy's upstream socket)."""
        with self._lock:
            self._sockets.append(sock)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(10)
            with self._lock:
                self.accepted += 1
                self._sockets.append(sock)
                thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        connection = None
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True,
                                            do_handshake_on_connect=False)
                self.track(sock)
                sock.do_handshake()
            connection = Connection(sock, self)
            self.handler(connection)
        except Exception:  # the client went away, a refused handshake: nothing to assert here
            pass
        finally:
            if connection is not None:
                connection.close()
            else:
                sock.close()

    def stop(self) -> None:
        """Stop accepting, shut every connection down and join the threads."""
        self.stopping.set()
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(timeout=5)


def response(status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None,
             *, length: bool = True) -> bytes:
    """An HTTP/1.1 answer; ``Content-Length`` unless ``length`` is False."""
    fields = {"Content-Length": str(len(body))} if length else {}
    fields.update(headers or {})
    head = f"HTTP/1.1 {status} Whatever\r\n" + "".join(f"{k}: {v}\r\n" for k, v in
                                                        fields.items())
    return head.encode("latin-1") + b"\r\n" + body


def chunked(*parts: bytes) -> bytes:
    """``parts`` as a chunked body with its last chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


def keep_alive(respond: Callable[[Request], bytes]) -> Callable[[Connection], None]:
    """A handler answering every request of a connection with ``respond(request)``."""

    def handler(connection: Connection) -> None:
        while (request := connection.read_request()) is not None:
            connection.send(respond(request))

    return handler


def echo(request: Request) -> bytes:
    """200 with what the server saw, as JSON."""
    seen = {
        "method": request.method,
        "target": request.target,
        "authorization": request.headers.get("authorization"),
        "proxy_authorization": request.headers.get("proxy-authorization"),
        "content_type": request.headers.get("content-type"),
        "content_length": request.headers.get("content-length"),
        "body": request.body.decode("latin-1"),
    }
    return response(200, json.dumps(seen).encode())


def closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def server_context(tls: ServerTLS) -> ssl.SSLContext:
    """The server side of ``tls``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(tls.server_cert), str(tls.server_key))
    return context
