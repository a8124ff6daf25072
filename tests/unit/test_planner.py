"""Unit tests for syncer.plan.planner with a fake lister (no network)."""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime, timedelta

import pytest

from syncer.plan.config import parse_rule
from syncer.plan.jobs import Job, PlanFailure
from syncer.plan.planner import default_destination, default_target, plan, select_tags
from syncer.registry.errors import NotFoundError
from syncer.registry.mediatypes import PlatformFilter
from syncer.registry.reference import Repository
from syncer.registry.referrers import NO_REFERRERS

DIGEST = "sha256:" + "cd" * 32


class FakeLister:
    """Tags and catalogs from dicts; a repository mapped to an exception raises it."""

    def __init__(self, tags=None, catalogs=None, barrier: threading.Barrier | None = None):
        self.tags = tags or {}
        self.catalogs = catalogs or {}
        self.created: dict[str, datetime | Exception | None] = {}
        self.barrier = barrier
        self.calls: list[str] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def _record(self, call: str) -> None:
        with self._lock:
            self.calls.append(call)
            self.threads.add(threading.current_thread().name)

    def list_tags(self, repo: Repository) -> list[str]:
        self._record(f"tags {repo}")
        if self.barrier is not None:
            self.barrier.wait()  # only passes when enough listings run at the same time
        found = self.tags[str(repo)]
        if isinstance(found, Exception):
            raise found
        return list(found)

    def list_repositories(self, registry: str, namespace: str) -> list[str]:
        self._record(f"catalog {registry}/{namespace}")
        found = self.catalogs[f"{registry}/{namespace}"]
        if isinstance(found, Exception):
            raise found
        return list(found)

    def image_created(self, repo: Repository, tag: str) -> datetime | None:
        self._record(f"created {repo}:{tag}")
        found = self.created[f"{repo}:{tag}"]
        if isinstance(found, Exception):
            raise found
        return found


def rules(mapping: dict) -> list:
    return [parse_rule(key, value, environ={}) for key, value in mapping.items()]


def pairs(result) -> list[tuple[str, str]]:
    return [(job.source, job.destination) for job in result.jobs]


def test_all_tags_lists_and_keeps_registry_order():
    lister = FakeLister(tags={"quay.io/a/b": ["v2", "v1", "latest"]})
    result = plan(rules({"quay.io/a/b": "quay.io/x/b"}), lister)
    assert pairs(result) == [
        ("quay.io/a/b:v2", "quay.io/x/b:v2"),
        ("quay.io/a/b:v1", "quay.io/x/b:v1"),
        ("quay.io/a/b:latest", "quay.io/x/b:latest"),
    ]
    assert result.failures == []


def test_explicit_tags_need_no_listing():
    lister = FakeLister()
    result = plan(rules({"quay.io/a/b:v1,v2": "quay.io/x/b"}), lister)
    assert pairs(result) == [
        ("quay.io/a/b:v1", "quay.io/x/b:v1"),
        ("quay.io/a/b:v2", "quay.io/x/b:v2"),
    ]
    assert lister.calls == []


def test_retag_pairs_left_to_right():
    result = plan(rules({"quay.io/a/b:v1,v2": "quay.io/x/b:n1,n2"}), FakeLister())
    assert pairs(result) == [
        ("quay.io/a/b:v1", "quay.io/x/b:n1"),
        ("quay.io/a/b:v2", "quay.io/x/b:n2"),
    ]


def test_regex_uses_search_semantics():
    lister = FakeLister(tags={"harbor.x:32080/lib/nginx": ["v1.0", "v1.1", "v10", "xv1.2", "v2"]})
    result = plan(
        rules(
            {
                "harbor.x:32080/lib/nginx:/^v1\\./": "acr.io/m/nginx",
                "harbor.x:32080/lib/nginx:/v1\\.2/": "acr.io/m/nginx",
            }
        ),
        lister,
    )
    assert pairs(result) == [
        ("harbor.x:32080/lib/nginx:v1.0", "acr.io/m/nginx:v1.0"),
        ("harbor.x:32080/lib/nginx:v1.1", "acr.io/m/nginx:v1.1"),
        ("harbor.x:32080/lib/nginx:xv1.2", "acr.io/m/nginx:xv1.2"),
    ]
    assert lister.calls == ["tags harbor.x:32080/lib/nginx"]  # listed once for both rules


