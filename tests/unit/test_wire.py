"""The HTTP/1.1 client under the registry transport (:mod:`syncer.registry.wire`), against
loopback servers on plain sockets (:mod:`tests.support.rawserver`), so that each test decides
exactly what the server sends and when it closes, and counts the TCP connections it accepts.

Covered: keep-alive and the pool (one connection for sequential requests, a connection the
server closed meanwhile replaced without an error, streamed bodies returning or dropping their
connection, at most one connection per thread under concurrency), bodies cut short, timeouts,
connect failures, request bodies (sized, chunked, a failing source), redirects and the
``Authorization`` rule, TLS trust, an HTTP CONNECT proxy and the environment's proxy settings.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from syncer.registry.wire import MAX_REDIRECTS, HttpClient, WireError, environment_proxy
from tests.support.rawserver import (
    LOOPBACK,
    Connection,
    LoopServer,
    Request,
    chunked,
    closed_port,
    echo,
    keep_alive,
    response,
    server_context,
)
from tests.support.tls import ServerTLS, make_server_tls

_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


def idle_connections(client: HttpClient) -> int:
    """How many connections ``client`` holds in its pools."""
    return sum(len(route.pool._idle) for route in client._routes.values())


@pytest.fixture(autouse=True)
def _no_proxy_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the proxy tests set proxies; nothing here may leave loopback."""
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def serve() -> Iterator[Callable[..., LoopServer]]:
    """Factory ``serve(handler, tls=None)``; every server is stopped at teardown."""
    servers: list[LoopServer] = []

    def start(handler: Callable[[Connection], None],
              tls: ssl.SSLContext | None = None) -> LoopServer:
        server = LoopServer(handler, tls)
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in reversed(servers):
            server.stop()


@pytest.fixture
def client() -> Iterator[HttpClient]:
    """A client with short timeouts (the defaults are covered by the transport's tests)."""
    http = HttpClient(timeout=(2, 5))
    try:
        yield http
    finally:
        http.close()


@pytest.fixture
def tls_files(tmp_path: Path) -> ServerTLS:
    """A fresh trustme CA and a certificate for 127.0.0.1 / localhost."""
    return make_server_tls(tmp_path / "tls")


# --- Keep-alive and the pool ---------------------------------------------------------------


@pytest.mark.timeout(20)
def test_sequential_requests_use_one_connection(serve, client):
    server = serve(keep_alive(lambda request: response(200, request.target.encode())))
    for n in range(20):
        answer = client.send("GET", server.url(f"/n/{n}"), {})
        assert (answer.status_code, answer.content) == (200, f"/n/{n}".encode())
    assert len(server.requests) == 20
    assert server.accepted == 1
    assert idle_connections(client) == 1


def _answer_once_then_close(closed: threading.Semaphore | None) -> Callable[[Connection], None]:
    """A handler that answers one request with keep-alive framing (Content-Length, no
    ``Connection: close``) and then closes the connection, as a server does whose idle
    timeout struck just after the answer."""

    def handler(connection: Connection) -> None:
        if connection.read_request() is not None:
            connection.send(response(200, b"ok"))
        connection.close()
        if closed is not None:
            closed.release()

    return handler


@pytest.mark.timeout(20)
def test_connection_closed_by_server_while_idle_is_replaced(serve, client):
    """The pooled connection is dead when the next request comes: ``_Pool.take`` sees the
    server's FIN and connects again, without an error."""
    closed = threading.Semaphore(0)
    server = serve(_answer_once_then_close(closed))
    for n in range(50):
        answer = client.send("GET", server.url(f"/round/{n}"), {})
        assert (answer.status_code, answer.content) == (200, b"ok")
        assert closed.acquire(timeout=5)  # the server has closed the pooled connection
    assert server.accepted == 50
    assert len(server.requests) == 50


