"""Tag filters (a rule's long form: exclude, semver, latest by semver or by created time) end
to end: real registries holding 55 tags per repository, the real CLI in a subprocess, the
selected tags checked in ``--dry-run`` output, then at the destination by digest; requests
counted in the source registry's access log; malformed filters refused with exit 2."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.support import images
from tests.support.celery_workers import clean_env, run_syncer

pytestmark = pytest.mark.integration

AMD64 = ("linux", "amd64", None)
ARM64 = ("linux", "arm64", "v8")
UNKNOWN = ("unknown", "unknown", None)

#: 55 tags: 36 full versions (2 majors, 9 minors, 2 patches), v-prefixed ones, pre-releases,
#: partial versions, a variant (a pre-release to semver) and tags that are no version at all.
VERSION_TAGS = [
    *(f"{major}.{minor}.{patch}" for major in (1, 2) for minor in range(9) for patch in (0, 1)),
    "0.9.0", "0.10.0",
    "v3.0.0", "v3.1.0", "v3.2.0",
    "2.7.2-rc.1", "3.3.0-rc.1", "3.3.0-rc.2",
    "1.5", "2", "3.1",
    "2.1-alpine",
    "latest", "stable", "edge", "nightly", "1.2.3.4", "build_77", "sha-4f2a9c1",
]


def run_cli(directory: Path, *args: str) -> subprocess.CompletedProcess:
    """The venv's ``syncer`` console script, output captured as text, isolated from the
    machine's settings (:func:`clean_env` in ``directory``)."""
    return run_syncer(clean_env(directory), *args, timeout=100)


def push_tags(registry, repo: str, tags: list[str], seed: str) -> str:
    """One small image in ``repo`` under every tag (one manifest PUT per extra tag)."""
    image = images.push_image(registry, repo, tags[0], seed=seed)
    for tag in tags[1:]:
        images.push_manifest(registry, repo, tag, image.manifest, image.media_type)
    return image.digest


def planned(stdout: str) -> dict[str, set[str]]:
    """``--dry-run`` output → {destination repository: destination tags} of would-copy lines."""
    found: dict[str, set[str]] = {}
    for line in stdout.splitlines():
        if line.startswith("would-copy"):
            destination = line.split(" -> ", 1)[1].strip()
            repo, tag = destination.rsplit(":", 1)
            found.setdefault(repo.split("/", 1)[1], set()).add(tag)
    return found