def test_regex_or_all_tags_with_nothing_listed_gives_no_jobs_and_no_failure():
    lister = FakeLister(tags={"quay.io/a/b": ["v2"], "quay.io/a/c": []})
    result = plan(rules({"quay.io/a/b:/^v1/": "quay.io/x/b", "quay.io/a/c": "quay.io/x/c"}), lister)
    assert result.jobs == [] and result.failures == []


def test_digest_keeps_digest_or_takes_one_tag():
    result = plan(
        rules({f"quay.io/a/b@{DIGEST}": ["quay.io/x/b", "quay.io/y/b:pinned"]}), FakeLister()
    )
    assert pairs(result) == [
        (f"quay.io/a/b@{DIGEST}", f"quay.io/x/b@{DIGEST}"),
        (f"quay.io/a/b@{DIGEST}", "quay.io/y/b:pinned"),
    ]


def test_multiple_destinations_tag_major_order():
    result = plan(rules({"quay.io/a/b:v1,v2": ["quay.io/x/b", "reg2.io/y/b"]}), FakeLister())
    assert pairs(result) == [
        ("quay.io/a/b:v1", "quay.io/x/b:v1"),
        ("quay.io/a/b:v1", "reg2.io/y/b:v1"),
        ("quay.io/a/b:v2", "quay.io/x/b:v2"),
        ("quay.io/a/b:v2", "reg2.io/y/b:v2"),
    ]


def test_guide_empty_destination_uses_defaults():
    lister = FakeLister(tags={"harbor.myk8s.paas.com:32080/library/nginx": ["1.25", "latest"]})
    result = plan(
        rules({"harbor.myk8s.paas.com:32080/library/nginx": ""}),
        lister,
        default_registry="registry.cn-beijing.aliyuncs.com",
        default_namespace="image-syncer",
    )
    assert pairs(result) == [
        (
            "harbor.myk8s.paas.com:32080/library/nginx:1.25",
            "registry.cn-beijing.aliyuncs.com/image-syncer/nginx:1.25",
        ),
        (
            "harbor.myk8s.paas.com:32080/library/nginx:latest",
            "registry.cn-beijing.aliyuncs.com/image-syncer/nginx:latest",
        ),
    ]


def test_empty_destination_without_defaults_is_a_failure():
    lister = FakeLister(tags={"quay.io/a/b": ["v1"]})
    result = plan(rules({"quay.io/a/b": ["", "quay.io/x/b"]}), lister, default_registry="r.io")
    assert pairs(result) == [("quay.io/a/b:v1", "quay.io/x/b:v1")]
    assert len(result.failures) == 1
    failure = result.failures[0]
    assert (failure.source, failure.destination) == ("quay.io/a/b", "")
    assert "default registry and namespace" in failure.reason
    assert "DEFAULT_REGISTRY" in failure.reason


def test_default_registry_that_is_not_a_host_is_a_failure():
    result = plan(
        rules({"quay.io/a/b:v1": ""}),
        FakeLister(),
        default_registry="myreg",
        default_namespace="ns",
    )
    assert result.jobs == []
    assert "not a registry host" in result.failures[0].reason


def test_default_destination_and_target_helpers():
    repo = Repository("harbor:32080", "library/team/nginx")
    assert default_destination(repo, "acr.io", "mirror") == Repository("acr.io", "mirror/nginx")
    with pytest.raises(ValueError):
        default_destination(repo, None, "mirror")
    env = {"DEFAULT_REGISTRY": "env.io", "DEFAULT_NAMESPACE": "env-ns"}
    assert default_target(None, None, env) == ("env.io", "env-ns")
    assert default_target("flag.io", "", env) == ("flag.io", "env-ns")
    assert default_target(None, None, {"DEFAULT_REGISTRY": ""}) == (None, None)


def test_namespace_wildcard_expands_repositories():
    lister = FakeLister(
        catalogs={"harbor:8443/proj": ["proj/app", "proj/team/api", "other/x", "project/y"]},
        tags={"harbor:8443/proj/app": ["v1"], "harbor:8443/proj/team/api": ["v2", "v3"]},
    )
    result = plan(
        rules({"harbor:8443/proj/*": ["acr.io/mirror", ""]}),
        lister,
        default_registry="def.io",
        default_namespace="ns",
    )
    assert pairs(result) == [
        ("harbor:8443/proj/app:v1", "acr.io/mirror/app:v1"),
        ("harbor:8443/proj/app:v1", "def.io/ns/app:v1"),
        ("harbor:8443/proj/team/api:v2", "acr.io/mirror/team/api:v2"),
        ("harbor:8443/proj/team/api:v2", "def.io/ns/api:v2"),
        ("harbor:8443/proj/team/api:v3", "acr.io/mirror/team/api:v3"),
        ("harbor:8443/proj/team/api:v3", "def.io/ns/api:v3"),
    ]
    assert "tags harbor:8443/other/x" not in lister.calls  # outside the namespace: ignored


