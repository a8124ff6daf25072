"""The worker's allowlist (workers/trust.py) and the signing settings (workers/signing.py):
pure functions, no broker, no registry."""

from __future__ import annotations

import pytest

from syncer.plan.jobs import Job
from syncer.registry.errors import ConfigError
from workers.signing import (
    ENV_CERT_STORE,
    ENV_CERTIFICATE,
    ENV_DIGEST,
    ENV_KEY,
    signing_settings,
)
from workers.trust import (
    ENV_ALLOWED,
    Allowlist,
    allowed_from_env,
    build_allowlist,
    parse_entry,
    refusal_reason,
)


def job(source: str, destination: str) -> dict:
    return Job(source, destination).to_dict()


# --------------------------------------------------------------------------- entries


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("harbor.example.com", "harbor.example.com"),
        ("Harbor.Example.com:8443", "harbor.example.com:8443"),
        ("harbor.example.com:8443/team-a", "harbor.example.com:8443/team-a"),
        ("harbor.example.com/team-a/sub/", "harbor.example.com/team-a/sub"),
        ("index.docker.io", "docker.io"),  # Docker Hub's aliases fold into docker.io
        ("registry-1.docker.io/bitnami", "docker.io/bitnami"),  # a namespace, not library/
        ("localhost", "localhost"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("  127.0.0.1:5000 ", "127.0.0.1:5000"),
    ],
)
def test_parse_entry_normalises(text, expected):
    assert parse_entry(text, "test") == expected


@pytest.mark.parametrize(
    "text",
    ["https://harbor.example.com", "harbor", "bad host.io", "harbor.io/Team", "harbor.io//x", ""],
)
def test_parse_entry_rejects(text):
    with pytest.raises(ConfigError) as caught:
        parse_entry(text, "--allow-registry")
    assert caught.value.problems[0].startswith("--allow-registry: ")


# --------------------------------------------------------------------------- allowlist


def test_registry_key_allows_the_whole_registry():
    allowlist = build_allowlist(["harbor.example.com:8443"])
    assert allowlist.allows("harbor.example.com:8443", "any/repo")
    assert allowlist.allows("HARBOR.example.com:8443", "x")
    assert not allowlist.allows("harbor.example.com", "any/repo")  # the port is part of it
    assert not allowlist.allows("harbor.example.com:8444", "any/repo")


def test_namespace_key_allows_only_that_namespace():
    allowlist = build_allowlist(["harbor.example.com/team-a"])
    assert allowlist.allows("harbor.example.com", "team-a")
    assert allowlist.allows("harbor.example.com", "team-a/app")
    assert allowlist.allows("harbor.example.com", "team-a/sub/app")
    assert not allowlist.allows("harbor.example.com", "team-ab/app")  # a prefix of a name
    assert not allowlist.allows("harbor.example.com", "team-b/app")
    assert allowlist.names_host("harbor.example.com")


def test_docker_config_counts_only_without_auth_file_keys():
    assert build_allowlist([], ["ghcr.io", "index.docker.io"]).prefixes == (
        "ghcr.io",
        "docker.io",
    )
    assert build_allowlist(["quay.io"], ["ghcr.io"]).prefixes == ("quay.io",)


def test_explicit_entries_add_to_the_auth_file():
    allowlist = build_allowlist(["quay.io"], [], ["docker.io/library", "quay.io"])
    assert allowlist.prefixes == ("quay.io", "docker.io/library")
    assert allowlist.allows("docker.io", "library/nginx")
    assert not allowlist.allows("docker.io", "bitnami/redis")


def test_star_allows_any_and_nothing_allows_nothing():
    anything = build_allowlist([], [], ["*"])
    assert anything.allow_any and not anything.empty
    assert anything.allows("evil.example.com", "x/y")
    assert str(anything) == "*"
    nothing = build_allowlist([], [], [])
    assert nothing.empty and str(nothing) == "(nothing)"
    assert not nothing.allows("quay.io", "x")


def test_bad_auth_key_or_env_entry_is_a_config_error():
    with pytest.raises(ConfigError, match="SYNCER_ALLOWED_REGISTRIES"):
        build_allowlist(["quay.io"], [], ["http://x.io"])


