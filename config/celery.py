"""Example Celery overrides: point ``SYNCER_CELERY_CONFIG=config.celery`` at this module
(with the project root on ``PYTHONPATH``). Anything not set here keeps the defaults of
``workers/settings.py``, which are already tuned; these lines show the knobs worth knowing.
"""

import os

from workers.settings import build_settings

_defaults = build_settings()
globals().update(_defaults)  # start from the tuned defaults

# A copy of one image (all its blobs) must finish within this many seconds.
task_time_limit = int(os.environ.get("SYNCER_TASK_TIME_LIMIT", "3600"))
task_soft_time_limit = task_time_limit - 60
# Must exceed task_time_limit + the longest retry countdown (300 s) — see settings.py.
broker_transport_options = {
    **_defaults["broker_transport_options"],  # keeps kombu's unacked-restore cadence
    "visibility_timeout": task_time_limit + 900,
}
# For rediss:// brokers, certificate checks are set in the URL, e.g.
# rediss://:PASSWORD@redis:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ssl/ca.pem