def test_namespace_wildcard_catalog_failure():
    lister = FakeLister(
        catalogs={"harbor:8443/proj": NotFoundError("catalog refused")},
        tags={"quay.io/a/b": ["v1"]},
    )
    result = plan(
        rules({"harbor:8443/proj/*": "acr.io/mirror", "quay.io/a/b": "quay.io/x/b"}), lister
    )
    assert result.failures == [
        PlanFailure("harbor:8443/proj/*", "acr.io/mirror", "catalog refused")
    ]
    assert pairs(result) == [("quay.io/a/b:v1", "quay.io/x/b:v1")]


def test_listing_failure_for_one_repo_keeps_the_rest():
    lister = FakeLister(
        tags={
            "quay.io/a/one": ["v1"],
            "quay.io/a/broken": NotFoundError("NAME_UNKNOWN", registry="quay.io"),
            "quay.io/a/three": ["v3"],
        }
    )
    result = plan(
        rules(
            {
                "quay.io/a/one": "quay.io/x/one",
                "quay.io/a/broken:/^v/": ["quay.io/x/broken", "reg2.io/y/broken"],
                "quay.io/a/three": "quay.io/x/three",
            }
        ),
        lister,
    )
    assert pairs(result) == [
        ("quay.io/a/one:v1", "quay.io/x/one:v1"),
        ("quay.io/a/three:v3", "quay.io/x/three:v3"),
    ]
    assert result.failures == [
        PlanFailure("quay.io/a/broken:/^v/", "quay.io/x/broken", "quay.io: NAME_UNKNOWN"),
        PlanFailure("quay.io/a/broken:/^v/", "reg2.io/y/broken", "quay.io: NAME_UNKNOWN"),
    ]


def test_any_exception_becomes_a_failure_with_its_text_or_class_name():
    lister = FakeLister(tags={"quay.io/a/b": RuntimeError(), "quay.io/a/c": OSError("reset")})
    result = plan(rules({"quay.io/a/b": "quay.io/x/b", "quay.io/a/c": "quay.io/x/c"}), lister)
    assert [f.reason for f in result.failures] == ["RuntimeError", "reset"]


def test_listing_runs_in_parallel():
    repos = [f"quay.io/a/r{i}" for i in range(4)]
    lister = FakeLister(tags={r: ["v1"] for r in repos}, barrier=threading.Barrier(4, timeout=10))
    result = plan(rules({r: r.replace("/a/", "/x/") for r in repos}), lister, parallelism=4)
    assert result.failures == []
    assert len(result.jobs) == 4
    assert len(lister.threads) == 4 and threading.current_thread().name not in lister.threads


def test_parallelism_one_still_works():
    lister = FakeLister(tags={"quay.io/a/b": ["v1"], "quay.io/a/c": ["v1"]})
    result = plan(
        rules({"quay.io/a/b": "quay.io/x/b", "quay.io/a/c": "quay.io/x/c"}), lister, parallelism=1
    )
    assert len(result.jobs) == 2 and len(lister.threads) == 1


def test_jobs_deduplicated_in_first_seen_order():
    lister = FakeLister(tags={"docker.io/library/nginx": ["1", "2"]})
    result = plan(
        rules(
            {
                "nginx:2": "quay.io/x/nginx",
                "docker.io/library/nginx": "quay.io/x/nginx",
                "index.docker.io/library/nginx:1,2": ["quay.io/x/nginx", "quay.io/x/nginx"],
            }
        ),
        lister,
    )
    assert pairs(result) == [
        ("docker.io/library/nginx:2", "quay.io/x/nginx:2"),
        ("docker.io/library/nginx:1", "quay.io/x/nginx:1"),
    ]


