"""Workers on separate hosts, for real: two ``syncer worker`` processes, each in its own network
namespace, reach Redis and the registries only over a link — no loopback anywhere.

The test builds a small private network on this machine and removes it afterwards (also when
the test fails)::

    root namespace: bridge syNbr  10.213.X.1/24  ← redis-server, two docker-registry
        ├── veth ── namespace syN-a: 10.213.X.2/24   worker w1, and the planner
        └── veth ── namespace syN-b: 10.213.X.3/24   worker w2

Redis and the registries listen on 10.213.X.1 only (not 127.0.0.1), so anything that quietly
assumed loopback — a default broker URL, a ``localhost`` in a setting, plain HTTP allowed only
for loopback — fails here. The registries are plain HTTP on a non-loopback address, so the
workers' auth file marks them ``insecure: true``, as an operator must. Each namespace has only
``lo`` and its link; inside it, 127.0.0.1 has nothing listening.

The commands run as ``ip netns exec NAME /abs/path/.venv/bin/syncer …`` — how a unit file would
start a worker in a namespace: the venv's absolute path, no activation. Skipped, with the
reason, where the machine does not allow namespaces (not root, no ``ip``, no veth/bridge).
Traffic never leaves this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis

from syncer.run.ledger import JobRecord
from tests.support import images
from tests.support.celery_workers import SYNCER, WorkerProcess, syncer_env
from tests.support.registry import _ACCESS_RE, RedisServer, RegistryProcess
from workers.redis_ledger import RedisLedger

pytestmark = pytest.mark.integration

SRC_REPO, DST_REPO = "src/app", "dst/app"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20,
                          check=check)


@dataclass
class Lab:
    """The namespaces and addresses of the test network."""

    bridge: str
    root_address: str
    namespaces: dict[str, str]  # namespace -> its address
    veths: list[str]

    def exec_argv(self, namespace: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``namespace``."""
        return ["ip", "netns", "exec", namespace, *argv]

    def teardown(self) -> None:
        """Remove everything (each step on its own: a half-built lab is removed too)."""
        for namespace in self.namespaces:
            _ip("netns", "del", namespace, check=False)  # takes its veth ends along
        for veth in self.veths:
            _ip("link", "del", veth, check=False)
        _ip("link", "del", self.bridge, check=False)


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A bridge with two namespaces on it (see the module docstring)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("the ip command (iproute2) is not installed")
    tag = os.getpid() % 100_000
    subnet = f"10.213.{tag % 200 + 20}"
    built = Lab(f"sy{tag}br", f"{subnet}.1",
                {f"sy{tag}-a": f"{subnet}.2", f"sy{tag}-b": f"{subnet}.3"},
                [f"sy{tag}h{i}" for i in range(2)])
    built.teardown()  # a lab left behind by a killed run with this pid
    try:
        _ip("link", "add", built.bridge, "type", "bridge")
        _ip("addr", "add", f"{built.root_address}/24", "dev", built.bridge)
        _ip("link", "set", built.bridge, "up")
        for index, (namespace, address) in enumerate(built.namespaces.items()):
            host_end, ns_end = built.veths[index], f"sy{tag}n{index}"
            _ip("netns", "add", namespace)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _ip("link", "set", host_end, "master", built.bridge)
            _ip("link", "set", host_end, "up")
            _ip("link", "set", ns_end, "netns", namespace)
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", ns_end)
            _ip("-n", namespace, "link", "set", ns_end, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as exc:
        built.teardown()
        detail = getattr(exc, "stderr", "") or str(exc)
        pytest.skip(f"this machine does not allow a test network (ip: {detail.strip()})")
    try:
        yield built
    finally:
        built.teardown()


def reachable(lab: Lab, namespace: str, host: str, port: int) -> bool:
    """Whether a TCP connection to ``host:port`` opens from inside ``namespace``."""
    probe = (f"import socket; socket.create_connection(({host!r}, {port}), timeout=2)")
    done = subprocess.run(lab.exec_argv(namespace, [shutil.which("python3") or "python3",
                                                    "-c", probe]),
                          capture_output=True, text=True, timeout=20, check=False)
    return done.returncode == 0


def remote_addresses(registry: RegistryProcess) -> set[str]:
    """Client addresses in a registry's access log (its probes excluded)."""
    registry.sync_log()
    found = set()
    for line in registry.log_path.read_text(errors="replace").splitlines():
        match = _ACCESS_RE.match(line)
        if match and "_test_support_probe" not in match.group("uri"):
            found.add(match.group("remote").rsplit(":", 1)[0])
    return found


@pytest.mark.timeout(120)
def test_workers_in_two_namespaces_sync_over_the_links_only(lab, tmp_path):
    address = lab.root_address
    (ns_a, addr_a), (ns_b, addr_b) = lab.namespaces.items()
    servers: list = []
    workers: list[WorkerProcess] = []
    try:
        server = RedisServer(tmp_path / "redis", address=address).start()
        servers.append(server)
        src = RegistryProcess(tmp_path / "src", address=address).start()
        servers.append(src)
        dst = RegistryProcess(tmp_path / "dst", address=address).start()
        servers.append(dst)
        with contextlib.closing(socket.socket()) as sock:  # nothing of ours on loopback
            assert sock.connect_ex(("127.0.0.1", server.port)) != 0
        shared = images.make_layer(20_000, seed="netns-base")
        pushed = {
            f"t{i:02d}": images.push_image(
                src, SRC_REPO, f"t{i:02d}",
                layers=[shared, images.make_layer(1_000 + i, seed=f"netns-{i}")])
            for i in range(10)
        }
        # Inside a namespace Redis answers at the link address, not at 127.0.0.1.
        assert reachable(lab, ns_a, address, server.port)
        assert not reachable(lab, ns_a, "127.0.0.1", server.port)

        auth = tmp_path / "auth.json"  # plain HTTP off loopback: insecure, said explicitly
        auth.write_text(json.dumps({src.host: {"insecure": True}, dst.host: {"insecure": True}}))
        rules = tmp_path / "images.json"
        rules.write_text(json.dumps({f"{src.host}/{SRC_REPO}": f"{dst.host}/{DST_REPO}"}))
        env = syncer_env(server.url, tmp_path / "env")
        assert env["SYNCER_BROKER_URL"] == f"redis://{address}:{server.port}/0"

        for name, namespace in (("w1", ns_a), ("w2", ns_b)):
            worker = WorkerProcess(name, auth, env, tmp_path / f"{name}.log", concurrency=2)
            worker.argv = lab.exec_argv(namespace, worker.argv)  # SYNCER: an absolute path
            workers.append(worker.start(wait=False))
        for worker in workers:
            worker.wait_ready(60)

        plan = subprocess.run(
            lab.exec_argv(ns_a, [SYNCER, "plan", "--auth", str(auth), "--images", str(rules),
                                 "--wait", "--json"]),
            env=env, capture_output=True, text=True, timeout=90, check=False)
        report = "\n".join(w.log_text()[-3000:] for w in workers)
        assert plan.returncode == 0, plan.stdout + plan.stderr + report
        summary = json.loads(plan.stdout)
        assert summary["synced"] == 10 and summary["failed"] == 0

        for tag, image in pushed.items():
            assert images.manifest_digest(dst, DST_REPO, tag) == image.digest, tag
            assert not images.walk_image(dst, DST_REPO, tag).missing, tag
        client = redis.Redis.from_url(server.url)
        records: list[JobRecord] = RedisLedger(client, summary["run_id"]).records()
        assert {r.worker for r in records} == {w.node for w in workers}  # both worked
        # Who talked to whom: the workers' and planner's traffic came over the links.
        clients = {entry["addr"].rsplit(":", 1)[0] for entry in client.client_list()}
        assert {addr_a, addr_b} <= clients, clients
        assert {addr_a, addr_b} <= remote_addresses(src)
        assert {addr_a, addr_b} <= remote_addresses(dst)
        assert "127.0.0.1" not in remote_addresses(src) | remote_addresses(dst)
    finally:
        for worker in workers:
            worker.stop(grace=5.0)
        for server in reversed(servers):
            server.stop()
