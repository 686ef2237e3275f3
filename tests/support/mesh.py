"""Real sidecar processes for integration tests: keys, configs, ports, signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from deploy.mesh import free_ports
from sidecar.identity import keys

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    return free_ports(1)[0]


class PortTaken(Exception):
    """The sidecar could not bind one of its ports."""


@dataclass
class SidecarProcess:
    """One `python -m sidecar run -c FILE` process with its own three ports."""

    name: str
    config: dict[str, Any]
    workdir: Path
    outbound: int = field(default_factory=free_port)
    inbound: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.name}.yaml"

    @property
    def audit_path(self) -> Path:
        return self.workdir / f"{self.name}-audit.jsonl"

    @property
    def stdout_path(self) -> Path:
        return self.workdir / f"{self.name}.out"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / f"{self.name}.err"

    @property
    def outbound_url(self) -> str:
        return f"http://127.0.0.1:{self.outbound}"

    @property
    def inbound_url(self) -> str:
        return f"http://127.0.0.1:{self.inbound}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin}"

    def write_config(self) -> None:
        doc = dict(self.config)
        doc.setdefault("listen", {
            "outbound": f"127.0.0.1:{self.outbound}",
            "inbound": f"127.0.0.1:{self.inbound}",
            "admin": f"127.0.0.1:{self.admin}",
        })
        doc.setdefault("audit", {"path": str(self.audit_path)})
        self.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))

    async def start(self) -> SidecarProcess:
        for _ in range(3):
            try:
                return await self._start_once()
            except PortTaken:
                # Another process took a port between choosing and binding it.
                self.outbound, self.inbound, self.admin = free_port(), free_port(), free_port()
        return await self._start_once()

    async def _start_once(self) -> SidecarProcess:
        self.write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env.update(self.env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "-c", str(self.config_path)],
            stdout=self.stdout_path.open("ab"), stderr=self.stderr_path.open("ab"),
            env=env, cwd=str(ROOT),
        )
        await self.wait_healthy()
        return self

    async def wait_healthy(self, timeout: float = 20.0) -> None:
        ends = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < ends:
                if self.proc is not None and self.proc.poll() is not None:
                    logs = self.logs()
                    if "address already in use" in logs:
                        self.stderr_path.unlink(missing_ok=True)
                        raise PortTaken(self.name)
                    raise RuntimeError(f"sidecar {self.name} exited: {logs}")
                try:
                    async with session.get(self.admin_url + "/healthz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"sidecar {self.name} did not come up: {self.logs()}")

    def logs(self) -> str:
        out = self.stdout_path.read_text() if self.stdout_path.exists() else ""
        err = self.stderr_path.read_text() if self.stderr_path.exists() else ""
        return f"--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        ends = time.monotonic() + timeout
        while time.monotonic() < ends:
            code = self.proc.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.05)
        raise TimeoutError(f"sidecar {self.name} did not exit")

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await self.wait_exit(timeout=15)
        except TimeoutError:
            self.proc.kill()
            self.proc.wait(5)


class Mesh:
    """Keys for every service, one JWKS, and sidecar processes sharing them."""

    def __init__(self, workdir: Path, services: list[str], *, algorithm: str = "EdDSA") -> None:
        self.workdir = workdir
        self.keys_dir = workdir / "keys"
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        for name in services:
            keys.generate(service=name, out_dir=self.keys_dir, algorithm=algorithm)
        self.jwks = workdir / "jwks.json"
        import json

        self.jwks.write_text(json.dumps(keys.merge_jwks([self.keys_dir])))
        self.algorithm = algorithm
        self.sidecars: list[SidecarProcess] = []

    def identity(self, name: str) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "private_key_file": str(self.keys_dir / f"{name}.pem"),
            "jwks_file": str(self.jwks),
        }

    def sidecar(self, name: str, **config: Any) -> SidecarProcess:
        doc: dict[str, Any] = {"service": name, "identity": self.identity(name),
                               "drain_timeout": "5s"}
        doc.update(config)
        process = SidecarProcess(name=name, config=doc, workdir=self.workdir)
        self.sidecars.append(process)
        return process

    async def stop(self) -> None:
        for process in self.sidecars:
            await process.stop()