def test_two_sources_for_one_destination_tag_is_a_failure():
    result = plan(
        rules({"quay.io/a/b:v1": "quay.io/x/b:latest", "quay.io/a/c:v9": "quay.io/x/b:latest"}),
        FakeLister(),
    )
    assert pairs(result) == [("quay.io/a/b:v1", "quay.io/x/b:latest")]
    assert result.failures[0].source == "quay.io/a/c:v9"
    assert "already the destination of quay.io/a/b:v1" in result.failures[0].reason


def test_invalid_listed_tag_is_a_failure_not_a_crash():
    lister = FakeLister(tags={"quay.io/a/b": ["ok", "-bad"]})
    result = plan(rules({"quay.io/a/b": "quay.io/x/b"}), lister)
    assert pairs(result) == [("quay.io/a/b:ok", "quay.io/x/b:ok")]
    assert result.failures[0].source == "quay.io/a/b:-bad"


def test_jobs_carry_options_and_serialise_without_credentials(tmp_path):
    from syncer.plan.config import load_config

    auth = tmp_path / "auth.yaml"
    auth.write_text("quay.io: {username: robot-user, password: TopSecret123}\n")
    images = tmp_path / "images.yaml"
    images.write_text('quay.io/a/b:v1: [quay.io/x/b, ""]\nquay.io/a/c: quay.io/x/c\n')
    config = load_config(auth=str(auth), images=str(images), environ={})
    platforms = PlatformFilter(os=("linux",), arch=("arm64:v8",))
    lister = FakeLister(tags={"quay.io/a/c": NotFoundError("gone")})
    result = plan(config.rules, lister, platforms=platforms, force=True)
    assert result.jobs and result.failures
    text = json.dumps([j.to_dict() for j in result.jobs] + [f.to_dict() for f in result.failures])
    assert "TopSecret123" not in text and "robot-user" not in text
    for job in result.jobs:
        assert job.platforms == platforms and job.force is True
        assert Job.from_dict(json.loads(json.dumps(job.to_dict()))) == job


def test_select_tags():
    rule = parse_rule("quay.io/a/b:/-alpine$/", "quay.io/x/b", environ={})
    assert select_tags(rule.selector, ["1", "1-alpine", "1-alpine3"]) == ["1-alpine"]
    explicit = parse_rule("quay.io/a/b:x,y", "quay.io/x/b", environ={})
    assert select_tags(explicit.selector, ["ignored"]) == ["x", "y"]


def test_failed_plan_entries_parse_back_as_rules():
    """A failure's source/destination are an images-file key/value (failed-images file)."""
    lister = FakeLister(tags={"quay.io/a/b": NotFoundError("x")})
    result = plan(rules({"quay.io/a/b:/^v1/": "quay.io/x/b", f"quay.io/a/d@{DIGEST}": ""}), lister)
    assert len(result.failures) == 2
    for failure in result.failures:
        parse_rule(failure.source, failure.destination, environ={})


# -- tag filters (a rule's long form) ---------------------------------------------------------

VERSIONS = ["latest", "0.9.0", "1.0.0", "1.1.0-rc.1", "1.1.0", "1.2.0", "v1.3.0", "2.0.0", "edge"]


def test_filters_narrow_the_listing_and_log_a_summary(caplog):
    lister = FakeLister(tags={"quay.io/a/b": VERSIONS})
    rule = {"quay.io/a/b": {"to": "quay.io/x/b", "exclude": "-rc", "semver": ">=1 <2",
                            "latest": 2}}
    with caplog.at_level(logging.INFO, logger="syncer.plan.planner"):
        result = plan(rules(rule), lister)
    assert pairs(result) == [
        ("quay.io/a/b:1.2.0", "quay.io/x/b:1.2.0"),
        ("quay.io/a/b:v1.3.0", "quay.io/x/b:v1.3.0"),
    ]
    assert result.failures == []
    assert not any(call.startswith("created") for call in lister.calls)  # semver sort: no reads
    assert (
        'quay.io/a/b (exclude /-rc/, semver ">=1 <2", latest 2 by semver): 2 of 9 tags selected '
        "(1 excluded, 2 skipped as not versions, 2 outside the range, 2 beyond latest)"
    ) in caplog.text


def test_filters_after_key_regex():
    lister = FakeLister(tags={"quay.io/a/b": ["v1.0", "v1.1", "v2.0", "x1.5"]})
    result = plan(rules({"quay.io/a/b:/^v/": {"to": "quay.io/x/b", "latest": 1}}), lister)
    assert pairs(result) == [("quay.io/a/b:v2.0", "quay.io/x/b:v2.0")]


