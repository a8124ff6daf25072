"""The ``syncer`` command: the embedded commands of :mod:`syncer.cli` plus the distributed
ones — ``plan`` (enqueue a run), ``status`` (read a run's ledger), ``worker`` and ``flower``.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import sys
from collections.abc import Callable

import click

from syncer.cli import (
    LOG_FORMAT_OPTION,
    PATH,
    RULE_OPTIONS,
    OutputOptions,
    RuleOptions,
    apply_options,
    cli,
    fail_usage,
    finish,
    guard,
    prepare,
    print_json,
    start_metrics,
    sync_options,
)
from syncer.registry.errors import ConfigError
from syncer.run.logsetup import configure_logging, configure_root_logging

# The default (workers.settings.DEFAULT_STALL_TIMEOUT, 600 s) is applied by workers.runs, so
# that this module does not import the Celery settings for the embedded commands.
stall_option = click.option(
    "--stall-timeout",
    type=click.FloatRange(min=0),
    default=None,
    envvar="SYNCER_STALL_TIMEOUT",
    show_envvar=True,
    metavar="SECONDS",
    help="Give up (exit 1, naming the unfinished images) when the run makes no progress — "
    "no job changes state, no bytes move — for this long (default 600). 0: wait forever.",
)


def exit_stalled(stalled, as_json: bool) -> None:
    """Report a :class:`workers.runs.RunStalled` (unfinished images named) and exit 1."""
    from syncer.run.report import render_summary

    lines = [f"error: {stalled}:"]
    for record in stalled.unfinished[:50]:
        where = f" on {record.worker}" if record.worker and record.state != "pending" else ""
        lines.append(f"  {record.label}  ({record.state}{where}, {record.attempts} attempts)")
    if len(stalled.unfinished) > 50:
        lines.append(f"  … and {len(stalled.unfinished) - 50} more")
    if as_json:
        document = stalled.summary.to_dict()
        document.update(
            stalled=True,
            idle_seconds=round(stalled.idle, 1),
            unfinished=[
                {"source": r.source, "destination": r.destination, "state": r.state,
                 "worker": r.worker, "attempts": r.attempts}
                for r in stalled.unfinished
            ],
        )
        print_json(document)
    else:
        click.echo(render_summary(stalled.summary))
    click.echo("\n".join(lines), err=True)
    sys.exit(1)


@cli.command()
@click.argument("config", required=False, type=PATH)
@sync_options
@click.option("--wait", is_flag=True, help="Follow the run until it ends; exit like 'sync'.")
@click.option("--json", "as_json", is_flag=True, help="Print the run (or final summary) as JSON.")
@stall_option
def plan(config, wait, as_json, stall_timeout, **options) -> None:
    """List source tags, create a run in Redis and enqueue one task per image.

    CONFIG is the legacy single config file (the same as --config).
    """
    from syncer.run.report import exit_code
    from workers.redis_ledger import RunNotFound
    from workers.runs import RunStalled, enqueue, wait_for

    rules, output = RuleOptions.take(options), OutputOptions.take(options)
    rules.config_file = config or rules.config_file
    if output.dry_run:
        fail_usage(["plan: --dry-run belongs to 'syncer sync --dry-run'"])
    prepared = prepare(rules, log_file=output.log_file, log_format=output.log_format)
    ledger = enqueue(prepared.plan, rules.retries)
    run_id = ledger.run_id
    prepared.registries.close()
    if not wait:
        if as_json:
            print_json(
                {
                    "run_id": run_id,
                    "jobs": len(prepared.plan.jobs),
                    "failures": [f.to_dict() for f in prepared.plan.failures],
                }
            )
        else:
            click.echo(run_id)
        return
    click.echo(f"run {run_id}: {len(prepared.plan.jobs)} images enqueued", err=True)
    try:
        summary = wait_for(ledger, show_progress=sys.stderr.isatty() and not as_json,
                           stall_timeout=stall_timeout)
    except RunStalled as stalled:
        exit_stalled(stalled, as_json)
    except RunNotFound:
        click.echo(
            f"error: run {run_id} vanished from Redis while waiting (was Redis restarted "
            "without persistence? run it with --appendonly yes)",
            err=True,
        )
        sys.exit(1)
    if as_json:
        print_json(summary.to_dict())
        sys.exit(exit_code(summary))
    finish(summary, output)


@cli.command()
@click.argument("run_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--watch", is_flag=True, help="Keep watching until the run ends.")
@click.option("--schedule", "schedule_name", metavar="NAME",
              help="List the runs of this schedule ('syncer schedule').")
@stall_option
def status(run_id, as_json, watch, stall_timeout, schedule_name) -> None:
    """Show a run's totals, rates and failures (from any host with access to Redis).

    Without RUN_ID, list the recent runs (those a schedule started are marked).
    """
    from syncer.run.report import exit_code, render_summary
    from workers.redis_ledger import RunNotFound
    from workers.runs import RunStalled, open_ledger, wait_for

    if run_id is None:
        from workers.schedule import listing

        try:
            # The human listing shows counts only: no job record is read.
            runs, schedules = listing(schedule_name, records=as_json)
        except ValueError as exc:  # not a schedule name
            fail_usage([f"status --schedule: {exc}"])
        if as_json:
            print_json({"runs": [dict(summary.to_dict(), schedule=schedules.get(summary.run_id))
                                 for summary in runs]})
        for summary in [] if as_json else runs:
            state = "done" if summary.complete else "running"
            scheduled = schedules.get(summary.run_id)
            click.echo(
                f"{summary.run_id}  {state:<7}  {summary.done}/{summary.total} images, "
                f"{summary.failed} failed" + (f"  schedule {scheduled}" if scheduled else "")
            )
        return
    ledger = open_ledger(run_id)
    try:
        if watch:
            summary = wait_for(ledger, show_progress=sys.stderr.isatty(),
                               stall_timeout=stall_timeout)
        else:
            summary = ledger.summary()
    except RunStalled as stalled:
        exit_stalled(stalled, as_json)
    except RunNotFound:
        click.echo(f"error: no run {run_id!r} in Redis (wrong id, or expired)", err=True)
        sys.exit(2)
    if as_json:
        print_json(summary.to_dict())
    else:
        click.echo(render_summary(summary))
    sys.exit(exit_code(summary))


@cli.command()
@click.argument("config", required=False, type=PATH)
@click.option("--every", "every", required=True, metavar="DURATION",
              help="The period: 30m, 2h, 1h30m, 45s, 1d. Periods start at multiples of it "
              "since the epoch (UTC): --every 30m runs at hh:00 and hh:30.")
@click.option("--name", metavar="NAME",
              help="The schedule's name, shared by its schedulers (default: the config or "
              "images file name without extension).")
@lambda func: apply_options(func, RULE_OPTIONS)
@click.option("--log", "log_file", type=PATH, help="Write the log here instead of stderr.")
@LOG_FORMAT_OPTION
def schedule(config, every, name, log_file, log_format, **options) -> None:
    """Keep a config in sync: enqueue a run every period, one at a time (runs like 'plan').

    The first run starts now, then one per period. A period that begins while the previous
    run is still going is skipped (logged); after a pause, one run, not one per missed period.
    Runs until stopped (Ctrl-C, SIGTERM); the config is read again for every run.
    """
    import signal

    from syncer.plan.config import load_config
    from workers.context import redis_client
    from workers.runs import enqueue, planner_reaper
    from workers.schedule import Scheduler, ScheduleStore, check_name, default_name, parse_every

    rules = RuleOptions.take(options)
    rules.config_file = config or rules.config_file
    try:
        period = parse_every(every)
        name = check_name(name or default_name(rules.config_file, rules.images_file))
        load_config(rules.config_file, rules.auth_file, rules.images_file)  # exit 2 now
    except ValueError as exc:
        fail_usage([f"schedule: {exc}"])
    except ConfigError as exc:
        fail_usage(exc.problems)
    configure_logging(log_file=log_file, secrets=(), log_format=log_format)

    def start_run():
        try:
            prepared = prepare(rules, log_file=log_file, log_format=log_format)
        except SystemExit:  # the config went bad since: its problems are printed already
            raise RuntimeError("the config is not valid (see the errors above)") from None
        try:
            return enqueue(prepared.plan, rules.retries)
        finally:
            prepared.registries.close()

    def terminate(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    client = redis_client()
    scheduler = Scheduler(ScheduleStore(client, name), period, start_run,
                          reap=planner_reaper(client))
    logging.getLogger("syncer.schedule").info(
        "schedule %s: a run every %s (%gs), periods aligned on the epoch", name, every, period)
    try:
        scheduler.run()
    except KeyboardInterrupt:
        logging.getLogger("syncer.schedule").info("schedule %s: stopped", name)


@cli.command()
@click.option(
    "-c",
    "--concurrency",
    default=4,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Images copied at once by this worker.",
)
@click.option(
    "--pool",
    type=click.Choice(["prefork", "threads"]),
    default="threads",
    show_default=True,
    help="threads: one process, as fast as prefork for streaming copies at a quarter of the "
    "memory (make bench); prefork: a process per slot, for isolation.",
)
@click.option("--auth", "auth_file", type=click.Path(dir_okay=False), help="This host's auth file.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="A config whose 'auth' section this worker uses.",
)
@click.option(
    "-n",
    "--hostname",
    default=None,
    help="Node name, unique per worker process (default: syncer-<random hex>@%h).",
)
@click.option("-l", "--loglevel", default="INFO", show_default=True)
@click.option(
    "--allow-registry",
    "allowed",
    multiple=True,
    metavar="HOST[/NAMESPACE]",
    help="Also copy from/to this registry (repeatable; '*' = any). Default: only the registries "
    "of this worker's auth file. Env SYNCER_ALLOWED_REGISTRIES (comma-separated).",
)
@click.option(
    "--metrics-port",
    "metrics_listen",
    envvar="SYNCER_METRICS_PORT",
    show_envvar=True,
    metavar="[ADDRESS:]PORT",
    help="Serve this worker's Prometheus metrics at /metrics (address 127.0.0.1 unless given; "
    "with --pool prefork, the sum over its child processes).",
)
@LOG_FORMAT_OPTION
def worker(concurrency, pool, auth_file, config_file, hostname, loglevel, allowed,
           metrics_listen, log_format) -> None:
    """Start a Celery worker that copies images (credentials from this host's files)."""
    if config_file:
        os.environ["SYNCER_CONFIG_FILE"] = os.path.abspath(config_file)
    elif auth_file:
        os.environ["SYNCER_AUTH_FILE"] = os.path.abspath(auth_file)
    if allowed:  # through the environment, like --auth, so that prefork children see it too
        os.environ["SYNCER_ALLOWED_REGISTRIES"] = ",".join(allowed)
    from workers.app import app
    from workers.context import load_worker_store
    from workers.signing import describe as describe_signing
    from workers.trust import announce, worker_allowlist

    try:  # the same loader every task uses: a bad file stops the worker before it starts
        store = load_worker_store()
        allowlist = worker_allowlist()
    except ConfigError as exc:
        fail_usage(exc.problems)
    configure_logging(log_file=None, secrets=lambda: store.secrets, log_format=log_format)
    # Prefork children copy: their counts meet in prometheus_client's multiprocess files.
    start_metrics(metrics_listen, multiprocess=pool == "prefork")
    announce(allowlist)
    logging.getLogger("syncer.worker").info("%s", describe_signing(app))
    argv = [
        "worker",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--loglevel={loglevel}",
        "--task-events",
        # Unique per process by default: two workers on one host must not share a name
        # (liveness and Flower tell workers apart by it).
        f"--hostname={hostname or f'syncer-{secrets.token_hex(3)}@%h'}",
        "--without-gossip",
        "--without-mingle",
    ]
    if log_format == "json":
        json_worker_logs(lambda: store.secrets, loglevel)
        argv.insert(0, "--quiet")  # no ASCII-art banner among the JSON lines
    else:
        scrub_celery_logs(lambda: store.secrets)
    app.worker_main(argv)


def json_worker_logs(secrets_: Callable[[], tuple[str, ...]], loglevel: str) -> None:
    """Celery's own log lines (and every other library's, and Python warnings) as JSON too:
    set up now, for what is said before Celery configures logging (its warning about
    running as root), and a ``setup_logging`` receiver replaces Celery's set-up with ours."""
    from celery import signals

    def setup(loglevel=None, **_) -> None:
        configure_root_logging(level=loglevel or logging.INFO, secrets=secrets_,
                               log_format="json")

    setup(loglevel)
    logging.captureWarnings(True)
    signals.setup_logging.connect(setup, weak=False)


def scrub_celery_logs(secrets_: Callable[[], tuple[str, ...]]) -> Callable[..., None]:
    """Text logs: Celery sets up its own handlers (its format) on the root logger, the task
    logger and the multiprocessing logger; each gets the secret scrubber the ``syncer`` logs
    have, as it is set up (``after_setup_logger`` / ``after_setup_task_logger``). Returns the
    receiver (connected until the process ends)."""
    from celery import signals
    from celery.utils.log import get_multiprocessing_logger

    from syncer.run.logsetup import SecretScrubber

    scrubber = SecretScrubber(secrets_)

    def scrub(logger: logging.Logger | None = None, **_) -> None:
        loggers = [logger]
        if logger is logging.getLogger():  # configured with the root logger, no signal of its own
            loggers.append(get_multiprocessing_logger())
        for each in loggers:
            for handler in each.handlers if each is not None else ():
                if scrubber not in handler.filters:
                    handler.addFilter(scrubber)

    signals.after_setup_logger.connect(scrub, weak=False)
    signals.after_setup_task_logger.connect(scrub, weak=False)
    return scrub


@cli.command()
@click.option("--port", default=5555, show_default=True, type=int)
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Listen address. Flower serves /metrics and /healthcheck without authentication: "
    "keep it on loopback behind a reverse proxy (README, 'Flower').",
)
def flower(port, address) -> None:
    """Start Flower on the same broker. Set FLOWER_BASIC_AUTH=user:password to protect it.

    The tasks page shows each task's image (args: SRC -> DST) and run id (kwargs);
    FLOWER_TASKS_COLUMNS or a flowerconfig.py change that (workers/flowerconfig.py).
    """
    from workers.app import app
    from workers.flowerconfig import apply_defaults

    apply_defaults()
    if not (os.environ.get("FLOWER_BASIC_AUTH") or os.environ.get("FLOWER_AUTH")) and (
        address not in ("127.0.0.1", "localhost", "::1")
    ):
        click.echo(f"warning: Flower on {address} without FLOWER_BASIC_AUTH: anyone who can "
                   "reach the port can see and stop tasks", err=True)
    # Flower reads FLOWER_BASIC_AUTH (and every FLOWER_* option) from the environment itself;
    # passing it on the command line would show the password in `ps`.
    app.start(["flower", f"--port={port}", f"--address={address}"])


def guard_redis(command):
    """Turn a Redis error (unreachable, wrong password, TLS refused) into one line + exit 1
    instead of a traceback; the URL is shown with its password masked."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Exception as exc:
            redis = sys.modules.get("redis")  # not imported at all: cannot be a Redis error
            if redis is None or not isinstance(exc, redis.RedisError):
                raise
            from kombu.utils.url import maybe_sanitize_url

            from workers.settings import redis_url

            click.echo(
                f"error: Redis {maybe_sanitize_url(redis_url())}: {type(exc).__name__}: {exc}",
                err=True,
            )
            sys.exit(1)

    return run


main = guard(guard_redis(cli))
__all__ = ["main"]


if __name__ == "__main__":
    main()
