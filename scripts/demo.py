"""``make demo``: a sample sync between throw-away local registries, in both modes.

1. Starts a source registry (htpasswd Basic auth, like a self-managed Harbor) and two
   destination registries (Docker token auth, like ACR in two regions) on free loopback ports.
2. Pushes sample images: a multi-platform ``library/nginx`` (three tags), an OCI
   ``library/redis``, and a ``team`` namespace of three apps.
3. **Embedded mode**: writes an image-syncer config (auth + images) and runs the real CLI,
   ``syncer sync --config … --registry … --namespace image-syncer --proc 4``, twice, to show
   that the second run only checks (every image skipped); checks every digest on both sides.
4. **Distributed mode** (:mod:`scripts.demo_fleet`): starts ``redis-server``, two
   ``syncer worker`` processes and Flower (basic auth, generated password, printed), runs
   ``syncer plan … --wait`` against the second destination (a live progress line on a
   terminal), prints the Flower URL, ``syncer status RUN`` and what Flower shows (workers
   online, tasks by state), and checks every digest on both sides.
5. Stops every process it started — at the end, on an error, on Ctrl-C, on SIGTERM or SIGHUP:
   each is stopped from a ``finally`` block and again from ``atexit`` (both idempotent).

``--hold`` keeps everything running after the distributed run until Enter (or Ctrl-C), to
look around in Flower: ``make demo DEMO_ARGS=--hold``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from scripts.demo_fleet import FLOWER_USER, Fleet
from tests.support import BASIC_USERS, TOKEN_USERS, images
from tests.support.celery_workers import SYNCER
from tests.support.ports import _die_with_parent as die_with_demo  # PR_SET_PDEATHSIG
from tests.support.registry import RegistryProcess

OUT = Path("demo-out")
NAMESPACE = "image-syncer"


def seed_source(src: RegistryProcess) -> list[tuple[str, str]]:
    """Push the sample images; return (repository, tag) pairs."""
    base = images.make_layer(512 * 1024, seed="debian-base")
    pushed = []
    for tag in ("1.25", "1.26", "latest"):
        images.push_index(src, "library/nginx", tag, shared_layers=[base], seed=f"nginx-{tag}")
        pushed.append(("library/nginx", tag))
    for tag in ("7.2", "7.4"):
        images.push_image(
            src,
            "library/redis",
            tag,
            media="oci",
            layers=[base, images.make_layer(256 * 1024, seed=f"redis-{tag}")],
        )
        pushed.append(("library/redis", tag))
    for app in ("api", "web", "worker"):
        images.push_image(
            src, f"team/{app}", "v1", layers=[base, images.make_layer(128 * 1024, seed=app)]
        )
        pushed.append((f"team/{app}", "v1"))
    return pushed


def write_config(src: RegistryProcess, dst: RegistryProcess, name: str) -> Path:
    """An image-syncer legacy config (the Alibaba Cloud guide's shape). Its ``auth`` section
    is also what a worker trusts: a worker copies only between registries it names."""
    config = {
        "auth": {
            src.host: {"username": "admin", "password": BASIC_USERS["admin"], "insecure": True},
            dst.host: {"username": "admin", "password": TOKEN_USERS["admin"], "insecure": True},
        },
        "images": {
            f"{src.host}/library/nginx": "",  # all tags → <registry>/<namespace>/nginx
            f"{src.host}/library/redis:7.2,7.4": f"{dst.host}/cache/redis",
            f"{src.host}/team/*": f"{dst.host}/mirror/team",
        },
    }
    path = OUT / name
    path.write_text(json.dumps(config, indent=2))
    return path


def syncer(args: list[str], env: dict[str, str] | None = None, *, capture: bool = False,
           comment: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``syncer ARGS`` as a user would (output shown, or captured)."""
    print(f"\n$ syncer {' '.join(args)}" + (f"   # {comment}" if comment else ""), flush=True)
    return subprocess.run([SYNCER, *args], env=env, check=False, text=True,
                          capture_output=capture, preexec_fn=die_with_demo)


def sync_args(config: Path, dst: RegistryProcess) -> list[str]:
    """``--config … --registry … --namespace …`` (what both modes share)."""
    return [f"--config={config}", f"--registry={dst.host}", f"--namespace={NAMESPACE}"]


def verify(src: RegistryProcess, dst: RegistryProcess, pushed: list[tuple[str, str]]) -> int:
    """Compare every image's digest on both sides; return the number of mismatches."""
    targets = {"library/nginx": f"{NAMESPACE}/nginx", "library/redis": "cache/redis"}
    print(f"\nverifying digests: {src.host} -> {dst.host}")
    bad = 0
    for repo, tag in pushed:
        dst_repo = targets.get(repo) or "mirror/" + repo
        want = images.manifest_digest(src, repo, tag)
        got = images.manifest_digest(dst, dst_repo, tag)
        mark = "ok " if want == got else "BAD"
        bad += want != got
        print(f"  {mark} {repo}:{tag} -> {dst_repo}:{tag}  {want}")
    return bad


def embedded(src: RegistryProcess, dst: RegistryProcess, pushed: list[tuple[str, str]]) -> bool:
    """The embedded mode: two ``syncer sync`` runs, then the digests. True if all is well."""
    print("\n== embedded mode: one command, a thread pool ==")
    config = write_config(src, dst, "harbor-to-acr.json")
    args = [*sync_args(config, dst), "--proc=4",
            "--output-failed-images", str(OUT / "failed.yaml")]
    first = syncer(["sync", *args], comment="first run: copies everything").returncode
    second = syncer(["sync", *args], comment="second run: everything up to date").returncode
    bad = verify(src, dst, pushed)
    print(f"embedded mode: exit codes {first}, {second}; {bad} digest mismatches")
    return not (first or second or bad)


def newest_run(env: dict[str, str]) -> dict | None:
    """The newest run in Redis (``syncer status --json``), or None."""
    listed = subprocess.run([SYNCER, "status", "--json"], env=env, check=False, text=True,
                            capture_output=True, preexec_fn=die_with_demo)
    with contextlib.suppress(ValueError, KeyError, IndexError):
        return json.loads(listed.stdout)["runs"][0]
    return None


def distributed(fleet: Fleet, src: RegistryProcess, dst: RegistryProcess,
                pushed: list[tuple[str, str]], hold: bool) -> bool:
    """The distributed mode: Redis, two workers, Flower, ``plan --wait``. True if all is well."""
    print("\n== distributed mode: Redis + 2 workers + Flower ==")
    try:
        fleet.start()
    except (RuntimeError, TimeoutError) as exc:  # a process died or never got ready
        print(f"could not start the fleet: {exc}\n{fleet.log_tails()}")
        return False
    print(f"redis-server:  {fleet.broker_url}  (throw-away, in {fleet.directory})")
    for node in fleet.nodes:
        print(f"worker:        {node}  (syncer worker --config {fleet.config} "
              f"--concurrency {fleet.concurrency})")
    print(f"Flower:        {fleet.flower_url}/tasks  user {FLOWER_USER}, "
          f"password {fleet.password}")
    env = fleet.env
    planned = syncer(["plan", *sync_args(fleet.config, dst), "--wait"], env,
                     comment="one task per image; follow the run to its end")
    run = newest_run(env)
    if run is None:
        print(f"no run in Redis (plan exit {planned.returncode})\n{fleet.log_tails()}")
        return False
    status = syncer(["status", run["run_id"]], env, comment="from any host that reaches Redis")
    fleet.wait_for_flower(run["run_id"], run["total"])
    online, states = fleet.flower_view(run["run_id"])
    shown = ", ".join(f"{count} {state.lower()}" for state, count in sorted(states.items()))
    print(f"\nFlower shows:  {online} workers online; tasks of {run['run_id']}: "
          f"{shown or 'none'}")
    print(f"               {fleet.flower_url}/tasks  (image in 'args', run id in 'kwargs'; "
          f"user {FLOWER_USER}, password {fleet.password})")
    bad = verify(src, dst, pushed)
    print(f"distributed mode: plan exit {planned.returncode}, status exit {status.returncode}, "
          f"{online} workers online in Flower; {bad} digest mismatches")
    if hold and sys.stdin.isatty():
        with contextlib.suppress(EOFError):
            input("\neverything is still running: press Enter to stop it all ")
    return not (planned.returncode or status.returncode or bad or online != len(fleet.nodes))


class Cleanup:
    """Stops what the demo started, once, in reverse order; later signals are ignored while
    it runs (a second Ctrl-C must not leave half the processes behind)."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()

    def push(self, stop: Callable[[], object]) -> None:
        """Call ``stop`` at cleanup (registered *before* the thing starts)."""
        self._stack.callback(stop)

    def __call__(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        try:
            self._stack.close()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT
                              else signal.SIG_DFL)


def _exit_on_signal(signum: int, _frame: object) -> None:
    """SIGTERM/SIGHUP → SystemExit, so that ``finally`` blocks and ``atexit`` run."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit 0 when every run succeeded and every digest matches."""
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hold", action="store_true",
                        help="keep the distributed stack up until Enter, to browse Flower")
    options = parser.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    OUT.mkdir(exist_ok=True)
    cleanup = Cleanup()
    atexit.register(cleanup)
    tmp = Path(tempfile.mkdtemp(prefix="syncer-demo-"))
    cleanup.push(lambda: shutil.rmtree(tmp, ignore_errors=True))
    ok = False
    try:
        src = RegistryProcess(tmp / "src", auth="htpasswd", users=BASIC_USERS)
        dst = RegistryProcess(tmp / "dst", auth="token", users=TOKEN_USERS)
        dst2 = RegistryProcess(tmp / "dst2", auth="token", users=TOKEN_USERS)
        for registry in (src, dst, dst2):
            cleanup.push(registry.stop)
            registry.start()
        print(f"source registry (Basic auth):        {src.url}")
        print(f"destination registry (token auth):   {dst.url}   (embedded mode)")
        print(f"destination registry 2 (token auth): {dst2.url}   (distributed mode)")
        pushed = seed_source(src)
        print(f"pushed {len(pushed)} sample images to the source")
        ok = embedded(src, dst, pushed)
        fleet = Fleet(tmp / "fleet", write_config(src, dst2, "harbor-to-acr-region2.json"))
        cleanup.push(fleet.stop)
        ok = distributed(fleet, src, dst2, pushed, options.hold) and ok
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process the demo started", file=sys.stderr)
        return 130
    finally:
        print("\nstopping: workers, Flower, redis-server, registries", flush=True)
        cleanup()
    print(f"\ndemo {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
