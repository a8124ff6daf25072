"""Command line: ``syncer copy`` and ``syncer sync`` (embedded), and the ``image-syncer`` alias.

Thin by design: each command loads and validates the config (exit 2 on any mistake, before
any registry is contacted), then hands over to the library. The distributed commands
(``plan``, ``status``, ``worker``, ``flower``) are added by :mod:`workers.cli`, so that this
package never imports Celery.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import click

# Only what builds the command tree and costs little is imported here: `syncer --help` must not
# load requests, marshmallow, PyYAML or rich (import time was most of a no-op run). The copy,
# config, planning and reporting modules are imported by the commands that use them.
from syncer import __version__
from syncer.registry.errors import ConfigError, SyncerError
from syncer.registry.mediatypes import PlatformFilter
from syncer.registry.reference import parse_reference
from syncer.registry.referrers import REFERRERS_DEPTH, ReferrerPolicy
from syncer.run import metrics
from syncer.run.logsetup import LOG_FORMATS, configure_logging, push_log_context

if TYPE_CHECKING:
    from syncer.plan.jobs import Job, Plan
    from syncer.registry.client import Registries
    from syncer.registry.retry import RetryPolicy
    from syncer.run.ledger import RunSummary

PATH = click.Path(dir_okay=False)


def fail_usage(problems: list[str]) -> None:
    """Print config problems, one line each, and exit 2."""
    from syncer.run.report import EXIT_USAGE

    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    sys.exit(EXIT_USAGE)


def apply_options(func: Callable, options: list[Callable]) -> Callable:
    """Decorate ``func`` with click options, first listed shown first in ``--help``."""
    for option in reversed(options):
        func = option(func)
    return func


PLATFORM_OPTIONS = [
    click.option("--os", "os_", multiple=True, metavar="OS[:VERSION]",
                 help="Keep only these operating systems of a multi-platform image."),
    click.option("--arch", multiple=True, metavar="ARCH[:VARIANT]",
                 help="Keep only these architectures of a multi-platform image."),
]  # fmt: skip

REFERRER_OPTIONS = [
    click.option("--referrers", "referrers", type=click.BOOL, default=True, is_flag=False,
                 flag_value=True, metavar="[BOOL]", show_default=True,
                 help="Copy each image's referrers too: signatures, SBOMs, attestations (OCI "
                      "referrers API, referrers tag, cosign's .sig/.att/.sbom tags). "
                      "--referrers=false turns it off."),
    click.option("--no-referrers", "no_referrers", is_flag=True,
                 help="The same as --referrers=false."),
    click.option("--referrers-artifact-type", "referrer_types", multiple=True, metavar="TYPE",
                 help="Copy only the referrers of these artifact types (repeatable), e.g. "
                      "application/spdx+json; what refers to them follows."),
    click.option("--referrers-depth", "referrers_depth", default=REFERRERS_DEPTH,
                 show_default=True, type=click.IntRange(1, 10),
                 help="Follow referrers of referrers this many levels below the image."),
]  # fmt: skip


def referrer_policy(referrers: bool, no_referrers: bool, referrer_types: tuple[str, ...],
                    referrers_depth: int) -> ReferrerPolicy:
    """The ``--referrers`` options as a :class:`ReferrerPolicy`."""
    return ReferrerPolicy(enabled=referrers and not no_referrers,
                          artifact_types=tuple(referrer_types), depth=referrers_depth)

RULE_OPTIONS = [
    click.option("--config", "config_file", type=PATH,
                 help="Legacy single file with 'auth' and 'images' sections (JSON/YAML)."),
    click.option("--auth", "auth_file", type=PATH,
                 help="Auth file: registry[/namespace] -> username/password/insecure/ca_file."),
    click.option("--images", "images_file", type=PATH,
                 help="Images file: source -> destination (string or list)."),
    click.option("--registry", envvar="DEFAULT_REGISTRY", show_envvar=True,
                 help="Default destination registry for empty destinations."),
    click.option("--namespace", envvar="DEFAULT_NAMESPACE", show_envvar=True,
                 help="Default destination namespace for empty destinations."),
    click.option("-r", "--retries", default=2, show_default=True, type=click.IntRange(0, 100),
                 help="Retries per image, for transient errors only."),
    # 16 (was 5): the latency profile of `make bench` (README, Performance) — against a
    # far-away registry an image is a chain of round trips, so images at once is what
    # counts; on loopback 16 costs no more CPU than 5.
    click.option("-p", "--proc", default=16, show_default=True, type=click.IntRange(1, 256),
                 help="Images copied at once (and repositories listed at once)."),
    click.option("--force", is_flag=True, help="Push even when the destination is up to date."),
    *PLATFORM_OPTIONS,
    *REFERRER_OPTIONS,
]  # fmt: skip

LOG_FORMAT_OPTION = click.option(
    "--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True,
    envvar="SYNCER_LOG_FORMAT", show_envvar=True,
    help="json: one JSON object per line (time, level, logger, message, run_id, image, "
    "registry, attempt, error), secrets scrubbed.",
)

OUTPUT_OPTIONS = [
    click.option("--log", "log_file", type=PATH, help="Write the log here instead of stderr."),
    LOG_FORMAT_OPTION,
    click.option("--dry-run", is_flag=True, help="Show what would be copied; change nothing."),
    click.option("--output-success-images", "success_file", type=PATH,
                 help="Write the images that synced (or were up to date) to this file."),
    click.option("--output-failed-images", "failed_file", type=PATH,
                 help="Write the images that failed to this file (feed it back as --images)."),
    click.option("--output-images-format", "images_format", type=click.Choice(["yaml", "json"]),
                 default="yaml", show_default=True),
]  # fmt: skip


class _TakenFromClick:
    """A dataclass whose fields are popped out of a click command's keyword arguments."""

    @classmethod
    def take(cls, options: dict):
        """Pop this dataclass's fields out of ``options``."""
        return cls(**{f.name: options.pop(f.name) for f in fields(cls)})


