"""The processes under test: one upstream, an OTLP sink, and each contender in front of it.

Every contender forwards to the same upstream. The upstream, the sink and
every proxy run on one core (`SYSTEM_CORE`), the load generator on the other
(`LOAD_CORE`), each started through `taskset`. Everything listens on
127.0.0.1 only.

| key | what |
|---|---|
| direct | wrk straight to the upstream |
| nginx | nginx as a reverse proxy, keep-alive to the upstream |
| bare | `bench/bare_proxy.py`, the 40-line aiohttp proxy |
| hop | one sidecar, outbound to a `mesh: false` service, tracing 0.01 |
| hop-t1 | the same with tracing 1.0 |
| mesh | sidecar A -> sidecar B -> upstream: token, policy, audit both sides; tracing 0.01 |
| mesh-t1 | the same with tracing 1.0 |

Audit is on for every sidecar and every sidecar exports its sampled spans
to the sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import nginx, procstat
from bench.upstream import BODY
from deploy.process import (
    KeyRing,
    Process,
    ProcessError,
    SidecarProcess,
    free_ports,
    loopback_session,
    loopback_url,
)

PATH = "/claims/1"  # what every request asks for
READY_WITHIN = 30.0  # seconds a bench process gets to answer
ALL = ("direct", "nginx", "bare", "hop", "hop-t1", "mesh", "mesh-t1")
LABELS = {
    "direct": "direct (no proxy)",
    "nginx": "nginx reverse proxy",
    "bare": "bare aiohttp proxy",
    "hop": "sidecar, one hop (tracing 0.01)",
    "hop-t1": "sidecar, one hop (tracing 1.0)",
    "mesh": "mesh A -> B (tracing 0.01)",
    "mesh-t1": "mesh A -> B (tracing 1.0)",
}


def cores() -> tuple[int, int] | None:
    """(system core, load core): the first two CPUs this process may use; None with one."""
    allowed = sorted(os.sched_getaffinity(0))
    return (allowed[0], allowed[1]) if len(allowed) >= 2 else None


@dataclass
class Contender:
    """A way to reach the upstream: its URL and the proxy processes whose cost counts."""

    key: str
    url: str
    processes: dict[str, Process] = field(default_factory=dict)  # role -> process

    @property
    def label(self) -> str:
        return LABELS[self.key]

    def pids(self) -> dict[str, list[int]]:
        """Per role, the process and its children (nginx's worker under its master)."""
        found = {}
        for role, process in self.processes.items():
            assert process.proc is not None
            pid = process.proc.pid
            found[role] = [pid, *procstat.children(pid)]
        return found

    def cpu_seconds(self) -> dict[str, float]:
        return {role: sum(procstat.cpu_seconds(pid) for pid in pids)
                for role, pids in self.pids().items()}

    def memory_mib(self) -> dict[str, dict[str, float]]:
        """Per role, VmRSS and VmHWM summed over its processes (nginx: master and worker)."""
        found = {}
        for role, pids in self.pids().items():
            readings = [procstat.memory_mib(pid) for pid in pids]
            found[role] = {key: sum(reading.get(key, 0.0) for reading in readings)
                           for key in ("VmRSS", "VmHWM")}
        return found


class Rig:
    """Starts the upstream, the sink and the chosen contenders; stops them all."""

    def __init__(self, workdir: Path, *, nginx_bin: str, upstream: str = "nginx",
                 pin: bool = True) -> None:
        self.workdir = workdir
        self.nginx_bin = nginx_bin
        self.upstream_kind = upstream
        pair = cores() if pin else None
        self.system_pin: list[str] = ["taskset", "-c", str(pair[0])] if pair else []
        self.load_pin: list[str] = ["taskset", "-c", str(pair[1])] if pair else []
        self.system_core = pair[0] if pair else None
        self.load_core = pair[1] if pair else None
        self.processes: list[Process] = []
        self.keyring = KeyRing(workdir).generate(["hop", "a", "b"])
        self.upstream_url = ""
        self.sink_url = ""
        self.sink: Process | None = None

    # ---- the processes

    def _python(self, name: str, module: str, *args: str) -> Process:
        argv = [*self.system_pin, sys.executable, "-m", module, *args]
        process = Process(name, argv, stdout_path=self.workdir / f"{name}.out")
        self.processes.append(process)
        return process

    def _sidecar(self, name: str, config: dict[str, Any]) -> SidecarProcess:
        doc = {"drain_timeout": "2s", **config}
        process = SidecarProcess(
            name, doc,
            config_path=self.workdir / f"{name}.yaml",
            audit_path=self.workdir / f"{name}-audit.jsonl",
            stdout_path=self.workdir / f"{name}.out",
            stderr_path=self.workdir / f"{name}.err",
            prefix=self.system_pin,
        )
        self.processes.append(process)
        return process

    def _tracing(self, ratio: float) -> dict[str, Any]:
        return {"exporter": "otlp", "endpoint": self.sink_url, "sample_ratio": ratio}

    async def start_base(self) -> None:
        """The upstream and the sink."""
        up_port, sink_port = free_ports(2)
        if self.upstream_kind == "nginx":
            upstream = nginx.upstream(self.workdir, port=up_port, nginx=self.nginx_bin,
                                      prefix=self.system_pin)
            self.processes.append(upstream)
        else:
            upstream = self._python("app-upstream", "bench.upstream", "--port", str(up_port))
        self.upstream_url = loopback_url(up_port)
        self.sink = self._python("otlp-sink", "bench.sink", "--port", str(sink_port))
        self.sink_url = loopback_url(sink_port)
        upstream.spawn()
        self.sink.spawn()
        await wait_http(self.upstream_url + PATH, upstream)
        await wait_http(self.sink_url + "/stats", self.sink)

    async def contender(self, key: str) -> Contender:
        """`key`'s processes started and ready, and one request through it checked."""
        if key == "direct":
            found = Contender(key, self.upstream_url + PATH)
        elif key == "nginx":
            port = free_ports(1)[0]
            process = nginx.proxy(self.workdir, port=port, nginx=self.nginx_bin,
                                  target=self.upstream_url.removeprefix("http://"),
                                  prefix=self.system_pin)
            self.processes.append(process)
            process.spawn()
            found = Contender(key, loopback_url(port) + PATH, {"nginx": process})
            await wait_http(found.url, process)
        elif key == "bare":
            port = free_ports(1)[0]
            process = self._python("bare-proxy", "bench.bare_proxy", "--port", str(port),
                                   "--upstream", self.upstream_url)
            process.spawn()
            found = Contender(key, loopback_url(port) + PATH, {"bare": process})
            await wait_http(found.url, process)
        elif key in ("hop", "hop-t1"):
            ratio = 1.0 if key == "hop-t1" else 0.01
            hop = self._sidecar(key, {
                "service": "hop", "identity": self.keyring.identity("hop"),
                "services": {"up": {"endpoints": [self.upstream_url], "mesh": False}},
                "tracing": self._tracing(ratio),
            })
            await hop.start(READY_WITHIN)
            found = Contender(key, hop.outbound_url + "/up" + PATH, {"sidecar": hop})
        elif key in ("mesh", "mesh-t1"):
            ratio = 1.0 if key == "mesh-t1" else 0.01
            b = self._sidecar(f"{key}-b", {
                "service": "b", "identity": self.keyring.identity("b"),
                "inbound": {"app": self.upstream_url, "policy": [
                    {"from": ["a"], "methods": ["GET"], "paths": ["/claims/*"]}]},
                "tracing": self._tracing(ratio),
            })
            await b.start(READY_WITHIN)
            a = self._sidecar(f"{key}-a", {
                "service": "a", "identity": self.keyring.identity("a"),
                "services": {"b": {"endpoints": [b.inbound_url]}},
                "tracing": self._tracing(ratio),
            })
            await a.start(READY_WITHIN)
            found = Contender(key, a.outbound_url + "/b" + PATH, {"A": a, "B": b})
        else:
            raise ValueError(f"unknown contender {key!r}; one of {', '.join(ALL)}")
        await check(found.url)
        return found

    async def sink_stats(self) -> dict[str, int]:
        async with loopback_session() as session, session.get(self.sink_url + "/stats") as answer:
            stats: dict[str, int] = await answer.json()
            return stats

    def others_on_system_core(self) -> dict[str, float] | None:
        """Core time so far: busy, stolen, and used by the bench's own processes (seconds).

        The difference of two readings, busy less ours, is what other work on
        the machine took from the contenders' core meanwhile.
        """
        if self.system_core is None:
            return None
        ours = 0.0
        for process in self.processes:
            if process.running and process.proc is not None:
                for pid in (process.proc.pid, *procstat.children(process.proc.pid)):
                    with contextlib.suppress(OSError, ValueError):
                        ours += procstat.cpu_seconds(pid)
        return {**procstat.core_seconds(self.system_core), "ours": ours}

    async def stop(self) -> None:
        for process in reversed(self.processes):
            await process.stop(5.0)


async def wait_http(url: str, process: Process, within: float = READY_WITHIN) -> None:
    """Until `url` answers 200; ProcessError if `process` exits first or time runs out."""
    ends = time.monotonic() + within
    async with loopback_session() as session:
        while time.monotonic() < ends:
            process.check()
            try:
                async with session.get(url) as answer:
                    if answer.status == 200:
                        return
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass
            await asyncio.sleep(0.05)
    raise ProcessError(f"{process.name} not answering {url} within {within:.0f}s; "
                       f"{process.logs()}")


async def check(url: str) -> None:
    """One GET through `url`: 200 and the upstream's body, or RuntimeError."""
    async with loopback_session() as session, session.get(url) as answer:
        body = await answer.read()
        if answer.status != 200 or body != BODY:
            raise RuntimeError(f"{url} answered {answer.status} with {body[:300]!r}")

