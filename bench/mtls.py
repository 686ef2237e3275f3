"""`make bench`, part three: one call through two sidecars against the app alone,
in plain text and in strict mutual TLS, and the CPU of one handshake.

Bounded: a fixed number of requests at a fixed concurrency, on loopback only.
Prints a small table; it asserts nothing (speed is measured here, never in tests).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench import upstream
from bench.drive import cpu_seconds, get, load, report, report_peak_rss
from deploy.process import CertRing, KeyRing, SidecarProcess
from sidecar.config.settings import TLS
from sidecar.tls.contexts import client_context, server_context


async def handshake_cpu(ring: CertRing, count: int = 200) -> float:
    """CPU seconds of one mesh TLS handshake, both ends in this process (the sidecars'
    own contexts), what a new connection costs on top of its calls."""
    server_side = server_context(TLS(**ring.tls("b")))
    client_side = client_context(TLS(**ring.tls("a")), ring.trust_domain)

    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close, "127.0.0.1", 0, ssl=server_side)
    port = server.sockets[0].getsockname()[1]
    started = time.process_time()
    for _ in range(count):
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_side,
                                                  server_hostname="b")
        writer.close()
    spent = time.process_time() - started
    server.close()
    return spent / count


async def main(requests: int, concurrency: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    keyring = KeyRing(workdir).generate(["a", "b"])
    ring = CertRing(workdir).generate(["a", "b"])
    sidecars: list[SidecarProcess] = []

    async def start(name: str, label: str, **config: object) -> SidecarProcess:
        doc = {"service": name, "identity": keyring.identity(name), "drain_timeout": "5s"}
        sidecar = SidecarProcess.in_dir(f"{name}-{label}", {**doc, **config}, workdir)
        sidecars.append(sidecar)
        return await sidecar.start()

    def strict(name: str) -> dict[str, object]:
        return {"trust_domain": ring.trust_domain, "tls": ring.tls(name, "strict")}

    async with upstream.serving() as app_url:
        try:
            b = await start("b", "plain", inbound={"app": app_url})
            a = await start("a", "plain", services={"b": {"endpoints": [b.inbound_url]}})
            b_tls = await start("b", "mtls", inbound={"app": app_url}, **strict("b"))
            a_tls = await start("a", "mtls", services={"b": {"endpoints": [b_tls.inbound_url]}},
                                **strict("a"))
            print(f"{requests} GETs at concurrency {concurrency}, loopback, 2 cores")
            paths = [("app alone", app_url + "/claims/1", []),
                     ("through sidecar A and B", a.outbound_url + "/b/claims/1", [a, b]),
                     ("... with strict mTLS", a_tls.outbound_url + "/b/claims/1", [a_tls, b_tls])]
            print(f"{'':<58}(CPU of both sidecars)")
            for name, url, measured in paths:
                # A warm-up, then the measured run.
                await load(get(url), requests=min(200, requests), concurrency=concurrency)
                cpu = cpu_seconds(measured)
                started = time.perf_counter()
                latencies = await load(get(url), requests=requests, concurrency=concurrency)
                elapsed = time.perf_counter() - started
                report(name, latencies, elapsed, cpu_seconds(measured) - cpu if measured else None)
        finally:
            for sidecar in reversed(sidecars):
                await sidecar.stop()
    print(f"one mTLS handshake (a new connection), both ends: "
          f"{await handshake_cpu(ring) * 1000:.1f} ms CPU")
    report_peak_rss()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.concurrency))
