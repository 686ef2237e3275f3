"""Durable workflows beside the app (SPEC "Workflows"): sagas, fan-out, audit shipping.

    api.py          the `/_sidecar/v1/` handler the outbound stack answers with
    definitions.py  a request body -> a checked definition, errors by field path
    templating.py   `{{steps.NAME.response.a.b}}`: references, extraction, rendering
    model.py        definitions and the state of an instance as the store keeps it
    store.py        the store interface and its schema, shared by both backends
    backends.py     `open_store(url)`: the backend `workflows.store` names
    sqlite.py       the default store: one file in WAL mode, through aiosqlite
    postgres.py     a store shared by replicas: asyncpg, claims with SKIP LOCKED
    engine.py       runs sagas and deliveries: write-ahead, claims, retries, purge
    calls.py        one workflow call through the outbound stack, and its verdict
    shipping.py     the audit records, in order, to a collector service
    lifecycle.py    the engine and the shipper of one sidecar process, from its config
    crash.py        test-only kill points (SIDECAR_CRASH_AT)

Every call the engine makes goes through the outbound stack as a `Handler`
passed in, so this package imports neither stack.
"""
