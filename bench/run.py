"""`make bench`: the sidecar beside nginx and a bare aiohttp proxy, measured in one run.

Each contender (see `bench/contenders.py`) forwards to the same upstream.
They are measured interleaved: rounds of every contender, the order rotated
each round, so that a noisy minute of the machine is shared out rather than
landing on one of them. Per contender and round: a short warm-up, the most
it answers with wrk in a closed loop, then latency at fixed rates with CPU
time of its proxy processes over each fixed-rate run. After the rounds:
peak RSS, then RSS with idle keep-alive connections open. The table shows
medians over the rounds; raw figures go to bench/results/<time>-bench.json.

Bounded: every wrk run has a duration and a timeout, the idle connections
a count and a deadline, and the rounds stop early rather than run past
`Plan.budget_s`. Traffic goes to 127.0.0.1 only.

`BENCH_QUICK=1` is one short round of a subset, for a look while working.
`BENCH_UPSTREAM=app` puts the aiohttp app (1 KiB JSON) behind every contender
instead of nginx; `BENCH_ONLY=bare,hop` measures only those (and, for the
ratios, bare and nginx when present).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench import report, tools, wrk
from bench.contenders import ALL, Contender, Rig
from bench.idle import IdleClients
from deploy.process import SidecarProcess

RESULTS = Path(__file__).resolve().parent / "results"
CPU_RATE = 1000  # req/s of the run whose CPU time the table shows
IDLE_SETTLE_S = 1.0  # seconds between opening the idle connections and reading RSS


@dataclass(frozen=True, slots=True)
class Plan:
    rounds: int = 3
    warm_s: int = 1
    max_s: int = 3
    rate_s: int = 4
    rates: tuple[int, ...] = (500, 1000, 2000)
    keys: tuple[str, ...] = ALL
    max_connections: int = 2  # closed loop: a sidecar serves one app, not a crowd
    rate_connections: int = 16  # enough that pacing never waits for a free connection
    idle_connections: int = 1000
    budget_s: float = 540.0  # the rounds stop before this; idle checks and stops follow


FULL = Plan()
QUICK = Plan(rounds=1, max_s=2, rate_s=2, keys=("direct", "nginx", "bare", "hop", "mesh"))


def plan_from(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    if args.only:
        keys = tuple(key.strip() for key in args.only.split(",") if key.strip())
        unknown = [key for key in keys if key not in ALL]
        if unknown:
            raise SystemExit(f"bench: unknown contender {', '.join(unknown)}; "
                             f"one of {', '.join(ALL)}")
        plan = replace(plan, keys=keys)
    if args.rounds:
        plan = replace(plan, rounds=args.rounds)
    return plan


def raise_fd_limit() -> None:
    """Soft open-files limit up to the hard one: 1,000 idle connections need the room.

    The children inherit it, so the proxies can accept them too.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    memory = ""
    with contextlib.suppress(OSError):
        memory = Path("/proc/meminfo").read_text().splitlines()[0].split(":")[1].strip()
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "nginx": _version(["nginx", "-v"]),
        "wrk": _version(["wrk", "-v"]).split(" [")[0],
    }


def _version(argv: list[str]) -> str:
    path = tools.find(argv[0])
    if path is None:
        return ""
    done = subprocess.run([path, *argv[1:]], capture_output=True, text=True, timeout=10,
                          check=False)
    return (done.stdout + done.stderr).strip().splitlines()[0] if done.stdout + done.stderr else ""


class Bench:
    """One run: the rig, the plan, and every figure recorded as it comes."""

    def __init__(self, rig: Rig, plan: Plan, wrk_bin: str, workdir: Path) -> None:
        self.rig = rig
        self.plan = plan
        self.wrk_bin = wrk_bin
        self.closed, self.paced = wrk.scripts(workdir)
        self.runs: list[dict[str, Any]] = []
        self.memory: dict[str, dict[str, Any]] = {}

    def wrk(self, contender: Contender, seconds: int, *, rate: int | None = None,
            connections: int | None = None) -> wrk.Run:
        script = self.closed if rate is None else self.paced
        if connections is None:
            connections = self.plan.max_connections if rate is None else self.plan.rate_connections
        return wrk.run(contender.url, wrk=self.wrk_bin, script=script, seconds=seconds,
                       connections=connections, rate=rate, prefix=self.rig.load_pin)

    def turn(self, contender: Contender, round_no: int) -> None:
        """One contender's part of a round: warm-up, closed loop, each fixed rate."""
        self.wrk(contender, self.plan.warm_s)
        closed = self.wrk(contender, self.plan.max_s)
        self.runs.append({"round": round_no, "contender": contender.key, "kind": "max",
                          "wrk": closed.as_json()})
        for rate in self.plan.rates:
            core_before = self.rig.others_on_system_core()
            before = contender.cpu_seconds()
            paced = self.wrk(contender, self.plan.rate_s, rate=rate)
            after = contender.cpu_seconds()
            core_after = self.rig.others_on_system_core()
            spent = {role: after[role] - before[role] for role in before}
            per_request = {role: round(seconds * 1e6 / max(paced.requests, 1), 1)
                           for role, seconds in spent.items()}
            self.runs.append({"round": round_no, "contender": contender.key, "kind": "rate",
                              "wrk": paced.as_json(), "cpu_s": spent,
                              "cpu_us_per_request": per_request,
                              "system_core": _interference(core_before, core_after,
                                                           paced.duration_s),
                              "load_average": os.getloadavg()[0]})
        print(f"  {contender.key:<8} {closed.rate:8.0f} req/s closed loop, "
              f"p50 {paced.p50_ms:.2f} ms at {paced.rate:.0f}/s", flush=True)

    def rounds(self, contenders: list[Contender]) -> int:
        started = time.monotonic()
        done = 0
        for round_no in range(self.plan.rounds):
            elapsed = time.monotonic() - started
            if done and elapsed / done * (done + 1) > self.plan.budget_s:
                print(f"stopping after {done} rounds: another would pass the time budget")
                break
            shift = round_no % len(contenders)
            order = contenders[shift:] + contenders[:shift]
            print(f"round {round_no + 1}/{self.plan.rounds}: "
                  f"{' '.join(c.key for c in order)}", flush=True)
            for contender in order:
                self.turn(contender, round_no)
            done += 1
        return done

    async def idle(self, contenders: list[Contender]) -> None:
        """Peak RSS after the load, then RSS with idle keep-alive connections open."""
        for contender in contenders:
            if contender.processes:
                self.memory[contender.key] = {"after_load": contender.memory_mib()}
        for contender in contenders:
            if not contender.processes:
                continue
            clients = IdleClients(contender.url, self.plan.idle_connections)
            try:
                opened = await clients.open()
                await asyncio.sleep(IDLE_SETTLE_S)
                self.memory[contender.key]["idle"] = contender.memory_mib()
                self.memory[contender.key]["idle_connections"] = {
                    "asked": self.plan.idle_connections, "opened": opened,
                    "open_when_read": clients.still_open()}
            finally:
                await clients.close()
            print(f"  {contender.key:<8} {opened} idle connections open", flush=True)


