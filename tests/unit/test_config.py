"""Unit tests for syncer.plan.config: the valid forms, env expansion, and every kind of mistake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from syncer.plan.config import load_auth_file, load_config, parse_rule
from syncer.plan.rules import ALL_TAGS, Destination, Rule, TagSelector
from syncer.plan.tagfilters import NO_FILTERS, TagFilters
from syncer.registry.credentials import AuthEntry, Credentials
from syncer.registry.errors import ConfigError
from syncer.registry.reference import Repository

REPO_ROOT = Path(__file__).resolve().parents[2]
DIGEST = "sha256:" + "ab" * 32


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def problems_of(**files) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(
            files.get("config"),
            files.get("auth"),
            files.get("images"),
            environ=files.get("environ", {}),
        )
    problems = caught.value.problems
    for line in problems:
        assert "\n" not in line
    return problems


def assert_reported(problems: list[str], expected: str) -> None:
    assert any(expected in line for line in problems), f"{expected!r} not in {problems!r}"


# -- valid forms -------------------------------------------------------------------------------

QUAY_B = Repository("quay.io", "a/b")
QUAY_X = Repository("quay.io", "x/b")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (
            "quay.io/a/b",
            "quay.io/x/b",
            Rule("quay.io/a/b", QUAY_B, ALL_TAGS, (Destination(QUAY_X),)),
        ),
        (
            "quay.io/a/b:v1,v2",
            "quay.io/x/b",
            Rule(
                "quay.io/a/b:v1,v2",
                QUAY_B,
                TagSelector("tags", tags=("v1", "v2")),
                (Destination(QUAY_X),),
            ),
        ),
        (
            "quay.io/a/b:v1, v2",
            "quay.io/x/b:n1,n2",
            Rule(
                "quay.io/a/b:v1, v2",
                QUAY_B,
                TagSelector("tags", tags=("v1", "v2")),
                (Destination(QUAY_X, ("n1", "n2")),),
            ),
        ),
        (
            "quay.io/a/b:v1",
            "quay.io/x/b:latest",
            Rule(
                "quay.io/a/b:v1",
                QUAY_B,
                TagSelector("tags", tags=("v1",)),
                (Destination(QUAY_X, ("latest",)),),
            ),
        ),
        (
            f"quay.io/a/b@{DIGEST}",
            "quay.io/x/b",
            Rule(
                f"quay.io/a/b@{DIGEST}",
                QUAY_B,
                TagSelector("digest", digest=DIGEST),
                (Destination(QUAY_X),),
            ),
        ),
        (
            f"quay.io/a/b@{DIGEST}",
            f"quay.io/x/b@{DIGEST}",  # as written by the failed-images file: same digest is fine
            Rule(
                f"quay.io/a/b@{DIGEST}",
                QUAY_B,
                TagSelector("digest", digest=DIGEST),
                (Destination(QUAY_X),),
            ),
        ),
        (
            "quay.io/a/b:/^v1\\./",
            "quay.io/x/b",
            Rule(
                "quay.io/a/b:/^v1\\./",
                QUAY_B,
                TagSelector("regex", pattern="^v1\\."),
                (Destination(QUAY_X),),
            ),
        ),
        (
            "quay.io/a/b:v1",
            ["quay.io/x/b", "reg2.io/y/b", ""],
            Rule(
                "quay.io/a/b:v1",
                QUAY_B,
                TagSelector("tags", tags=("v1",)),
                (Destination(QUAY_X), Destination(Repository("reg2.io", "y/b")), Destination()),
            ),
        ),
        (
            "harbor.myk8s.paas.com:32080/library/nginx",
            "",
            Rule(
                "harbor.myk8s.paas.com:32080/library/nginx",
                Repository("harbor.myk8s.paas.com:32080", "library/nginx"),
                ALL_TAGS,
                (Destination(),),
            ),
        ),
        (
            "harbor:8443/proj/sub/*",
            "acr.example.com/mirror",
            Rule(
                "harbor:8443/proj/sub/*",
                Repository("harbor:8443", "proj/sub"),
                ALL_TAGS,
                (Destination(Repository("acr.example.com", "mirror")),),
                wildcard=True,
            ),
        ),
        (
            "bitnami/redis",  # a first segment without '.'/':' is a Docker Hub namespace
            None,
            Rule(
                "bitnami/redis",
                Repository("docker.io", "bitnami/redis"),
                ALL_TAGS,
                (Destination(),),
            ),
        ),
    ],
)
def test_valid_forms_parse_into_rules(key, value, expected):
    assert parse_rule(key, value, environ={}) == expected


@pytest.mark.parametrize(
    ("key", "pattern"),
    [
        ("harbor.x:32080/lib/nginx:/^v1\\./", "^v1\\."),
        ("harbor.x:32080/lib/nginx:/^v1/a:b/", "^v1/a:b"),  # the regex may hold '/' and ':'
        ("localhost:5000/nginx:/.*-alpine$/", ".*-alpine$"),
    ],
)
def test_regex_after_host_port(key, pattern):
    rule = parse_rule(key, "x.io/y", environ={})
    assert rule.selector == TagSelector("regex", pattern=pattern)
    assert rule.source.path in ("lib/nginx", "nginx")
    assert rule.source.registry in ("harbor.x:32080", "localhost:5000")


def test_tag_after_host_port_is_a_tag_and_port_is_not():
    rule = parse_rule("harbor:32080/library/nginx:1.25", "x.io/nginx", environ={})
    assert rule.source == Repository("harbor:32080", "library/nginx")
    assert rule.selector.tags == ("1.25",)
    assert parse_rule("harbor:32080/library/nginx", "x.io/n", environ={}).selector == ALL_TAGS


def test_split_files_load(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("cert")
    auth = write(
        tmp_path,
        "auth.yaml",
        (
            "harbor:8443:\n  username: admin\n  password: secret\n  insecure: true\n"
            "  ca_file: ca.pem\n"
            "harbor:8443/team-a: {username: bot, password: other}\n"
        ),
    )
    images = write(tmp_path, "images.yml", "harbor:8443/team-a/app:v1: quay.io/x/app\n")
    config = load_config(None, auth, images, environ={})
    assert config.auth_entries == [
        AuthEntry("harbor:8443", Credentials("admin", "secret"), True, str(ca)),
        AuthEntry("harbor:8443/team-a", Credentials("bot", "other"), False, None),
    ]
    assert [r.key for r in config.rules] == ["harbor:8443/team-a/app:v1"]


def test_images_without_auth_is_fine(tmp_path):
    images = write(tmp_path, "images.json", json.dumps({"quay.io/a/b": ["quay.io/x/b"]}))
    config = load_config(images=images, environ={})
    assert config.auth_entries == []
    assert config.rules[0].destinations == (Destination(QUAY_X),)


def test_env_expansion(tmp_path):
    auth = write(
        tmp_path,
        "auth.yaml",
        (
            "harbor:8443:\n  username: $USER_NAME\n  password: ${PASS}\n"
            "quay.io:\n  username: robot$$x\n  password: pa$$word\n"
        ),
    )
    images = write(
        tmp_path, "images.yaml", "quay.io/a/b: ${MIRROR}/x/b\nquay.io/a/c: [$MIRROR/c]\n"
    )
    env = {"USER_NAME": "admin", "PASS": "s3cret", "MIRROR": "reg.example.com:5000"}
    config = load_config(auth=auth, images=images, environ=env)
    assert config.auth_entries[0].credentials == Credentials("admin", "s3cret")
    assert config.auth_entries[1].credentials == Credentials("robot$x", "pa$word")
    destinations = [r.destinations[0].repository for r in config.rules]
    assert destinations == [
        Repository("reg.example.com:5000", "x/b"),
        Repository("reg.example.com:5000", "c"),
    ]


def test_source_keys_are_not_env_expanded():
    rule = parse_rule("quay.io/a/b:/^v1$/", "quay.io/x/b", environ={"": "boom"})
    assert rule.selector.pattern == "^v1$"


def test_guide_config_loads():
    config = load_config(str(REPO_ROOT / "config" / "harbor-to-acr.json"), environ={})
    assert [e.prefix for e in config.auth_entries] == [
        "harbor.myk8s.paas.com:32080",
        "registry.cn-beijing.aliyuncs.com",
    ]
    assert config.auth_entries[0].insecure is True
    assert config.rules == [
        Rule(
            "harbor.myk8s.paas.com:32080/library/nginx",
            Repository("harbor.myk8s.paas.com:32080", "library/nginx"),
            ALL_TAGS,
            (Destination(),),
        )
    ]


def test_example_split_configs_load():
    env = {
        name: "x" for name in ("HARBOR_PASSWORD", "TEAM_A_TOKEN", "ACR_USERNAME", "ACR_PASSWORD")
    }
    env["MIRROR_REGISTRY"] = "reg.example.com"
    config = load_config(
        auth=str(REPO_ROOT / "config" / "auth.yaml"),
        images=str(REPO_ROOT / "config" / "images.yaml"),
        environ=env,
    )
    assert len(config.auth_entries) == 3
    kinds = {r.selector.kind for r in config.rules}
    assert kinds == {"all", "tags", "regex", "digest"}
    assert any(r.wildcard for r in config.rules)


def test_load_auth_file(tmp_path):
    legacy = write(
        tmp_path,
        "c.json",
        json.dumps(
            {"auth": {"quay.io": {"username": "u", "password": "p"}}, "images": {"a.io/b": ""}}
        ),
    )
    assert load_auth_file(legacy, section="auth", environ={})[0].prefix == "quay.io"
    split = write(tmp_path, "auth.json", json.dumps({"quay.io": {"username": "u"}}))
    assert load_auth_file(split, environ={})[0].credentials.username == "u"
    assert load_auth_file(None) == []


# -- mistakes: each one line, naming the file and the key path ---------------------------------

Q = 'images["quay.io/a/b"]'


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("images.yaml", "", "file is empty"),
        ("images.yaml", "# only a comment\n", "file is empty"),
        ("images.yaml", "quay.io/a/b: [x\n", "invalid YAML at line 2"),
        ("images.json", '{"quay.io/a/b": "x",}', "invalid JSON at line 1, column 21"),
        ("images.yaml", "- quay.io/a/b\n", "top level must be a mapping (source -> destination)"),
        ("images.yaml", "{}\n", "images: empty"),
        ("images.yaml", "quay.io/a/b: 5\n", f"{Q}: Not a valid destination"),
        ("images.yaml", "quay.io/a/b: [quay.io/x/b, 7]\n", f"{Q}[1]: Not a valid string."),
        ("images.yaml", "quay.io/a/b: []\n", f"{Q}: empty list of destinations"),
        ("images.yaml", "Quay.io/A/b: quay.io/x/b\n", 'images["Quay.io/A/b"]: invalid repository'),
        ("images.yaml", "quay.io/a/b: quay.io/X/b\n", f"{Q}: invalid destination"),
        (
            "images.yaml",
            "quay.io/a/b:v1,v2: quay.io/x/b:n1\n",
            'images["quay.io/a/b:v1,v2"]: retag needs one destination tag per source tag: '
            "2 source tags, 1 destination tags",
        ),
        (
            "images.yaml",
            "quay.io/a/b: quay.io/x/b:n1\n",
            f"{Q}: destination names tags but the source selects all tags",
        ),
        (
            "images.yaml",
            "quay.io/a/b:/^v1/: quay.io/x/b:n1\n",
            'images["quay.io/a/b:/^v1/"]: destination names tags '
            "but the source selects a tag regex",
        ),
        (
            "images.yaml",
            "quay.io/a/b:/[/: quay.io/x/b\n",
            'images["quay.io/a/b:/[/"]: invalid tag regex: '
            "unterminated character set at position 0",
        ),
        (
            "images.yaml",
            "quay.io/a/b://: quay.io/x/b\n",
            'images["quay.io/a/b://"]: empty tag regex',
        ),
        (
            "images.yaml",
            "quay.io/a/b@sha256:abc: quay.io/x/b\n",
            'images["quay.io/a/b@sha256:abc"]: invalid digest',
        ),
        ("images.yaml", f"quay.io/a/b:v1@{DIGEST}: quay.io/x/b\n", "tags or a digest, not both"),
        (
            "images.yaml",
            f"quay.io/a/b: quay.io/x/b@{DIGEST}\n",
            f"{Q}: a destination cannot name a digest",
        ),
        (
            "images.yaml",
            "quay.io/a/*/b: quay.io/x/b\n",
            "images[\"quay.io/a/*/b\"]: '*' is only allowed as the last path segment",
        ),
        (
            "images.yaml",
            "quay.io/a/*:v1: quay.io/x\n",
            'images["quay.io/a/*:v1"]: a namespace wildcard (registry/namespace/*) takes every tag',
        ),
        (
            "images.yaml",
            "quay.io/*: quay.io/x\n",
            'images["quay.io/*"]: a wildcard needs a namespace',
        ),
        ("images.yaml", "quay.io/a/b: quay.io/x/*\n", f"{Q}: destination 'quay.io/x/*'"),
        (
            "images.yaml",
            "quay.io/a/b:v*: quay.io/x/b\n",
            "invalid tag 'v*' (for a pattern write :/regex/)",
        ),
        ("images.yaml", "quay.io/a/b:v1,,v2: quay.io/x/b\n", "empty tag in tag list"),
        (
            "images.yaml",
            "quay.io/a/b: ${NOPE}/x/b\n",
            f'{Q}: undefined environment variable "NOPE"',
        ),
        ("images.yaml", "123: quay.io/x/b\n", 'images["123"]: source must be a string'),
        ("images.yaml", "https://quay.io/a/b: quay.io/x/b\n", "drop the scheme"),
        (
            "images.yaml",
            "quay.io/a/b: x\nquay.io/a/b: y\n",
            'duplicate key "quay.io/a/b" at line 2',
        ),
        ("images.json", '{"quay.io/a/b": "x", "quay.io/a/b": "y"}', 'duplicate key "quay.io/a/b"'),
        ("images.yaml", "auth: {}\nimages: {quay.io/a/b: x}\n", "pass it with --config"),
    ],
)
def test_images_mistakes(tmp_path, name, text, expected):
    path = write(tmp_path, name, text)
    problems = problems_of(images=path)
    assert_reported(problems, f"{path}: ")
    assert_reported(problems, expected)
    assert any(line.startswith(f"{path}: ") and expected in line for line in problems)


H = 'auth["harbor:8443"]'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("harbor:8443: {username: u, passwd: p}\n", f"{H}.passwd: Unknown field (allowed: "),
        ("harbor:8443: {insecure: maybe}\n", f"{H}.insecure: Not a valid boolean."),
        ("harbor:8443: {username: 42}\n", f"{H}.username: Not a valid string."),
        ("harbor:8443: admin\n", f"{H}: must be a mapping with username, password"),
        (
            "harbor:8443: {ca_file: /nonexistent/ca.pem}\n",
            f"{H}.ca_file: file not found: /nonexistent/ca.pem",
        ),
        (
            "harbor:8443: {username: '${NO_USER}'}\n",
            f'{H}.username: undefined environment variable "NO_USER"',
        ),
        (
            "harbor:8443:\n  password: ${NO_PASS}\n",
            f'{H}.password: undefined environment variable "NO_PASS"',
        ),
        ("harbor:8443: {username: ${BROKEN}\n", "invalid YAML"),
        ("harbor:8443: {username: '${BROKEN'}\n", f"{H}.username: malformed ${{...}}"),
        ("harbor: {username: u}\n", "auth[\"harbor\"]: 'harbor' is not a registry host"),
        ("ha_rbor.io:8443: {username: u}\n", "invalid registry host 'ha_rbor.io:8443'"),
        (
            "harbor:8443/Team: {username: u}\n",
            "auth[\"harbor:8443/Team\"]: invalid namespace 'Team'",
        ),
        ("https://harbor:8443: {username: u}\n", "without a URL scheme"),
    ],
)
def test_auth_mistakes(tmp_path, text, expected):
    auth = write(tmp_path, "auth.yaml", text)
    images = write(tmp_path, "images.yaml", "quay.io/a/b: quay.io/x/b\n")
    problems = problems_of(auth=auth, images=images)
    assert any(line.startswith(f"{auth}: ") and expected in line for line in problems), problems


def test_password_never_echoed(tmp_path):
    auth = write(
        tmp_path,
        "auth.yaml",
        (
            "harbor:8443: {username: u, password: s3cr$etValue, extra: 1}\n"
            "quay.io: {username: u, password: 98765, insecure: maybe}\n"
            "ghcr.io: {password: $HIDDENPART, nope: 1}\n"
        ),
    )
    images = write(tmp_path, "images.yaml", "quay.io/a/b: quay.io/x/b\n")
    problems = problems_of(auth=auth, images=images)
    text = "\n".join(problems)
    for secret in ("s3cr", "etValue", "98765", "HIDDENPART"):
        assert secret not in text
    assert_reported(problems, f"{auth}: {H}.password: refers to an undefined environment variable")
    assert_reported(problems, f'{auth}: auth["quay.io"].password: Not a valid string.')


def test_legacy_file_mistakes_are_all_collected(tmp_path):
    config = write(
        tmp_path,
        "sync.json",
        json.dumps(
            {
                "auth": {"harbor:8443": {"insecure": "maybe"}},
                "images": {"quay.io/a/b:/[/": "quay.io/x/b", "quay.io/a/c": 3},
                "extra": 1,
            }
        ),
    )
    problems = problems_of(config=config)
    assert problems == [
        f'{config}: extra: unknown top-level key (expected "auth" and "images")',
        f"{config}: {H}.insecure: Not a valid boolean.",
        f'{config}: images["quay.io/a/b:/[/"]: invalid tag regex: unterminated character set '
        "at position 0",
        f'{config}: images["quay.io/a/c"]: Not a valid destination: expected a string or a list.',
    ]


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"auth": {}}, "images: Missing data for required field."),
        ({"auth": [], "images": {"a.io/b": ""}}, "auth: Not a valid mapping type."),
        ({"auth": {}, "images": {}}, "images: empty"),
        (["auth"], "top level must be a mapping"),
    ],
)
def test_legacy_shape_mistakes(tmp_path, doc, expected):
    config = write(tmp_path, "sync.yaml", json.dumps(doc))
    assert_reported(problems_of(config=config), f"{config}: {expected}")


def test_missing_files_reported_together(tmp_path):
    auth, images = str(tmp_path / "auth.yaml"), str(tmp_path / "images.yaml")
    assert problems_of(auth=auth, images=images) == [
        f"{auth}: file not found",
        f"{images}: file not found",
    ]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (
            {"config": "c.json", "images": "i.yaml"},
            "--config cannot be combined with --auth/--images",
        ),
        (
            {"config": "c.json", "auth": "a.yaml"},
            "--config cannot be combined with --auth/--images",
        ),
        ({"auth": "a.yaml"}, "--auth needs --images"),
        ({}, "nothing to sync"),
    ],
)
def test_flag_combinations(files, expected):
    assert_reported(problems_of(**files), expected)


def test_parse_rule_error_names_key_path():
    with pytest.raises(ConfigError) as caught:
        parse_rule("quay.io/a/b:v1,v2", ["quay.io/x/b:n1,n2", "quay.io/y/b:n1"], environ={})
    assert caught.value.problems == [
        'images["quay.io/a/b:v1,v2"][1]: retag needs one destination tag per source tag: '
        "2 source tags, 1 destination tags"
    ]


# -- long form: tag filters ----------------------------------------------------------------------


def test_long_form_parses_filters(tmp_path):
    images = write(
        tmp_path,
        "images.yaml",
        (
            "quay.io/a/b:\n"
            "  to: quay.io/x/b\n"
            "  exclude: '-rc\\d*$'\n"
            "  semver: '>=1.2 <2'\n"
            "  latest: 5\n"
            "quay.io/a/c:/^v/:\n"
            "  to: [quay.io/x/c, '']\n"
            "  exclude: ['^v0', 'beta']\n"
            "  latest: 2\n"
            "  sort: created\n"
            "harbor:8443/proj/*: {to: acr.example.com/mirror, semver: ^3}\n"
            "quay.io/a/d: {to: null}\n"
            "quay.io/a/e: quay.io/x/e\n"
        ),
    )
    rules = {rule.key: rule for rule in load_config(images=images, environ={}).rules}
    assert rules["quay.io/a/b"].filters == TagFilters(("-rc\\d*$",), ">=1.2 <2", 5, "semver")
    assert rules["quay.io/a/b"].destinations == (Destination(QUAY_X),)
    assert rules["quay.io/a/c:/^v/"].selector == TagSelector("regex", pattern="^v")
    assert rules["quay.io/a/c:/^v/"].filters == TagFilters(("^v0", "beta"), "", 2, "created")
    assert rules["quay.io/a/c:/^v/"].destinations[1] == Destination()
    assert rules["harbor:8443/proj/*"].wildcard
    assert rules["harbor:8443/proj/*"].filters == TagFilters(semver="^3")
    assert rules["quay.io/a/d"].destinations == (Destination(),)
    assert rules["quay.io/a/d"].filters == NO_FILTERS
    assert rules["quay.io/a/e"].filters == NO_FILTERS


def test_long_form_json_and_env_in_to(tmp_path):
    images = write(
        tmp_path,
        "images.json",
        json.dumps({"quay.io/a/b": {"to": "${MIRROR}/x/b", "latest": 3, "sort": "semver"}}),
    )
    (rule,) = load_config(images=images, environ={"MIRROR": "reg.io"}).rules
    assert rule.destinations == (Destination(Repository("reg.io", "x/b")),)
    assert rule.filters.latest == 3


LF = 'images["quay.io/a/b"]'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("quay.io/a/b: {to: quay.io/x/b, semver: '>>1'}\n",
         f"{LF}.semver: invalid semver range '>>1': expected npm syntax"),
        ("quay.io/a/b: {to: quay.io/x/b, semver: '>=1.2,<2'}\n",
         f"{LF}.semver: invalid semver range '>=1.2,<2'"),
        ("quay.io/a/b: {to: quay.io/x/b, semver: ''}\n", f"{LF}.semver: empty semver range"),
        ("quay.io/a/b: {to: quay.io/x/b, semver: 2}\n",
         f"{LF}.semver: must be a string, got a int (quote it in YAML"),
        ("quay.io/a/b: {to: quay.io/x/b, exclude: '['}\n",
         f"{LF}.exclude: invalid regex '[': unterminated character set"),
        ("quay.io/a/b: {to: quay.io/x/b, exclude: [ok, '(']}\n",
         f"{LF}.exclude[1]: invalid regex '('"),
        ("quay.io/a/b: {to: quay.io/x/b, exclude: []}\n",
         f"{LF}.exclude: expected a regex or a non-empty list of regexes"),
        ("quay.io/a/b: {to: quay.io/x/b, exclude: [3]}\n", f"{LF}.exclude[0]: Not a valid string."),
        ("quay.io/a/b: {to: quay.io/x/b, latest: 0}\n", f"{LF}.latest: must be at least 1"),
        ("quay.io/a/b: {to: quay.io/x/b, latest: -2}\n", f"{LF}.latest: must be at least 1"),
        ("quay.io/a/b: {to: quay.io/x/b, latest: '5'}\n",
         f"{LF}.latest: expected a whole number of tags, got a string"),
        ("quay.io/a/b: {to: quay.io/x/b, latest: true}\n",
         f"{LF}.latest: expected a whole number of tags, got a bool"),
        ("quay.io/a/b: {to: quay.io/x/b, latest: 2.5}\n",
         f"{LF}.latest: expected a whole number of tags, got a float"),
        ("quay.io/a/b: {to: quay.io/x/b, latest: 2, sort: date}\n",
         f"{LF}.sort: must be one of: semver, created"),
        ("quay.io/a/b: {to: quay.io/x/b, sort: created}\n",
         f"{LF}.sort: sort orders the tags for latest: give latest N as well"),
        ("quay.io/a/b: {to: quay.io/x/b, lastest: 2}\n",
         f"{LF}.lastest: Unknown field (allowed: to, exclude, semver, latest, sort"),
        ("quay.io/a/b: {latest: 2}\n", f'{LF}: missing "to": the destination(s) of the rule'),
        ("quay.io/a/b: {to: 5, latest: 2}\n", f"{LF}.to: Not a valid destination"),
        ("quay.io/a/b: {to: [quay.io/x/b, 7], latest: 2}\n", f"{LF}.to[1]: Not a valid string."),
        ("quay.io/a/b: {to: [quay.io/x/b, quay.io/X/b], latest: 2}\n",
         f"{LF}.to[1]: invalid destination"),
        ("quay.io/a/b: {to: quay.io/x/b:n1, latest: 2}\n",
         f"{LF}.to: destination names tags but the source selects all tags"),
        ("quay.io/a/b: {to: '${NOPE}/b', latest: 2}\n",
         f'{LF}.to: undefined environment variable "NOPE"'),
        ("quay.io/a/b:v1,v2: {to: quay.io/x/b, latest: 1}\n",
         'images["quay.io/a/b:v1,v2"]: the key names its tags: tag filters (latest 1 by semver) '
         "need a key that lists tags"),
        (f"quay.io/a/b@{DIGEST}: {{to: quay.io/x/b, exclude: x}}\n",
         f'images["quay.io/a/b@{DIGEST}"]: the key names a digest: tag filters'),
    ],
)
def test_long_form_mistakes(tmp_path, text, expected):
    path = write(tmp_path, "images.yaml", text)
    problems = problems_of(images=path)
    assert any(line.startswith(f"{path}: ") and expected in line for line in problems), problems


def test_long_form_mistakes_all_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        "images.yaml",
        "quay.io/a/b: {to: [quay.io/x/b, quay.io/X/b], semver: '>>1', latest: 0, sort: x}\n",
    )
    problems = problems_of(images=path)
    assert [line.split(": ", 2)[1] for line in problems] == [
        f"{LF}.semver", f"{LF}.latest", f"{LF}.sort", f"{LF}.to[1]"
    ], problems