@dataclass
class RuleOptions(_TakenFromClick):
    """Where the rules are and how to expand them (``sync`` and ``plan``)."""

    config_file: str | None
    auth_file: str | None
    images_file: str | None
    registry: str | None
    namespace: str | None
    retries: int
    proc: int
    force: bool
    os_: tuple[str, ...]
    arch: tuple[str, ...]
    referrers: bool
    no_referrers: bool
    referrer_types: tuple[str, ...]
    referrers_depth: int

    @property
    def platforms(self) -> PlatformFilter:
        """The ``--os`` / ``--arch`` filter."""
        return PlatformFilter(os=tuple(self.os_), arch=tuple(self.arch))

    @property
    def referrer_policy(self) -> ReferrerPolicy:
        """The ``--referrers`` options."""
        return referrer_policy(self.referrers, self.no_referrers, self.referrer_types,
                               self.referrers_depth)


@dataclass
class OutputOptions(_TakenFromClick):
    """What ``sync`` and ``plan --wait`` write besides the summary."""

    log_file: str | None
    log_format: str
    dry_run: bool
    success_file: str | None
    failed_file: str | None
    images_format: str


@dataclass
class Prepared:
    """A validated config turned into credentials and a plan."""

    registries: Registries
    plan: Plan
    policy: RetryPolicy


def prepare(rules: RuleOptions, *, log_file: str | None = None,
            quiet_stderr: bool = False, log_format: str = "text") -> Prepared:
    """Validate (exit 2 on mistakes), set up logging, then list tags and build the plan."""
    from syncer.plan.config import load_config
    from syncer.plan.listing import RegistryLister
    from syncer.plan.planner import plan as plan_rules
    from syncer.registry.client import Registries
    from syncer.registry.credentials import CredentialStore
    from syncer.registry.retry import RetryPolicy

    try:
        loaded = load_config(rules.config_file, rules.auth_file, rules.images_file)
    except ConfigError as exc:
        fail_usage(exc.problems)
    store = CredentialStore(loaded.auth_entries)
    configure_logging(log_file=log_file, secrets=lambda: store.secrets, quiet_stderr=quiet_stderr,
                      log_format=log_format)
    registries = Registries(store)
    plan = plan_rules(loaded.rules, RegistryLister(registries), default_registry=rules.registry,
                      default_namespace=rules.namespace, platforms=rules.platforms,
                      force=rules.force, parallelism=rules.proc,
                      referrers=rules.referrer_policy)
    return Prepared(registries, plan, RetryPolicy(max_retries=rules.retries))


