"""Logging set-up: plain lines or JSON lines, to stderr or a file, with every known secret
scrubbed.

Registries do not echo credentials and our messages are built from status codes, but a
scrubbing filter is cheap insurance: any known password or token that reaches a log record
(message, arguments, exception text, or an ``extra=`` field) is replaced by ``***`` — and the
JSON formatter scrubs its finished line once more, in the escaped forms JSON gives a secret.

**Context fields.** What a line is about travels in a :class:`contextvars.ContextVar`: the
executors bind ``run_id``, ``image`` (``src -> dst``) and ``attempt`` around a job with
:func:`log_context`, and everything logged inside (the copier, its blob threads, the
transport) carries them. ``registry`` and ``error`` are passed with ``extra=`` where they are
known. The text format shows only the message; ``--log-format json`` shows every field.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from syncer.registry.credentials import MASK, MIN_SECRET_LENGTH, mask_secrets

FORMAT = "%(asctime)s %(levelname)-7s %(message)s"
LOG_FORMATS = ("text", "json")
#: The fields a JSON line may carry besides time, level, logger and message.
CONTEXT_FIELDS = ("run_id", "image", "registry", "attempt", "error")

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_CONTEXT: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "syncer_log_context", default=_EMPTY
)
# Attributes every LogRecord has: anything else on a record came from ``extra=`` or a filter.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName",
}


def push_log_context(**fields: Any) -> contextvars.Token:
    """Add ``fields`` (None values are ignored) to the log context of this thread/task;
    undo with :func:`pop_log_context`. Prefer :func:`log_context` where a block fits."""
    merged = dict(_CONTEXT.get())
    merged.update({k: v for k, v in fields.items() if v is not None})
    return _CONTEXT.set(MappingProxyType(merged))


def pop_log_context(token: contextvars.Token) -> None:
    """Restore the log context :func:`push_log_context` replaced."""
    _CONTEXT.reset(token)


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Log lines inside the block carry ``fields`` (``run_id=…, image=…, attempt=…``)."""
    token = push_log_context(**fields)
    try:
        yield
    finally:
        pop_log_context(token)


def current_log_context() -> Mapping[str, Any]:
    """The fields bound now (read-only)."""
    return _CONTEXT.get()


def failure_fields(exc: BaseException, reason: str, attempt: int | None = None) -> dict:
    """The ``extra=`` of a failure line: ``error`` (the one-line reason), ``attempt``, and
    ``registry`` when the error names one."""
    fields: dict[str, Any] = {"error": reason}
    if attempt is not None:
        fields["attempt"] = attempt
    registry = getattr(exc, "registry", None)
    if registry:
        fields["registry"] = registry
    return fields


