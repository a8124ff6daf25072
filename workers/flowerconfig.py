"""What ``syncer flower`` shows by default: each task's image and run, not only its id.

Flower's tasks table lists ``name, uuid, state, received, runtime, worker`` out of the box,
so a run of 500 images is 500 rows of ``syncer.sync_image`` and a UUID. ``syncer flower``
starts Flower with :data:`tasks_columns` (the image in the ``args`` column, the run id in
the ``kwargs`` column) and :func:`format_task`, which turns a task's arguments into those two
cells on the tasks page and a task's page.

Only what Flower *renders* changes: task messages, Flower's JSON API (``/api/tasks``) and
the workers' logs keep the message's ``argsrepr``, ``('RUN_ID', 'SRC -> DST')`` (set by
:func:`workers.runs.send_job`), and Flower's search box matches that, so typing a run id
there lists that run's tasks.

An operator changes the columns like any Flower option (Flower applies them in this order,
the last one wins): ``FLOWER_TASKS_COLUMNS=...`` in the environment, a ``flowerconfig.py`` in
the working directory (or the file named by ``FLOWER_CONF``), then the command line. This
file is itself a valid Flower configuration file, e.g. for ``celery -A workers.app flower
--conf=workers/flowerconfig.py``.
"""

from __future__ import annotations

import ast
import os
from typing import Any

# From the settings, not the task module: importing that would connect the worker's signals
# in Flower's process.
from workers.settings import TASK_NAME

#: Flower's ``tasks_columns``: slugs from Flower's ``TASK_COLUMNS``, in display order.
#: ``args`` shows ``SRC -> DST`` and ``kwargs`` the run id (see :func:`format_task`); the
#: task name is left out (every task is ``syncer.sync_image``) to leave room for the image;
#: the UUID, last, links to the task's page.
tasks_columns = "state,args,kwargs,worker,runtime,received,uuid"


def split_argsrepr(argsrepr: Any) -> tuple[str, str] | None:
    """``("('run-1', 'a -> b')")`` → ``("run-1", "a -> b")``; None for any other shape.

    Parsed with :func:`ast.literal_eval`, which evaluates literals only: an argsrepr is
    whatever the sender wrote, so it is never executed.
    """
    if not isinstance(argsrepr, str) or len(argsrepr) > 8192:
        return None
    try:
        value = ast.literal_eval(argsrepr)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(part, str) for part in value)
        and " -> " in value[1]
    ):
        return value[0], value[1]
    return None


def format_task(task: Any) -> Any:
    """Flower's ``format_task`` hook: a ``syncer.sync_image`` task shows ``SRC -> DST`` as its
    args and its run id as its kwargs; any other task, or an argsrepr of another shape, is
    returned unchanged. Flower passes a copy of its task object, so nothing it stores
    (or searches) changes."""
    if getattr(task, "name", None) != TASK_NAME:
        return task
    parts = split_argsrepr(getattr(task, "args", None))
    if parts is None:
        return task
    run_id, label = parts
    task.args = label
    # The bare id, not "run_id=...": Flower's "kwargs:key=value" search looks at the
    # message's real kwargs (none), while a free-text search for the id matches the args.
    task.kwargs = run_id
    return task


def apply_defaults() -> None:
    """Make :data:`tasks_columns` and :func:`format_task` Flower's defaults in this process.

    Called by ``syncer flower`` before Flower parses its options, so the environment, a
    Flower config file and the command line still override both.
    """
    from flower.options import options  # tornado's option registry, defined by Flower

    os.environ.setdefault("FLOWER_TASKS_COLUMNS", tasks_columns)
    if options.format_task is None:
        options.format_task = format_task