def _interference(before: dict[str, float] | None, after: dict[str, float] | None,
                  seconds: float) -> dict[str, float] | None:
    """Shares of the contenders' core over a run: ours, other work's, stolen by the host."""
    if before is None or after is None or seconds <= 0:
        return None
    ours = after["ours"] - before["ours"]
    busy = after["busy"] - before["busy"]
    return {"ours": round(ours / seconds, 3),
            "others": round(min(max(busy - ours, 0.0), seconds) / seconds, 3),
            "stolen": round((after["steal"] - before["steal"]) / seconds, 3)}


def save(doc: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{doc['started'].replace(':', '').replace('-', '')[:15]}Z-bench.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


async def main(plan: Plan, upstream: str, keep: bool) -> int:
    found = tools.require()
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    rig = Rig(workdir, nginx_bin=found["nginx"], upstream=upstream)
    if rig.load_core is not None:
        os.sched_setaffinity(0, {rig.load_core})  # the driver stays off the proxies' core
    started = datetime.now(UTC)
    clock = time.monotonic()
    load_at_start = list(os.getloadavg())
    print(f"bench: {', '.join(plan.keys)}; upstream {upstream}; {plan.rounds} round(s); "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    if rig.load_core is None:
        print("bench: one CPU only, so nothing is pinned and the figures mean less")
    ok = False
    try:
        await rig.start_base()
        contenders: list[Contender] = []
        for key in plan.keys:
            contenders.append(await rig.contender(key))
        idle_rss = {c.key: c.memory_mib() for c in contenders if c.processes}
        bench = Bench(rig, plan, found["wrk"], workdir)
        rounds = await asyncio.to_thread(bench.rounds, contenders)
        await bench.idle(contenders)
        for key, reading in idle_rss.items():
            bench.memory[key]["at_start"] = reading
        sink = await rig.sink_stats()
        audit = {p.name: p.audit_path.stat().st_size for p in rig.processes
                 if isinstance(p, SidecarProcess) and p.audit_path.exists()}
        ok = True
    finally:
        await rig.stop()
        if ok and not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench: files kept in {workdir}")
    summary = report.summarise(bench.runs, bench.memory, plan.rates, CPU_RATE)
    table = report.table(summary, plan.rates, CPU_RATE)
    targets = report.targets(summary, CPU_RATE)
    doc = {
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - clock, 1),
        "machine": machine(),
        "load_average": {"start": load_at_start, "end": list(os.getloadavg())},
        "upstream": upstream,
        "plan": asdict(plan),
        "rounds_done": rounds,
        "runs": bench.runs,
        "memory": bench.memory,
        "sink": sink,
        "audit_bytes": audit,
        "summary": summary,
        "targets": targets,
        "table": table,
    }
    path = save(doc)
    print()
    print(f"{started:%Y-%m-%d %H:%M} UTC, upstream {upstream}, medians of {rounds} round(s), "
          f"{doc['seconds']:.0f} s; load average now {os.getloadavg()[0]:.2f}")
    print(table)
    print()
    print(report.format_targets(targets))
    print(f"\nsink: {sink['exports']} exports, {sink['bytes'] / 1e6:.1f} MB of spans")
    print(f"raw results: {path}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("BENCH_QUICK", "") not in ("", "0"))
    parser.add_argument("--only", default=os.environ.get("BENCH_ONLY", ""),
                        help=f"comma-separated contenders, of {', '.join(ALL)}")
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "0")))
    parser.add_argument("--upstream", choices=("nginx", "app"),
                        default=os.environ.get("BENCH_UPSTREAM", "nginx"))
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    return asyncio.run(main(plan_from(args), args.upstream, args.keep))


if __name__ == "__main__":
    sys.exit(cli())
