"""`syncer sync` / `image-syncer` end to end: the guide's config, every rule form, failures,
bad configs, dry runs — real registries, the real CLI in a subprocess, digests on both sides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import BASIC_USERS, TEST_PASSWORDS, TOKEN_USERS, images

BIN = Path(sys.executable).parent
ARM64 = ("linux", "arm64", "v8")
AMD64 = ("linux", "amd64", None)


def run_cli(
    *args: str, tool: str = "syncer", cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run a console script of this venv; return the completed process (text output)."""
    merged = {**os.environ, **(env or {})}
    return subprocess.run(
        [str(BIN / tool), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=merged,
        timeout=120,
        check=False,
    )


def guide_config(src, dst) -> dict:
    """The Alibaba Cloud guide's harbor-to-acr.json, pointed at the test registries."""
    return {
        "auth": {
            src.host: {"username": "admin", "password": BASIC_USERS["admin"], "insecure": True},
            dst.host: {"username": "admin", "password": TOKEN_USERS["admin"]},
        },
        "images": {f"{src.host}/library/nginx": ""},
    }


def same_digest(src, src_repo, dst, dst_repo, tag) -> bool:
    want = images.manifest_digest(src, src_repo, tag)
    return want is not None and images.manifest_digest(dst, dst_repo, tag) == want


def test_guide_command_verbatim_then_everything_skipped(make_registry, tmp_path):
    src, dst = make_registry(auth="htpasswd"), make_registry(auth="token")
    tags = ["1.24", "1.25", "latest"]
    for tag in tags:
        images.push_index(src, "library/nginx", tag, seed=tag)
    (tmp_path / "harbor-to-acr.json").write_text(json.dumps(guide_config(src, dst), indent=4))
    command = [
        "--proc=10",
        "--config=./harbor-to-acr.json",
        f"--registry={dst.host}",
        "--namespace=image-syncer",
        "--retries=10",
        "--log=./log",
    ]

    first = run_cli(*command, tool="image-syncer", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "3 synced" in first.stdout
    for tag in tags:
        assert same_digest(src, "library/nginx", dst, "image-syncer/nginx", tag)

    second = run_cli(*command, tool="image-syncer", cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "0 synced, 3 skipped" in second.stdout
    log = (tmp_path / "log").read_text()
    assert "skipped" in log and "synced" in log
    for secret in TEST_PASSWORDS:
        assert secret not in log + first.stdout + first.stderr + second.stdout


def test_every_rule_form(make_registry, tmp_path):
    src, dst, dst2 = make_registry(), make_registry(), make_registry()
    for tag in ("v1.0", "v1.1", "v2.0", "dev"):
        images.push_image(src, "a/app", tag, seed=tag)
    pinned = images.push_image(src, "a/pinned", "x", seed="pinned")
    for name in ("one", "two", "deep/three"):
        images.push_image(src, f"team/{name}", "1", seed=name)
    images.push_image(src, "other/skip", "1", seed="other")
    rules = {
        f"{src.host}/a/app": f"{dst.host}/all/app",  # all tags
        f"{src.host}/a/app:v1.0,dev": f"{dst.host}/listed/app",  # listed
        f"{src.host}/a/app:v1.0,v1.1": f"{dst.host}/retag/app:one,two",  # retag
        f"{src.host}/a/app:/^v1\\./": f"{dst.host}/regex/app",  # regex
        f"{src.host}/a/pinned@{pinned.digest}": f"{dst.host}/pinned/app",  # digest
        f"{src.host}/a/app:v2.0": [f"{dst.host}/multi/app", f"{dst2.host}/multi/app"],
        f"{src.host}/team/*": f"{dst.host}/mirror",  # namespace
    }
    (tmp_path / "images.yaml").write_text(yaml.safe_dump(rules))
    result = run_cli("sync", "--images", str(tmp_path / "images.yaml"), "--proc", "4")
    assert result.returncode == 0, result.stdout + result.stderr

    assert sorted(images.list_tags(dst, "all/app")) == ["dev", "v1.0", "v1.1", "v2.0"]
    assert sorted(images.list_tags(dst, "listed/app")) == ["dev", "v1.0"]
    assert sorted(images.list_tags(dst, "regex/app")) == ["v1.0", "v1.1"]
    assert images.manifest_digest(dst, "retag/app", "one") == images.manifest_digest(
        src, "a/app", "v1.0"
    )
    assert images.manifest_digest(dst, "retag/app", "two") == images.manifest_digest(
        src, "a/app", "v1.1"
    )
    assert images.manifest_digest(dst, "pinned/app", pinned.digest) == pinned.digest
    assert same_digest(src, "a/app", dst, "multi/app", "v2.0")
    assert same_digest(src, "a/app", dst2, "multi/app", "v2.0")
    for name in ("one", "two", "deep/three"):
        assert same_digest(src, f"team/{name}", dst, f"mirror/{name}", "1")
    assert "other/skip" not in " ".join(images.catalog(dst))
    assert "16 images: 16 synced" in result.stdout  # 4+2+2+2+1+2+3


def test_failures_do_not_stop_the_others(make_registry, tmp_path):
    src, dst = make_registry(), make_registry(auth="token")
    for tag in ("1", "2"):
        images.push_image(src, "good/app", tag, seed=tag)
    images.push_image(src, "denied/app", "1", seed="denied")
    auth = {
        dst.host: {"username": "admin", "password": TOKEN_USERS["admin"]},
        # A longer prefix wins: this namespace is pushed with a pull-only user.
        f"{dst.host}/locked": {"username": "puller", "password": TOKEN_USERS["puller"]},
    }
    rules = {
        f"{src.host}/good/app": f"{dst.host}/ok/app",
        f"{src.host}/does/not-exist": f"{dst.host}/ok/ghost",
        f"{src.host}/denied/app:1": f"{dst.host}/locked/app",
    }
    (tmp_path / "auth.json").write_text(json.dumps(auth))
    (tmp_path / "images.json").write_text(json.dumps(rules))
    failed_file = tmp_path / "failed.yaml"
    ok_file = tmp_path / "ok.json"
    result = run_cli(
        "sync",
        "--auth",
        str(tmp_path / "auth.json"),
        "--images",
        str(tmp_path / "images.json"),
        "--retries",
        "1",
        "--output-failed-images",
        str(failed_file),
        "--output-success-images",
        str(ok_file),
        "--output-images-format",
        "yaml",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert same_digest(src, "good/app", dst, "ok/app", "1")
    assert same_digest(src, "good/app", dst, "ok/app", "2")
    assert "2 synced" in result.stdout and "2 failed" in result.stdout
    failures = [line for line in result.stdout.splitlines() if line.startswith("  ")]
    assert any("does/not-exist" in line and "NAME_UNKNOWN" in line for line in failures), failures
    assert any("locked/app" in line and "401" in line for line in failures), failures
    failed = yaml.safe_load(failed_file.read_text())
    assert set(failed) == {f"{src.host}/does/not-exist", f"{src.host}/denied/app:1"}
    succeeded = yaml.safe_load(ok_file.read_text())
    assert set(succeeded) == {f"{src.host}/good/app:1", f"{src.host}/good/app:2"}
    for secret in TEST_PASSWORDS:
        assert secret not in result.stdout + result.stderr


def test_platform_filter_and_dry_run(make_registry, tmp_path):
    src, dst = make_registry(), make_registry()
    pushed = images.push_index(src, "multi/app", "1", platforms=[AMD64, ARM64])
    (tmp_path / "images.yaml").write_text(
        yaml.safe_dump({f"{src.host}/multi/app": f"{dst.host}/m/app"})
    )
    dry = run_cli("sync", "--images", str(tmp_path / "images.yaml"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would-copy  {src.host}/multi/app:1 -> {dst.host}/m/app:1" in dry.stdout
    assert images.catalog(dst) == []

    result = run_cli("sync", "--images", str(tmp_path / "images.yaml"), "--arch", "arm64")
    assert result.returncode == 0, result.stderr
    tree = images.walk_image(dst, "m/app", "1")
    assert not tree.missing
    assert pushed.children[ARM64].digest in tree.manifests
    assert pushed.children[AMD64].digest not in tree.manifests

    dry_again = run_cli("sync", "--images", str(tmp_path / "images.yaml"), "--dry-run")
    assert "would-copy" in dry_again.stdout  # the unfiltered source differs from the filtered copy


BAD_CONFIGS = {
    "bad-json": ("cfg.json", '{"auth": {}, "images": {'),
    "unknown-key": ("cfg.yaml", "auth: {}\nimages: {'REG/a/b': 'REG/c/d'}\nextra: 1\n"),
    "bad-auth-type": (
        "cfg.yaml",
        "auth: {'REG': {'insecure': 'maybe'}}\nimages: {'REG/a/b': ''}\n",
    ),
    "bad-regex": ("cfg.yaml", "images:\n  'REG/a/b:/[/': REG/c/d\n"),
    "bad-retag": ("cfg.yaml", "images:\n  'REG/a/b:v1,v2': 'REG/c/d:n1'\n"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_2_before_any_request(make_registry, make_proxy, tmp_path, case):
    reg = make_registry()
    proxy = make_proxy(reg)
    name, text = BAD_CONFIGS[case]
    path = tmp_path / name
    path.write_text(text.replace("REG", proxy.host))
    result = run_cli("sync", "--config", str(path))
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and name in errors[0], errors
    assert "Traceback" not in result.stderr
    assert proxy.records == []


def test_copy_command_exit_codes(make_registry, tmp_path):
    src, dst = make_registry(), make_registry(auth="htpasswd")
    pushed = images.push_image(src, "one/app", "v1")
    auth = tmp_path / "auth.yaml"
    auth.write_text(yaml.safe_dump({dst.host: {"username": "admin",
                                               "password": BASIC_USERS["admin"]}}))
    ok = run_cli("copy", f"{src.host}/one/app:v1", f"{dst.host}/two/app:v1", "--auth", str(auth))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"synced {src.host}/one/app:v1 -> {dst.host}/two/app:v1")
    assert images.manifest_digest(dst, "two/app", "v1") == pushed.digest

    missing = run_cli("copy", f"{src.host}/one/app:nope", f"{dst.host}/two/app:nope",
                      "--auth", str(auth))
    assert missing.returncode == 1
    assert "not found" in missing.stderr and "Traceback" not in missing.stderr

    bad = run_cli("copy", "Not A Reference", f"{dst.host}/two/app:v1")
    assert bad.returncode == 2 and "invalid" in bad.stderr
