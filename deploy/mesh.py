"""The example mesh as running processes: keys, configs, apps and sidecars.

`make demo` and `tests/topology` both run it. Each service runs at a `Site`:

- in a network namespace of its own (`deploy.netns`), exactly as in Compose:
  app on 127.0.0.1:8000, sidecar on 15001/15006/15000, peers reached as
  `http://<name>:15006` and traces sent to `http://jaeger:4318`;
- or on the host's loopback, where each service needs a port set of its own:
  the sidecar's listen addresses, its app address and its endpoints are
  rewritten to 127.0.0.1:<port>.

The configs are `deploy/config/<service>.yaml` with only what this machine
needs rewritten: key and JWKS paths, the audit path, the tracing endpoint when
one is given, the breaker settings when asked (a demo cannot wait 10 s), and,
on loopback, the addresses. Keys come from `sidecar keygen` and `sidecar jwks`,
as a user makes them. Every process starts in a session of its own, so a
Ctrl-C at the terminal reaches only the driver, and `stop`/`kill` end whole
process groups.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from deploy import netns
from deploy.topology import APPS, SERVICES

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "deploy" / "config"
COMPOSE_PORTS = {"app": 8000, "outbound": 15001, "inbound": 15006, "admin": 15000}
STOP_WITHIN = 15.0  # seconds a process gets after SIGTERM before SIGKILL
READY_WITHIN = 30.0
POLL = 0.05  # seconds between looks at a stopping process
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)
# Never inherited by the mesh's processes: a proxy would carry their traffic
# (the OTLP exporter honours HTTP_PROXY) somewhere this machine does not own.
PROXY_VARIABLES = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})


@dataclass(frozen=True, slots=True)
class Site:
    """Where one service runs: a namespace (None: the host's loopback) and its ports."""

    service: str
    namespace: str | None
    address: str  # where other sidecars reach this one's inbound listener
    app_port: int = COMPOSE_PORTS["app"]
    outbound_port: int = COMPOSE_PORTS["outbound"]
    inbound_port: int = COMPOSE_PORTS["inbound"]
    admin_port: int = COMPOSE_PORTS["admin"]

    @property
    def outbound_url(self) -> str:
        """The sidecar's outbound listener, as its app (in the same network) calls it."""
        return f"http://127.0.0.1:{self.outbound_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def app_url(self) -> str:
        """The app, as seen from inside its own network."""
        return f"http://127.0.0.1:{self.app_port}"

    @property
    def inbound_url(self) -> str:
        """The sidecar's inbound listener, as other services' networks reach it."""
        return f"http://{self.address}:{self.inbound_port}"


@dataclass(frozen=True, slots=True)
class Placement:
    """Every service's `Site`, and the namespace layout when there is one."""

    mode: str  # "netns" | "loopback"
    sites: dict[str, Site]
    layout: netns.Layout | None = None


def netns_placement(layout: netns.Layout) -> Placement:
    """Compose's addressing: every service on the same ports, each in its own namespace."""
    sites = {
        service: Site(service=service, namespace=namespace, address=layout.addresses[service])
        for service, namespace in layout.namespaces.items()
    }
    return Placement(mode="netns", sites=sites, layout=layout)


def loopback_placement(services: Sequence[str] = SERVICES) -> Placement:
    """One set of free loopback ports per service, all on 127.0.0.1."""
    ports = iter(free_ports(4 * len(services)))
    sites = {
        service: Site(
            service=service,
            namespace=None,
            address="127.0.0.1",
            app_port=next(ports),
            outbound_port=next(ports),
            inbound_port=next(ports),
            admin_port=next(ports),
        )
        for service in services
    }
    return Placement(mode="loopback", sites=sites)


# Below the kernel's ephemeral range (32768-60999 by default), so a port
# chosen here is not taken meanwhile as the source port of some connection.
PORT_RANGE = (20000, 32000)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free on 127.0.0.1 a moment ago."""
    held: list[socket.socket] = []
    try:
        # Held open together, so no port is handed out twice.
        for _ in range(count * 50):
            if len(held) == count:
                break
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", random.randrange(*PORT_RANGE)))
            except OSError:
                sock.close()
                continue
            held.append(sock)
        if len(held) < count:
            raise RuntimeError("not enough free ports on 127.0.0.1")
        return [int(sock.getsockname()[1]) for sock in held]
    finally:
        for sock in held:
            sock.close()


# ---- configs


def adapt_config(
    doc: Mapping[str, Any],
    *,
    site: Site,
    sites: Mapping[str, Site],
    private_key: Path,
    jwks: Path,
    audit: Path,
    tracing_endpoint: str | None = None,
    breaker: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A Compose config made runnable here; everything not named above stays as shipped."""
    out = copy.deepcopy(dict(doc))
    out["identity"] = {
        **out["identity"],
        "private_key_file": str(private_key),
        "jwks_file": str(jwks),
    }
    out["audit"] = {**(out.get("audit") or {}), "path": str(audit)}
    if tracing_endpoint is not None:
        out["tracing"] = {**(out.get("tracing") or {}), "endpoint": tracing_endpoint}
    if breaker:
        defaults = out.setdefault("defaults", {})
        defaults["circuit_breaker"] = {**(defaults.get("circuit_breaker") or {}), **breaker}
    if site.namespace is None:
        # Everyone shares the host's loopback here, so each needs its own ports.
        out["listen"] = {
            "outbound": f"127.0.0.1:{site.outbound_port}",
            "inbound": f"127.0.0.1:{site.inbound_port}",
            "admin": f"127.0.0.1:{site.admin_port}",
        }
        out["inbound"] = {**out["inbound"], "app": site.app_url}
        for name, service in (out.get("services") or {}).items():
            service["endpoints"] = [sites[name].inbound_url]
    return out


def child_env(base: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a mesh process: no proxies, no inherited OTEL_* or *_URL."""
    env = {
        name: value
        for name, value in base.items()
        if name.lower() not in PROXY_VARIABLES
        and not name.startswith("OTEL_")
        and not name.endswith("_URL")  # the apps read <SERVICE>_URL as an upstream address
    }
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


# ---- processes


@dataclass
class Process:
    """One app or sidecar process, started in a session (process group) of its own."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=ROOT,
                start_new_session=True,
            )

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    async def stop(self, within: float = STOP_WITHIN) -> int | None:
        """SIGTERM, wait up to `within` seconds, then SIGKILL; the exit code (None: never ran)."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            ends = time.monotonic() + within
            # Polled: a thread blocked in wait() would hold up the loop's exit after a Ctrl-C.
            while self.popen.poll() is None and time.monotonic() < ends:  # noqa: ASYNC110
                await asyncio.sleep(POLL)
        if self.popen.poll() is None:
            self.kill()
        # The group too: anything the process started must not outlive it.
        self._signal(signal.SIGKILL)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole group at once and reap it; for clean-up after errors."""
        if self.popen is None:
            return
        self._signal(signal.SIGKILL)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _signal(self, signum: signal.Signals) -> None:
        assert self.popen is not None
        try:
            os.killpg(self.popen.pid, signum)  # the pid leads its own group (new session)
        except (ProcessLookupError, PermissionError):
            pass


class MeshError(RuntimeError):
    """The mesh could not be prepared or started; the message says where to look."""


@dataclass
class LocalMesh:
    """Keys, configs and processes for every service of `placement`, under `workdir`."""

    placement: Placement
    workdir: Path
    tracing_endpoint: str | None = None
    breaker: Mapping[str, Any] | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # extra variables for every process
    config_dir: Path = CONFIG_DIR
    apps: dict[str, Process] = field(default_factory=dict)
    sidecars: dict[str, Process] = field(default_factory=dict)

    @property
    def sites(self) -> dict[str, Site]:
        return self.placement.sites

    @property
    def keys_dir(self) -> Path:
        return self.workdir / "keys"

    @property
    def jwks_path(self) -> Path:
        return self.workdir / "jwks.json"

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    def config_path(self, service: str) -> Path:
        return self.workdir / "config" / f"{service}.yaml"

    def audit_path(self, service: str) -> Path:
        return self.workdir / "audit" / f"{service}.jsonl"

    # -- set-up

    async def prepare(self) -> None:
        """Key pairs with `sidecar keygen`, one JWKS with `sidecar jwks`, and the configs."""
        for directory in (self.keys_dir, self.logs_dir, self.workdir / "config"):
            directory.mkdir(parents=True, exist_ok=True)
        await asyncio.gather(
            *(
                self._sidecar_cli("keygen", "--service", service, "--out", str(self.keys_dir))
                for service in self.sites
            )
        )
        await self._sidecar_cli("jwks", "-o", str(self.jwks_path), str(self.keys_dir))
        for service, site in self.sites.items():
            shipped = yaml.safe_load((self.config_dir / f"{service}.yaml").read_text())
            doc = adapt_config(
                shipped,
                site=site,
                sites=self.sites,
                private_key=self.keys_dir / f"{service}.pem",
                jwks=self.jwks_path,
                audit=self.audit_path(service),
                tracing_endpoint=self.tracing_endpoint,
                breaker=self.breaker,
            )
            self.config_path(service).write_text(yaml.safe_dump(doc, sort_keys=False))

    async def start(self, within: float = READY_WITHIN) -> None:
        """Every app and sidecar, then wait until each sidecar says it is ready."""
        for service in self.sites:
            if service in APPS:
                self.start_app(service)
            self.start_sidecar(service)
        await asyncio.gather(*(self.wait_ready(service, within) for service in self.sites))

    def start_app(self, service: str) -> Process:
        site = self.sites[service]
        env = child_env(
            os.environ,
            {
                **self.env,
                "APP_HOST": "127.0.0.1",
                "APP_PORT": str(site.app_port),
                "SIDECAR_OUTBOUND": site.outbound_url,
            },
        )
        process = Process(
            name=f"{service} app",
            argv=[*self._prefix(site), sys.executable, "-m", APPS[service]],
            log=self.logs_dir / f"{service}.app.log",
            env=env,
        )
        process.start()
        self.apps[service] = process
        return process

    def start_sidecar(self, service: str) -> Process:
        site = self.sites[service]
        process = Process(
            name=f"{service} sidecar",
            argv=[
                *self._prefix(site),
                sys.executable,
                "-m",
                "sidecar",
                "run",
                "-c",
                str(self.config_path(service)),
            ],
            log=self.logs_dir / f"{service}.sidecar.log",
            env=child_env(os.environ, self.env),
        )
        process.start()
        self.sidecars[service] = process
        return process

    async def stop_app(self, service: str) -> int | None:
        return await self.apps[service].stop()

    async def stop(self) -> dict[str, int | None]:
        """Apps first, then their sidecars (as Kubernetes stops native sidecars): exit codes."""
        codes: dict[str, int | None] = {}
        for group in (self.apps, self.sidecars):
            processes = list(group.values())
            results = await asyncio.gather(*(process.stop() for process in processes))
            codes |= {p.name: code for p, code in zip(processes, results, strict=True)}
        return codes

    def kill(self) -> None:
        """SIGKILL every process group still running: the clean-up of last resort."""
        for process in [*self.apps.values(), *self.sidecars.values()]:
            process.kill()

    # -- reaching the services

    def session(self, service: str) -> aiohttp.ClientSession:
        """A client whose connections start in `service`'s network (its namespace or loopback)."""
        namespace = self.sites[service].namespace
        connector = (
            netns.connector_in(namespace)
            if namespace is not None
            else aiohttp.TCPConnector(force_close=True)
        )
        return aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT, trust_env=False)

    async def admin(self, service: str, path: str) -> tuple[int, Any]:
        """GET `path` on `service`'s admin port (loopback-only, so from inside its network)."""
        async with self.session(service) as session:
            async with session.get(self.sites[service].admin_url + path) as response:
                text = await response.text()
                try:
                    return response.status, json.loads(text)
                except ValueError:
                    return response.status, text

    async def breaker_state(self, caller: str, target: str) -> str:
        """The state of `caller`'s breaker for `target`, from its `/admin/services`."""
        _, body = await self.admin(caller, "/admin/services")
        return str(body["services"][target]["breaker"])

    async def wait_ready(self, service: str, within: float = READY_WITHIN) -> None:
        """Until `service`'s sidecar answers `/readyz` with 200; MeshError with its log if not."""
        sidecar = self.sidecars[service]
        ends = time.monotonic() + within
        last = "no answer"
        while time.monotonic() < ends:
            for process in (sidecar, self.apps.get(service)):
                if process is not None and process.popen is not None and not process.running:
                    raise MeshError(
                        f"{process.name} exited with {process.popen.returncode}; "
                        f"its log ({process.log}) ends:\n{process.tail()}"
                    )
            try:
                status, body = await self.admin(service, "/readyz")
                if status == 200:
                    return
                last = f"{status} {body}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = type(exc).__name__
            await asyncio.sleep(0.1)
        raise MeshError(
            f"{service} not ready within {within:.0f}s ({last}); "
            f"its sidecar's log ({sidecar.log}) ends:\n{sidecar.tail()}"
        )

    # -- helpers

    def _prefix(self, site: Site) -> list[str]:
        return netns.exec_prefix(site.namespace) if site.namespace is not None else []

    async def _sidecar_cli(self, *args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=child_env(os.environ),
            cwd=ROOT,
        )
        out, _ = await process.communicate()
        text = out.decode(errors="replace").strip()
        if process.returncode != 0:
            raise MeshError(f"sidecar {' '.join(args)} failed ({process.returncode}): {text}")
        return text
