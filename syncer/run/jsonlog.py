"""``--log-format json``: one JSON object per line, built by python-json-logger.

Each line has ``time`` (ISO 8601, UTC, milliseconds), ``level``, ``logger`` and ``message``,
then whichever context fields are known (:data:`syncer.run.logsetup.CONTEXT_FIELDS`:
``run_id``, ``image``, ``registry``, ``attempt``, ``error``) and any other ``extra=`` field;
a traceback, if any, is in ``exc_info``. Fields that are not known are left out rather than
written as ``null``. Imported only when JSON is asked for.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pythonjsonlogger.json import JsonFormatter

if TYPE_CHECKING:
    from syncer.run.logsetup import SecretScrubber

_FIELDS = ("asctime", "levelname", "name", "message")
_RENAMES = {"asctime": "time", "levelname": "level", "name": "logger"}


class JsonLineFormatter(JsonFormatter):
    """The syncer's JSON lines; ``scrubber`` removes secrets from the finished line too."""

    def __init__(self, scrubber: SecretScrubber | None = None):
        super().__init__(list(_FIELDS), rename_fields=dict(_RENAMES), json_ensure_ascii=False)
        self.scrubber = scrubber

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """``2024-05-01T12:00:00.123Z``."""
        moment = datetime.fromtimestamp(record.created, UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line, scrubbed of every secret."""
        line = super().format(record)
        return self.scrubber.scrub_serialized(line) if self.scrubber else line
