"""`make profile`: where a request's time goes in the sidecars of the mesh path, kept.

The mesh path of `make bench` (sidecar A -> sidecar B -> nginx, token,
policy and audit on both sides, tracing 0.01 exported to the sink) under wrk
at a fixed rate, while py-spy samples each sidecar process. Written to
bench/results/: a flame graph per sidecar (SVG), the collapsed stacks
(`-A.txt`, `-B.txt`) and `-top.txt`: per sidecar the top functions by own
time (the frame that was running), by "sidecar frame" (the innermost
function of sidecar/ on the stack, so that the JSON encoder called by the
audit log is charged to the audit log), sidecar functions by total time
(the layers' inclusive cost), and own time per package and per thread. The
top 15 by own time and by sidecar frame are printed.

py-spy reads the sidecars' memory, which needs ptrace rights: as root it
works. It samples without pausing them (`--nonblocking`), on the load core.
Idle threads (the loop waiting in epoll, idle executor workers) are left
out, so shares are of the time a sidecar was busy; a thread waiting for the
GIL counts as busy in the frame that waits (such as `submit` handing the
audit batch to the writer thread), which is time the request waits too.
`PROFILE_PYSPY_ARGS=--gil` keeps only samples holding the GIL;
`PROFILE_CONTENDER=hop|hop-t1|mesh-t1`, `PROFILE_RATE`, `PROFILE_SECONDS`
change what is profiled.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from bench import tools, wrk
from bench.contenders import LABELS, Rig
from bench.run import RESULTS, raise_fd_limit

PROFILED = ("mesh", "mesh-t1", "hop", "hop-t1")
SAMPLES_PER_S = 100
EXTRA = os.environ.get("PROFILE_PYSPY_ARGS", "").split()  # such as --gil
TOP_FILE, TOP_PRINTED = 25, 15
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*)\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


# ---- reading py-spy's collapsed stacks


def stacks(raw: str) -> list[tuple[str, list[str], int]]:
    """(thread, frames outermost first, samples) for each line of `--format raw --threads`."""
    found = []
    for line in raw.splitlines():
        body, _, count = line.rpartition(" ")
        if not body or not count.isdigit():
            continue
        thread, *frames = body.split(";")
        found.append((thread.partition(": ")[2] or thread, frames, int(count)))
    return found


def _file(frame: str) -> str:
    match = FRAME.match(frame)
    return match.group("file") if match else ""


def package(frame: str) -> str:
    """`sidecar/http/edge.py` -> `sidecar/http`; `aiohttp/web_protocol.py` -> `aiohttp`."""
    path = _file(frame)
    parts = path.split("/")
    if parts[0] == "sidecar":
        return "/".join(parts[:2])
    return parts[0] if len(parts) > 1 else (path or "?")


def tally(parsed: list[tuple[str, list[str], int]]) -> dict[str, Counter[str]]:
    own: Counter[str] = Counter()
    in_sidecar: Counter[str] = Counter()
    total: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for thread, frames, count in parsed:
        threads[thread] += count
        if not frames:
            continue
        own[frames[-1]] += count
        packages[package(frames[-1])] += count
        # Only what the loop runs: the entry points below it are on every stack.
        loop = [i for i, frame in enumerate(frames) if _file(frame) == "asyncio/base_events.py"]
        mine = [frame for frame in frames[loop[-1] + 1 if loop else 0:]
                if _file(frame).startswith("sidecar/")]
        in_sidecar[mine[-1] if mine else f"(outside sidecar/) {package(frames[-1])}"] += count
        for frame in set(mine):
            total[frame] += count
    return {"own": own, "sidecar": in_sidecar, "total": total, "packages": packages,
            "threads": threads}


def _lines(counter: Counter[str], samples: int, top: int) -> list[str]:
    return [f"  {count * 100 / samples:5.1f}%  {count:6d}  {name}"
            for name, count in counter.most_common(top)]


def describe(role: str, counts: dict[str, Counter[str]], top: int,
             sections: Iterable[str] = ("own", "sidecar", "total", "packages", "threads")
             ) -> str:
    samples = sum(counts["threads"].values()) or 1
    titles = {
        "own": "own time (the frame that was running)",
        "sidecar": "by sidecar frame (innermost function of sidecar/ on the stack)",
        "total": "total time of sidecar/ functions (anywhere on the stack below the loop)",
        "packages": "own time per package",
        "threads": "samples per thread",
    }
    out = [f"== sidecar {role}: {samples} samples while busy"]
    for section in sections:
        out.append(f"-- top {top} {titles[section]}")
        out.extend(_lines(counts[section], samples, top))
    return "\n".join(out)


# ---- the run


async def main(contender: str, seconds: int, rate: int) -> int:
    found = tools.require()
    spy = py_spy()
    if spy is None:
        print("profile: py-spy is missing; `make profile` installs the dev extra, or "
              f"{sys.executable} -m pip install py-spy", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("profile: not root; py-spy needs ptrace rights over the sidecars and may fail")
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-profile-"))
    rig = Rig(workdir, nginx_bin=found["nginx"])
    if rig.load_core is not None:
        os.sched_setaffinity(0, {rig.load_core})
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    outputs: dict[str, dict[str, Path]] = {}
    try:
        await rig.start_base()
        target = await rig.contender(contender)
        closed, paced = wrk.scripts(workdir)
        wrk.run(target.url, wrk=found["wrk"], script=closed, seconds=2, connections=2,
                prefix=rig.load_pin)  # warm-up
        print(f"profile: {LABELS[contender]} at {rate}/s for {seconds} s, "
              f"py-spy at {SAMPLES_PER_S} samples/s on each of {', '.join(target.processes)}",
              flush=True)
        load = asyncio.create_task(asyncio.to_thread(
            wrk.run, target.url, wrk=found["wrk"], script=paced, seconds=seconds + 3,
            connections=16, rate=rate, prefix=rig.load_pin))
        await asyncio.sleep(1.0)
        spies = []
        for role, process in target.processes.items():
            assert process.proc is not None
            outputs[role] = {"svg": RESULTS / f"{stamp}-profile-{role}.svg",
                             "raw": RESULTS / f"{stamp}-profile-{role}.txt"}
            for fmt, key in (("flamegraph", "svg"), ("raw", "raw")):
                argv = [*rig.load_pin, spy, "record", "--pid", str(process.proc.pid),
                        "--duration", str(seconds), "--rate", str(SAMPLES_PER_S),
                        "--nonblocking", "--threads", "--nolineno", *EXTRA, "--format", fmt,
                        "-o", str(outputs[role][key])]
                spies.append(subprocess.Popen(argv, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True))
        failed = False
        for spied in spies:
            out, _ = await asyncio.to_thread(spied.communicate, timeout=seconds + 30)
            if spied.returncode != 0:
                failed = True
                print(f"profile: py-spy failed ({spied.returncode}): {out[-1500:]}",
                      file=sys.stderr)
        paced_run = await load
    finally:
        await rig.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if failed:
        return 1
    header = (f"{stamp}: {LABELS[contender]}, wrk at {rate}/s for {seconds} s "
              f"(reached {paced_run.rate:.0f}/s, p50 {paced_run.p50_ms:.2f} ms, "
              f"p99 {paced_run.p99_ms:.2f} ms), py-spy {SAMPLES_PER_S} samples/s per sidecar; "
              f"load average {os.getloadavg()[0]:.2f}")
    written, printed = [header, ""], [header, ""]
    for role, paths in outputs.items():
        counts = tally(stacks(paths["raw"].read_text()))
        written += [describe(role, counts, TOP_FILE), ""]
        printed += [describe(role, counts, TOP_PRINTED, ("own", "sidecar", "packages")), ""]
    top = RESULTS / f"{stamp}-profile-top.txt"
    top.write_text("\n".join(written))
    print("\n".join(printed))
    print("written: " + ", ".join(str(p) for paths in outputs.values() for p in paths.values())
          + f", {top}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--contender", choices=PROFILED,
                        default=os.environ.get("PROFILE_CONTENDER", "mesh"))
    parser.add_argument("--seconds", type=int, default=int(os.environ.get("PROFILE_SECONDS", 20)))
    parser.add_argument("--rate", type=int, default=int(os.environ.get("PROFILE_RATE", 1000)))
    args = parser.parse_args(argv)
    if not 1 <= args.seconds <= 120 or not 1 <= args.rate <= 20000:
        parser.error("--seconds must be 1 to 120 and --rate 1 to 20000")
    return asyncio.run(main(args.contender, args.seconds, args.rate))


if __name__ == "__main__":
    sys.exit(cli())
