"""Builds the Celery app — nothing else lives here."""

from __future__ import annotations

import importlib
import os
import types

from celery import Celery

from workers.settings import build_settings
from workers.signing import setup_signing


def _overrides(module_name: str) -> dict:
    """Lower-case, non-private plain values of a settings module (``config/celery.py``)."""
    module = importlib.import_module(module_name)
    return {
        name: value
        for name, value in vars(module).items()
        if name.islower()
        and not name.startswith("_")
        and not isinstance(value, types.ModuleType | types.FunctionType | type)
    }


settings = build_settings()
if os.environ.get("SYNCER_CELERY_CONFIG"):
    settings.update(_overrides(os.environ["SYNCER_CELERY_CONFIG"]))
app = Celery("syncer", include=["workers.tasks"])
app.conf.update(settings)
setup_signing(app)  # Celery's auth serializer, when SYNCER_SECURITY_* ask for it
