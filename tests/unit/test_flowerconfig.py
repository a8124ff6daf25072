"""What ``syncer flower`` renders for a task (workers/flowerconfig.py), and how its defaults
give way to an operator's Flower options."""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import pytest

from workers import flowerconfig
from workers.hooks import TASK_NAME

LABEL = "harbor.example.com/library/nginx:1.25 -> registry.example.com/mirror/nginx:1.25"


def task(name: str = TASK_NAME, args: object = None, kwargs: object = "{}") -> SimpleNamespace:
    """A stand-in for Flower's task object (``name``, ``args``, ``kwargs`` attributes)."""
    if args is None:
        args = repr(("run-20261128-031500-3f9a", LABEL))
    return SimpleNamespace(name=name, args=args, kwargs=kwargs, uuid="u-1")


def test_the_task_name_is_the_workers():
    assert flowerconfig.TASK_NAME == TASK_NAME


def test_a_sync_task_shows_its_image_and_run():
    shown = flowerconfig.format_task(task())
    assert shown.args == LABEL
    assert shown.kwargs == "run-20261128-031500-3f9a"


@pytest.mark.parametrize(
    "changed",
    [
        {"name": "celery.backend_cleanup"},  # another task
        {"args": "('run-1', 'no arrow here')"},  # not a label
        {"args": "('run-1', 'a -> b', 3)"},  # another shape
        {"args": "__import__('os').system('true')"},  # never evaluated
        {"args": "(" * 5000},  # unparsable
        {"args": None},
    ],
)
def test_anything_else_is_left_as_flower_has_it(changed):
    original = task(**{k: v for k, v in changed.items() if k != "args"})
    if "args" in changed:
        original.args = changed["args"]
    before = copy.copy(original)
    assert flowerconfig.format_task(original) is original
    assert vars(original) == vars(before)


@pytest.fixture
def flower_options():
    """Flower's (tornado's) option registry, its ``format_task`` restored afterwards."""
    from flower.options import options

    saved = options.format_task  # tornado options are not plain attributes: no monkeypatch
    try:
        yield options
    finally:
        options.format_task = saved


def test_defaults_give_way_to_the_operators_columns(monkeypatch, flower_options):
    monkeypatch.setenv("FLOWER_TASKS_COLUMNS", "name,uuid,state")
    flower_options.format_task = None
    flowerconfig.apply_defaults()
    assert flower_options.format_task is flowerconfig.format_task
    assert os.environ["FLOWER_TASKS_COLUMNS"] == "name,uuid,state"


def test_defaults_fill_in_what_the_operator_left_unset(monkeypatch, flower_options):
    monkeypatch.delenv("FLOWER_TASKS_COLUMNS", raising=False)  # restored at teardown
    own = lambda t: t  # noqa: E731 - an operator's own formatter, set in a flowerconfig.py
    flower_options.format_task = own
    flowerconfig.apply_defaults()
    assert os.environ["FLOWER_TASKS_COLUMNS"] == flowerconfig.tasks_columns
    assert flower_options.format_task is own
