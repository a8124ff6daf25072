"""Reading the head of an HTTP answer (status line, header fields) for the wire layer.

:class:`http.client.HTTPResponse` parses header fields with the :mod:`email` package: a
feed parser, a policy object and a MIME content-type lookup for every answer — about a
fifth of this client's CPU per request, for the handful of fields a registry client reads.
:class:`FastResponse` reads the same bytes with a plain loop into :class:`Headers` and
then applies http.client's own framing rules (chunked, ``Content-Length``, keep-alive),
unchanged; the body is read by http.client as before.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator

_MAX_LINE = 65536  # http.client's limits
_MAX_HEADERS = 100


class Headers:
    """Header fields of one answer: :meth:`get` ignores case and gives the first value of a
    repeated field (as :class:`email.message.Message` does); :meth:`get_all` gives every
    value."""

    __slots__ = ("_fields",)

    def __init__(self, fields: list[tuple[str, str]]):
        self._fields = fields

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of field ``name`` (any case), else ``default``."""
        wanted = name.lower()
        for key, value in self._fields:
            if key.lower() == wanted:
                return value
        return default

    def get_all(self, name: str, default: list[str] | None = None) -> list[str] | None:
        """Every value of field ``name``, in order, else ``default``."""
        wanted = name.lower()
        values = [value for key, value in self._fields if key.lower() == wanted]
        return values or default

    def __getitem__(self, name: str) -> str | None:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def items(self) -> list[tuple[str, str]]:
        """Every field as ``(name, value)``, in order."""
        return list(self._fields)

    def keys(self) -> list[str]:
        """Every field name, in order."""
        return [key for key, _ in self._fields]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._fields)


def read_headers(fp) -> Headers:
    """Header fields up to the empty line that ends them (``fp``: the socket's buffered
    reader). A folded continuation line (obsolete, RFC 9112 5.2) is joined to its field."""
    fields: list[tuple[str, str]] = []
    while True:
        line = fp.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE:
            raise http.client.LineTooLong("header line")
        if line in (b"\r\n", b"\n", b""):
            return Headers(fields)
        if len(fields) >= _MAX_HEADERS:
            raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")
        text = line.decode("iso-8859-1")
        if text[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {text.strip()}")
            continue
        name, colon, value = text.partition(":")
        if colon:
            fields.append((name.strip(), value.strip()))


class FastResponse(http.client.HTTPResponse):
    """:class:`http.client.HTTPResponse` whose head is read by :func:`read_headers`."""

    def begin(self) -> None:
        """Read the status line and header fields; set the body's framing as http.client's
        ``begin`` does."""
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            read_headers(self.fp)  # a 100 Continue's fields: skipped
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = read_headers(self.fp)  # type: ignore[assignment]
        coding = self.headers.get("transfer-encoding")
        self.chunked = bool(coding) and coding.lower() == "chunked"
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None
            else:
                if self.length < 0:  # a nonsensical negative length: ignored
                    self.length = None
        if status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED) \
                or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True  # no framing: the body ends when the server closes


class Connection(http.client.HTTPConnection):
    """A plain-HTTP connection whose answers are :class:`FastResponse`."""

    response_class = FastResponse


class TLSConnection(http.client.HTTPSConnection):
    """An HTTPS connection whose answers are :class:`FastResponse`."""

    response_class = FastResponse
