"""The registry layer (bottom): one registry's HTTP API and everything under it.

References and media types, the exception tree with the one "transient?" predicate, the one
retry policy, credentials, auth flows, per-host pauses, the transport (TLS, auth, in-place
retries, response → error) and the client. Imports nothing else from ``syncer``.
"""
