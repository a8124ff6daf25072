"""``make demo``: a sample sync between two throw-away local registries, embedded mode.

1. Starts a source registry (htpasswd Basic auth, like a self-managed Harbor) and a
   destination registry (Docker token auth, like ACR) on free loopback ports.
2. Pushes sample images: a multi-platform ``library/nginx`` (three tags), an OCI
   ``library/redis``, and a ``team`` namespace of three apps.
3. Writes an image-syncer config (auth + images) and runs the real CLI:
   ``syncer sync --config … --registry … --namespace image-syncer --proc 4`` — twice, to
   show that the second run only checks (every image skipped).
4. Verifies every destination digest against its source and stops both registries.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support import BASIC_USERS, TOKEN_USERS, images
from tests.support.registry import RegistryProcess

OUT = Path("demo-out")


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


def write_config(src: RegistryProcess, dst: RegistryProcess) -> Path:
    """An image-syncer legacy config (the Alibaba Cloud guide's shape)."""
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
    path = OUT / "harbor-to-acr.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def run_sync(config: Path, dst: RegistryProcess, label: str) -> int:
    """Run the CLI as a user would; return its exit code."""
    command = [
        sys.executable,
        "-m",
        "workers.cli",
        "sync",
        f"--config={config}",
        f"--registry={dst.host}",
        "--namespace=image-syncer",
        "--proc=4",
        "--output-failed-images",
        str(OUT / "failed.yaml"),
    ]
    print(
        f"\n$ syncer sync --config={config} --registry={dst.host} "
        "--namespace=image-syncer --proc=4   # " + label,
        flush=True,
    )
    return subprocess.run(command, check=False).returncode


def verify(src: RegistryProcess, dst: RegistryProcess, pushed: list[tuple[str, str]]) -> int:
    """Compare every image's digest on both sides; return the number of mismatches."""
    targets = {"library/nginx": "image-syncer/nginx", "library/redis": "cache/redis"}
    bad = 0
    for repo, tag in pushed:
        dst_repo = targets.get(repo) or "mirror/" + repo
        want = images.manifest_digest(src, repo, tag)
        got = images.manifest_digest(dst, dst_repo, tag)
        mark = "ok " if want == got else "BAD"
        bad += want != got
        print(f"  {mark} {repo}:{tag} -> {dst_repo}:{tag}  {want}")
    return bad


def main() -> int:
    """Run the demo; exit 0 when both runs succeeded and every digest matches."""
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="syncer-demo-") as tmp:
        src = RegistryProcess(Path(tmp) / "src", auth="htpasswd", users=BASIC_USERS)
        dst = RegistryProcess(Path(tmp) / "dst", auth="token", users=TOKEN_USERS)
        with src, dst:
            print(f"source registry (Basic auth):      {src.url}")
            print(f"destination registry (token auth): {dst.url}")
            pushed = seed_source(src)
            print(f"pushed {len(pushed)} sample images to the source")
            config = write_config(src, dst)
            first = run_sync(config, dst, "first run: copies everything")
            second = run_sync(config, dst, "second run: everything up to date")
            print("\nverifying digests on both sides:")
            bad = verify(src, dst, pushed)
    print(
        f"\ndemo {'passed' if not (first or second or bad) else 'FAILED'}: "
        f"exit codes {first}, {second}; {bad} digest mismatches"
    )
    return 1 if (first or second or bad) else 0


if __name__ == "__main__":
    sys.exit(main())
