"""The copy layer: copy one image — its manifest tree and its blobs — between registries.

Imports only :mod:`syncer.registry`.
"""
