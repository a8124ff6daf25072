"""A far-away registry on loopback: a TCP relay that delays every byte by half a round trip
each way, run as its own process (``python -m tests.support.delayproxy``).

Unlike :class:`tests.support.proxy.CountingProxy` (an HTTP proxy that parses every request,
opens a new upstream connection for each and can inject faults), this relay does not look at
HTTP at all: each client connection gets one upstream connection, and bytes flow through as
they come, ``rtt / 2`` later in each direction. So a request/response exchange costs one
round trip, as through the HTTP proxy's per-request delay; a new connection costs nothing
more (a real network would charge a round trip for the TCP handshake and one or two for
TLS: leaving them out keeps the figures comparable with the per-request model, and is kind
to tools that open many connections). On a 2-core machine shared by the tools and the
registries, the HTTP proxy's own CPU (about 2 ms per request in Python, and a new upstream
connection per request) was part of what was measured; the relay costs less. Requests are
counted at the registries' access logs instead.

Usage: ``python -m tests.support.delayproxy --upstream HOST:PORT --rtt-ms 25``; it prints
``listening HOST:PORT`` once ready and runs until terminated. :class:`DelayProxy` starts one
and stops it (also on failure).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

_CHUNK = 256 * 1024


class _Direction:
    """Bytes from one socket to another, each piece ``delay`` seconds after it arrived: one
    thread receives (so pieces keep arriving while earlier ones wait), one delivers. Threads
    and ``time.sleep``, not asyncio: an event loop's timers wake up to ~2 ms late (epoll's
    millisecond timeouts), which would add several ms to every round trip."""

    def __init__(self, source: socket.socket, target: socket.socket, delay: float):
        self.source, self.target, self.delay = source, target, delay
        self.pieces: collections.deque[tuple[float, bytes]] = collections.deque()
        self.ready = threading.Condition()

    def receive(self) -> None:
        while True:
            try:
                data = self.source.recv(_CHUNK)
            except OSError:
                data = b""
            with self.ready:
                self.pieces.append((time.monotonic() + self.delay, data))
                self.ready.notify()
            if not data:
                return

    def deliver(self) -> None:
        while True:
            with self.ready:
                while not self.pieces:
                    self.ready.wait()
                due, data = self.pieces.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if not data:
                    self.target.shutdown(socket.SHUT_WR)  # pass the EOF on (half-close)
                    return
                self.target.sendall(data)
            except OSError:
                return


def _relay(client: socket.socket, upstream: tuple[str, int], rtt: float) -> None:
    try:
        server = socket.create_connection(upstream)
    except OSError:
        client.close()
        return
    for sock in (client, server):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threads = []
    for direction in (_Direction(client, server, rtt / 2), _Direction(server, client, rtt / 2)):
        for work in (direction.receive, direction.deliver):
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            threads.append(thread)
    for thread in threads:
        thread.join()
    client.close()
    server.close()


def _serve(upstream: tuple[str, int], rtt: float, host: str) -> None:
    listener = socket.create_server((host, 0), backlog=1024)
    print(f"listening {host}:{listener.getsockname()[1]}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_relay, args=(client, upstream, rtt), daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """Run the relay until SIGTERM / SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT to relay to")
    parser.add_argument("--rtt-ms", type=float, default=25.0, help="round trip added (ms)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        _serve((host, int(port)), args.rtt_ms / 1000, args.host)


class DelayProxy:
    """A :mod:`tests.support.delayproxy` process in front of ``upstream`` (``host:port``);
    ``host`` is where to reach it; a context manager that always stops it."""

    def __init__(self, upstream: str, rtt: float, log_path: Path | None = None):
        self.upstream = upstream
        self.rtt = rtt
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.host = ""

    def start(self) -> DelayProxy:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.delayproxy", "--upstream", self.upstream,
             "--rtt-ms", str(self.rtt * 1000)],
            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"delay proxy did not start: {line!r}")
        self.host = line.split()[1]
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