@pytest.mark.timeout(30)
def test_connection_closed_by_server_right_after_the_answer(serve, client):
    """The same without waiting for the close: the client's next request races the
    server's FIN, many times over; every request must still get its answer."""
    server = serve(_answer_once_then_close(None))
    for n in range(200):
        answer = client.send("GET", server.url(f"/round/{n}"), {})
        assert (answer.status_code, answer.content) == (200, b"ok")
    assert len(server.requests) == 200


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("method", "body", "retried"), [
    ("GET", None, True), ("HEAD", None, True), ("POST", b"x", False), ("PUT", b"x", False),
    ("DELETE", None, False)])
def test_pooled_connection_dropped_with_the_request_unanswered(serve, client, method, body,
                                                               retried):
    """The server reads the second request on a kept-alive connection and closes without an
    answer (its FIN crossed our request): a bodiless GET or HEAD is sent again on a new
    connection; other requests are not sent twice."""
    connections = iter(range(1000))

    def handler(connection: Connection) -> None:
        index = next(connections)
        served = 0
        while (request := connection.read_request()) is not None:
            if index == 0 and served == 1:
                return  # closes unanswered
            connection.send(response(200, b"" if request.method == "HEAD" else b"ok"))
            served += 1

    server = serve(handler)
    assert client.send("GET", server.url("/first"), {}).content == b"ok"
    if retried:
        assert client.send(method, server.url("/second"), {}, body).status_code == 200
        assert [r.target for r in server.requests] == ["/first", "/second", "/second"]
    else:
        with pytest.raises(WireError) as raised:
            client.send(method, server.url("/second"), {}, body)
        assert raised.value.kind == "reset"
        assert [r.target for r in server.requests] == ["/first", "/second"]
    assert server.accepted == (2 if retried else 1)


@pytest.mark.timeout(20)
def test_fresh_connection_dropped_unanswered_is_not_retried(serve, client):
    server = serve(lambda connection: connection.read_request() and None)
    with pytest.raises(WireError) as raised:
        client.send("GET", server.url("/only"), {})
    assert raised.value.kind == "reset"
    assert server.accepted == 1


# --- Bodies cut short ----------------------------------------------------------------------


def _answer_then_close(raw: bytes) -> Callable[[Connection], None]:
    def handler(connection: Connection) -> None:
        if connection.read_request() is not None:
            connection.send(raw)
        connection.close()

    return handler


_CUT_ANSWERS = {
    "content-length": response(200, b"x" * 500, {"Content-Length": "1000"}),
    "mid-chunk": response(200, b"3e8\r\n" + b"x" * 500, {"Transfer-Encoding": "chunked"},
                          length=False),
    "before-last-chunk": response(200, b"1f4\r\n" + b"x" * 500 + b"\r\n",
                                  {"Transfer-Encoding": "chunked"}, length=False),
    "mid-chunk-size": response(200, b"1f4\r\n" + b"x" * 500 + b"\r\n3",
                               {"Transfer-Encoding": "chunked"}, length=False),
}


@pytest.mark.timeout(20)
@pytest.mark.parametrize("how", sorted(_CUT_ANSWERS))
def test_body_cut_short(serve, client, how):
    server = serve(_answer_then_close(_CUT_ANSWERS[how]))
    with pytest.raises(WireError) as raised:
        client.send("GET", server.url("/whole"), {})
    assert raised.value.kind == "cut"

    answer = client.send("GET", server.url("/streamed"), {}, stream=True)
    received = b""
    with pytest.raises(WireError) as raised:
        for piece in answer.iter_content(100):
            received += piece
    assert raised.value.kind == "cut"
    assert received == b"x" * len(received) and len(received) <= 500

    answer = client.send("GET", server.url("/read"), {}, stream=True)
    with pytest.raises(WireError) as raised:  # the cut shows on some read
        while answer.read(64):
            pass
    assert raised.value.kind == "cut"
    assert idle_connections(client) == 0
    assert server.accepted == 3


