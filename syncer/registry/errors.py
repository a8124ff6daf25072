"""The exception tree of the syncer, and the one predicate that says "worth retrying".

::

    SyncerError                      base of everything raised on purpose
    ├── ConfigError                  a config/auth/images file or a flag is wrong (exit code 2)
    ├── ReferenceError_              an image reference cannot be parsed
    ├── TimeLimitExceeded            one image took longer than its time limit          (permanent)
    └── RegistryError                a registry said no, or could not be reached
        ├── TransportError           connection refused/reset, timeout, TLS failure     (transient*)
        ├── AuthenticationError      401/403 after credentials were offered             (permanent)
        ├── NotFoundError            404, NAME_UNKNOWN, MANIFEST_UNKNOWN, BLOB_UNKNOWN  (permanent)
        ├── RateLimitedError         429 / TOOMANYREQUESTS, carries ``retry_after``     (transient)
        ├── ServerError              5xx, 408, UNAVAILABLE, UNKNOWN                     (transient)
        ├── IntegrityError           truncated body or digest mismatch                  (transient)
        └── UnsupportedManifestError schema1 or an unknown media type                   (permanent)

``*`` a TLS verification failure is a :class:`TransportError` with ``transient=False``: retrying
will not make a self-signed certificate trusted.

Error texts never contain credentials: the client builds its own messages from status codes
and the spec's error codes, and the free text a registry puts in its error body (which a
registry or a proxy in front of it may fill with what it was sent) has every known secret
masked before it is quoted (:func:`syncer.registry.transport.raise_for_response`). URL queries
(presigned storage URLs) are cut from connection errors' texts.
"""

from __future__ import annotations

from dataclasses import dataclass


class SyncerError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(SyncerError):
    """A configuration problem, found before any registry is contacted.

    ``problems`` holds one human line per mistake, each naming the file and the key path.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ReferenceError_(SyncerError, ValueError):
    """An image reference that is not valid (bad host, repository, tag or digest)."""


class TimeLimitExceeded(SyncerError):
    """A copy ran past its deadline (``SYNCER_TASK_TIME_LIMIT`` in the distributed mode).

    Enforced by the copier itself, between chunks, so it holds on any Celery pool (the
    threads pool ignores Celery's own time limits) and leaves no half-open upload behind.
    """


@dataclass(frozen=True)
class SpecError:
    """One entry of an OCI error body: ``{"code": ..., "message": ...}``."""

    code: str
    message: str = ""


class RegistryError(SyncerError):
    """A registry request failed. ``transient`` says whether trying again may help."""

    transient = False

    def __init__(
        self,
        message: str,
        *,
        registry: str = "",
        status: int | None = None,
        errors: tuple[SpecError, ...] = (),
    ):
        self.registry = registry
        self.status = status
        self.errors = errors
        prefix = f"{registry}: " if registry else ""
        super().__init__(prefix + message)

    @property
    def codes(self) -> tuple[str, ...]:
        """The spec error codes from the response body, e.g. ``("MANIFEST_UNKNOWN",)``."""
        return tuple(e.code for e in self.errors)


class TransportError(RegistryError):
    """The registry could not be reached or the connection broke."""

    def __init__(self, message: str, *, transient: bool = True, **kwargs):
        super().__init__(message, **kwargs)
        self.transient = transient


class AuthenticationError(RegistryError):
    """Credentials were refused (401/403 after the auth flow ran) or are missing."""


class NotFoundError(RegistryError):
    """The repository, manifest or blob does not exist."""


class RateLimitedError(RegistryError):
    """HTTP 429 / TOOMANYREQUESTS. ``retry_after`` is seconds from the Retry-After header."""

    transient = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(RegistryError):
    """5xx, 408, or an UNAVAILABLE/UNKNOWN spec code: the registry may recover."""

    transient = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class IntegrityError(RegistryError):
    """A body was truncated or its digest did not match what was asked for."""

    transient = True


class UnsupportedManifestError(RegistryError):
    """A manifest this tool will not copy (Docker schema1, unknown media type)."""


def is_transient(exc: BaseException) -> bool:
    """True when retrying the failed operation may succeed.

    Registry errors answer by their class (see the tree above); anything else not raised by
    us (a bug, a KeyError) is permanent, so a retry loop never hides a programming error.
    """
    if isinstance(exc, RegistryError):
        return bool(exc.transient)
    return False


def retry_after(exc: BaseException) -> float | None:
    """Seconds the registry asked us to wait (Retry-After on 429/503), if it said."""
    return getattr(exc, "retry_after", None)
