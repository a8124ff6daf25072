"""Unit tests for syncer.plan.tagfilters (versions, ranges, selection) and the pure parts of
syncer.plan.created (timestamps, which child of an index speaks for it)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from syncer.plan.created import _parse_created, _representative_child, parse_timestamp
from syncer.plan.tagfilters import (
    NO_FILTERS,
    FilterSyntaxError,
    TagFilters,
    check_pattern,
    filter_tags,
    keep_latest_by_created,
    parse_range,
    parse_version,
)


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("1.2.3", "1.2.3"),
        ("v1.2.3", "1.2.3"),
        ("1.25", "1.25.0"),
        ("2", "2.0.0"),
        ("v0", "0.0.0"),
        ("1.2.3-rc.1", "1.2.3-rc.1"),
        ("1.25-alpine", "1.25.0-alpine"),
        ("1.2.3-alpine3.19", "1.2.3-alpine3.19"),
    ],
)
def test_versions(tag, expected):
    assert str(parse_version(tag)) == expected


@pytest.mark.parametrize(
    "tag",
    ["latest", "stable", "1.2.3.4", "01.2", "1.02", "1.2_3", "vv1", "v", "1.2.3-", "1.2.3-rc.01",
     "1.2.", "V1.2", "sha256-" + "a" * 64],
)
def test_not_versions(tag):
    assert parse_version(tag) is None


def test_ranges_npm_style_with_v_prefix():
    assert parse_range(">=1.2 <2").match(parse_version("1.9.9"))
    assert not parse_range(">=1.2 <2").match(parse_version("2.0.0"))
    assert parse_range(">=v1.2 <v2").match(parse_version("v1.5"))
    assert parse_range("^1.4").match(parse_version("1.9"))
    assert parse_range("~2.1").match(parse_version("2.1.7"))
    assert not parse_range("~2.1").match(parse_version("2.2"))
    assert parse_range("1.x || 3.x").match(parse_version("3.1"))
    assert parse_range("1.2 - 1.4").match(parse_version("1.3.5"))
    # npm's rule: a pre-release is in a range only when a comparator names one of its tuple
    assert not parse_range(">=1.2 <2").match(parse_version("1.3.0-rc.1"))
    assert parse_range(">=1.3.0-rc.0 <2").match(parse_version("1.3.0-rc.1"))


@pytest.mark.parametrize("text", ["", "  ", ">>1", ">=1.2,<2", "bogus", "=>1", "1.2.3.4"])
def test_malformed_ranges(text):
    with pytest.raises(FilterSyntaxError, match="semver range"):
        parse_range(text)


def test_patterns_checked():
    assert check_pattern("-rc\\d*$") == "-rc\\d*$"
    with pytest.raises(FilterSyntaxError, match="invalid regex"):
        check_pattern("[")
    with pytest.raises(FilterSyntaxError, match="empty"):
        check_pattern("")


TAGS = [
    "latest", "1.0.0", "1.1.0", "1.2.0", "1.2.1-rc.1", "1.2.1", "v1.3.0", "1.10.0", "2.0.0",
    "2.0.0-rc.2", "nightly", "1.2", "0.9.0",
]


def test_no_filters_keep_everything_in_order():
    selection = filter_tags(NO_FILTERS, TAGS)
    assert selection.tags == TAGS
    assert not NO_FILTERS
    assert selection.summary() == f"{len(TAGS)} of {len(TAGS)} tags selected"


def test_exclude_drops_every_match_of_any_pattern():
    selection = filter_tags(TagFilters(exclude=("-rc", "^nightly$")), TAGS)
    assert "1.2.1-rc.1" not in selection.tags and "2.0.0-rc.2" not in selection.tags
    assert "nightly" not in selection.tags and "latest" in selection.tags
    assert selection.excluded == 3
    assert selection.tags == [t for t in TAGS if t not in ("1.2.1-rc.1", "2.0.0-rc.2", "nightly")]


def test_semver_keeps_range_and_counts_non_versions():
    selection = filter_tags(TagFilters(semver=">=1.1 <2"), TAGS)
    assert selection.tags == ["1.1.0", "1.2.0", "1.2.1", "v1.3.0", "1.10.0", "1.2"]
    assert selection.not_versions == 2  # latest, nightly
    assert selection.outside_range == len(TAGS) - 2 - 6
    assert "2 skipped as not versions" in selection.summary()


def test_latest_by_semver_keeps_listing_order():
    selection = filter_tags(TagFilters(latest=3), TAGS)
    # newest three versions: 2.0.0, 2.0.0-rc.2, 1.10.0 (numeric, not text, order)
    assert selection.tags == ["1.10.0", "2.0.0", "2.0.0-rc.2"]
    assert selection.not_versions == 2
    assert selection.beyond_latest == len(TAGS) - 2 - 3


def test_latest_combined_with_exclude_and_range():
    filters = TagFilters(exclude=("-rc",), semver="<2", latest=2)
    selection = filter_tags(filters, TAGS)
    assert selection.tags == ["v1.3.0", "1.10.0"]
    assert str(filters) == 'exclude /-rc/, semver "<2", latest 2 by semver'


def test_partial_versions_rank_below_their_full_spelling():
    assert filter_tags(TagFilters(latest=1), ["1.2", "1.2.0", "1"]).tags == ["1.2.0"]
    assert filter_tags(TagFilters(latest=2), ["1", "1.2", "1.2.0"]).tags == ["1.2", "1.2.0"]


def test_latest_more_than_available_keeps_all_versions():
    assert filter_tags(TagFilters(latest=50), ["b", "1.0", "a"]).tags == ["1.0"]


def test_created_sort_defers_to_times():
    filters = TagFilters(exclude=("^old",), latest=2, sort="created")
    assert filters.needs_created
    selection = filter_tags(filters, ["a", "b", "old-1", "c", "d"])
    assert selection.pending_created and selection.tags == ["a", "b", "c", "d"]
    base = datetime(2024, 1, 1, tzinfo=UTC)
    times = {
        "a": base + timedelta(days=3),
        "b": None,  # no created time: ranked oldest
        "c": base + timedelta(days=1),
        # "d" vanished between listing and reading
    }
    done = keep_latest_by_created(filters, selection, times)
    assert done.tags == ["a", "c"] and not done.pending_created
    assert done.unknown_created == 1 and done.beyond_latest == 1 and done.excluded == 1
    # aware times in other zones compare by instant
    east = timezone(timedelta(hours=5))
    times = {"a": datetime(2024, 1, 1, 4, tzinfo=east), "b": datetime(2023, 12, 31, 23, 30,
                                                                      tzinfo=UTC)}
    done = keep_latest_by_created(TagFilters(latest=1, sort="created"),
                                  filter_tags(TagFilters(latest=1, sort="created"), ["a", "b"]),
                                  times)
    assert done.tags == ["b"]  # 23:30 UTC is after 04:00+05:00 (= 23:00 UTC)


def test_unknown_times_fill_up_when_too_few_known():
    filters = TagFilters(latest=2, sort="created")
    selection = filter_tags(filters, ["x", "y", "z"])
    done = keep_latest_by_created(
        filters, selection, {"x": None, "y": datetime(2024, 1, 1, tzinfo=UTC), "z": None}
    )
    assert len(done.tags) == 2 and "y" in done.tags


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00.123456789Z", datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2024-05-01T14:00:00+02:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("1970-01-01T00:00:00Z", datetime(1970, 1, 1, tzinfo=UTC)),
        ("yesterday", None),
        ("", None),
    ],
)
def test_timestamps(text, expected):
    assert parse_timestamp(text) == expected


def test_created_of_config_documents():
    assert _parse_created(b'{"created": "2024-05-01T12:00:00Z"}') == datetime(
        2024, 5, 1, 12, tzinfo=UTC
    )
    assert _parse_created(b'{"architecture": "amd64"}') is None
    assert _parse_created(b'{"created": 5}') is None
    assert _parse_created(b"not json") is None
    assert _parse_created(None) is None


def test_representative_child_skips_attestations():
    index = {
        "manifests": [
            {"digest": "sha256:att", "platform": {"os": "unknown", "architecture": "unknown"}},
            {"digest": "sha256:nop"},
            {"digest": "sha256:arm", "platform": {"os": "linux", "architecture": "arm64"}},
        ]
    }
    assert _representative_child(index) == "sha256:arm"
    assert _representative_child({"manifests": [{"digest": "sha256:att"}]}) is None
    assert _representative_child({"manifests": "x"}) is None
