"""A small HTTP server on a free loopback port, serving from a daemon thread.

Shared by the token server, the counting proxy and the tests that need a stand-in for
something a real registry cannot show on loopback (storage redirects, Harbor's API).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .ports import LOOPBACK


class BackgroundServer:
    """``ThreadingHTTPServer`` for ``handler`` on ``127.0.0.1:<free port>``.

    Use as a context manager, or :meth:`start` / :meth:`stop` (both idempotent).
    """

    def __init__(self, handler: type[BaseHTTPRequestHandler], name: str = "http-server"):
        self.handler = handler
        self.name = name
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"{LOOPBACK}:{self.port}"

    def start(self) -> BackgroundServer:
        """Bind and serve in a daemon thread."""
        if self._server is not None:
            return self
        self._server = ThreadingHTTPServer((LOOPBACK, 0), self.handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"{self.name}-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class JsonHandler(BaseHTTPRequestHandler):
    """Base for stand-in servers: :meth:`reply` sends a JSON body; nothing is logged."""

    def reply(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        """Answer ``status`` with ``body`` as JSON and any extra ``headers``."""
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: tests assert on what was served, not on stderr."""
