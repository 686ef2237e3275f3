"""The integration tests' meshes: sidecar processes configured as tests want them.

The processes, their ports, configs, signals and output are `deploy.process`'s,
the harness `make bench` and `make demo` use too; this adds only what tests
share: every service's keys, and a short drain so that a test stops quickly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.process import KeyRing, SidecarProcess


class Mesh:
    """Keys for every service, one JWKS, and sidecar processes sharing them, in `workdir`."""

    def __init__(self, workdir: Path, services: list[str], *, algorithm: str = "EdDSA") -> None:
        self.workdir = workdir
        self.keyring = KeyRing(workdir, algorithm).generate(services)
        self.sidecars: list[SidecarProcess] = []

    def sidecar(self, name: str, **config: Any) -> SidecarProcess:
        """`name`'s sidecar, not started: its identity and a 5 s drain, then `config`."""
        doc: dict[str, Any] = {"service": name, "identity": self.keyring.identity(name),
                               "drain_timeout": "5s"}
        doc.update(config)
        process = SidecarProcess.in_dir(name, doc, self.workdir)
        self.sidecars.append(process)
        return process

    async def stop(self) -> None:
        for process in self.sidecars:
            await process.stop()
