"""A live progress view (images done/total, bytes, rate) drawn from ledger summaries.

On a terminal it is a rich progress bar; elsewhere nothing is drawn (the log lines say it
all) and rich is not even imported. The view polls a ``summary()`` callable, so the same view
serves the embedded run (a :class:`~syncer.run.ledger.MemoryLedger`) and a distributed run (a
Redis ledger). The bar is redrawn a few times a second by its own thread, from the summary:
the copy threads never touch it (their per-chunk byte count is one locked addition).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from syncer.run.ledger import RunSummary


class ByteCounter:
    """A thread-safe running total of bytes moved (fed by the copier's ``on_bytes``)."""

    def __init__(self) -> None:
        self.total = 0
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        """Add ``count`` bytes."""
        with self._lock:
            self.total += count


class ProgressView:
    """Redraws a bar from ``summary()`` every ``interval`` seconds while in a ``with`` block."""

    def __init__(
        self,
        summary: Callable[[], RunSummary],
        *,
        live_bytes: ByteCounter | None = None,
        enabled: bool | None = None,
        interval: float = 0.25,
    ):
        self._summary = summary
        self._live_bytes = live_bytes
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress = None
        self._task = None
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]images"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._task = self._progress.add_task("images", total=None, detail="")

    def _draw(self) -> None:
        from syncer.run.report import human_bytes

        try:
            summary = self._summary()
        except Exception:
            return
        moved = self._live_bytes.total if self._live_bytes else summary.bytes_copied
        rate = moved / summary.duration if summary.duration else 0.0
        detail = (
            f"{summary.failed} failed  {human_bytes(moved)}  {human_bytes(rate)}/s"
            if summary.failed
            else f"{human_bytes(moved)}  {human_bytes(rate)}/s"
        )
        self._progress.update(
            self._task, total=summary.total, completed=summary.done, detail=detail
        )

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._draw()

    def __enter__(self) -> ProgressView:
        if self.enabled:
            self._progress.start()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.enabled:
            self._stop.set()
            if self._thread:
                self._thread.join()
            self._draw()
            self._progress.stop()
