"""The plan layer: config files and rules become jobs (plain data, no credentials).

Imports only :mod:`syncer.registry` (to list tags and repositories).
"""