@pytest.mark.timeout(20)
def test_body_delimited_by_close_is_whole(serve, client):
    """No Content-Length, not chunked, ``Connection: close``: the end of the connection is
    the end of the body, not a cut."""
    body = bytes(range(256)) * 100
    server = serve(_answer_then_close(response(200, body, {"Connection": "close"},
                                               length=False)))
    assert client.send("GET", server.url(), {}).content == body
    with client.send("GET", server.url(), {}, stream=True) as answer:
        assert b"".join(answer.iter_content(1000)) == body
    assert idle_connections(client) == 0


@pytest.mark.timeout(20)
def test_chunked_body_reads_whole_and_keeps_the_connection(serve, client):
    parts = [b"a" * 10, bytes(range(256)) * 300, b"z"]
    server = serve(keep_alive(lambda request: response(
        200, chunked(*parts), {"Transfer-Encoding": "chunked"}, length=False)))
    for _ in range(3):
        assert client.send("GET", server.url(), {}).content == b"".join(parts)
    with client.send("GET", server.url(), {}, stream=True) as answer:
        assert b"".join(answer.iter_content(1000)) == b"".join(parts)
    answer = client.send("GET", server.url(), {}, stream=True)
    received = b""
    while piece := answer.read(7777):
        received += piece
    assert received == b"".join(parts)
    assert client.send("GET", server.url(), {}).content == b"".join(parts)
    assert server.accepted == 1


# --- Streamed answers and their connection -------------------------------------------------


@pytest.mark.timeout(20)
def test_streamed_answer_closed_early_drops_its_connection(serve, client):
    big = bytes(range(256)) * 4096  # 1 MiB: far more than the socket buffers hold
    server = serve(keep_alive(lambda request: response(200, big)))
    answer = client.send("GET", server.url(), {}, stream=True)
    assert answer.read(10) == big[:10]
    answer.close()
    assert idle_connections(client) == 0
    assert client.send("GET", server.url(), {}).content == big
    assert server.accepted == 2


@pytest.mark.timeout(20)
def test_streamed_answer_read_to_its_end_returns_its_connection(serve, client):
    big = bytes(range(256)) * 4096

    def respond(request: Request) -> bytes:
        if request.method == "HEAD":  # the length of a GET's body, and no body
            return response(200, headers={"Content-Length": str(len(big))})
        return response(200, big)

    server = serve(keep_alive(respond))
    with client.send("GET", server.url(), {}, stream=True) as answer:
        assert b"".join(answer.iter_content(65536)) == big
    assert idle_connections(client) == 1
    answer = client.send("GET", server.url(), {}, stream=True)
    assert answer.read(len(big)) == big  # exactly the body: released without a last read
    answer.close()
    assert idle_connections(client) == 1
    assert client.send("HEAD", server.url(), {}).content == b""
    assert client.send("GET", server.url(), {}).content == big
    assert server.accepted == 1


# --- Timeouts and connect failures ---------------------------------------------------------


def _silent(connection: Connection) -> None:
    connection.server.stopping.wait(20)


@pytest.mark.timeout(20)
def test_read_timeout_without_an_answer(serve):
    server = serve(_silent)
    http = HttpClient(timeout=(2, 0.5))
    try:
        started = time.monotonic()
        with pytest.raises(WireError) as raised:
            http.send("GET", server.url(), {})
        elapsed = time.monotonic() - started
    finally:
        http.close()
    assert raised.value.kind == "timeout"
    assert 0.4 <= elapsed < 2.0


@pytest.mark.timeout(20)
def test_read_timeout_in_the_middle_of_a_body(serve):
    def stall(connection: Connection) -> None:
        connection.read_request()
        connection.send(response(200, b"x" * 10, {"Content-Length": "1000"}))
        connection.server.stopping.wait(20)

    server = serve(stall)
    http = HttpClient(timeout=(2, 0.5))
    try:
        answer = http.send("GET", server.url(), {}, stream=True)
        started = time.monotonic()
        with pytest.raises(WireError) as raised:
            answer.read(1000)
        assert raised.value.kind == "timeout"
        assert time.monotonic() - started < 2.0
        assert idle_connections(http) == 0
    finally:
        http.close()


