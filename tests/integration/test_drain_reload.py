"""Drain and reload under load, through two real sidecar processes (127.0.0.1 only).

SIGTERM with 200 calls in flight, some streaming either way: every one
completes intact and both processes exit 0. SIGHUP under load with a new
policy and a rotated signing key (b's JWKS holding a's old and new keys while
a switches): no call fails with 401. An invalid config on SIGHUP: the old one
keeps serving. Every load loop is bounded in calls and in time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from deploy.process import SidecarProcess
from sidecar.identity import keys
from tests.integration.resilience_support import wait_until
from tests.support.mesh import Mesh
from tests.support.upstream import Upstream

IN_FLIGHT = 200
CHUNKS = 16  # a streamed answer: 16 chunks of 4 KiB, a few milliseconds apart
UPLOAD = 100 * 1024  # over retry.max_body: the request body streams too
PATIENT = {"timeout": "30s", "retry": {"per_try_timeout": "30s"},
           "bulkhead": {"max_concurrent": 250, "max_pending": 0}}


def chunk(index: int, n: int) -> bytes:
    return f"{index:06d}:{n:02d};".encode() * 410  # 4 KiB, different for every call and chunk


def streamed(index: int) -> bytes:
    return b"".join(chunk(index, n) for n in range(CHUNKS))


def upload(index: int) -> bytes:
    return f"{index:06d}".encode() * (UPLOAD // 6)


class Gated:
    """b's app: holds every answer until the gate opens, then answers by kind.

    `/plain/N` answers JSON, `/stream/N` streams `streamed(N)`, a POST to
    `/upload/N` answers the SHA-256 of the body it received.
    """

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.holding = 0

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        kind, index = request.path.strip("/").split("/")[-2:]
        body = await request.read()
        self.holding += 1
        await self.gate.wait()
        if kind == "stream":
            response = web.StreamResponse()
            await response.prepare(request)
            for n in range(CHUNKS):
                await response.write(chunk(int(index), n))
                await asyncio.sleep(0.005)
            await response.write_eof()
            return response
        if kind == "upload":
            return web.json_response({"sha256": hashlib.sha256(body).hexdigest()})
        return web.json_response({"index": int(index)})


async def draining(process: SidecarProcess) -> bool:
    async with aiohttp.ClientSession() as session:
        async with session.get(process.admin_url + "/readyz") as response:
            return "draining" in (await response.json()).get("reasons", [])


@pytest.mark.timeout(110)
async def test_sigterm_with_200_calls_in_flight_completes_every_one(make_mesh, upstreams):
    mesh = make_mesh(["a", "b"])
    app = Gated()
    app_b = await upstreams(script=app).start()
    b = mesh.sidecar("b", drain_timeout="30s", inbound={"app": app_b.url},
                     defaults={"timeout": "30s"})
    await b.start()
    a = mesh.sidecar("a", drain_timeout="30s",
                     services={"b": {"endpoints": [b.inbound_url], **PATIENT}})
    await a.start()

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def one(index: int) -> bool:
            kind = ("plain", "stream", "upload")[index % 3]
            url = f"{a.outbound_url}/b/{kind}/{index}"
            if kind == "upload":
                async with session.post(url, data=upload(index)) as response:
                    doc = await response.json()
                    expected = hashlib.sha256(upload(index)).hexdigest()
                    return response.status == 200 and doc["sha256"] == expected
            async with session.get(url) as response:
                body = await response.read()
                if kind == "stream":
                    return response.status == 200 and body == streamed(index)
                return response.status == 200 and json.loads(body) == {"index": index}

        calls = [asyncio.ensure_future(one(i)) for i in range(IN_FLIGHT)]
        try:
            await until(lambda: app.holding == IN_FLIGHT, "every call held at b's app")
        except AssertionError:
            # Say what happened to the calls that are missing at the app.
            ended = [repr(c.exception() or c.result()) for c in calls if c.done()]
            raise AssertionError(f"{app.holding} of {IN_FLIGHT} calls held at b's app; "
                                 f"ended early: {Counter(ended)}; a: {a.logs(chars=3000)}; "
                                 f"b: {b.logs(chars=3000)}") from None
        b.signal(signal.SIGTERM)
        a.signal(signal.SIGTERM)
        await wait_until(lambda: draining(b), "b draining")
        await wait_until(lambda: draining(a), "a draining")
        assert app.holding == IN_FLIGHT  # nothing timed out or was sent again meanwhile
        app.gate.set()
        intact = await asyncio.wait_for(asyncio.gather(*calls), timeout=60)
    # The app has gone (its connections closed): a finishes its drain too.
    assert Counter(intact) == Counter({True: IN_FLIGHT})
    assert await b.wait_exit(30) == 0
    assert await a.wait_exit(30) == 0
    records = [json.loads(line) for line in b.audit_path.read_text().splitlines()]
    assert Counter(r["status"] for r in records) == Counter({200: IN_FLIGHT})


async def until(check: Callable[[], bool], what: str, within: float = 40.0) -> None:
    """Polls `check` for up to `within` seconds (two shared cores may be busy)."""
    ends = time.monotonic() + within
    while not check():
        assert time.monotonic() < ends, f"still waiting for {what}"
        await asyncio.sleep(0.05)


class Load:
    """A bounded load through a's outbound port: `workers` loops, at most `limit` calls
    and `within` seconds in all, until `stop()`. Counts answers by status and reason."""

    def __init__(self, url: str, *, workers: int = 6, limit: int = 3000,
                 within: float = 40.0) -> None:
        self.url = url
        self.workers = workers
        self.limit = limit
        self.ends = time.monotonic() + within
        self.seen: Counter[tuple[int, str]] = Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def calls(self) -> int:
        return sum(self.seen.values())

    def start(self, session: aiohttp.ClientSession) -> Load:
        self._tasks = [asyncio.ensure_future(self._loop(session, n)) for n in range(self.workers)]
        return self

    async def _loop(self, session: aiohttp.ClientSession, worker: int) -> None:
        while not self._stop.is_set() and self.calls < self.limit and time.monotonic() < self.ends:
            async with session.get(f"{self.url}/{worker}-{self.calls}") as response:
                await response.read()
                self.seen[(response.status, response.headers.get("x-sidecar-reason", ""))] += 1

    async def until(self, more: int) -> None:
        """Until `more` calls beyond the present count have been answered."""
        target = self.calls + more
        await until(lambda: self.calls >= target or self._done(), f"{more} calls")
        assert self.calls >= target, "the load stopped early"

    def _done(self) -> bool:
        return all(task.done() for task in self._tasks)

    async def stop(self) -> Counter[tuple[int, str]]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.seen


POLICY = [{"from": ["a"], "methods": ["GET"], "paths": ["/claims/*"]}]
WIDER = [{"from": ["a"], "methods": ["GET"], "paths": ["/claims/*", "/notes/*"]}]


async def policed_pair(make_mesh: Callable[..., Mesh], upstreams: Callable[..., Upstream]
                       ) -> tuple[Mesh, SidecarProcess, SidecarProcess]:
    """a calling b, whose policy lets a GET /claims/*; b's app echoes."""
    mesh = make_mesh(["a", "b"])
    app_b = await upstreams().start()
    b = await mesh.sidecar("b", inbound={"app": app_b.url, "policy": POLICY}).start()
    a = await mesh.sidecar("a", services={"b": {"endpoints": [b.inbound_url]}}).start()
    return mesh, a, b


def rotated_key(workdir: Path) -> tuple[Path, dict[str, Any]]:
    """A new key pair for a, in a folder of its own: (private key, public JWK)."""
    pem, jwks = keys.generate(service="a", out_dir=workdir / "rotated", algorithm="EdDSA")
    return Path(pem), json.loads(Path(jwks).read_text())["keys"][0]


async def status_of(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as response:
        await response.read()
        return response.status


def verdicts(process: SidecarProcess) -> int:
    """SIGHUPs the sidecar has dealt with so far: reloads and refusals."""
    logs = process.logs(chars=10**7)
    return logs.count('"msg":"config reloaded"') + logs.count("config reload refused")


def refused(process: SidecarProcess) -> bool:
    return "config reload refused" in process.logs(chars=10**7)


@pytest.mark.timeout(90)
async def test_sighup_under_load_with_a_new_policy_and_a_rotated_key_fails_no_call(
        make_mesh, upstreams):
    mesh, a, b = await policed_pair(make_mesh, upstreams)
    jwks = mesh.keyring.jwks_path
    old = json.loads(jwks.read_text())["keys"]
    new_pem, new_jwk = rotated_key(mesh.workdir)
    b_jwks = mesh.workdir / "b-jwks.json"  # b's view of the mesh, rotated step by step
    b_jwks.write_text(json.dumps({"keys": old}))
    b.config["identity"] = {**b.config["identity"], "jwks_file": str(b_jwks)}
    b.write_config()
    b.signal(signal.SIGHUP)
    await until(lambda: verdicts(b) >= 1, "b reloaded")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        load = Load(a.outbound_url + "/b/claims").start(session)
        await load.until(100)
        assert await status_of(session, a.outbound_url + "/b/notes/1") == 403
        # 1. A new policy.
        b.config["inbound"]["policy"] = WIDER
        b.write_config()
        b.signal(signal.SIGHUP)
        await until(lambda: verdicts(b) >= 2, "b's second reload")
        await load.until(100)
        assert await status_of(session, a.outbound_url + "/b/notes/1") == 200
        # 2. Rotation: b trusts a's old and new keys, a signs with the new one,
        # then b forgets the old one.
        b_jwks.write_text(json.dumps({"keys": [*old, new_jwk]}))
        b.signal(signal.SIGHUP)
        # (Each wait is for the verdict, not for success: a refusal shows in the end.)
        await until(lambda: verdicts(b) >= 3, "b trusting both of a's keys")
        await load.until(100)
        a.config["identity"] = {**a.config["identity"], "private_key_file": str(new_pem)}
        a.write_config()
        a.signal(signal.SIGHUP)
        await until(lambda: verdicts(a) >= 1, "a signing with its new key")
        await load.until(200)
        b_jwks.write_text(json.dumps({"keys": [k for k in old if k["kid"] != "a"] + [new_jwk]}))
        b.signal(signal.SIGHUP)
        await until(lambda: verdicts(b) >= 4, "b trusting only a's new key")
        await load.until(200)
        seen = await load.stop()
    assert seen == Counter({(200, ""): seen[(200, "")]}), seen  # no 401, nor anything else
    assert not refused(a) and not refused(b)


@pytest.mark.timeout(60)
async def test_sighup_with_an_invalid_config_under_load_keeps_the_old_one(make_mesh, upstreams):
    mesh, a, b = await policed_pair(make_mesh, upstreams)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        load = Load(a.outbound_url + "/b/claims").start(session)
        await load.until(100)
        valid = b.config_path.read_text()
        # A typo that would also have opened /notes, then keys that do not load.
        b.config_path.write_text(valid.replace("policy:", "polcy:").replace("/claims/*",
                                                                           "/notes/*"))
        b.signal(signal.SIGHUP)
        await until(lambda: "inbound.polcy" in b.logs(chars=10**7), "the refused reload logged")
        await load.until(100)
        b.config_path.write_text(valid.replace(str(mesh.keyring.jwks_path),
                                                str(mesh.workdir / "missing.json")))
        b.signal(signal.SIGHUP)
        await until(lambda: b.logs(chars=10**7).count("config reload refused") >= 2,
                    "the second refused reload logged")
        await load.until(100)
        assert await status_of(session, a.outbound_url + "/b/notes/1") == 403
        seen = await load.stop()
    assert seen == Counter({(200, ""): seen[(200, "")]}), seen
    assert '"msg":"config reloaded"' not in b.logs(chars=10**7)
