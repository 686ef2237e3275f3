"""The programs the bench drives that pip does not bring: wrk, nginx and taskset.

`require` finds them, installs the missing ones through apt when run as root,
and otherwise says what is missing and exits 2. The system's nginx service is
never started by the install: without a `policy-rc.d` of its own the machine
gets one for the length of the install (as Debian's container images keep),
so that the package's post-install script does not start it on port 80.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# The command each program is found by, and the Debian package that brings it.
PACKAGES = {"wrk": "wrk", "nginx": "nginx-light", "taskset": "util-linux"}
SBIN = ("/usr/sbin", "/sbin")  # nginx lives here, not always on a non-root PATH
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
APT_WITHIN = 600  # seconds for `apt-get update` and `apt-get install` each


def find(command: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(command, path=path)


def require(commands: tuple[str, ...] = ("wrk", "nginx", "taskset")) -> dict[str, str]:
    """The full path of each command, installing what is missing; exit 2 when it cannot."""
    missing = [command for command in commands if find(command) is None]
    if missing:
        _install(missing)
    found = {command: find(command) for command in commands}
    still = [command for command, path in found.items() if path is None]
    if still:
        _give_up(still, "the install did not bring them")
    return {command: path for command, path in found.items() if path is not None}


def _install(missing: list[str]) -> None:
    packages = sorted({PACKAGES[command] for command in missing})
    if os.geteuid() != 0 or find("apt-get") is None:
        _give_up(missing, "not root with apt-get, so the bench cannot install them")
    print(f"installing {' '.join(packages)} through apt", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    placed = not POLICY_RC_D.exists()
    if placed:
        POLICY_RC_D.write_text("#!/bin/sh\n# placed by the sidecar bench during apt-get install\n"
                               "exit 101\n")
        POLICY_RC_D.chmod(0o755)
    try:
        for argv in (["apt-get", "update", "-qq"],
                     ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
            done = subprocess.run(argv, env=env, capture_output=True, text=True,
                                  timeout=APT_WITHIN, check=False)
            if done.returncode != 0:
                sys.stderr.write(done.stdout[-2000:] + done.stderr[-2000:])
                _give_up(missing, f"`{' '.join(argv[:2])}` failed")
    finally:
        if placed:
            POLICY_RC_D.unlink(missing_ok=True)


def _give_up(missing: list[str], why: str) -> None:
    packages = " ".join(sorted({PACKAGES[command] for command in missing}))
    print(f"bench: missing {', '.join(missing)} ({why}); install them with\n"
          f"  sudo apt-get install {packages}", file=sys.stderr)
    raise SystemExit(2)
