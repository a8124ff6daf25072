"""The in-memory ledger counts each job once; the report renders every failure."""

import json

import yaml

from syncer.plan.jobs import Job, PlanFailure
from syncer.run.ledger import MemoryLedger
from syncer.run.report import exit_code, render_summary, write_images_file

JOB_A = Job("r.io/a/x:1", "d.io/b/x:1")
JOB_B = Job("r.io/a/y:1", "d.io/b/y:1")
RESULT = {
    "status": "synced",
    "digest": "sha256:" + "1" * 64,
    "blobs_copied": 3,
    "bytes_copied": 1000,
    "manifests_pushed": 1,
}


def test_final_state_counts_once():
    ledger = MemoryLedger("t")
    ledger.begin([JOB_A, JOB_B], [])
    ledger.mark_running(JOB_A.id)
    assert ledger.mark_done(JOB_A.id, RESULT) is True
    assert ledger.mark_done(JOB_A.id, RESULT) is False  # a redelivered job
    assert ledger.mark_failed(JOB_A.id, "late failure") is False
    summary = ledger.summary()
    assert (summary.synced, summary.failed, summary.pending) == (1, 0, 1)
    assert summary.bytes_copied == 1000 and summary.blobs_copied == 3
    assert not summary.complete


def test_failures_and_plan_failures_are_listed():
    ledger = MemoryLedger("t")
    failure = PlanFailure("r.io/missing", "d.io/b/missing", "NAME_UNKNOWN")
    ledger.begin([JOB_A, JOB_B], [failure])
    ledger.mark_done(JOB_A.id, {**RESULT, "status": "skipped"})
    ledger.mark_retrying(JOB_B.id, "HTTP 503")
    ledger.mark_failed(JOB_B.id, "denied: push")
    summary = ledger.summary()
    assert summary.complete and summary.total == 3
    assert (summary.skipped, summary.failed) == (1, 2)
    text = render_summary(summary)
    assert "r.io/missing -> d.io/b/missing: NAME_UNKNOWN" in text
    assert f"{JOB_B.label}: denied: push" in text
    assert exit_code(summary) == 1


def test_images_files_round_trip(tmp_path):
    ledger = MemoryLedger("t")
    extra = Job("r.io/a/x:1", "e.io/c/x:1")
    ledger.begin([JOB_A, extra], [])
    ledger.mark_failed(JOB_A.id, "x")
    ledger.mark_failed(extra.id, "y")
    failures = ledger.summary().failures
    write_images_file(tmp_path / "f.yaml", failures, "yaml")
    write_images_file(tmp_path / "f.json", failures, "json")
    expected = {"r.io/a/x:1": ["d.io/b/x:1", "e.io/c/x:1"]}
    assert yaml.safe_load((tmp_path / "f.yaml").read_text()) == expected
    assert json.loads((tmp_path / "f.json").read_text()) == expected