class ContextFilter(logging.Filter):
    """Copies the bound context fields onto each record; a field given with ``extra=`` wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _CONTEXT.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class SecretScrubber(logging.Filter):
    """Replaces every secret in a record's final text, and in its extra fields, with ``***``
    (:func:`~syncer.registry.credentials.mask_secrets`' rule)."""

    def __init__(self, secrets: Iterable[str] | Callable[[], Iterable[str]]):
        super().__init__()
        # A callable is asked again for every record (once, in filter()): credential helpers
        # answer secrets only when a registry is first used, long after logging was set up.
        self._source = secrets if callable(secrets) else None
        self._known: tuple[str, ...] = ()
        self._learn(() if callable(secrets) else tuple(secrets))

    def _learn(self, known: tuple[str, ...]) -> None:
        self._known = known
        self.secrets = tuple(
            sorted({s for s in known if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
        )
        # How JSON may spell a secret: escaped quotes/backslashes/control characters, and
        # \uXXXX for non-ASCII when ensure_ascii is on.
        forms = {f for s in self.secrets
                 for f in (json.dumps(s)[1:-1], json.dumps(s, ensure_ascii=False)[1:-1])}
        self._escaped = tuple(sorted(forms - set(self.secrets), key=len, reverse=True))

    def _refresh(self) -> None:
        if self._source is not None:
            known = tuple(self._source())
            # CredentialStore.secrets answers the same tuple until it changes.
            if known is not self._known and known != self._known:
                self._learn(known)

    def scrub(self, text: str) -> str:
        """``text`` with every secret replaced (the secrets source asked first)."""
        self._refresh()
        return self._scrub(text)

    def _scrub(self, text: str) -> str:
        return mask_secrets(text, self.secrets) if self.secrets else text

    def scrub_serialized(self, text: str) -> str:
        """``text`` (a JSON document) with every secret, raw or JSON-escaped, replaced."""
        self._refresh()
        return self._scrub(self._scrub_escaped(text))

    def _scrub_escaped(self, text: str) -> str:
        for form in self._escaped:
            text = text.replace(form, MASK)
        return text

    def _scrub_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._scrub(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, Mapping):
            return {self._scrub_value(k): self._scrub_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._scrub_value(v) for v in value]
        text = str(value)  # an object the JSON encoder would turn into text
        cleaned = self._scrub(text)
        return cleaned if cleaned != text else value

    def filter(self, record: logging.LogRecord) -> bool:
        self._refresh()  # once per record; everything below uses what it found
        if self.secrets:
            record.msg = self._scrub(record.getMessage())
            record.args = None
            if record.exc_info:
                record.exc_text = self._scrub(
                    logging.Formatter().formatException(record.exc_info)
                )
                record.exc_info = None
            elif record.exc_text:
                record.exc_text = self._scrub(record.exc_text)
            if record.stack_info:
                record.stack_info = self._scrub(record.stack_info)
            for key, value in list(vars(record).items()):
                if key not in _STANDARD_ATTRS:
                    setattr(record, key, self._scrub_value(value))
        return True


def make_formatter(log_format: str, scrubber: SecretScrubber | None = None) -> logging.Formatter:
    """The formatter of ``log_format`` (``text`` or ``json``); the JSON one scrubs its output
    with ``scrubber`` too."""
    if log_format == "json":
        from syncer.run.jsonlog import JsonLineFormatter  # python-json-logger, only when asked

        return JsonLineFormatter(scrubber)
    if log_format != "text":
        raise ValueError(f"log format must be one of {LOG_FORMATS}, not {log_format!r}")
    return logging.Formatter(FORMAT)


def make_handler(
    *, log_file: str | None, secrets: Iterable[str] | Callable[[], Iterable[str]],
    log_format: str = "text",
) -> logging.Handler:
    """A handler writing to ``log_file`` (or stderr) in ``log_format``, adding the context
    fields and scrubbing ``secrets``."""
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    scrubber = SecretScrubber(secrets)
    handler.setFormatter(make_formatter(log_format, scrubber))
    handler.addFilter(ContextFilter())  # before the scrubber: context fields are scrubbed too
    handler.addFilter(scrubber)
    return handler


def configure_logging(
    *,
    log_file: str | None,
    secrets: Iterable[str] | Callable[[], Iterable[str]],
    verbose: bool = False,
    quiet_stderr: bool = False,
    log_format: str = "text",
) -> None:
    """Send ``syncer`` logs to ``log_file`` (or stderr), scrubbed of ``secrets``, as plain
    lines or (``log_format="json"``) one JSON object per line.

    ``quiet_stderr`` drops info lines from stderr (a progress bar is showing instead).
    """
    root = logging.getLogger("syncer")
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    handler = make_handler(log_file=log_file, secrets=secrets, log_format=log_format)
    if not log_file and quiet_stderr:
        handler.setLevel(logging.WARNING)
    root.addHandler(handler)


def configure_root_logging(
    *, level: int | str, secrets: Iterable[str] | Callable[[], Iterable[str]], log_format: str
) -> None:
    """Send every other library's logs (Celery's, in a worker) to stderr the same way."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper() if isinstance(level, str) else level)
    root.addHandler(make_handler(log_file=None, secrets=secrets, log_format=log_format))
