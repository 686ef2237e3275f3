"""The integration tests' meshes: sidecar processes configured as tests want them.

The processes, their ports, configs, signals and output are `deploy.process`'s,
the harness `make bench` and `make demo` use too; this adds only what tests
share: every service's keys (and, with `tls`, a mesh CA and every service's
certificate), and a short drain so that a test stops quickly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.process import CertRing, KeyRing, SidecarProcess


class Mesh:
    """Keys for every service, one JWKS, and sidecar processes sharing them, in `workdir`.

    With `tls` (a mode: "strict" or "permissive") every sidecar also gets its
    certificate, the mesh CA and that mode, unless its config says otherwise.
    """

    def __init__(self, workdir: Path, services: list[str], *, algorithm: str = "EdDSA",
                 tls: str | None = None) -> None:
        self.workdir = workdir
        self.keyring = KeyRing(workdir, algorithm).generate(services)
        self.tls = tls
        self.certs = CertRing(workdir).generate(services) if tls is not None else None
        self.sidecars: list[SidecarProcess] = []

    def sidecar(self, name: str, **config: Any) -> SidecarProcess:
        """`name`'s sidecar, not started: its identity, certificate and a 5 s drain, then
        `config`."""
        doc: dict[str, Any] = {"service": name, "identity": self.keyring.identity(name),
                               "drain_timeout": "5s"}
        if self.certs is not None and self.tls is not None:
            doc["trust_domain"] = self.certs.trust_domain
            doc["tls"] = self.certs.tls(name, self.tls)
        doc.update(config)
        process = SidecarProcess.in_dir(name, doc, self.workdir)
        self.sidecars.append(process)
        return process

    async def stop(self) -> None:
        for process in self.sidecars:
            await process.stop()
