"""The compose setups and their sidecar configs, checked without a Docker engine.

Two setups describe the same mesh: deploy/docker-compose.yml on its own, and
deploy/compose.apps.yml (the apps as they were) with compose.override.yml.
Debian's `docker-compose config` validates and merges them; the structural
checks then read the result. The full file is also read raw with PyYAML, so
most checks run even where docker-compose is missing.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.apps.common import settings_from
from deploy.topology import ALLOWED, APPS, CLIENT_MODULE, DENIED, EDGE, SERVICES, callees
from sidecar import cli
from sidecar.config import loader as config_loader
from sidecar.inbound.policy import Policy
from tests.deploy import (
    AUDIT_FILE,
    CA_FILE,
    DEPLOY,
    JWKS_FILE,
    REPO,
    SECRETS_DIR,
    SIDECAR_IMAGE,
    TRUST_DOMAIN,
    check_in_process,
    localise,
    make_keys,
    sidecar_check,
)

FULL = (DEPLOY / "docker-compose.yml",)
OVERRIDE = (DEPLOY / "compose.apps.yml", REPO / "compose.override.yml")
SETUPS = {"full": FULL, "override": OVERRIDE}
CONFIGS = DEPLOY / "config"
DOCKER_COMPOSE = shutil.which("docker-compose")
needs_docker_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None,
    reason="docker-compose is not installed (apt-get install -y docker-compose; make does it)",
)
JAEGER_PORTS = {16686, 4317, 4318}


def compose_config(files: tuple[Path, ...], *extra: str) -> subprocess.CompletedProcess[str]:
    assert DOCKER_COMPOSE is not None
    command = [DOCKER_COMPOSE]
    for file in files:
        command += ["-f", str(file)]
    return subprocess.run(
        [*command, "config", *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


@functools.cache
def merged(files: tuple[Path, ...]) -> dict[str, Any]:
    """What `docker-compose config` makes of `files` (read once per run)."""
    result = compose_config(files)
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = yaml.safe_load(result.stdout)
    return model


@pytest.fixture(params=["full-raw", "full", "override"])
def services(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The services of each setup: the full file as written, and as compose merges each."""
    if request.param == "full-raw":
        raw = yaml.safe_load(FULL[0].read_text(encoding="utf-8"))
        return dict(raw["services"])
    if DOCKER_COMPOSE is None:
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose)")
    return dict(merged(SETUPS[request.param])["services"])


# -- reading compose's several spellings ----------------------------------------------


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def command_line(service: dict[str, Any]) -> list[str]:
    parts: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        parts += value.split() if isinstance(value, str) else [str(v) for v in value]
    return parts


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """target -> (source, read_only)."""
    found = {}
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            found[volume["target"]] = (str(volume["source"]), bool(volume.get("read_only")))
            continue
        source, target, *mode = volume.split(":")
        found[target] = (source, "ro" in (mode[0].split(",") if mode else []))
    return found