def finish(summary: RunSummary, output: OutputOptions) -> None:
    """Print the summary, write the output files, exit 0 or 1."""
    from syncer.run.report import exit_code, render_summary, write_images_file

    click.echo(render_summary(summary))
    if output.success_file:
        write_images_file(output.success_file, summary.succeeded, output.images_format)
    if output.failed_file:
        write_images_file(output.failed_file, summary.failures, output.images_format)
    sys.exit(exit_code(summary))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="syncer")
def cli() -> None:
    """Copy container images between registries, on one machine or across Celery workers."""


@cli.command()
@click.argument("source")
@click.argument("destination")
@click.option("--auth", "auth_file", type=PATH, help="Auth file.")
@click.option("--config", "config_file", type=PATH, help="A config whose 'auth' section is used.")
@click.option("-r", "--retries", default=2, show_default=True, type=click.IntRange(0, 100))
@click.option("--force", is_flag=True, help="Push even when the destination is up to date.")
@lambda func: apply_options(func, [*PLATFORM_OPTIONS, *REFERRER_OPTIONS])
@LOG_FORMAT_OPTION
def copy(source, destination, auth_file, config_file, retries, force, os_, arch,
         log_format, **referrer_options) -> None:
    """Copy one image SOURCE to DESTINATION (all platforms unless --os/--arch)."""
    from syncer.copy.copier import ImageCopier
    from syncer.plan.config import load_auth_file
    from syncer.registry.client import Registries
    from syncer.registry.credentials import CredentialStore
    from syncer.registry.retry import RetryPolicy, call_with_retries
    from syncer.run.attempt import describe_error
    from syncer.run.report import result_line

    try:
        src, dst = parse_reference(source), parse_reference(destination)
        entries = load_auth_file(config_file or auth_file, section="auth" if config_file else None)
    except (ConfigError, SyncerError) as exc:
        fail_usage(getattr(exc, "problems", [str(exc)]))
    store = CredentialStore(entries)
    configure_logging(log_file=None, secrets=lambda: store.secrets, log_format=log_format)
    registries = Registries(store)
    copier = ImageCopier(registries)
    platforms = PlatformFilter(os=tuple(os_), arch=tuple(arch))
    try:
        result = call_with_retries(
            lambda: copier.copy(src, dst, platforms=platforms, force=force,
                                referrers=referrer_policy(**referrer_options)),
            RetryPolicy(max_retries=retries),
        )
    except Exception as exc:
        click.echo(f"failed {src} -> {dst}: {describe_error(exc)}", err=True)
        sys.exit(1)
    finally:
        registries.close()
    click.echo(result_line(result))


def start_metrics(listen: str | None, textfile: str | None = None, *,
                  multiprocess: bool = False) -> None:
    """Enable the Prometheus metrics when asked (exit 2 on a bad or busy port)."""
    if listen is None and not textfile:
        return
    try:
        metrics.enable(listen=listen, textfile=textfile, multiprocess=multiprocess)
    except (OSError, ValueError) as exc:
        fail_usage([f"--metrics-port {listen}: {exc}"])


METRICS_OPTIONS = [
    click.option("--metrics-port", "metrics_listen", metavar="[ADDRESS:]PORT",
                 help="Serve Prometheus metrics at /metrics while the sync runs (address "
                 "127.0.0.1 unless given)."),
    click.option("--metrics-file", type=PATH,
                 help="At exit, write the run's Prometheus metrics to this file "
                 "(node_exporter textfile format)."),
]  # fmt: skip


