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
from dataclasses import dataclass

import click

from syncer import __version__
from syncer.config import load_auth_file, load_config
from syncer.copier import ImageCopier
from syncer.credentials import CredentialStore
from syncer.errors import ConfigError, SyncerError
from syncer.jobs import Plan
from syncer.ledger import MemoryLedger, RunSummary
from syncer.listing import RegistryLister
from syncer.local import run_plan
from syncer.logsetup import configure_logging
from syncer.mediatypes import PlatformFilter
from syncer.planner import plan as plan_rules
from syncer.progress import ByteCounter, ProgressView
from syncer.reference import parse_reference
from syncer.registry import Registries
from syncer.report import EXIT_USAGE, exit_code, render_summary, write_images_file
from syncer.retry import RetryPolicy
from syncer.runner import describe_error


def fail_usage(problems: list[str]) -> None:
    """Print config problems, one line each, and exit 2."""
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    sys.exit(EXIT_USAGE)


def platform_options(func: Callable) -> Callable:
    """``--os`` / ``--arch`` filters (repeatable, image-syncer's syntax)."""
    func = click.option("--arch", "arch", multiple=True, metavar="ARCH[:VARIANT]",
                        help="Keep only these architectures of a multi-platform image.")(func)
    return click.option("--os", "os_", multiple=True, metavar="OS[:VERSION]",
                        help="Keep only these operating systems of a multi-platform image.")(func)


def rule_options(func: Callable) -> Callable:
    """Options shared by ``sync`` and ``plan``: where the rules are and how to expand them."""
    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="Legacy single file with 'auth' and 'images' sections (JSON/YAML)."),
        click.option("--auth", "auth_file", type=click.Path(dir_okay=False),
                     help="Auth file: registry[/namespace] -> username/password/insecure/ca_file."),
        click.option("--images", "images_file", type=click.Path(dir_okay=False),
                     help="Images file: source -> destination (string or list)."),
        click.option("--registry", envvar="DEFAULT_REGISTRY", default=None,
                     help="Default destination registry for empty destinations [env DEFAULT_REGISTRY]."),
        click.option("--namespace", envvar="DEFAULT_NAMESPACE", default=None,
                     help="Default destination namespace [env DEFAULT_NAMESPACE]."),
        click.option("-r", "--retries", default=2, show_default=True, type=click.IntRange(0, 100),
                     help="Retries per image for transient errors."),
        click.option("-p", "--proc", default=5, show_default=True, type=click.IntRange(1, 256),
                     help="Images copied at once (and repositories listed at once)."),
        click.option("--force", is_flag=True, help="Push even when the destination is up to date."),
        platform_options,
    ]
    for option in reversed(options):
        func = option(func)
    return func


@dataclass
class Prepared:
    """A validated config turned into credentials and a plan."""

    store: CredentialStore
    registries: Registries
    plan: Plan
    policy: RetryPolicy


def load_store(config_file, auth_file, images_file) -> tuple[CredentialStore, list]:
    """Validate the config files (exit 2 on mistakes) and return credentials + rules."""
    try:
        loaded = load_config(config_file, auth_file, images_file)
    except ConfigError as exc:
        fail_usage(exc.problems)
    return CredentialStore(loaded.auth_entries), loaded.rules


def prepare(config_file, auth_file, images_file, registry, namespace, retries, proc, force,
            os_, arch, *, log_file=None, progress_enabled=False) -> Prepared:
    """Validate, set up logging, then list tags and build the plan."""
    store, rules = load_store(config_file, auth_file, images_file)
    configure_logging(log_file=log_file, secrets=store.secrets, quiet_stderr=progress_enabled)
    registries = Registries(store)
    platforms = PlatformFilter(os=tuple(os_), arch=tuple(arch))
    plan = plan_rules(rules, RegistryLister(registries), default_registry=registry,
                      default_namespace=namespace, platforms=platforms, force=force,
                      parallelism=proc)
    return Prepared(store, registries, plan, RetryPolicy(max_retries=retries))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="syncer")
def cli() -> None:
    """Copy container images between registries, on one machine or across Celery workers."""


