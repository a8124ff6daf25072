"""What a run tells its user at the end: the summary text and the success/failure files.

Shared by ``syncer sync`` (embedded), ``syncer plan --wait`` and ``syncer status``.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from syncer.copy.copier import CopyResult
from syncer.run.ledger import JobRecord, RunSummary

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def human_bytes(count: float) -> str:
    """``1.5 MiB``-style text for a byte count."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def result_line(result: CopyResult) -> str:
    """One line telling what a copy did (the log line of a finished image)."""
    if result.status == "skipped":
        return f"skipped {result.source} -> {result.destination}: up to date ({result.digest[:19]})"
    return (
        f"synced {result.source} -> {result.destination} {result.digest[:19]}: "
        f"{result.manifests_pushed} manifests, {result.blobs_copied} blobs copied "
        f"({human_bytes(result.bytes_copied)}), {result.blobs_mounted} mounted, "
        f"{result.blobs_existing} existing"
    )


def exit_code(summary: RunSummary) -> int:
    """0 when every image landed (synced or already up to date), 1 when any failed."""
    return EXIT_FAILED if summary.failed else EXIT_OK


def render_summary(summary: RunSummary) -> str:
    """The end-of-run summary: totals, blob figures, duration and every failure."""
    rate = summary.bytes_copied / summary.duration if summary.duration else 0.0
    lines = [
        f"Run {summary.run_id}: {summary.total} images: {summary.synced} synced, "
        f"{summary.skipped} skipped (unchanged), {summary.failed} failed"
        + (f", {summary.pending} pending" if summary.pending else ""),
        f"Blobs: {summary.blobs_copied} copied ({human_bytes(summary.bytes_copied)}), "
        f"{summary.blobs_mounted} mounted, {summary.blobs_existing} already present; "
        f"{summary.manifests_pushed} manifests pushed",
        f"Duration: {summary.duration:.1f}s ({human_bytes(rate)}/s)",
    ]
    if summary.failures:
        lines.append(f"Failures ({len(summary.failures)}):")
        lines.extend(f"  {record.label}: {record.reason}" for record in summary.failures)
    return "\n".join(lines)


def images_document(records: list[JobRecord]) -> dict[str, str | list[str]]:
    """An image-syncer ``images`` mapping (source → destination or list) for ``records``,
    so a failed-images file can be fed back as ``--images`` to retry just those."""
    mapping: dict[str, list[str]] = {}
    for record in records:
        mapping.setdefault(record.source, [])
        if record.destination not in mapping[record.source]:
            mapping[record.source].append(record.destination)
    return {src: dsts[0] if len(dsts) == 1 else dsts for src, dsts in mapping.items()}


def write_images_file(path: str | Path, records: list[JobRecord], fmt: str) -> None:
    """Write ``records`` as an images file in ``fmt`` (``yaml`` or ``json``)."""
    document = images_document(records)
    if fmt == "json":
        text = json.dumps(document, indent=2) + "\n"
    else:
        text = yaml.safe_dump(document, sort_keys=False) if document else "{}\n"
    Path(path).write_text(text, encoding="utf-8")