def test_exclude_semver_and_latest_on_55_tags(make_registry, tmp_path):
    src, dst = make_registry(), make_registry()
    assert len(VERSION_TAGS) == 55
    digests = {name: push_tags(src, f"filters/{name}", VERSION_TAGS, seed=name)
               for name in ("exclude", "semver", "latest")}
    rules = {
        f"{src.host}/filters/exclude": {
            "to": f"{dst.host}/mirror/exclude", "exclude": [r"^[12]\.", r"^0\.", "-rc"],
        },
        f"{src.host}/filters/semver": {
            "to": f"{dst.host}/mirror/semver", "semver": ">=2.3 <3 || ^v3.1",
        },
        f"{src.host}/filters/latest": {
            "to": f"{dst.host}/mirror/latest", "exclude": "-rc", "latest": 4,
        },
    }
    expected = {
        # every tag but 1.x / 2.x / 0.x and the release candidates
        "mirror/exclude": {"v3.0.0", "v3.1.0", "v3.2.0", "2", "3.1", "latest", "stable", "edge",
                           "nightly", "build_77", "sha-4f2a9c1"},
        # 2.3.0 … 2.8.1, and 3.1 and up below 4 (pre-releases and variants are out: npm rule)
        "mirror/semver": {f"2.{minor}.{patch}" for minor in range(3, 9) for patch in (0, 1)}
        | {"v3.1.0", "v3.2.0", "3.1"},
        # the newest four versions; "3.1" ranks just below "v3.1.0" (fewer components)
        "mirror/latest": {"v3.2.0", "v3.1.0", "3.1", "v3.0.0"},
    }
    images_file = tmp_path / "images.yaml"
    images_file.write_text(yaml.safe_dump(rules))

    dry = run_cli(tmp_path, "sync", "--images", str(images_file), "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert planned(dry.stdout) == expected
    assert "30 images planned, 0 rules failed" in dry.stdout
    assert images.catalog(dst) == []
    log = dry.stderr
    assert "filters/exclude (exclude /^[12]\\./, exclude /^0\\./, exclude /-rc/): 11 of 55 tags " \
           "selected (44 excluded)" in log, log
    assert "filters/semver (semver \">=2.3 <3 || ^v3.1\"): 15 of 55 tags selected " \
           "(7 skipped as not versions, 33 outside the range)" in log, log
    assert "filters/latest (exclude /-rc/, latest 4 by semver): 4 of 55 tags selected " \
           "(3 excluded, 7 skipped as not versions, 41 beyond latest)" in log, log

    done = run_cli(tmp_path, "sync", "--images", str(images_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "30 synced" in done.stdout
    for repo, tags in expected.items():
        assert set(images.list_tags(dst, repo)) == tags
        name = repo.split("/")[1]
        for tag in tags:
            assert images.manifest_digest(dst, repo, tag) == digests[name]


def push_dated(registry, repo: str, tags: list[str], created: str | None, seed: str) -> str:
    """An image whose config says ``created`` (None: ``null``), under ``tags``."""
    image = images.push_image(registry, repo, tags[0], seed=seed,
                              config_extra={"created": created})
    for tag in tags[1:]:
        images.push_manifest(registry, repo, tag, image.manifest, image.media_type)
    return image.digest


def push_dated_index(registry, repo: str, tags: list[str], created: str) -> str:
    """A multi-arch index built at ``created`` whose *first* entry is a buildx-style
    attestation manifest (``unknown/unknown``) with a much older config time: the created
    time must come from a real platform."""
    attestation = images.push_image(registry, repo, None, seed="attestation",
                                    platform=UNKNOWN,
                                    config_extra={"created": "2000-01-01T00:00:00Z"})
    children = [(attestation.manifest, attestation.media_type, UNKNOWN)]
    for platform in (AMD64, ARM64):
        child = images.push_image(registry, repo, None, seed=f"index-{platform[1]}",
                                  platform=platform, config_extra={"created": created})
        children.append((child.manifest, child.media_type, platform))
    index = images.make_index(children)
    for tag in tags:
        images.push_manifest(registry, repo, tag, index, images.DOCKER_LIST)
    return images.sha256_digest(index)


def test_latest_by_created_time_on_55_tags(make_registry, tmp_path):
    src, dst = make_registry(), make_registry()
    repo = "timeline/app"
    days = [3, 17, 9, 25, 1, 12, 21, 6, 14, 19]  # image i was built on March days[i]
    digests: dict[str, str] = {}
    for i, day in enumerate(days):
        tags = [f"b{i}-{k}" for k in range(5)]
        digest = push_dated(src, repo, tags, f"2024-03-{day:02d}T10:00:00.123456789Z", f"img{i}")
        digests.update(dict.fromkeys(tags, digest))
    digests.update(dict.fromkeys(["multi", "multi-arch"],
                                 push_dated_index(src, repo, ["multi", "multi-arch"],
                                                  "2024-03-28T08:00:00+02:00")))
    digests["no-date"] = push_dated(src, repo, ["no-date"], None, "undated")
    push_dated(src, repo, ["skip-me", "skip-too"], "2024-03-30T00:00:00Z", "newest-but-excluded")
    listed = images.list_tags(src, repo)
    assert len(listed) == 55

    images_file = tmp_path / "images.yaml"
    images_file.write_text(yaml.safe_dump({f"{src.host}/{repo}": {
        "to": f"{dst.host}/mirror/app", "exclude": "^skip-", "latest": 7, "sort": "created",
    }}))
    # the index (28th, read from its amd64 child, not the attestation) and image 3 (25th)
    expected = {"multi", "multi-arch", *(f"b3-{k}" for k in range(5))}

    mark = src.log_mark()
    dry = run_cli(tmp_path, "sync", "--images", str(images_file), "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert planned(dry.stdout) == {"mirror/app": expected}
    assert "reading the created time of 53 tags in 1 repositories" in dry.stderr
    assert "7 of 55 tags selected (2 excluded, 46 beyond latest, 1 without a created time, " \
           "ranked oldest)" in dry.stderr, dry.stderr
    # The cost, as documented: one manifest GET per candidate tag (not the excluded ones),
    # one more for the index's child, one config GET per distinct image.
    gets = Counter()
    for entry in src.access_log()[mark:]:
        if entry.method != "GET" or entry.status != 200:
            continue
        if "/manifests/sha256:" in entry.path:
            gets["child manifest"] += 1
        elif "/manifests/" in entry.path:
            gets["tag manifest"] += 1
            assert "/manifests/skip-" not in entry.path
        elif "/blobs/" in entry.path:
            gets["config"] += 1
    assert gets == {"tag manifest": 53, "child manifest": 1, "config": 12}, gets

    done = run_cli(tmp_path, "sync", "--images", str(images_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "7 synced" in done.stdout
    assert set(images.list_tags(dst, "mirror/app")) == expected
    for tag in expected:
        assert images.manifest_digest(dst, "mirror/app", tag) == digests[tag]
    assert not images.walk_image(dst, "mirror/app", "multi").missing


def test_malformed_filters_exit_2_one_line_each_before_any_request(make_registry, tmp_path):
    src = make_registry()
    images.push_image(src, "filters/app", "1.0.0")
    key = f"{src.host}/filters/app"
    document = {
        key: {"to": "reg.example.com/x/app", "semver": ">>1"},
        f"{key}:/^v/": {"to": "reg.example.com/x/app", "latest": 0, "sort": "newest"},
        f"{key}:1.0.0": {"to": "reg.example.com/x/app", "exclude": "-rc"},
        f"{src.host}/filters/other": {"to": "reg.example.com/x/o", "exclude": "(", "lastest": 3},
    }
    mark = src.log_mark()
    for images_file in (tmp_path / "images.yaml", tmp_path / "images.json"):
        images_file.write_text(json.dumps(document) if images_file.suffix == ".json"
                               else yaml.safe_dump(document))
        done = run_cli(tmp_path, "sync", "--images", str(images_file), "--dry-run")
        assert done.returncode == 2, done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        prefix = f"error: {images_file}: "
        assert all(line.startswith(prefix) for line in lines), lines
        assert sorted(line[len(prefix):].split(": ", 1)[0] for line in lines) == sorted([
            f'images["{key}"].semver',
            f'images["{key}:/^v/"].latest',
            f'images["{key}:/^v/"].sort',
            f'images["{key}:1.0.0"]',
            f'images["{src.host}/filters/other"].exclude',
            f'images["{src.host}/filters/other"].lastest',
        ]), lines
        assert "invalid semver range '>>1'" in done.stderr
        assert "tag filters (exclude /-rc/) need a key that lists tags" in done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
    assert src.access_log()[mark:] == []  # nothing was asked of any registry
