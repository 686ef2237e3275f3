"""`make soak`: bounded load through two sidecars while faults come and go; prints what held.

    load (the app of A) --> sidecar A --> fault proxies P1, P2 --> sidecar B --> app B

Everything is on 127.0.0.1. For `SOAK_MINUTES` (default 10) a fixed number of
workers send GETs and POSTs (each POST with its own `Idempotency-Key`) at a
bounded rate; each minute runs the same schedule of faults:

    0-10 s   none            a SIGHUP to both sidecars at the start of every minute after the first
    10-20 s  latency         P1 holds every chunk 300 ms (under per_try_timeout: slow, not failed)
    20-30 s  resets          P2 resets every new connection before any answer
    30-35 s  503 burst       app B answers 503 to everything
    35-45 s  none
    45-48 s  app B restarts  stopped (in-flight calls finish first), then started on the same port
    48-60 s  none

Both proxies close idle keep-alive connections after 1 s throughout (an
upstream dropping idle connections), so new connections, and with them the
faults, keep coming. At the end it prints requests, answers by status and
reason, POSTs lost (the app took one whose caller heard no 2xx, or a call got
no answer at all) and duplicated (the app took one key twice), retry
amplification, and RSS and open file descriptors of each sidecar at start,
middle and end. Exit 1 if anything was lost or duplicated.

It is a script, not a test: it asserts nothing else and its figures go in the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from deploy.process import SidecarProcess, free_port
from tests.support.faults import FaultProxy
from tests.support.mesh import Mesh

MINUTE = 60.0
WORKERS = 12
PAUSE = 0.01  # seconds each worker rests between calls: bounds the rate on two shared cores
MAX_RATE = 400  # calls per second of soak, at most, whatever the machine
CALL_TIMEOUT = 15.0  # seconds the load waits for one answer (the sidecar's own is 10 s)
POST_SHARE = 0.3
LATENCY = 0.3
SCHEDULE = (  # (second of the minute, what starts)
    (10, "latency"), (20, "resets"), (30, "burst"), (35, "calm"), (45, "restart"), (48, "calm"),
)
RESILIENCE = {  # short enough that each minute sees breakers and ejections come and go
    "circuit_breaker": {"failure_threshold": 5, "recovery_timeout": "3s"},
    "outlier_detection": {"consecutive_failures": 5, "base_ejection": "2s",
                          "max_ejection": "10s"},
}


@dataclass
class App:
    """App B: GET answers a small JSON; POST takes an order by its Idempotency-Key.

    `received` counts every POST that arrived, `accepted` those it answered 2xx.
    """

    port: int
    burst: bool = False
    received: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)
    gets: int = 0
    _runner: web.AppRunner | None = None

    async def _get(self, request: web.Request) -> web.Response:
        self.gets += 1
        if self.burst:
            return web.json_response({"busy": True}, status=503)
        return web.json_response({"item": request.match_info["n"]})

    async def _post(self, request: web.Request) -> web.Response:
        await request.read()
        key = request.headers.get("Idempotency-Key", "")
        self.received[key] += 1
        if self.burst:
            return web.json_response({"busy": True}, status=503)
        self.accepted[key] += 1
        return web.json_response({"order": key}, status=201)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/items/{n}", self._get)
        app.router.add_post("/orders", self._post)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()  # in-flight requests finish first
            self._runner = None


@dataclass
class Load:
    """What the load saw: each call's answer, and the POST keys answered 2xx."""

    answers: Counter[str] = field(default_factory=Counter)
    posts_ok: set[str] = field(default_factory=set)
    posts_failed: set[str] = field(default_factory=set)
    no_answer: int = 0
    calls: int = 0

    async def run(self, url: str, *, ends: float, limit: int) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                         trust_env=False) as session:
            await asyncio.gather(*(self._worker(session, url, ends, limit, n)
                                   for n in range(WORKERS)))

    async def _worker(self, session: aiohttp.ClientSession, url: str, ends: float,
                      limit: int, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < ends and self.calls < limit:
            self.calls += 1
            post = rng.random() < POST_SHARE
            key = str(uuid.UUID(int=rng.getrandbits(128))) if post else ""
            try:
                if post:
                    request = session.post(f"{url}/orders", json={"lines": 3},
                                           headers={"Idempotency-Key": key})
                else:
                    request = session.get(f"{url}/items/{rng.randrange(1000)}")
                async with request as response:
                    await response.read()
                    reason = response.headers.get("x-sidecar-reason") or "app"
                    self.answers[f"{response.status} {reason}"] += 1
                    if post:
                        ok = 200 <= response.status < 300
                        (self.posts_ok if ok else self.posts_failed).add(key)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.no_answer += 1
                self.answers[f"no answer ({type(exc).__name__})"] += 1
                if post:
                    self.posts_failed.add(key)
            await asyncio.sleep(PAUSE)


def usage(process: SidecarProcess) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of a sidecar process, from /proc."""
    assert process.proc is not None
    pid = process.proc.pid
    rss_kib = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kib = int(line.split()[1])
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def metric(process: SidecarProcess, name: str) -> float:
    """The sum of every sample of `name` in a sidecar's /metrics."""
    async with aiohttp.ClientSession(trust_env=False) as session:
        async with session.get(process.admin_url + "/metrics") as response:
            text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def faults(app: App, p1: FaultProxy, p2: FaultProxy, sidecars: list[SidecarProcess], *,
                 started: float, minutes: float, log: list[str]) -> None:
    """Runs the schedule of every minute until the soak ends."""
    ends = started + minutes * MINUTE
    for minute in itertools.count():
        base = started + minute * MINUTE
        if base >= ends:
            return
        if minute:
            for process in sidecars:
                process.signal(signal.SIGHUP)
            log.append(f"{minute:>2}:00 SIGHUP to both sidecars")
        for second, what in SCHEDULE:
            wait = min(base + second, ends) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if time.monotonic() >= ends:
                return
            await apply(what, app, p1, p2)
            log.append(f"{minute:>2}:{second:02d} {what}")


async def apply(what: str, app: App, p1: FaultProxy, p2: FaultProxy) -> None:
    p1.mode = "latency" if what == "latency" else "close_idle"
    p2.mode = "reset_before_response" if what == "resets" else "close_idle"
    app.burst = what == "burst"
    if what == "restart":
        await app.stop()
        await asyncio.sleep(3.0)
        await app.start()


async def soak(minutes: float) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-soak-"))
    mesh = Mesh(workdir, ["a", "b"])  # the integration tests' mesh: keys, 5 s drains
    sidecars = mesh.sidecars
    app = App(port=free_port())
    await app.start()
    proxies: list[FaultProxy] = []
    try:
        b = await mesh.sidecar("b", inbound={"app": f"http://127.0.0.1:{app.port}"}).start()
        for _ in range(2):
            proxy = await FaultProxy(b.inbound).start()
            proxy.mode, proxy.latency, proxy.idle_close = "close_idle", LATENCY, 1.0
            proxies.append(proxy)
        a = await mesh.sidecar("a", services={"b": {"endpoints": [p.url for p in proxies],
                                                    **RESILIENCE}}).start()
        print(f"soak: {minutes:g} min, {WORKERS} workers, faults every minute; files in {workdir}",
              flush=True)
        load = Load()
        started = time.monotonic()
        ends = started + minutes * MINUTE
        schedule: list[str] = []
        load_task = asyncio.ensure_future(
            load.run(a.outbound_url + "/b", ends=ends, limit=int(MAX_RATE * minutes * MINUTE)))
        fault_task = asyncio.ensure_future(
            faults(app, *proxies, sidecars, started=started, minutes=minutes, log=schedule))
        samples: dict[str, dict[str, tuple[float, int]]] = {}
        for label, at in (("start", 5.0), ("middle", minutes * MINUTE / 2),
                          ("end", minutes * MINUTE - 2.0)):
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            samples[label] = {p.name: usage(p) for p in sidecars}
        await asyncio.gather(load_task, fault_task)
        await apply("calm", app, *proxies)
        retries = await metric(a, "sidecar_retries_total")
        requests = await metric(a, "sidecar_requests_total")
        ejections = await metric(a, "sidecar_outlier_ejections_total")
        opened = a.logs(chars=10**8).count('"state":"open"')
        reloads = sum(p.logs(chars=10**8).count('"msg":"config reloaded"') for p in sidecars)
    finally:
        await mesh.stop()
        for proxy in proxies:
            await proxy.stop()
        await app.stop()
    return report(load, app, samples, retries=retries, requests=requests, ejections=ejections,
                  opened=opened, reloads=reloads, schedule=schedule, minutes=minutes)


def report(load: Load, app: App, samples: dict[str, dict[str, tuple[float, int]]], *,
           retries: float, requests: float, ejections: float, opened: int, reloads: int,
           schedule: list[str], minutes: float) -> int:
    accepted = set(app.accepted)
    duplicated = sorted(key for key, n in app.accepted.items() if n > 1)
    # Taken by the app, yet its caller heard no 2xx: work the caller will do again.
    unheard = accepted & load.posts_failed
    lost = len(unheard) + load.no_answer
    posts = len(load.posts_ok) + len(load.posts_failed)
    print(f"\nschedule: {'; '.join(schedule)}")
    print(f"\nrequests: {load.calls} in {minutes:g} min ({load.calls / (minutes * MINUTE):.0f}/s), "
          f"{posts} of them POSTs")
    print("answers by status and reason (`app`: the app's own answer):")
    for answer, count in sorted(load.answers.items(), key=lambda item: -item[1]):
        print(f"  {answer:<40} {count:>8}")
    print(f"lost: {lost} (no answer: {load.no_answer}; POSTs the app took whose caller "
          f"heard no 2xx: {len(unheard)})")
    print(f"duplicated POSTs at the app (one Idempotency-Key taken twice): {len(duplicated)}")
    sent_again = sum(n - 1 for n in app.received.values() if n > 1)
    print(f"POSTs that reached the app more than once: {sent_again} (each after the app "
          "answered 503 to the one before)" if sent_again else
          "POSTs that reached the app more than once: 0")
    print(f"retry amplification: {retries:.0f} retries for {requests:.0f} calls at sidecar A "
          f"({(requests + retries) / max(requests, 1):.3f} attempts a call)")
    print(f"endpoint ejections: {ejections:.0f}; breaker openings: {opened}; reloads: {reloads}")
    print("sidecar          RSS MiB (start / middle / end)      open fds (start / middle / end)")
    for name in samples["start"]:
        rss = " / ".join(f"{samples[label][name][0]:6.1f}" for label in samples)
        fds = " / ".join(f"{samples[label][name][1]:4d}" for label in samples)
        print(f"  {name:<14} {rss:<34} {fds}")
    return 1 if lost or duplicated else 0


def main() -> int:
    minutes = float(os.environ.get("SOAK_MINUTES", "10"))
    if not 0 < minutes <= 60:
        raise SystemExit("SOAK_MINUTES must be more than 0 and at most 60")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(soak(minutes))
    return 130


if __name__ == "__main__":
    raise SystemExit(main())
