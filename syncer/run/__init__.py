"""The run layer: execute a plan's jobs in this process and record, report and show them.

Imports the layers below (:mod:`syncer.registry`, :mod:`syncer.copy`, :mod:`syncer.plan`).
The distributed executor (Celery, Redis) lives in ``workers/``, above this package.
"""