@pytest.mark.timeout(20)
def test_stalled_tls_handshake_is_a_timeout_not_a_tls_verdict(serve):
    server = serve(_silent)  # accepts, never answers the ClientHello
    http = HttpClient(timeout=(0.5, 5))
    try:
        started = time.monotonic()
        with pytest.raises(WireError) as raised:
            http.send("GET", server.url(scheme="https"), {}, verify=False)
        elapsed = time.monotonic() - started
    finally:
        http.close()
    assert raised.value.kind == "timeout"
    assert elapsed < 2.0


@pytest.mark.timeout(20)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_connect_refused(client, scheme):
    with pytest.raises(WireError) as raised:
        client.send("GET", f"{scheme}://{LOOPBACK}:{closed_port()}/v2/", {}, verify=False)
    assert raised.value.kind == "connect"


@pytest.mark.timeout(20)
def test_connection_closed_during_tls_handshake_is_not_a_tls_verdict(serve, client):
    server = serve(lambda connection: None)  # accepts and closes at once
    with pytest.raises(WireError) as raised:
        client.send("GET", server.url(scheme="https"), {}, verify=False)
    assert raised.value.kind in ("connect", "reset")


# --- Request bodies ------------------------------------------------------------------------


class SizedBody:
    """An iterable body that knows its length in bytes."""

    def __init__(self, parts: list[bytes]):
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.parts)


class BrokenBody(SizedBody):
    """Yields its first part, then fails as a source can (a read error upstream)."""

    def __init__(self, error: Exception):
        super().__init__([b"first part", b"never sent"])
        self.error = error

    def __iter__(self) -> Iterator[bytes]:
        yield self.parts[0]
        raise self.error


@pytest.mark.timeout(20)
@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "chunked"])
def test_failing_body_source_propagates_and_drops_the_connection(serve, client, sized):
    server = serve(keep_alive(echo))
    assert client.send("GET", server.url(), {}).status_code == 200  # a pooled connection
    assert idle_connections(client) == 1
    error = ValueError("source broke")
    broken = BrokenBody(error)
    body = broken if sized else iter(broken)
    with pytest.raises(ValueError) as raised:
        client.send("PUT", server.url("/upload"), {}, body)
    assert raised.value is error
    assert idle_connections(client) == 0
    answer = client.send("GET", server.url("/after"), {})
    assert json.loads(answer.content)["target"] == "/after"
    assert server.accepted == 2
    assert [request.target for request in server.requests] == ["/", "/after"]


@pytest.mark.timeout(20)
def test_iterable_bodies_sized_and_chunked(serve, client):
    server = serve(keep_alive(echo))
    parts = [b"", bytes(range(256)) * 257, b"\r\n0\r\n\r\n", b"tail"]
    whole = b"".join(parts)

    client.send("PUT", server.url("/sized"), {}, SizedBody(parts))
    client.send("PUT", server.url("/chunked"), {}, (part for part in parts))
    client.send("PUT", server.url("/bytes"), {}, whole)
    client.send("PUT", server.url("/text"), {}, "é")

    sized, streamed, plain, text = server.requests
    assert sized.headers["content-length"] == str(len(whole))
    assert "transfer-encoding" not in sized.headers
    assert not sized.chunked and sized.body == whole
    assert "content-length" not in streamed.headers
    assert streamed.chunked and streamed.body == whole
    assert plain.headers["content-length"] == str(len(whole)) and plain.body == whole
    assert text.body == "é".encode() and text.headers["content-length"] == "2"
    assert server.accepted == 1


# --- Redirects -----------------------------------------------------------------------------


