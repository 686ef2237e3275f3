"""Shared by the deployment tests: paths, and sidecar configs made checkable here.

The shipped configs name key files where the containers mount them
(`/run/secrets/<service>.pem`, `/etc/mesh/jwks.json`). `sidecar check` loads
those keys, so the tests make a throwaway key set with `sidecar keygen` and
check a copy of each config whose key paths point at it: everything else in
the copy is byte for byte the shipped file.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from deploy.topology import SERVICES
from sidecar import cli

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SECRETS_DIR = "/run/secrets/"
JWKS_FILE = "/etc/mesh/jwks.json"
AUDIT_FILE = "/var/log/sidecar/audit.jsonl"
SIDECAR_IMAGE = "intelluxe/sidecar"
SIDECAR = (sys.executable, "-m", "sidecar")


def run_all(commands: Iterable[tuple[str, ...]]) -> list[subprocess.CompletedProcess[str]]:
    """Run commands side by side (each is a Python start-up) and collect them in order."""
    started = [
        (
            command,
            subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
            ),
        )
        for command in commands
    ]
    done = []
    for command, process in started:
        out, err = process.communicate(timeout=60)
        done.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return done


def make_keys(out: Path) -> Path:
    """A key pair per mesh service and the merged JWKS, made with the sidecar's CLI."""
    for name in SERVICES:
        assert cli.main(["keygen", "--service", name, "--out", str(out)]) == 0
    assert cli.main(["jwks", "-o", str(out / "jwks.json"), str(out)]) == 0
    return out


def localise(config: Path, keys: Path, out_dir: Path) -> Path:
    """A copy of `config` whose key paths point at `keys`; nothing else changes."""
    text = config.read_text(encoding="utf-8")
    assert SECRETS_DIR in text and JWKS_FILE in text, f"{config}: key paths moved"
    text = text.replace(JWKS_FILE, str(keys / "jwks.json")).replace(SECRETS_DIR, f"{keys}/")
    copy = out_dir / config.name
    copy.write_text(text, encoding="utf-8")
    return copy


def sidecar_check(configs: Iterable[Path]) -> dict[str, subprocess.CompletedProcess[str]]:
    """`python -m sidecar check -c FILE` for each config, side by side, by file name."""
    paths = list(configs)
    results = run_all((*SIDECAR, "check", "-c", str(path)) for path in paths)
    return {path.name: result for path, result in zip(paths, results, strict=True)}


def check_in_process(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`sidecar check` without a new interpreter: (exit status, stderr)."""
    capsys.readouterr()
    status = cli.main(["check", "-c", str(config)])
    return status, capsys.readouterr().err
