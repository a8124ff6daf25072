"""The tables of ``make bench`` (:mod:`scripts.bench`): runs as Markdown rows."""

from __future__ import annotations

from scripts.benchkit import Run


def per_image(run: Run) -> str:
    """Requests per image, source + destination."""
    return f"{run.src_requests / run.images:.1f} + {run.dst_requests / run.images:.1f}"


def run_table(runs: list[Run], *, reference: dict[tuple[str, str], Run] | None = None) -> list[str]:
    """The runs as a Markdown table, each syncer row with its ratio to skopeo's."""
    reference = reference or {}
    lines = [
        "| profile | workload | tool | wall s | vs skopeo | requests/image (src + dst) "
        "| own CPU s | CPU ms/request | registries' CPU s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        other = reference.get((run.profile, run.workload))
        ratio = (f"{run.result.seconds / other.result.seconds:.2f}x"
                 if other is not None and other is not run and other.result.seconds else "")
        failed = f" (exit {run.result.exit_code})" if run.result.exit_code else ""
        lines.append(
            f"| {run.profile} | {run.workload} | {run.tool}{failed} | {run.result.seconds:.2f} "
            f"| {ratio} | {per_image(run)} | {run.result.cpu:.2f} "
            f"| {run.cpu_ms_per_request:.2f} | {run.registries_cpu:.2f}"
            f"{f' (+ relays {run.relays_cpu:.2f})' if run.relays_cpu else ''} "
            f"| {run.result.peak_rss_mb:.0f} |"
        )
    return lines


def fault_table(rows: list[Run]) -> list[str]:
    """The fault profiles, each run next to its tool's clean run."""
    clean = {row.tool: row for row in rows if row.profile.startswith("clean")}
    skopeo = {row.profile: row for row in rows if row.tool == "skopeo"}
    lines = [
        "| fault profile (both sides) | tool | seconds | vs skopeo | time vs clean "
        "| requests/image (src + dst) | requests vs clean | own CPU s | registries' CPU s "
        "| peak RSS MB | faults injected | outcome |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = clean.get(row.tool)
        other = skopeo.get(row.profile)
        versus = (f"{row.result.seconds / other.result.seconds:.2f}x"
                  if other is not None and other is not row and other.result.seconds else "")
        time_ratio = f"x{row.result.seconds / base.result.seconds:.1f}" if base else "-"
        request_ratio = f"x{row.requests / base.requests:.1f}" if base and base.requests else "-"
        faults = row.extra.get("faults", {})
        kinds = ", ".join(f"{kind}: {n}" for kind, n in faults.items())
        injected = f"{sum(faults.values())} ({kinds})" if faults else "0"
        done = row.extra.get("landed", 0)
        outcome = (f"{done} of {row.images} landed" if done == row.images
                   and not row.result.exit_code else
                   f"failed {row.images - done} of {row.images} (exit {row.result.exit_code})")
        lines.append(
            f"| {row.profile} | {row.tool} | {row.result.seconds:.2f} | {versus} | {time_ratio} "
            f"| {per_image(row)} | {request_ratio} | {row.result.cpu:.2f} "
            f"| {row.registries_cpu:.2f} | {row.result.peak_rss_mb:.0f} | {injected} | {outcome} |"
        )
    return lines
