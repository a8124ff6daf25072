"""Real ``docker-registry`` (distribution 2.8) and ``redis-server`` processes for tests.

:class:`RegistryProcess` runs ``docker-registry serve config.yml`` on a free loopback
port with filesystem storage in a temporary directory, optionally behind htpasswd or
token auth and/or TLS. :class:`RegistrySession` is a ``requests.Session`` that performs
the registry auth dance (Basic or Bearer) by itself, so helpers in
:mod:`tests.support.images` can talk to any registry mode.

distribution 2.8 writes two logs, both kept in the registry's directory:

* stdout (``log_path``): an Apache "combined" access log, one line per request, e.g.
  ``127.0.0.1 - - [28/Nov/2026:02:53:12 +0000] "PUT /v2/a/b/manifests/1 HTTP/1.1" 201 0 "" "ua"``;
  it includes requests rejected with 401.
* stderr (``app_log_path``): logrus text lines such as ``msg="response completed"
  http.request.method=PUT http.request.uri=/v2/...`` (the URI is only quoted when it
  contains special characters).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import redis
import requests
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from .ports import LOOPBACK, free_port, port_is_open, spawn, stop_process, wait_until
from .tls import ServerTLS, make_server_tls
from .tokenserver import TokenServer

AuthMode = Literal["htpasswd", "token"] | None
Credentials = tuple[str, str]

REGISTRY_BINARY = "docker-registry"
REDIS_BINARY = "redis-server"

#: Query parameter marking requests made by this module (readiness / log sync probes);
#: such lines are left out of :meth:`RegistryProcess.access_log`.
PROBE_MARKER = "_test_support_probe"

_ACCESS_RE = re.compile(
    r"^(?P<remote>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) (?P<proto>[^"]+)" (?P<status>\d{3}) (?P<size>\d+|-)'
    r'(?: "(?P<referer>[^"]*)" "(?P<agent>[^"]*)")?'
)
_CHALLENGE_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')
_REPO_PATH_RE = re.compile(r"^/v2/(?P<name>.+?)/(?:manifests|blobs|tags|referrers)(?:/|$)")


def require_binary(name: str) -> str:
    """Return the full path of ``name`` or raise :class:`FileNotFoundError`."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found on PATH")
    return path


