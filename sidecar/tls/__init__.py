"""Encryption in transit: the mesh's certificates, TLS contexts, and keeping them current.

`certs` makes and reads certificates (`sidecar certs`), `check` validates a
config's files (`sidecar check`), `contexts` builds the SSL contexts and
reads a peer's identity, `material` holds the current contexts and reloads
them when the files change. Nothing here sees a request.
"""