def published(service: dict[str, Any]) -> set[tuple[str, int, int]]:
    """(host address, host port, container port) for each published port."""
    found = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            found.add((str(port.get("host_ip", "")), int(port["published"]), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        found.add((host_ip, int(parts[-2]) if len(parts) > 1 else 0, int(parts[-1])))
    return found


def config_file(service: dict[str, Any]) -> Path:
    source, read_only = mounts(service)["/etc/sidecar/config.yaml"]
    assert read_only
    return (DEPLOY / source).resolve()


# -- the setups ------------------------------------------------------------------------


@needs_docker_compose
@pytest.mark.parametrize("setup", SETUPS)
def test_docker_compose_accepts_the_setup(setup: str) -> None:
    result = compose_config(SETUPS[setup], "-q")
    assert result.returncode == 0, result.stderr


@needs_docker_compose
def test_docker_compose_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    text = FULL[0].read_text(encoding="utf-8")
    broken.write_text(text.replace("network_mode:", "network_mod:", 1), encoding="utf-8")
    assert compose_config((broken,), "-q").returncode != 0


def test_every_mesh_service_has_its_sidecar_in_its_namespace(services: dict[str, Any]) -> None:
    for name in SERVICES:
        sharing = [
            key for key, svc in services.items() if svc.get("network_mode") == f"service:{name}"
        ]
        assert sharing == [f"{name}-sidecar"], name
        sidecar = services[f"{name}-sidecar"]
        assert str(sidecar["image"]).startswith(SIDECAR_IMAGE)
        assert not command_line(sidecar), "the image's `sidecar run -c ...` must run"
        assert "networks" not in sidecar and "ports" not in sidecar
        config = yaml.safe_load(config_file(sidecar).read_text(encoding="utf-8"))
        assert config["service"] == name


def test_apps_bind_loopback_and_call_through_their_sidecar(services: dict[str, Any]) -> None:
    for name, module in APPS.items():
        app = services[name]
        assert module in command_line(app)
        settings = settings_from(environment(app), [])
        assert (settings.host, settings.port) == ("127.0.0.1", 8000), name
        for target in callees(name):
            assert settings.url_for(target) == f"http://127.0.0.1:15001/{target}"
    edge = services[EDGE]
    assert CLIENT_MODULE in command_line(edge)
    settings = settings_from(environment(edge), [])
    for target in callees(EDGE):
        assert settings.url_for(target) == f"http://127.0.0.1:15001/{target}"


def test_apps_start_once_their_sidecar_can_take_their_calls(services: dict[str, Any]) -> None:
    # The sidecar joins the app's namespace, so it starts after the app's
    # container: the app's entrypoint waits for the sidecar's outbound path.
    for name, module in APPS.items():
        line = command_line(services[name])
        assert line[:3] == ["sidecar", "wait", "--admin"], name
        sidecar = yaml.safe_load(config_file(services[f"{name}-sidecar"]).read_text("utf-8"))
        assert line[3] == sidecar["listen"]["admin"], name
        assert line[line.index("--") + 1:] == ["python", "-m", module], name
        # ... and is a `sidecar wait` the command line accepts.
        args = cli._parser().parse_args(line[1:])
        assert (args.command, args.admin) == ("wait", sidecar["listen"]["admin"])


def test_nothing_but_jaeger_is_published(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name != "jaeger":
            assert not service.get("ports"), f"{name} publishes ports"
    jaeger = published(services["jaeger"])
    assert {container for _, _, container in jaeger} == JAEGER_PORTS
    assert all(host_ip == "127.0.0.1" and host == container for host_ip, host, container in jaeger)


def test_only_the_inbound_port_is_exposed(services: dict[str, Any]) -> None:
    for name, service in services.items():
        exposed = {str(port) for port in service.get("expose") or []}
        assert exposed == ({"15006"} if name in APPS else set()), name


def test_keys_are_made_once_and_each_sidecar_gets_only_its_own(
    services: dict[str, Any],
) -> None:
    keygen = services["keygen"]
    script = " ".join(command_line(keygen))
    assert keygen.get("network_mode") == "none"
    assert "sidecar jwks -o /keys/public/jwks.json" in script
    keygen_mounts = mounts(keygen)
    assert keygen_mounts["/keys/public"][0] == "mesh-jwks"
    for name in SERVICES:
        assert name in script
        assert f"/keys/{name}" in script.split("jwks", 1)[1]
        assert keygen_mounts[f"/keys/{name}"][0] == f"keys-{name}"
        sidecar = services[f"{name}-sidecar"]
        assert sidecar["depends_on"]["keygen"]["condition"] == "service_completed_successfully"
        sidecar_mounts = mounts(sidecar)
        assert sidecar_mounts[SECRETS_DIR.rstrip("/")] == (f"keys-{name}", True)
        assert sidecar_mounts[str(Path(JWKS_FILE).parent)] == ("mesh-jwks", True)
        assert sidecar_mounts[str(Path(AUDIT_FILE).parent)] == (f"audit-{name}", False)
        # The CA's private key is the keygen's alone.
        assert "mesh-ca" not in {source for source, _ in sidecar_mounts.values()}
    assert keygen_mounts["/ca"] == ("mesh-ca", False)


def keygen_script(root: Path) -> str:
    """The keygen's script as its shell runs it, with its volumes under `root` and no chown."""
    raw = yaml.safe_load(FULL[0].read_text(encoding="utf-8"))["services"]["keygen"]
    script = str(raw["command"][0]).replace("$$", "$")
    script = re.sub(r"(?<![\w/.-])/(keys|ca)\b", lambda m: f"{root}/{m.group(1)}", script)
    return script.replace("chown -R 10001:10001", ": chown")


def run_keygen(root: Path, renew: str = "") -> dict[str, bytes]:
    """One run of the keygen (as `docker compose run keygen`); every file it leaves."""
    shim = root / "bin" / "sidecar"
    if not shim.exists():
        shim.parent.mkdir(parents=True)
        shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m sidecar "$@"\n')
        shim.chmod(0o755)
        for volume in ("ca", "keys/public", *(f"keys/{name}" for name in SERVICES)):
            (root / volume).mkdir(parents=True)
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}", "RENEW": renew}
    done = subprocess.run(["/bin/sh", "-ec", keygen_script(root)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return {str(path.relative_to(root)): path.read_bytes()
            for path in root.rglob("*") if path.is_file() and "bin" not in path.parts}


def test_keygen_makes_the_ca_and_certificates_once_and_renews_on_request(tmp_path: Path) -> None:
    first = run_keygen(tmp_path)
    for name in SERVICES:
        for suffix in (".pem", ".crt", ".key"):
            assert f"keys/{name}/{name}{suffix}" in first
    assert {"ca/ca.pem", "ca/ca.key"} <= set(first)
    # What every sidecar mounts holds no private key: the JWKS and the CA's certificate.
    assert sorted(path for path in first if path.startswith("keys/public/")) == [
        "keys/public/ca.pem", "keys/public/jwks.json"]
    assert first["keys/public/ca.pem"] == first["ca/ca.pem"]
    assert run_keygen(tmp_path) == first  # kept across restarts
    renewed = run_keygen(tmp_path, renew="billing-engine")
    changed = {path for path in first if renewed.get(path) != first[path]}
    assert changed == {"keys/billing-engine/billing-engine.crt",
                       "keys/billing-engine/billing-engine.key"}
    # Every shipped config passes `sidecar check` against what the keygen made.
    copies = [localise(CONFIGS / f"{name}.yaml", tmp_path / "keys" / name, tmp_path,
                       public=tmp_path / "keys" / "public") for name in SERVICES]
    for name, result in sidecar_check(copies).items():
        assert result.returncode == 0, f"{name}: {result.stderr}"


def test_jaeger_takes_otlp(services: dict[str, Any]) -> None:
    jaeger = services["jaeger"]
    assert str(jaeger["image"]).startswith("jaegertracing/all-in-one:")
    assert environment(jaeger)["COLLECTOR_OTLP_ENABLED"] == "true"


@needs_docker_compose
def test_the_override_meshes_exactly_what_the_full_file_does() -> None:
    full = merged(FULL)["services"]
    override = merged(OVERRIDE)["services"]
    assert set(full) == set(override)
    for name in SERVICES:
        sidecar = f"{name}-sidecar"
        assert mounts(full[sidecar]) == mounts(override[sidecar])
    base = yaml.safe_load(OVERRIDE[0].read_text(encoding="utf-8"))["services"]
    assert set(base) == set(APPS), "compose.apps.yml holds just the apps"


def test_no_fixed_addresses_anywhere() -> None:
    files = [*FULL, *OVERRIDE, *CONFIGS.glob("*.yaml"), *(DEPLOY / "k8s").rglob("*.yaml")]
    for file in files:
        text = file.read_text(encoding="utf-8")
        assert "172.20." not in text and "ipv4_address" not in text, file


# -- the sidecar configs -------------------------------------------------------------


def test_there_is_a_config_for_each_service_and_no_other() -> None:
    assert {path.stem for path in CONFIGS.glob("*.yaml")} == set(SERVICES)


def test_sidecar_check_passes_every_config(tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    copies = [localise(CONFIGS / f"{name}.yaml", keys, tmp_path) for name in SERVICES]
    for name, result in sidecar_check(copies).items():
        assert result.returncode == 0, f"{name}: {result.stderr}"


def test_sidecar_check_would_catch_a_typo(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    copy = localise(CONFIGS / "billing-engine.yaml", make_keys(tmp_path / "keys"), tmp_path)
    copy.write_text(copy.read_text(encoding="utf-8").replace("policy:", "polcy:"), encoding="utf-8")
    status, errors = check_in_process(copy, capsys)
    assert status == 2
    assert "inbound.polcy" in errors


def test_configs_name_what_compose_mounts() -> None:
    for name in SERVICES:
        config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text(encoding="utf-8"))
        identity = config["identity"]
        assert identity["private_key_file"] == f"{SECRETS_DIR}{name}.pem"
        assert identity["jwks_file"] == JWKS_FILE
        assert config["trust_domain"] == TRUST_DOMAIN
        assert config["tls"] == {"mode": "strict", "ca_file": CA_FILE,
                                 "cert_file": f"{SECRETS_DIR}{name}.crt",
                                 "key_file": f"{SECRETS_DIR}{name}.key"}
        assert config["audit"]["path"] == AUDIT_FILE
        assert config["tracing"]["exporter"] == "otlp"
        assert config["tracing"]["endpoint"] == "http://jaeger:4318"
        assert config["inbound"]["app"] == "http://127.0.0.1:8000"
        listen = config["listen"]
        assert listen["outbound"] == "127.0.0.1:15001"
        assert listen["admin"] == "127.0.0.1:15000"
        # The edge serves nothing, so even its inbound port stays on loopback.
        assert listen["inbound"] == ("127.0.0.1:15006" if name == EDGE else "0.0.0.0:15006")
        for target, service in (config.get("services") or {}).items():
            assert service["endpoints"] == [f"http://{target}:15006"]
        if name in APPS:
            assert config["inbound"]["app_health_path"] == "/health"
            assert config["inbound"]["public_paths"] == ["/health"]


def load_mesh(keys: Path, out_dir: Path, config_dir: Path = CONFIGS) -> dict[str, Any]:
    return {
        name: config_loader.load(str(localise(config_dir / f"{name}.yaml", keys, out_dir)))
        for name in SERVICES
    }


def test_policies_admit_the_topology_and_nothing_else(
    tmp_path: Path,
) -> None:
    mesh = load_mesh(make_keys(tmp_path / "keys"), tmp_path)
    policies = {
        name: Policy(rules=config.inbound.policy, public_paths=config.inbound.public_paths)
        for name, config in mesh.items()
    }
    for name, config in mesh.items():
        assert config.inbound.policy is not None, f"{name}: every service denies by default"
        assert set(config.services) >= callees(name), name
    for call in ALLOWED:
        assert policies[call.target].allows(call.source, call.method, call.path), call
    for call in DENIED:
        assert not policies[call.target].allows(call.source, call.method, call.path), call
    for name in APPS:
        assert policies[name].is_public("/health") and not policies[name].is_public("/")