class Redirector:
    """Two servers: ``a`` redirects by path, ``b`` (another port) echoes."""

    def __init__(self, serve: Callable[..., LoopServer]):
        self.b = serve(keep_alive(echo))
        self.a = serve(keep_alive(self.respond))

    def respond(self, request: Request) -> bytes:
        path = request.target
        locations = {
            "/same": "/target",
            "/absolute-same": self.a.url("/target"),
            "/other-port": self.b.url("/target"),
            "/other-host": f"http://localhost:{self.a.port}/target",
            "/see-other": "/target",
            "/found": "/target",
            "/moved": "/target",
        }
        if path.startswith("/loop/"):
            return response(302, b"", {"Location": f"/loop/{int(path[6:]) + 1}"})
        status = {"/see-other": 303, "/found": 302, "/moved": 301}.get(path, 307)
        if path in locations:
            return response(status, b"go elsewhere", {"Location": locations[path]})
        return echo(request)


def _seen(answer) -> dict:
    assert answer.status_code == 200
    return json.loads(answer.content)


@pytest.mark.timeout(20)
def test_redirect_within_the_origin_keeps_authorization(serve, client):
    servers = Redirector(serve)
    for path in ("/same", "/absolute-same"):
        answer = client.send("POST", servers.a.url(path), {"Authorization": "Bearer t"},
                             b"payload")
        seen = _seen(answer)
        assert (seen["method"], seen["target"], seen["body"]) == ("POST", "/target", "payload")
        assert seen["authorization"] == "Bearer t"
        assert answer.url == servers.a.url("/target")


@pytest.mark.timeout(20)
def test_redirect_leaving_the_origin_drops_authorization(serve, client):
    servers = Redirector(serve)
    answer = client.send("GET", servers.a.url("/other-port"),
                         {"authorization": "Bearer t", "X-Other": "kept"})
    seen = _seen(answer)
    assert seen["authorization"] is None and seen["target"] == "/target"
    assert servers.b.requests[-1].headers["x-other"] == "kept"
    assert answer.url == servers.b.url("/target")

    answer = client.send("GET", servers.a.url("/other-host"), {"Authorization": "Bearer t"})
    assert _seen(answer)["authorization"] is None
    assert answer.url == f"http://localhost:{servers.a.port}/target"


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("path", "method"),
                         [("/see-other", "POST"), ("/see-other", "PUT"), ("/found", "POST"),
                          ("/moved", "POST")])
def test_redirect_to_get_without_body(serve, client, path, method):
    servers = Redirector(serve)
    answer = client.send(method, servers.a.url(path),
                         {"Content-Type": "application/json", "Authorization": "Bearer t"},
                         b'{"a": 1}')
    seen = _seen(answer)
    assert (seen["method"], seen["body"], seen["content_type"]) == ("GET", "", None)
    assert seen["content_length"] in (None, "0")
    assert seen["authorization"] == "Bearer t"
    assert answer.url == servers.a.url("/target")


@pytest.mark.timeout(20)
def test_redirect_keeping_the_method_resends_a_bytes_body(serve, client):
    servers = Redirector(serve)
    for path in ("/found", "/same"):
        seen = _seen(client.send("PUT", servers.a.url(path), {}, b"again"))
        assert (seen["method"], seen["body"]) == ("PUT", "again")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("path", ["/same", "/found", "/moved"])
@pytest.mark.parametrize("sized", [True, False], ids=["sized", "generator"])
def test_redirect_keeping_the_method_returns_with_a_spent_iterable_body(serve, client, path,
                                                                       sized):
    """An iterable body cannot be sent twice: the caller gets the redirect (and the target
    is never sent an empty or short body)."""
    servers = Redirector(serve)
    body = SizedBody([b"only", b"once"])
    answer = client.send("PUT", servers.a.url(path), {}, body if sized else iter(body))
    assert 300 <= answer.status_code < 400
    assert answer.headers["Location"] == "/target"
    assert [request.target for request in servers.a.requests] == [path]
    assert servers.a.requests[0].body == b"onlyonce"


@pytest.mark.timeout(20)
def test_too_many_redirects(serve, client):
    servers = Redirector(serve)
    with pytest.raises(WireError) as raised:
        client.send("GET", servers.a.url("/loop/0"), {})
    assert raised.value.kind == "redirects"
    assert len(servers.a.requests) == MAX_REDIRECTS + 1
    assert servers.a.accepted == 1


