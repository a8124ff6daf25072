"""Loopback port helpers and child-process plumbing shared by the test servers."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The port is found by binding to port 0 and closing the socket again, so a small
    race with other processes remains; callers that start servers retry on failure.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_is_open(port: int, host: str = LOOPBACK) -> bool:
    """Return True if something accepts TCP connections on ``host:port`` right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(port: int, timeout: float = 10.0, host: str = LOOPBACK) -> None:
    """Block until ``host:port`` accepts TCP connections.

    Raises:
        TimeoutError: if nothing listens on the port within ``timeout`` seconds.
    """
    wait_until(lambda: port_is_open(port, host), timeout, f"port {host}:{port} to open")


def wait_for_port_closed(port: int, timeout: float = 10.0, host: str = LOOPBACK) -> None:
    """Block until ``host:port`` no longer accepts TCP connections."""
    wait_until(lambda: not port_is_open(port, host), timeout, f"port {host}:{port} to close")


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str = "condition", interval: float = 0.05
) -> None:
    """Poll ``predicate`` until it returns True.

    Raises:
        TimeoutError: naming ``what`` if the predicate stays false for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Ask Linux to SIGTERM this child when the test process dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)


def spawn(
    argv: list[str],
    *,
    cwd: str | None = None,
    stdout: int | object | None = None,
    stderr: int | object | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a helper server process that dies with the test process on Linux.

    ``stdout`` / ``stderr`` accept anything :class:`subprocess.Popen` accepts (e.g. an
    open file). On Linux the child gets ``PR_SET_PDEATHSIG`` so a hard-killed pytest
    (e.g. by a timeout) does not leave registries or redis servers behind.
    """
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,  # type: ignore[arg-type]
        stderr=stderr,  # type: ignore[arg-type]
        preexec_fn=preexec,
    )


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 5.0) -> None:
    """Terminate ``proc``, escalating to SIGKILL after ``grace`` seconds, and reap it."""
    if proc is None or proc.poll() is not None:
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(timeout=0)
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=grace)