@cli.command()
@click.argument("source")
@click.argument("destination")
@click.option("--auth", "auth_file", type=click.Path(dir_okay=False), help="Auth file.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="Config file whose 'auth' section is used.")
@click.option("-r", "--retries", default=2, show_default=True, type=click.IntRange(0, 100))
@click.option("--force", is_flag=True, help="Push even when the destination is up to date.")
@platform_options
def copy(source, destination, auth_file, config_file, retries, force, os_, arch) -> None:
    """Copy one image SOURCE to DESTINATION (all platforms unless --os/--arch)."""
    try:
        src, dst = parse_reference(source), parse_reference(destination)
        entries = load_auth_file(config_file or auth_file, section="auth" if config_file else None)
    except (ConfigError, SyncerError) as exc:
        fail_usage(getattr(exc, "problems", [str(exc)]))
    store = CredentialStore(entries)
    configure_logging(log_file=None, secrets=store.secrets)
    registries = Registries(store)
    copier = ImageCopier(registries)
    platforms = PlatformFilter(os=tuple(os_), arch=tuple(arch))
    from syncer.retry import call_with_retries

    try:
        result = call_with_retries(
            lambda: copier.copy(src, dst, platforms=platforms, force=force),
            RetryPolicy(max_retries=retries),
        )
    except Exception as exc:
        click.echo(f"failed {src} -> {dst}: {describe_error(exc)}", err=True)
        sys.exit(1)
    finally:
        registries.close()
    click.echo(result.summary())


def sync_options(func: Callable) -> Callable:
    """Options of ``sync`` beyond the rule options: log, dry run, output files."""
    options = [
        rule_options,
        click.option("--log", "log_file", type=click.Path(dir_okay=False),
                     help="Write the log to this file instead of stderr."),
        click.option("--dry-run", is_flag=True, help="Show what would be copied; change nothing."),
        click.option("--output-success-images", type=click.Path(dir_okay=False),
                     help="Write the images that synced (or were up to date) to this file."),
        click.option("--output-failed-images", type=click.Path(dir_okay=False),
                     help="Write the images that failed to this file (feed it back as --images)."),
        click.option("--output-images-format", type=click.Choice(["yaml", "json"]),
                     default="yaml", show_default=True),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def run_sync(config_file, auth_file, images_file, registry, namespace, retries, proc, force,
             os_, arch, log_file, dry_run, output_success_images, output_failed_images,
             output_images_format) -> None:
    """The body of ``syncer sync`` / ``image-syncer``: plan, run on a thread pool, report."""
    show_progress = sys.stderr.isatty() and not log_file and not dry_run
    prepared = prepare(config_file, auth_file, images_file, registry, namespace, retries, proc,
                       force, os_, arch, log_file=log_file, progress_enabled=show_progress)
    if dry_run:
        sys.exit(dry_run_report(prepared, proc))
    ledger = MemoryLedger(run_id=time.strftime("local-%Y%m%d-%H%M%S"))
    moved = ByteCounter()
    copier = ImageCopier(prepared.registries)
    try:
        with ProgressView(ledger.summary, live_bytes=moved, enabled=show_progress):
            run_plan(prepared.plan, copier, ledger, policy=prepared.policy, workers=proc,
                     on_bytes=moved.add)
    finally:
        prepared.registries.close()
    summary = ledger.summary()
    finish(summary, output_success_images, output_failed_images, output_images_format)


def finish(summary: RunSummary, success_file, failed_file, fmt) -> None:
    """Print the summary, write the output files, exit 0 or 1."""
    click.echo(render_summary(summary))
    if success_file:
        write_images_file(success_file, summary.succeeded, fmt)
    if failed_file:
        write_images_file(failed_file, summary.failures, fmt)
    sys.exit(exit_code(summary))


def dry_run_report(prepared: Prepared, proc: int) -> int:
    """Print each job and whether its destination is already up to date; copy nothing."""
    from concurrent.futures import ThreadPoolExecutor

    def check(job) -> str:
        try:
            src, dst = parse_reference(job.source), parse_reference(job.destination)
            wanted = prepared.registries.client(src.registry).manifest_digest(
                src.repository, src.identifier)
            present = prepared.registries.client(dst.registry).manifest_digest(
                dst.repository, dst.identifier)
        except SyncerError as exc:
            return f"unknown     {job.label}: {describe_error(exc)}"
        if wanted is None:
            return f"missing     {job.label}: source not found"
        state = "up-to-date" if wanted == present and not job.force else "would-copy"
        return f"{state:<11} {job.label}"

    with ThreadPoolExecutor(proc) as pool:
        for line in pool.map(check, prepared.plan.jobs):
            click.echo(line)
    for failure in prepared.plan.failures:
        click.echo(f"{'failed':<11} {failure.label}: {failure.reason}")
    click.echo(f"{len(prepared.plan.jobs)} images planned, {len(prepared.plan.failures)} rules failed "
               "(dry run: nothing copied)")
    return 1 if prepared.plan.failures else 0


@cli.command()
@sync_options
def sync(**options) -> None:
    """Sync every image of the config on a thread pool in this process (no Redis needed)."""
    run_sync(**options)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@sync_options
@click.version_option(__version__, prog_name="image-syncer")
def image_syncer(**options) -> None:
    """image-syncer compatible entry point: the same as ``syncer sync``."""
    run_sync(**options)


def _guard(command: Callable) -> Callable:
    """Turn a stray SyncerError into one line + exit 1 instead of a traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ConfigError as exc:
            fail_usage(exc.problems)
        except SyncerError as exc:
            click.echo(f"error: {describe_error(exc)}", err=True)
            sys.exit(1)

    return run


main = _guard(cli)
image_syncer_main = _guard(image_syncer)


def print_json(data: dict) -> None:
    """Print ``data`` as indented JSON."""
    click.echo(json.dumps(data, indent=2, sort_keys=True))
