"""Own CPU of one registry request, by HTTP stack: ``python -m scripts.wirecost [N]``.

Sends ``N`` (default 3000) keep-alive requests — a manifest HEAD that answers 404, with an
``Authorization`` and an ``Accept`` header as the copier sends them — to a throw-away local
distribution registry through: a plain ``requests.Session``, urllib3's connection pool,
bare ``http.client`` (one connection, no pool), and this project's transport
(:mod:`syncer.registry.transport` over :mod:`syncer.registry.wire`). Prints the CPU (user +
system) of this process per request: what a stack costs on top of the exchange itself. The
registry's own CPU is not counted. A figure of the machine at the time: run it on a quiet one.
"""

from __future__ import annotations

import http.client
import resource
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

PATH = "/v2/bench/app/manifests/v1"
HEADERS = {
    "Accept": "application/vnd.oci.image.manifest.v1+json, "
              "application/vnd.docker.distribution.manifest.v2+json",
    "Authorization": "Bearer " + "a" * 64,
}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def per_request(send: Callable[[], object], count: int) -> float:
    """Milliseconds of this process's CPU per ``send()``, after one warm-up call."""
    send()
    before = _cpu()
    for _ in range(count):
        send()
    return 1000 * (_cpu() - before) / count


def stacks(host: str) -> dict[str, Callable[[], object]]:
    """One ``send`` per HTTP stack, each against ``host`` (``127.0.0.1:PORT``)."""
    import requests
    import urllib3

    from syncer.registry.credentials import CredentialStore
    from syncer.registry.transport import Transport

    session = requests.Session()
    name, port = host.rsplit(":", 1)
    pool = urllib3.HTTPConnectionPool(name, int(port), maxsize=4)
    bare = http.client.HTTPConnection(name, int(port))
    transport = Transport(host, CredentialStore([], docker_config=False))

    def bare_send() -> None:
        bare.request("HEAD", PATH, headers=HEADERS)
        bare.getresponse().read()

    return {
        "requests.Session": lambda: session.head(f"http://{host}{PATH}", headers=HEADERS),
        "urllib3 connection pool": lambda: pool.urlopen(
            "HEAD", PATH, headers=HEADERS, retries=False, redirect=False,
            assert_same_host=False),
        "http.client (no pool)": bare_send,
        "syncer transport (wire)": lambda: transport.request(
            "HEAD", PATH, repository="bench/app", scopes=(), what="check manifest",
            headers=HEADERS, allow=(404,)).close(),
    }


def main() -> int:
    """Start a registry, measure every stack, print one line each."""
    from tests.support.registry import RegistryProcess

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    with tempfile.TemporaryDirectory(prefix="wirecost-") as tmp, \
            RegistryProcess(Path(tmp) / "registry") as registry:
        for name, send in stacks(registry.host).items():
            print(f"{name:26s} {per_request(send, count):.3f} ms of CPU per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
