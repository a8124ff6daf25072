"""image-syncer-py: copy container images between registries, embedded or over Celery."""

__version__ = "0.1.0"
