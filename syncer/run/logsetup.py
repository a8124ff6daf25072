"""Logging set-up: plain lines to stderr or a file, with every known secret scrubbed.

Registries do not echo credentials and our messages are built from status codes, but a
scrubbing filter is cheap insurance: any known password or token that reaches a log record
(message, arguments, or exception text) is replaced by ``***``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

FORMAT = "%(asctime)s %(levelname)-7s %(message)s"


class SecretScrubber(logging.Filter):
    """Replaces every secret in a record's final text with ``***``."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        self.secrets = tuple(
            sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True)
        )

    def scrub(self, text: str) -> str:
        """``text`` with every secret replaced."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg = self.scrub(record.getMessage())
            record.args = None
            if record.exc_info:
                record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


def configure_logging(
    *,
    log_file: str | None,
    secrets: Iterable[str],
    verbose: bool = False,
    quiet_stderr: bool = False,
) -> None:
    """Send ``syncer`` logs to ``log_file`` (or stderr), scrubbed of ``secrets``.

    ``quiet_stderr`` drops info lines from stderr (a progress bar is showing instead).
    """
    root = logging.getLogger("syncer")
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
        if quiet_stderr:
            handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(SecretScrubber(secrets))
    root.addHandler(handler)
