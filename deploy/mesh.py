"""The example mesh as running processes: keys, configs, apps and sidecars.

`make demo` and `tests/topology` both run it. Each service runs at a `Site`:

- in a network namespace of its own (`deploy.netns`), exactly as in Compose:
  app on 127.0.0.1:8000, sidecar on 15001/15006/15000, peers reached as
  `http://<name>:15006` and traces sent to `http://jaeger:4318`;
- or on the host's loopback, where each service needs a port set of its own:
  the sidecar's listen addresses, its app address and its endpoints are
  rewritten to 127.0.0.1:<port>.

The configs are `deploy/config/<service>.yaml` with only what this machine
needs rewritten: key, JWKS and certificate paths, the audit path, the
workflow store's file, the tracing endpoint when one is given, the breaker,
redelivery and shipping pace when asked (a demo cannot wait 10 s), and, on
loopback, the addresses. Keys come from `sidecar keygen` and `sidecar jwks`,
the CA and certificates from `sidecar certs`, as a user makes them. The
processes are `deploy.process`'s, the harness the
tests and the bench use too.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from deploy import netns
from deploy.process import (
    READY_WITHIN,
    REQUEST_TIMEOUT,
    ROOT,
    CertRing,
    KeyRing,
    Process,
    ProcessError,
    SidecarProcess,
    child_env,
    free_ports,
    loopback_listen,
    loopback_session,
    loopback_url,
)
from deploy.topology import APPS, SERVICES

CONFIG_DIR = ROOT / "deploy" / "config"
TRUST_DOMAIN = "intelluxe.local"  # the shipped configs' `trust_domain`
COMPOSE_PORTS = {"app": 8000, "outbound": 15001, "inbound": 15006, "admin": 15000}


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
        return loopback_url(self.outbound_port)

    @property
    def admin_url(self) -> str:
        return loopback_url(self.admin_port)

    @property
    def app_url(self) -> str:
        """The app, as seen from inside its own network."""
        return loopback_url(self.app_port)

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


# ---- configs


def adapt_config(
    doc: Mapping[str, Any],
    *,
    site: Site,
    sites: Mapping[str, Site],
    private_key: Path,
    jwks: Path,
    audit: Path,
    store: Path | None = None,
    certs: CertRing | None = None,
    tracing_endpoint: str | None = None,
    breaker: Mapping[str, Any] | None = None,
    redelivery: Mapping[str, Any] | None = None,
    ship_interval: str | None = None,
) -> dict[str, Any]:
    """A Compose config made runnable here; everything not named above stays as shipped."""
    out = copy.deepcopy(dict(doc))
    out["identity"] = {
        **out["identity"],
        "private_key_file": str(private_key),
        "jwks_file": str(jwks),
    }
    if certs is not None and "tls" in out:
        out["tls"] = {**out["tls"], **certs.tls(site.service, out["tls"]["mode"])}
    out["audit"] = {**(out.get("audit") or {}), "path": str(audit)}
    if ship_interval is not None and out["audit"].get("ship"):
        out["audit"]["ship"] = {**out["audit"]["ship"], "interval": ship_interval}
    if out.get("workflows") is not None:
        workflows = out["workflows"] = dict(out["workflows"])
        if store is not None:
            workflows["store"] = f"sqlite://{store}"
        if redelivery:
            workflows["redelivery"] = {**(workflows.get("redelivery") or {}), **redelivery}
    if tracing_endpoint is not None:
        out["tracing"] = {**(out.get("tracing") or {}), "endpoint": tracing_endpoint}
    if breaker:
        defaults = out.setdefault("defaults", {})
        defaults["circuit_breaker"] = {**(defaults.get("circuit_breaker") or {}), **breaker}
    if site.namespace is None:
        # Everyone shares the host's loopback here, so each needs its own ports.
        out["listen"] = loopback_listen(
            outbound=site.outbound_port, inbound=site.inbound_port, admin=site.admin_port
        )
        out["inbound"] = {**out["inbound"], "app": site.app_url}
        for name, service in (out.get("services") or {}).items():
            service["endpoints"] = [sites[name].inbound_url]
    return out


@dataclass
class LocalMesh:
    """Keys, configs and processes for every service of `placement`, under `workdir`."""

    placement: Placement
    workdir: Path
    tracing_endpoint: str | None = None
    breaker: Mapping[str, Any] | None = None
    redelivery: Mapping[str, Any] | None = None
    ship_interval: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # extra variables for every process
    config_dir: Path = CONFIG_DIR
    apps: dict[str, Process] = field(default_factory=dict)
    sidecars: dict[str, SidecarProcess] = field(default_factory=dict)  # made by `prepare`

    @property
    def sites(self) -> dict[str, Site]:
        return self.placement.sites

    @property
    def keyring(self) -> KeyRing:
        """Where `prepare` puts the keys (with the CLI, as a user makes them)."""
        return KeyRing(self.workdir)

    @property
    def certs(self) -> CertRing:
        """Where `prepare` puts the CA and the certificates (with the CLI too)."""
        return CertRing(self.workdir, trust_domain=TRUST_DOMAIN)

    @property
    def logs_dir(self) -> Path:
        return self.workdir / "logs"

    def config_path(self, service: str) -> Path:
        return self.workdir / "config" / f"{service}.yaml"

    def audit_path(self, service: str) -> Path:
        return self.workdir / "audit" / f"{service}.jsonl"

    def store_path(self, service: str) -> Path:
        return self.workdir / "workflows" / f"{service}.db"

    # -- set-up

    async def prepare(self) -> None:
        """Key pairs with `sidecar keygen`, one JWKS with `sidecar jwks`, and the configs."""
        keyring = self.keyring
        for directory in (keyring.keys_dir, self.logs_dir, self.workdir / "config"):
            directory.mkdir(parents=True, exist_ok=True)
        await asyncio.gather(
            *(
                self._sidecar_cli("keygen", "--service", service, "--out", str(keyring.keys_dir))
                for service in self.sites
            )
        )
        await self._sidecar_cli("jwks", "-o", str(keyring.jwks_path), str(keyring.keys_dir))
        ring = self.certs
        await self._sidecar_cli("certs", "ca", "--out", str(ring.ca_dir))
        await asyncio.gather(
            *(
                self._sidecar_cli("certs", "issue", "--ca", str(ring.ca_dir), "--service", service,
                                  "--trust-domain", ring.trust_domain, "--out",
                                  str(ring.certs_dir))
                for service in self.sites
            )
        )
        ring.trust(ring.ca_dir)
        for service, site in self.sites.items():
            shipped = yaml.safe_load((self.config_dir / f"{service}.yaml").read_text())
            doc = adapt_config(
                shipped,
                site=site,
                sites=self.sites,
                private_key=keyring.private_key(service),
                jwks=keyring.jwks_path,
                audit=self.audit_path(service),
                store=self.store_path(service),
                certs=ring,
                tracing_endpoint=self.tracing_endpoint,
                breaker=self.breaker,
                redelivery=self.redelivery,
                ship_interval=self.ship_interval,
            )
            self.sidecars[service] = self._sidecar(service, doc)
            self.sidecars[service].write_config()

    async def start(self, within: float = READY_WITHIN) -> None:
        """Every app and sidecar, then wait until each sidecar says it is ready."""
        for service in self.sites:
            if service in APPS:
                self.start_app(service)
        await asyncio.gather(
            *(
                sidecar.start(within, watch=self._app_of(service))
                for service, sidecar in self.sidecars.items()
            )
        )

    async def start_sidecar(self, service: str, within: float = READY_WITHIN) -> None:
        """`service`'s sidecar again (after `stop` or a kill), until it is ready."""
        await self.sidecars[service].start(within, watch=self._app_of(service))

    def start_app(self, service: str) -> Process:
        site = self.sites[service]
        process = Process(
            f"{service} app",
            [*self._prefix(site), sys.executable, "-m", APPS[service]],
            stdout_path=self.logs_dir / f"{service}.app.log",
            env={
                **self.env,
                "APP_HOST": "127.0.0.1",
                "APP_PORT": str(site.app_port),
                "SIDECAR_OUTBOUND": site.outbound_url,
            },
        )
        process.spawn()
        self.apps[service] = process
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
        if namespace is None:
            return loopback_session()
        return aiohttp.ClientSession(
            connector=netns.connector_in(namespace), timeout=REQUEST_TIMEOUT, trust_env=False
        )

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
        """Until `service`'s sidecar answers `/readyz` with 200; ProcessError if not."""
        await self.sidecars[service].wait_ready(within, watch=self._app_of(service))

    # -- helpers

    def _sidecar(self, service: str, config: dict[str, Any]) -> SidecarProcess:
        site = self.sites[service]
        return SidecarProcess(
            f"{service} sidecar",
            config,
            config_path=self.config_path(service),
            audit_path=self.audit_path(service),
            stdout_path=self.logs_dir / f"{service}.sidecar.log",
            ports=(site.outbound_port, site.inbound_port, site.admin_port),
            prefix=self._prefix(site),
            env=self.env,
            ready_path="/readyz",  # the app is up too
            session=lambda: self.session(service),
        )

    def _app_of(self, service: str) -> list[Process]:
        """The app process beside `service`'s sidecar, if it has one."""
        return [self.apps[service]] if service in self.apps else []

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
            raise ProcessError(f"sidecar {' '.join(args)} failed ({process.returncode}): {text}")
        return text