@pytest.mark.timeout(20)
@pytest.mark.parametrize("stream", [False, True])
def test_redirect_not_followed_when_asked(serve, client, stream):
    servers = Redirector(serve)
    answer = client.send("GET", servers.a.url("/same"), {}, stream=stream,
                         follow_redirects=False)
    assert answer.status_code == 307
    assert answer.headers["location"] == "/target"
    assert answer.url == servers.a.url("/same")
    assert answer.content == b"go elsewhere"
    assert [request.target for request in servers.a.requests] == ["/same"]


# --- Concurrency ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_concurrent_requests_get_their_own_answers(serve):
    server = serve(keep_alive(lambda request: response(200, request.headers["x-id"].encode())))
    http = HttpClient(timeout=(2, 10))
    threads_count, per_thread, rounds = 16, 50, 3
    failures: list[str] = []

    def work(round_: int, thread: int) -> None:
        try:
            for n in range(per_thread):
                rid = f"{round_}-{thread}-{n}"
                if n % 2:
                    with http.send("GET", server.url(f"/{rid}"), {"X-Id": rid},
                                   stream=True) as answer:
                        got = b"".join(answer.iter_content(3))
                else:
                    got = http.send("GET", server.url(f"/{rid}"), {"X-Id": rid}).content
                if got != rid.encode():
                    failures.append(f"{rid}: got {got!r}")
        except Exception as exc:
            failures.append(f"{round_}-{thread}: {exc!r}")

    try:
        for round_ in range(rounds):
            workers = [threading.Thread(target=work, args=(round_, t), daemon=True)
                       for t in range(threads_count)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(timeout=20)
            assert not any(worker.is_alive() for worker in workers)
            assert failures == []
    finally:
        http.close()
    assert len(server.requests) == threads_count * per_thread * rounds
    assert server.accepted <= threads_count


# --- TLS -----------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_tls_trust(serve, client, tls_files):
    server = serve(keep_alive(echo), tls=server_context(tls_files))
    url = server.url("/v2/", scheme="https")
    for _ in range(3):
        assert _seen(client.send("GET", url, {}, verify=str(tls_files.ca_cert)))["target"] \
            == "/v2/"
    assert server.accepted == 1  # keep-alive over TLS too

    with pytest.raises(WireError) as raised:
        client.send("GET", url, {}, verify=True)  # the CA is in no system store
    assert raised.value.kind == "tls"

    assert _seen(client.send("GET", url, {}, verify=False))["target"] == "/v2/"


@pytest.mark.timeout(20)
def test_https_to_a_plain_http_server_is_a_tls_error(serve, client):
    def plain(connection: Connection) -> None:
        connection.sock.recv(65536)  # a ClientHello: not a request line
        connection.send(response(400, b"Client sent an HTTP request to an HTTP server",
                                 {"Connection": "close"}))

    server = serve(plain)
    with pytest.raises(WireError) as raised:
        client.send("GET", server.url("/v2/", scheme="https"), {}, verify=False)
    assert raised.value.kind == "tls"


@pytest.mark.timeout(10)
def test_unreadable_ca_file_is_a_tls_error(client, tmp_path):
    bogus = tmp_path / "not-a-ca.pem"
    bogus.write_text("nothing here")
    with pytest.raises(WireError) as raised:
        client.send("GET", f"https://{LOOPBACK}:{closed_port()}/", {}, verify=str(bogus))
    assert raised.value.kind == "tls"


# --- Proxies -------------------------------------------------------------------------------


def _relay(source: Callable[[], bytes], sink: socket.socket) -> None:
    try:
        while data := source():
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def connect_proxy(connection: Connection) -> None:
    """A minimal HTTP proxy: CONNECT tunnels; any other request is answered by the proxy
    itself with the request line it received (to check absolute-form targets)."""
    request = connection.read_request()
    if request is None:
        return
    if request.method != "CONNECT":
        connection.send(response(200, f"{request.method} {request.target}".encode(),
                                 {"Connection": "close"}))
        return
    host, _, port = request.target.rpartition(":")
    upstream = socket.create_connection((host, int(port)), timeout=10)
    connection.server.track(upstream)
    connection.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
    to_upstream = threading.Thread(
        target=_relay, args=(lambda: connection.rfile.read1(65536), upstream), daemon=True)
    to_upstream.start()
    _relay(lambda: upstream.recv(65536), connection.sock)
    to_upstream.join(timeout=10)
    upstream.close()


def _use_proxy(monkeypatch: pytest.MonkeyPatch, **proxies: str) -> None:
    """Set ``<scheme>_proxy`` in both cases, and a NO_PROXY that excludes nothing here."""
    for scheme, url in proxies.items():
        monkeypatch.setenv(f"{scheme}_proxy", url)
        monkeypatch.setenv(f"{scheme.upper()}_PROXY", url)
    monkeypatch.setenv("NO_PROXY", "excluded.invalid")
    monkeypatch.setenv("no_proxy", "excluded.invalid")


@pytest.mark.timeout(20)
def test_https_through_a_connect_proxy(serve, tls_files, monkeypatch):
    origin = serve(keep_alive(echo), tls=server_context(tls_files))
    proxy = serve(connect_proxy)
    ca = str(tls_files.ca_cert)
    _use_proxy(monkeypatch, https=f"http://{LOOPBACK}:{proxy.port}")
    http = HttpClient(timeout=(2, 5))
    try:
        for _ in range(3):
            seen = _seen(http.send("GET", origin.url("/v2/", scheme="https"),
                                   {"Authorization": "Bearer t"}, verify=ca))
            assert (seen["target"], seen["authorization"]) == ("/v2/", "Bearer t")
    finally:
        http.close()
    assert [(r.method, r.target) for r in proxy.requests] == [
        ("CONNECT", f"{LOOPBACK}:{origin.port}")]  # one tunnel, kept alive
    assert "proxy-authorization" not in proxy.requests[0].headers
    assert origin.accepted == 1


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("userinfo", "credentials"),
                         [("u:p", "u:p"), ("us%40er:p%3Ass", "us@er:p:ss")])