def run_sync(options: dict) -> None:
    """The body of ``syncer sync`` / ``image-syncer``: plan, run on a thread pool, report."""
    from syncer.copy.copier import ImageCopier
    from syncer.run.embedded import run_plan
    from syncer.run.ledger import MemoryLedger
    from syncer.run.progress import ByteCounter, ProgressView

    start_metrics(options.pop("metrics_listen", None), options.pop("metrics_file", None))
    rules, output = RuleOptions.take(options), OutputOptions.take(options)
    show_progress = (sys.stderr.isatty() and not output.log_file and not output.dry_run
                     and output.log_format == "text")
    run_id = time.strftime("local-%Y%m%d-%H%M%S")
    push_log_context(run_id=run_id)  # every line of this run, planning included
    prepared = prepare(rules, log_file=output.log_file, quiet_stderr=show_progress,
                       log_format=output.log_format)
    if output.dry_run:
        sys.exit(dry_run_report(prepared, rules.proc))
    ledger = MemoryLedger(run_id=run_id)
    moved = ByteCounter()
    copier = ImageCopier(prepared.registries)
    try:
        with ProgressView(ledger.summary, live_bytes=moved, enabled=show_progress):
            run_plan(prepared.plan, copier, ledger, policy=prepared.policy, workers=rules.proc,
                     on_bytes=moved.add)
    finally:
        prepared.registries.close()
    finish(ledger.summary(), output)


def dry_run_report(prepared: Prepared, proc: int) -> int:
    """Print each job and whether its destination is already up to date; copy nothing."""
    from concurrent.futures import ThreadPoolExecutor

    from syncer.copy.platforms import expected_digest
    from syncer.run.attempt import describe_error

    def check(job: Job) -> str:
        try:
            src, dst = parse_reference(job.source), parse_reference(job.destination)
            registries = prepared.registries
            # Under --os/--arch: the digest the filtered copy would have (nested indexes and
            # attestations filtered as the copier does), not the source's.
            wanted, filtered = expected_digest(registries.client(src.registry), src,
                                               job.platforms)
            present = registries.client(dst.registry).manifest_digest(dst.repository,
                                                                      dst.identifier)
        except SyncerError as exc:
            return f"{'unknown':<11} {job.label}: {describe_error(exc)}"
        if wanted is None:
            return f"{'missing':<11} {job.label}: source not found"
        state = "up-to-date" if wanted == present and not job.force else "would-copy"
        note = f" ({filtered.describe()})" if filtered is not None else ""
        return f"{state:<11} {job.label}{note}"

    with ThreadPoolExecutor(proc) as pool:
        for line in pool.map(check, prepared.plan.jobs):
            click.echo(line)
    for failure in prepared.plan.failures:
        click.echo(f"{'failed':<11} {failure.label}: {failure.reason}")
    click.echo(f"{len(prepared.plan.jobs)} images planned, {len(prepared.plan.failures)} "
               "rules failed (dry run: nothing copied)")
    return 1 if prepared.plan.failures else 0


def sync_options(func: Callable) -> Callable:
    """Every option of ``sync``: the rule options and the output options."""
    return apply_options(func, [*RULE_OPTIONS, *OUTPUT_OPTIONS])


@cli.command()
@sync_options
@lambda func: apply_options(func, METRICS_OPTIONS)
def sync(**options) -> None:
    """Sync every image of the config on a thread pool in this process (no Redis needed)."""
    run_sync(options)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@sync_options
@lambda func: apply_options(func, METRICS_OPTIONS)
@click.version_option(__version__, prog_name="image-syncer")
def image_syncer(**options) -> None:
    """image-syncer compatible entry point: the same as ``syncer sync``."""
    run_sync(options)


def guard(command: Callable) -> Callable:
    """Turn a stray SyncerError into one line + exit 1 instead of a traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ConfigError as exc:
            fail_usage(exc.problems)
        except SyncerError as exc:
            from syncer.run.attempt import describe_error

            click.echo(f"error: {describe_error(exc)}", err=True)
            sys.exit(1)

    return run


main = guard(cli)
image_syncer_main = guard(image_syncer)


def print_json(data: dict) -> None:
    """Print ``data`` as indented JSON."""
    click.echo(json.dumps(data, indent=2, sort_keys=True))
