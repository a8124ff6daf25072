"""The distributed layer: the Celery app, its tasks, and the commands that drive them."""