def test_connect_proxy_credentials(serve, tls_files, monkeypatch, userinfo, credentials):
    origin = serve(keep_alive(echo), tls=server_context(tls_files))
    proxy = serve(connect_proxy)
    _use_proxy(monkeypatch, https=f"http://{userinfo}@{LOOPBACK}:{proxy.port}")
    http = HttpClient(timeout=(2, 5))
    try:
        seen = _seen(http.send("GET", origin.url("/v2/", scheme="https"), {},
                               verify=str(tls_files.ca_cert)))
    finally:
        http.close()
    assert proxy.requests[0].method == "CONNECT"
    expected = "Basic " + base64.b64encode(credentials.encode()).decode()
    assert proxy.requests[0].headers["proxy-authorization"] == expected
    assert seen["proxy_authorization"] is None  # never sent through the tunnel


@pytest.mark.timeout(20)
def test_proxy_without_scheme_and_no_proxy(serve, tls_files, monkeypatch):
    origin = serve(keep_alive(echo), tls=server_context(tls_files))
    proxy = serve(connect_proxy)
    url, ca = origin.url("/v2/", scheme="https"), str(tls_files.ca_cert)
    _use_proxy(monkeypatch, https=f"{LOOPBACK}:{proxy.port}")  # taken as http://
    http = HttpClient(timeout=(2, 5))
    try:
        assert _seen(http.send("GET", url, {}, verify=ca))["target"] == "/v2/"
    finally:
        http.close()
    assert len(proxy.requests) == 1

    monkeypatch.setenv("NO_PROXY", LOOPBACK)
    monkeypatch.setenv("no_proxy", LOOPBACK)
    http = HttpClient(timeout=(2, 5))
    try:
        assert _seen(http.send("GET", url, {}, verify=ca))["target"] == "/v2/"
    finally:
        http.close()
    assert proxy.accepted == 1  # the second client went direct
    assert origin.accepted == 2