def test_allowed_from_env():
    assert allowed_from_env({ENV_ALLOWED: " a.io, b.io/ns ,,*"}) == ["a.io", "b.io/ns", "*"]
    assert allowed_from_env({}) == []


# --------------------------------------------------------------------------- refusal


ALLOWLIST = Allowlist(("src.example.com", "dst.example.com:5000/mirror"))


def test_allowed_job_is_not_refused():
    assert refusal_reason(
        job("src.example.com/app:v1", "dst.example.com:5000/mirror/app:v1"), ALLOWLIST
    ) is None


def test_untrusted_destination_is_refused_with_its_registry():
    reason = refusal_reason(job("src.example.com/app:v1", "evil.example.com/loot:v1"), ALLOWLIST)
    assert reason == (
        "refused: destination registry evil.example.com is not in this worker's allowlist"
    )


def test_untrusted_source_is_refused():
    reason = refusal_reason(
        job("other.example.com/app:v1", "dst.example.com:5000/mirror/app:v1"), ALLOWLIST
    )
    assert reason == "refused: source registry other.example.com is not in this worker's allowlist"


def test_destination_outside_the_namespace_is_refused():
    reason = refusal_reason(
        job("src.example.com/app:v1", "dst.example.com:5000/other/app:v1"), ALLOWLIST
    )
    assert reason == (
        "refused: destination dst.example.com:5000/other/app is outside the namespaces this "
        "worker's allowlist names for dst.example.com:5000"
    )


def test_docker_hub_short_names_are_resolved_before_the_check():
    allowlist = Allowlist(("docker.io/library", "dst.example.com"))
    assert refusal_reason(job("nginx:1.27", "dst.example.com/nginx:1.27"), allowlist) is None
    assert refusal_reason(job("bitnami/redis:7", "dst.example.com/redis:7"), allowlist)


@pytest.mark.parametrize(
    "forged",
    [
        None,
        "src.example.com/app:v1",
        {"source": "src.example.com/app:v1"},
        {"source": "src.example.com/app:v1", "destination": "dst.example.com:5000/mirror/A B"},
        {"source": 1, "destination": 2},
    ],
)
def test_malformed_job_is_refused_without_echoing_it(forged):
    assert refusal_reason(forged, ALLOWLIST) == "refused: the task does not carry a valid job"


def test_star_allows_every_valid_job_but_not_garbage():
    anything = Allowlist(allow_any=True)
    assert refusal_reason(job("a.io/x:1", "b.io/y:1"), anything) is None
    assert refusal_reason({"source": "a.io/x:1"}, anything)


# --------------------------------------------------------------------------- signing settings


def test_signing_is_off_without_the_variables():
    assert signing_settings({}) == {}


def test_signing_settings_with_all_three(tmp_path):
    key, cert, store = tmp_path / "k.pem", tmp_path / "c.pem", tmp_path / "store"
    key.write_text("k")
    cert.write_text("c")
    store.mkdir()
    settings = signing_settings(
        {ENV_KEY: str(key), ENV_CERTIFICATE: str(cert), ENV_CERT_STORE: str(store)}
    )
    assert settings == {
        "security_key": str(key),
        "security_certificate": str(cert),
        "security_cert_store": str(store),
        "security_digest": "sha256",
        "task_serializer": "auth",
        "accept_content": ["auth"],
    }
    settings = signing_settings(
        {ENV_KEY: str(key), ENV_CERTIFICATE: str(cert), ENV_CERT_STORE: str(cert),
         ENV_DIGEST: "sha512"}
    )
    assert settings["security_digest"] == "sha512"


def test_partial_or_missing_signing_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError) as caught:
        signing_settings({ENV_KEY: str(tmp_path / "nope.pem")})
    text = "\n".join(caught.value.problems)
    assert f"{ENV_CERTIFICATE} is not set" in text and f"{ENV_CERT_STORE} is not set" in text
    assert "no such file" in text
    with pytest.raises(ConfigError, match="no certificate at"):
        cert = tmp_path / "c.pem"
        cert.write_text("c")
        signing_settings({ENV_KEY: str(cert), ENV_CERTIFICATE: str(cert),
                          ENV_CERT_STORE: str(tmp_path / "missing" / "*.pem")})
