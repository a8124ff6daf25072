"""The fast reader of an HTTP answer's head gives what http.client's email-based one gives."""

from __future__ import annotations

import http.client
import io

import pytest

from syncer.registry.heads import FastResponse, read_headers

ANSWERS = [
    # A registry's typical answers: fixed length, chunked, HEAD, 204, close-delimited.
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDocker-Content-Digest: sha256:ab\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nLink: </v2/x?n=1&last=a>; rel=\"next\""
    b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"HTTP/1.1 202 Accepted\r\nLocation: /v2/a/blobs/uploads/u?_state=x%3D\r\nRange: 0-0\r\n"
    b"Content-Length: 0\r\nConnection: close\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nbody until close",
    b"HTTP/1.1 100 Continue\r\nX-Skip: 1\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"https://a/t\"\r\n"
    b"WWW-Authenticate: Basic realm=\"r\"\r\nContent-Length: 0\r\n\r\n",
]


class _Socket:
    def __init__(self, data: bytes):
        self.data = data

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(io.BytesIO(self.data))


def _both(raw: bytes, method: str = "GET"):
    ours = FastResponse(_Socket(raw), method=method)  # type: ignore[arg-type]
    theirs = http.client.HTTPResponse(_Socket(raw), method=method)  # type: ignore[arg-type]
    ours.begin()
    theirs.begin()
    return ours, theirs


@pytest.mark.parametrize("raw", ANSWERS)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_same_framing_and_fields_as_http_client(raw, method):
    ours, theirs = _both(raw, method)
    assert (ours.status, ours.reason, ours.version) == (theirs.status, theirs.reason,
                                                        theirs.version)
    assert (ours.chunked, ours.length, ours.will_close) == (theirs.chunked, theirs.length,
                                                             theirs.will_close)
    for name, _ in theirs.headers.items():
        assert ours.headers.get(name) == theirs.headers.get(name)
        assert ours.headers.get(name.upper()) == theirs.headers.get(name)
        assert ours.headers.get_all(name) == theirs.headers.get_all(name)
    assert ours.headers.items() == list(theirs.headers.items())
    assert ours.read() == theirs.read()


def test_missing_fields_and_folded_lines():
    headers = read_headers(io.BytesIO(b"X-A: one\r\n  two\r\nX-B:three\r\nno colon\r\n\r\nrest"))
    assert headers.get("x-a") == "one two" and headers["X-B"] == "three"
    assert headers.get("X-C") is None and headers.get("X-C", "d") == "d"
    assert "x-b" in headers and "x-c" not in headers
    assert len(headers) == 2


def test_limits_as_http_client():
    with pytest.raises(http.client.LineTooLong):
        read_headers(io.BytesIO(b"X: " + b"a" * 70000 + b"\r\n\r\n"))
    with pytest.raises(http.client.HTTPException):
        read_headers(io.BytesIO(b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n"))