@pytest.mark.timeout(20)
def test_proxy_refusing_the_tunnel(serve, monkeypatch):
    def refuse(connection: Connection) -> None:
        connection.read_request()
        connection.send(response(407, b"", {"Proxy-Authenticate": "Basic realm=x",
                                            "Connection": "close"}))

    proxy = serve(refuse)
    _use_proxy(monkeypatch, https=f"http://{LOOPBACK}:{proxy.port}")
    http = HttpClient(timeout=(2, 5))
    try:
        with pytest.raises(WireError) as raised:
            http.send("GET", f"https://{LOOPBACK}:{closed_port()}/v2/", {}, verify=False)
    finally:
        http.close()
    assert raised.value.kind == "proxy"
    assert proxy.requests[0].method == "CONNECT"


@pytest.mark.timeout(20)
def test_plain_http_through_a_proxy_uses_absolute_form(serve, monkeypatch):
    proxy = serve(connect_proxy)
    _use_proxy(monkeypatch, http=f"http://u:p@{LOOPBACK}:{proxy.port}")
    target = f"http://{LOOPBACK}:{closed_port()}/v2/a/b?n=1"
    http = HttpClient(timeout=(2, 5))
    try:
        answer = http.send("GET", target, {})
    finally:
        http.close()
    assert answer.content == f"GET {target}".encode()
    assert proxy.requests[0].headers["proxy-authorization"] == "Basic " + base64.b64encode(
        b"u:p").decode()


# --- The environment's proxy settings ------------------------------------------------------


@pytest.mark.timeout(10)
def test_environment_proxy_no_proxy(monkeypatch):
    proxy = "http://proxy.invalid:3128"
    monkeypatch.setenv("http_proxy", proxy)
    monkeypatch.setenv("no_proxy", "reg.example,other.example:5000")
    monkeypatch.setenv("NO_PROXY", "reg.example,other.example:5000")
    assert environment_proxy("http", "reg.example") is None
    assert environment_proxy("http", "reg.example:5000") is None  # the host, any port
    assert environment_proxy("http", "mirror.reg.example:443") is None  # a subdomain
    assert environment_proxy("http", "other.example:5000") is None  # host:port
    assert environment_proxy("http", "other.example:5001") == proxy
    assert environment_proxy("http", "other.example") == proxy
    assert environment_proxy("http", "notreg.example") == proxy
    assert environment_proxy("https", "somewhere.example") is None  # no https/all proxy

    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    assert environment_proxy("http", "somewhere.example") is None


@pytest.mark.timeout(10)
def test_environment_proxy_all_proxy(monkeypatch):
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setenv("ALL_PROXY", "http://all.invalid:3128")
    assert environment_proxy("https", "reg.example") == "http://all.invalid:3128"
    assert environment_proxy("http", "reg.example") == "http://all.invalid:3128"
    monkeypatch.setenv("HTTPS_PROXY", "http://https.invalid:3128")
    assert environment_proxy("https", "reg.example") == "http://https.invalid:3128"
    assert environment_proxy("http", "reg.example") == "http://all.invalid:3128"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("proxy", ["https://proxy.invalid:3128", "socks5://proxy.invalid:1080",
                                   "socks5h://proxy.invalid:1080"])
def test_only_http_proxies_are_supported(monkeypatch, proxy):
    monkeypatch.setenv("no_proxy", "excluded.invalid")
    monkeypatch.setenv("NO_PROXY", "excluded.invalid")
    monkeypatch.setenv("ALL_PROXY", proxy)
    http = HttpClient(timeout=(2, 5))
    try:
        for url in ("http://reg.invalid/v2/", "https://reg.invalid/v2/"):
            with pytest.raises(WireError) as raised:
                http.send("GET", url, {})
            assert raised.value.kind == "proxy"
            assert proxy.split("://")[0] + "://" in str(raised.value)
    finally:
        http.close()