def test_filters_apply_to_each_repository_of_a_wildcard():
    lister = FakeLister(
        catalogs={"harbor:8443/proj": ["proj/app", "proj/api"]},
        tags={"harbor:8443/proj/app": ["1.0", "1.1", "dev"], "harbor:8443/proj/api": ["3.0"]},
    )
    result = plan(rules({"harbor:8443/proj/*": {"to": "acr.io/m", "exclude": "^dev$",
                                                "latest": 1}}), lister)
    assert pairs(result) == [
        ("harbor:8443/proj/app:1.1", "acr.io/m/app:1.1"),
        ("harbor:8443/proj/api:3.0", "acr.io/m/api:3.0"),
    ]


def test_latest_by_created_reads_only_the_candidates():
    base = datetime(2024, 1, 1, tzinfo=UTC)
    lister = FakeLister(tags={"quay.io/a/b": ["a", "b-rc", "c", "d", "e", "f"]})
    lister.created = {
        "quay.io/a/b:a": base + timedelta(days=1),
        "quay.io/a/b:c": base + timedelta(days=5),
        "quay.io/a/b:d": None,  # no created time: ranked oldest
        "quay.io/a/b:e": NotFoundError("MANIFEST_UNKNOWN"),  # deleted since listed: dropped
        "quay.io/a/b:f": base + timedelta(days=3),
    }
    rule = {"quay.io/a/b": {"to": "quay.io/x/b", "exclude": "-rc$", "latest": 2,
                            "sort": "created"}}
    result = plan(rules(rule), lister)
    assert pairs(result) == [("quay.io/a/b:c", "quay.io/x/b:c"), ("quay.io/a/b:f", "quay.io/x/b:f")]
    reads = sorted(call for call in lister.calls if call.startswith("created"))
    assert reads == [f"created quay.io/a/b:{t}" for t in "acdef"]  # not the excluded b-rc


def test_created_read_failure_fails_that_rule_only():
    lister = FakeLister(tags={"quay.io/a/b": ["a", "b"], "quay.io/a/c": ["v1"]})
    lister.created = {"quay.io/a/b:a": None, "quay.io/a/b:b": RuntimeError("boom")}
    result = plan(
        rules({"quay.io/a/b": {"to": "quay.io/x/b", "latest": 1, "sort": "created"},
               "quay.io/a/c": "quay.io/x/c"}),
        lister,
    )
    assert pairs(result) == [("quay.io/a/c:v1", "quay.io/x/c:v1")]
    assert result.failures == [
        PlanFailure(
            "quay.io/a/b", "quay.io/x/b",
            "read the created time of quay.io/a/b:b: boom "
            "(the rule's tag filters: latest 1 by created)",
        )
    ]


def test_filtered_rule_failures_parse_back_and_name_the_filters():
    lister = FakeLister(tags={"quay.io/a/b": NotFoundError("x")})
    result = plan(rules({"quay.io/a/b:/^v/": {"to": "quay.io/x/b", "semver": "^1"}}), lister)
    (failure,) = result.failures
    assert failure.reason == 'x (the rule\'s tag filters: semver "^1")'
    parse_rule(failure.source, failure.destination, environ={})


def test_referrer_tags_travel_with_their_subject_not_as_images():
    """With referrers on (the default), an all-tags or regex rule leaves out the tags that only
    carry referrers (``sha256-<hex>``, cosign's ``.sig``/``.att``/``.sbom``): they are copied
    with their subject and merged there. With referrers off, they are ordinary tags."""
    hexa = "ab" * 32
    listed = ["v1", f"sha256-{hexa}", f"sha256-{hexa}.sig", f"sha256-{hexa}.att", "sha256-x"]
    lister = FakeLister(tags={"quay.io/a/b": listed})
    following = plan(rules({"quay.io/a/b": "quay.io/x/b"}), lister)
    assert [src for src, _ in pairs(following)] == ["quay.io/a/b:v1", "quay.io/a/b:sha256-x"]
    regex = plan(rules({"quay.io/a/b:/^(v|sha)/": "quay.io/x/b"}), lister)
    assert [src for src, _ in pairs(regex)] == ["quay.io/a/b:v1", "quay.io/a/b:sha256-x"]
    ignoring = plan(rules({"quay.io/a/b": "quay.io/x/b"}), lister, referrers=NO_REFERRERS)
    assert len(pairs(ignoring)) == len(listed)