def _clean_env() -> dict[str, str]:
    """The test environment minus variables that would change the child's behaviour."""
    drop = ("REGISTRY_", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "OTEL_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def htpasswd_line(user: str, password: str) -> str:
    """Return a bcrypt htpasswd line for ``user`` (distribution accepts bcrypt only)."""
    out = subprocess.run(
        [require_binary("htpasswd"), "-Bbn", user, password],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip() + "\n"


# --------------------------------------------------------------------------- sessions


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split a ``WWW-Authenticate`` value into ``(scheme_lowercase, params)``."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM_RE.findall(rest))


def _token_key(url: str) -> str:
    path = urllib.parse.urlsplit(url).path
    match = _REPO_PATH_RE.match(path)
    if match:
        return match.group("name")
    return path


class RegistrySession(requests.Session):
    """A ``requests.Session`` bound to one registry that handles auth challenges.

    Relative URLs (``"/v2/..."``) are resolved against ``base_url``. On a 401 the
    session answers a ``Basic`` challenge with its credentials, or runs the Bearer
    token flow (``WWW-Authenticate`` → token realm with Basic credentials → retry with
    ``Authorization: Bearer``). Tokens are cached per repository. Environment proxy
    settings are ignored and the registry CA (if any) is trusted.
    """

    def __init__(
        self,
        base_url: str,
        credentials: Credentials | None = None,
        ca_file: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.credentials = credentials
        self.ca_file = Path(ca_file) if ca_file else None
        self.verify = str(ca_file) if ca_file else True
        self.trust_env = False
        self.headers["User-Agent"] = "image-syncer-test-support/1.0"
        self._tokens: dict[str, str] = {}
        self._basic = False
        self._auth_lock = threading.Lock()

    def url_for(self, path: str) -> str:
        """Resolve a path like ``/v2/repo/tags/list`` against the registry URL."""
        if path.startswith(("http://", "https://")):
            return path
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def _basic_header(self) -> str:
        assert self.credentials is not None
        raw = f"{self.credentials[0]}:{self.credentials[1]}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def fetch_token(self, realm: str, service: str | None, scopes: list[str]) -> str | None:
        """Fetch a bearer token from ``realm``; return None if the server refuses."""
        params: list[tuple[str, str]] = []
        if service:
            params.append(("service", service))
        params.extend(("scope", s) for s in scopes)
        headers = {"Authorization": self._basic_header()} if self.credentials else {}
        resp = requests.get(realm, params=params, headers=headers, timeout=30, verify=self.verify)
        if resp.status_code != 200:
            return None
        body = resp.json()
        return body.get("token") or body.get("access_token")

    def request(  # type: ignore[override]
        self, method: str, url: str, *args: Any, **kwargs: Any
    ) -> requests.Response:
        """Send a request, transparently answering one auth challenge.

        A streamed body (iterator/file ``data``) cannot be replayed, so a 401 for such a
        request is returned as-is; make one small request first to prime the session.
        """
        url = self.url_for(url)
        headers: dict[str, str] = dict(kwargs.pop("headers", None) or {})
        kwargs.setdefault("timeout", 60)
        explicit_auth = "Authorization" in headers or kwargs.get("auth") is not None
        key = _token_key(url)
        if not explicit_auth:
            with self._auth_lock:
                if self._basic and self.credentials:
                    headers["Authorization"] = self._basic_header()
                elif key in self._tokens:
                    headers["Authorization"] = "Bearer " + self._tokens[key]
        resp = super().request(method, url, *args, headers=headers, **kwargs)
        replayable = isinstance(kwargs.get("data"), bytes | str | dict | None)
        if resp.status_code != 401 or explicit_auth or not replayable:
            return resp
        scheme, params = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        if scheme == "basic" and self.credentials:
            with self._auth_lock:
                self._basic = True
            headers["Authorization"] = self._basic_header()
        elif scheme == "bearer" and "realm" in params:
            scopes = [s for s in params.get("scope", "").split(" ") if s]
            token = self.fetch_token(params["realm"], params.get("service"), scopes)
            if token is None:
                return resp
            with self._auth_lock:
                self._tokens[key] = token
            headers["Authorization"] = "Bearer " + token
        else:
            return resp
        resp.close()
        return super().request(method, url, *args, headers=headers, **kwargs)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class AccessLogEntry:
    """One parsed line of distribution's access log."""

    method: str
    uri: str
    status: int
    size: int
    user: str

    @property
    def path(self) -> str:
        """The URI without its query string."""
        return self.uri.split("?", 1)[0]


class RegistryProcess:
    """A ``docker-registry serve`` child process on ``127.0.0.1:<free port>``.

    Args:
        directory: a fresh directory for config, storage, certificates and logs.
        auth: ``None`` (open), ``"htpasswd"`` (Basic) or ``"token"`` (Bearer via a
            :class:`~tests.support.tokenserver.TokenServer` started alongside).
        tls: serve HTTPS with a certificate signed by a throw-away CA (``ca_file``).
        users: ``{user: password}`` for htpasswd/token modes.
        admin_user: the user :meth:`admin` logs in as (must be in ``users``).
        permissions: token mode only: per-user allowed actions (default: all).
        anonymous: token mode only: actions granted without credentials (default: none).
        token_header_mode: token mode only: ``"x5c"`` or ``"kid"`` JWT header.
        token_expires_in: token mode only: token lifetime in seconds.
        extra_config: dict merged (recursively) into the generated config.

    Use as a context manager, or call :meth:`start` / :meth:`stop`; the process is
    terminated (SIGKILL after 5 s) on exit even when the body raises.
    """

    def __init__(
        self,
        directory: Path,
        *,
        auth: AuthMode = None,
        tls: bool = False,
        users: Mapping[str, str] | None = None,
        admin_user: str = "admin",
        permissions: Mapping[str, Any] | None = None,
        anonymous: tuple[str, ...] | list[str] | None = None,
        token_header_mode: Literal["x5c", "kid"] = "x5c",
        token_expires_in: int = 300,
        extra_config: Mapping[str, Any] | None = None,
        service: str = "test-registry",
        issuer: str = "test-token-issuer",
        address: str = LOOPBACK,
    ) -> None:
        if auth not in (None, "htpasswd", "token"):
            raise ValueError(f"unknown auth mode {auth!r}")
        if auth and not users:
            raise ValueError(f"auth={auth!r} needs users")
        self.directory = Path(directory)
        self.address = address  # the IPv4 address to listen on (tests of other links)
        self.auth: AuthMode = auth
        self.tls = tls
        self.users: dict[str, str] = dict(users or {})
        self.admin_user = admin_user
        self.service = service
        self.issuer = issuer
        self._permissions = permissions
        self._anonymous = anonymous
        self._token_header_mode = token_header_mode
        self._token_expires_in = token_expires_in
        self._extra_config = dict(extra_config or {})
        self.storage_dir = self.directory / "storage"
        self.config_path = self.directory / "config.yml"
        self.log_path = self.directory / "access.log"
        self.app_log_path = self.directory / "registry.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.token_server: TokenServer | None = None
        self.server_tls: ServerTLS | None = None
        self._admin: RegistrySession | None = None
        self._log_files: list[Any] = []

    # -- addresses -------------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` (or ``ADDRESS:PORT``), as used in image references."""
        return f"{self.address}:{self.port}"

    @property
    def scheme(self) -> str:
        """``https`` when started with ``tls=True``, else ``http``."""
        return "https" if self.tls else "http"

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT``."""
        return f"{self.scheme}://{self.host}"

    @property
    def ca_file(self) -> Path | None:
        """PEM CA certificate to trust for a TLS registry (None without TLS)."""
        return self.server_tls.ca_cert if self.server_tls else None

    @property
    def ca_dir(self) -> Path | None:
        """Directory containing only ``ca.crt`` (skopeo ``--cert-dir``); None without TLS."""
        return self.server_tls.ca_dir if self.server_tls else None

    @property
    def admin_credentials(self) -> Credentials | None:
        """``(user, password)`` of the admin user, or None for an open registry."""
        if self.auth is None or self.admin_user not in self.users:
            return None
        return (self.admin_user, self.users[self.admin_user])

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self.proc is not None and self.proc.poll() is None

    # -- sessions --------------------------------------------------------------

    def admin(self) -> RegistrySession:
        """A cached :class:`RegistrySession` with admin credentials (anonymous if open)."""
        if self._admin is None:
            self._admin = RegistrySession(self.url, self.admin_credentials, self.ca_file)
        return self._admin

    def session(self, user: str | None = None, password: str | None = None) -> RegistrySession:
        """A new session as ``user`` (password looked up in ``users`` if omitted)."""
        if user is None:
            return RegistrySession(self.url, None, self.ca_file)
        if password is None:
            password = self.users[user]
        return RegistrySession(self.url, (user, password), self.ca_file)

    def anonymous(self) -> RegistrySession:
        """A new session without credentials."""
        return self.session(None)

    # -- config ----------------------------------------------------------------

    def build_config(self) -> dict[str, Any]:
        """Return the distribution config dict for the current port and mode."""
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {
                "level": "info",
                "formatter": "text",
                "accesslog": {"disabled": False},
                "fields": {"service": "registry"},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": self.host,
                "secret": secrets.token_hex(16),
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.server_tls is not None:
            config["http"]["tls"] = {
                "certificate": str(self.server_tls.server_cert),
                "key": str(self.server_tls.server_key),
            }
        if self.auth == "htpasswd":
            htpasswd = self.directory / "htpasswd"
            htpasswd.write_text("".join(htpasswd_line(u, p) for u, p in self.users.items()))
            config["auth"] = {"htpasswd": {"realm": "test-registry", "path": str(htpasswd)}}
        elif self.auth == "token":
            assert self.token_server is not None
            config["auth"] = {
                "token": {
                    "realm": self.token_server.realm,
                    "service": self.service,
                    "issuer": self.issuer,
                    "rootcertbundle": str(self.token_server.signing.bundle_path),
                }
            }
        _deep_merge(config, self._extra_config)
        return config

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> RegistryProcess:
        """Start the registry (and token server) and wait until ``/v2/`` answers."""
        binary = require_binary(REGISTRY_BINARY)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.storage_dir.mkdir(exist_ok=True)
        try:
            if self.tls and self.server_tls is None:
                self.server_tls = make_server_tls(self.directory / "tls")
            if self.auth == "token" and self.token_server is None:
                self.token_server = TokenServer(
                    self.users,
                    self.directory / "token",
                    service=self.service,
                    issuer=self.issuer,
                    permissions=self._permissions,
                    anonymous=self._anonymous,
                    expires_in=self._token_expires_in,
                    header_mode=self._token_header_mode,
                ).start()
            last_error = ""
            for _attempt in range(5):
                self.port = free_port()
                self.config_path.write_text(yaml.safe_dump(self.build_config(), sort_keys=False))
                if self._spawn_and_wait(binary, timeout):
                    return self
                last_error = self._read_app_log()[-2000:]
                if "address already in use" not in last_error:
                    break
            raise RuntimeError(f"docker-registry failed to start:\n{last_error}")
        except BaseException:
            self.stop()
            raise

    def _spawn_and_wait(self, binary: str, timeout: float) -> bool:
        stdout = self.log_path.open("ab")
        stderr = self.app_log_path.open("ab")
        self._log_files += [stdout, stderr]
        self.proc = spawn(
            [binary, "serve", str(self.config_path)],
            cwd=str(self.directory),
            env=_clean_env(),
            stdout=stdout,
            stderr=stderr,
        )
        deadline = time.monotonic() + timeout
        probe = RegistrySession(self.url, None, self.ca_file)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    self.proc = None
                    return False
                if port_is_open(self.port, self.address):
                    with contextlib.suppress(requests.RequestException):
                        resp = probe.get(f"/v2/?{PROBE_MARKER}=ready", timeout=2)
                        if resp.status_code in (200, 401):
                            return True
                time.sleep(0.05)
        finally:
            probe.close()
        stop_process(self.proc)
        self.proc = None
        raise TimeoutError(f"docker-registry did not answer /v2/ within {timeout}s")

    def stop(self) -> None:
        """Terminate the registry (SIGKILL after 5 s) and stop its token server."""
        try:
            stop_process(self.proc)
        finally:
            self.proc = None
            if self.token_server is not None:
                self.token_server.stop()
                self.token_server = None
            if self._admin is not None:
                self._admin.close()
                self._admin = None
            for handle in self._log_files:
                with contextlib.suppress(Exception):
                    handle.close()
            self._log_files.clear()

    def __enter__(self) -> RegistryProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- logs ------------------------------------------------------------------

    def _read_app_log(self) -> str:
        try:
            return self.app_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def app_log(self) -> str:
        """The registry's logrus output (stderr) so far."""
        return self._read_app_log()

    def sync_log(self, timeout: float = 5.0) -> None:
        """Wait until the access log has caught up with requests already answered.

        distribution writes the access-log line just after the response is sent, so a
        test that checks the log right after a request could miss it. This sends a
        marked probe request and waits for its line to show up.
        """
        if not self.running:
            return
        token = secrets.token_hex(8)
        with RegistrySession(self.url, None, self.ca_file) as probe:
            probe.get(f"/v2/?{PROBE_MARKER}={token}", timeout=timeout)
        needle = f"{PROBE_MARKER}={token}"
        wait_until(
            lambda: needle in self.log_path.read_text(errors="replace"), timeout, "access log"
        )

    def access_log(self, *, sync: bool = True) -> list[AccessLogEntry]:
        """Parsed access-log entries, excluding this module's probe requests."""
        if sync:
            self.sync_log()
        entries: list[AccessLogEntry] = []
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return entries
        for line in lines:
            match = _ACCESS_RE.match(line)
            if not match or PROBE_MARKER in match.group("uri"):
                continue
            size = match.group("size")
            entries.append(
                AccessLogEntry(
                    method=match.group("method"),
                    uri=match.group("uri"),
                    status=int(match.group("status")),
                    size=0 if size == "-" else int(size),
                    user=match.group("user"),
                )
            )
        return entries

    def log_mark(self) -> int:
        """Current number of access-log entries; pass it as ``since=`` to count later ones."""
        return len(self.access_log())

    def requests_matching(
        self,
        method: str | None,
        path_substring: str = "",
        *,
        status: int | None = None,
        since: int = 0,
    ) -> int:
        """Count access-log requests with ``method`` (None = any) whose URI contains
        ``path_substring`` (and with ``status`` if given), after entry number ``since``.
        """
        return sum(
            1
            for e in self.access_log()[since:]
            if (method is None or e.method == method.upper())
            and path_substring in e.uri
            and (status is None or e.status == status)
        )


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        elif value is None:
            base.pop(key, None)
        else:
            base[key] = value


@contextlib.contextmanager
def running_registry(directory: Path, **kwargs: Any) -> Iterator[RegistryProcess]:
    """Context manager: start a :class:`RegistryProcess` and always stop it afterwards."""
    reg = RegistryProcess(directory, **kwargs)
    try:
        yield reg.start()
    finally:
        reg.stop()


# --------------------------------------------------------------------------- redis


class RedisServer:
    """A ``redis-server`` child process on a fixed free loopback port.

    ``stop()`` and ``start()`` may be called repeatedly; the port stays the same so
    clients can reconnect after a restart. No persistence (``--save '' --appendonly no``)
    unless ``persistent=True``: then every write is appended to an AOF in ``directory`` and
    fsynced at once (``--appendonly yes --appendfsync always``), so queued messages and
    ledgers survive ``stop()`` / ``start()`` (or ``restart()``) like a production Redis.

    ``password="..."`` starts the server with ``--requirepass``; the URLs then carry it as
    ``redis://:PASSWORD@host:port/db`` (percent-encoded). ``tls=True`` serves TLS only
    (``--port 0 --tls-port P``) with a certificate from a throw-away CA (``ca_file``; no
    client certificates), and the URLs become
    ``rediss://host:port/db?ssl_cert_reqs=required&ssl_ca_certs=<ca_file>``, which both
    kombu (the Celery broker) and ``redis.Redis.from_url`` understand.
    """

    def __init__(self, directory: Path, port: int | None = None, *,
                 persistent: bool = False, password: str | None = None,
                 tls: bool = False, address: str = LOOPBACK) -> None:
        self.directory = Path(directory)
        self.address = address  # the IPv4 address to listen on (tests of other links)
        self.port = port or free_port()
        self.persistent = persistent
        self.password = password
        self.tls = tls
        self.server_tls: ServerTLS | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.directory / "redis.log"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` (or ``ADDRESS:PORT``)."""
        return f"{self.address}:{self.port}"

    @property
    def ca_file(self) -> Path | None:
        """The CA that signed the server certificate (TLS mode, once started)."""
        return self.server_tls.ca_cert if self.server_tls else None

    @property
    def url(self) -> str:
        """``redis://[:PASSWORD@]127.0.0.1:PORT/0`` (``rediss://...?ssl_...`` with TLS)."""
        return self.db_url(0)

    def db_url(self, db: int) -> str:
        """URL for database number ``db``."""
        userinfo = f":{urllib.parse.quote(self.password, safe='')}@" if self.password else ""
        if not self.tls:
            return f"redis://{userinfo}{self.host}/{db}"
        if self.server_tls is None:
            raise RuntimeError("start() the TLS redis-server before asking for its URL")
        query = urllib.parse.urlencode(
            {"ssl_cert_reqs": "required", "ssl_ca_certs": str(self.server_tls.ca_cert)}, safe="/"
        )
        return f"rediss://{userinfo}{self.host}/{db}?{query}"

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def ping(self) -> bool:
        """True if the server answers ``PING`` (redis-py: after ``AUTH`` when it has a
        password, over TLS verified against :attr:`ca_file` when it serves TLS)."""
        tls: dict[str, Any] = {}
        if self.tls:
            assert self.server_tls is not None
            tls = {"ssl": True, "ssl_ca_certs": str(self.server_tls.ca_cert)}
        client = redis.Redis(host=self.address, port=self.port, password=self.password,
                             socket_timeout=1, socket_connect_timeout=1,
                             retry=Retry(NoBackoff(), 0), **tls)
        try:
            return bool(client.ping())
        except redis.RedisError:  # refused, still loading, wrong password, TLS refused
            return False
        finally:
            client.close()

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server (no-op if running) and wait until it answers PING."""
        if self.running:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.tls and self.server_tls is None:  # kept across restarts: clients trust one CA
            self.server_tls = make_server_tls(self.directory / "tls")
        wait_until(lambda: not port_is_open(self.port, self.address), timeout,
                   f"port {self.port} to be free")
        if self.tls:
            assert self.server_tls is not None
            listen = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.server_tls.server_cert),
                "--tls-key-file", str(self.server_tls.server_key),
                "--tls-ca-cert-file", str(self.server_tls.ca_cert),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        else:
            listen = ["--port", str(self.port)]
        # The password goes in a config file (mode 600), not argv, so it does not show in
        # `ps` -- as an operator would run it.
        conf: list[str] = []
        if self.password:
            conf_path = self.directory / "redis-auth.conf"
            conf_path.write_text(f"requirepass {_redis_quote(self.password)}\n")
            conf_path.chmod(0o600)
            conf = [str(conf_path)]
        argv = [
            require_binary(REDIS_BINARY),
            *conf,
            *listen,
            "--bind", self.address,
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            *(["--appendfsync", "always"] if self.persistent else []),
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--protected-mode", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self.proc = spawn(argv, cwd=str(self.directory), env=_clean_env())
        try:
            wait_until(lambda: self.ping() or not self.running, timeout, "redis-server PING")
            if not self.running:
                raise RuntimeError(f"redis-server exited:\n{self._log_tail()}")
        except BaseException:
            self.stop()
            raise
        return self

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Terminate the server (SIGKILL after 5 s); the port is kept for ``start()``."""
        stop_process(self.proc)
        self.proc = None

    def restart(self) -> None:
        """``stop()`` then ``start()`` on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _redis_quote(value: str) -> str:
    """``value`` as a double-quoted redis.conf string."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class RedisUrl(str):
    """A ``redis://127.0.0.1:PORT/0`` string (or the password / TLS form of
    :attr:`RedisServer.url`) that can also stop/start its server.

    Yielded by the ``redis_server`` fixture: pass it anywhere a URL is expected and call
    ``stop()`` / ``start()`` / ``restart()`` to simulate an outage on the same port.
    """

    server: RedisServer

    def __new__(cls, server: RedisServer) -> RedisUrl:
        """Wrap ``server``; the string value is ``server.url``."""
        obj = super().__new__(cls, server.url)
        obj.server = server
        return obj

    @property
    def url(self) -> str:
        """The plain ``str`` URL."""
        return str.__str__(self)

    @property
    def port(self) -> int:
        """The server's port."""
        return self.server.port

    def db_url(self, db: int) -> str:
        """URL for database number ``db``."""
        return self.server.db_url(db)

    def stop(self) -> None:
        """Stop the server (the port stays reserved for ``start()``)."""
        self.server.stop()

    def start(self) -> None:
        """Start the server again on the same port and wait for PING."""
        self.server.start()

    def restart(self) -> None:
        """Stop and start the server."""
        self.server.restart()

    def ping(self) -> bool:
        """True if the server answers PING."""
        return self.server.ping()
