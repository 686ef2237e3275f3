"""Shared by the deployment tests: paths, and sidecar configs made checkable here.

The shipped configs name key files where the containers mount them
(`/run/secrets/<service>.pem`, `.crt` and `.key`, `/etc/mesh/jwks.json` and
`ca.pem`). `sidecar check` loads those keys and certificates, so the tests
make a throwaway set with `sidecar keygen` and `sidecar certs` and check a
copy of each config whose key paths point at it: everything else in the copy
is byte for byte the shipped file.
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
CA_FILE = "/etc/mesh/ca.pem"
TRUST_DOMAIN = "intelluxe.local"
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
    """A key pair and a certificate per mesh service, the merged JWKS and the mesh CA,
    made with the sidecar's CLI."""
    assert cli.main(["certs", "ca", "--out", str(out)]) == 0
    for name in SERVICES:
        assert cli.main(["keygen", "--service", name, "--out", str(out)]) == 0
        assert cli.main(["certs", "issue", "--ca", str(out), "--service", name,
                         "--trust-domain", TRUST_DOMAIN, "--out", str(out)]) == 0
    assert cli.main(["jwks", "-o", str(out / "jwks.json"), str(out)]) == 0
    return out


def localise(config: Path, keys: Path, out_dir: Path, public: Path | None = None) -> Path:
    """A copy of `config` whose key paths point at `keys` (and the JWKS and CA bundle at
    `public`, `keys` unless given); nothing else changes."""
    text = config.read_text(encoding="utf-8")
    assert SECRETS_DIR in text and JWKS_FILE in text and CA_FILE in text, f"{config}: moved"
    public = public or keys
    text = (text.replace(JWKS_FILE, str(public / "jwks.json"))
            .replace(CA_FILE, str(public / "ca.pem")).replace(SECRETS_DIR, f"{keys}/"))
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
