"""The Kubernetes manifests, parsed and checked without a cluster.

Every mesh service runs as a Deployment whose sidecar is a native sidecar (an
init container with `restartPolicy: Always`) with readiness on `/readyz`; each
called service has a Service whose port 80 leads to the sidecar's 15006; the
sidecar configs come from kustomize's configMapGenerator and pass
`sidecar check`. Where kubectl is installed, `kubectl kustomize` renders it all.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.apps.common import settings_from
from deploy.topology import APPS, CLIENT_MODULE, EDGE, SERVICES, callees
from tests.deploy import (
    AUDIT_FILE,
    CA_FILE,
    DEPLOY,
    JWKS_FILE,
    SECRETS_DIR,
    SIDECAR_IMAGE,
    check_in_process,
    localise,
    make_keys,
)

K8S = DEPLOY / "k8s"
NAMESPACE = "healthcare-mesh"
KUBECTL = shutil.which("kubectl")


@functools.cache
def kustomization() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text("utf-8"))
    return loaded


@functools.cache
def objects() -> tuple[dict[str, Any], ...]:
    """Every object the kustomization lists (parsed once; do not modify)."""
    found: list[dict[str, Any]] = []
    for resource in kustomization()["resources"]:
        found += [doc for doc in yaml.safe_load_all((K8S / resource).read_text("utf-8")) if doc]
    return tuple(found)


def one(kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = one("Deployment", name)["spec"]["template"]["spec"]
    return spec


def container(containers: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(c for c in containers if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: str(item["value"]) for item in c.get("env") or []}


def probes_admin(probe: dict[str, Any], path: str) -> bool:
    """True if `probe` asks the admin port for `path`, by exec or by httpGet."""
    if "exec" in probe:
        return f"http://127.0.0.1:15000{path}" in " ".join(probe["exec"]["command"])
    http = probe.get("httpGet") or {}
    return http.get("path") == path and http.get("port") in (15000, "admin")


def generated_configs() -> dict[str, Path]:
    """ConfigMap name -> the sidecar config file it is generated from."""
    found = {}
    for generator in kustomization()["configMapGenerator"]:
        (entry,) = generator["files"]
        key, _, source = entry.partition("=")
        assert key == "config.yaml"
        found[generator["name"]] = K8S / source
    return found


def test_every_manifest_is_listed_and_parses() -> None:
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects()}
    assert ("Namespace", NAMESPACE) in kinds
    assert kustomization()["namespace"] == NAMESPACE


def test_each_service_runs_with_a_native_sidecar() -> None:
    for name in SERVICES:
        spec = pod_spec(name)
        sidecar = container(spec["initContainers"], "sidecar")
        assert sidecar["restartPolicy"] == "Always"
        assert sidecar["image"].startswith(SIDECAR_IMAGE)
        assert probes_admin(sidecar["readinessProbe"], "/readyz"), name
        # The app starts once the startup probe passes: it waits for the outbound
        # path (/readyz would wait for the app, which only starts after it).
        assert probes_admin(sidecar["startupProbe"], "/readyz/outbound"), name
        assert probes_admin(sidecar["livenessProbe"], "/healthz"), name
        assert sidecar["securityContext"]["allowPrivilegeEscalation"] is False


def test_probes_can_reach_the_admin_port() -> None:
    for name in SERVICES:
        sidecar = container(pod_spec(name)["initContainers"], "sidecar")
        config = yaml.safe_load((K8S / "config" / f"{name}.yaml").read_text("utf-8"))
        admin_on_loopback = config["listen"]["admin"].startswith("127.0.0.1:")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            # The kubelet's httpGet goes to the pod IP; only exec reaches loopback.
            assert not admin_on_loopback or "exec" in sidecar[probe], (name, probe)


def test_apps_bind_loopback_and_call_through_their_sidecar() -> None:
    for name in SERVICES:
        app = container(pod_spec(name)["containers"], "app")
        module = APPS.get(name, CLIENT_MODULE)
        assert module in [*app.get("command", []), *app.get("args", [])]
        assert "ports" not in app, f"{name}: only the sidecar's 15006 is a pod port"
        settings = settings_from(env_of(app), [])
        if name in APPS:
            assert (settings.host, settings.port) == ("127.0.0.1", 8000)
        for target in callees(name):
            assert settings.url_for(target) == f"http://127.0.0.1:15001/{target}"


def test_each_sidecar_mounts_its_config_its_own_keys_the_jwks_and_the_ca() -> None:
    configs = generated_configs()
    for name in SERVICES:
        spec = pod_spec(name)
        volumes = {v["name"]: v for v in spec["volumes"]}
        sidecar = container(spec["initContainers"], "sidecar")
        mounted = {m["mountPath"]: volumes[m["name"]] for m in sidecar["volumeMounts"]}
        config_map = mounted["/etc/sidecar"]["configMap"]["name"]
        assert configs[config_map] == K8S / "config" / f"{name}.yaml"
        key = mounted[SECRETS_DIR.rstrip("/")]["secret"]["secretName"]
        assert key == f"sidecar-key-{name}"
        # The JWKS and the CA bundle side by side: both public, both mesh-wide.
        sources = mounted[str(Path(JWKS_FILE).parent)]["projected"]["sources"]
        assert [source["configMap"]["name"] for source in sources] == ["mesh-jwks", "mesh-ca"]
        assert Path(JWKS_FILE).parent == Path(CA_FILE).parent
        assert "emptyDir" in mounted[str(Path(AUDIT_FILE).parent)]


def test_services_lead_to_the_sidecar_only() -> None:
    services = {o["metadata"]["name"]: o for o in objects() if o["kind"] == "Service"}
    assert set(services) == {*APPS, "jaeger"}, "the edge is called by nobody"
    for name in APPS:
        spec = services[name]["spec"]
        assert spec.get("type", "ClusterIP") == "ClusterIP"
        assert [(p["port"], p["targetPort"]) for p in spec["ports"]] == [(80, 15006)]
        labels = one("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert spec["selector"].items() <= labels.items()
    for o in objects():
        if o["kind"] == "Deployment":
            spec = o["spec"]["template"]["spec"]
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                assert all("hostPort" not in p for p in c.get("ports", [])), c["name"]


def test_jaeger_runs_with_otlp() -> None:
    jaeger = container(pod_spec("jaeger")["containers"], "jaeger")
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert env_of(jaeger)["COLLECTOR_OTLP_ENABLED"] == "true"
    ports = {p["port"] for p in one("Service", "jaeger")["spec"]["ports"]}
    assert ports == {16686, 4317, 4318}


def test_k8s_configs_differ_from_compose_only_in_endpoints() -> None:
    for name in SERVICES:
        k8s = yaml.safe_load((K8S / "config" / f"{name}.yaml").read_text("utf-8"))
        compose = yaml.safe_load((DEPLOY / "config" / f"{name}.yaml").read_text("utf-8"))
        for target, service in (k8s.get("services") or {}).items():
            # The Service's port 80 is the target sidecar's 15006.
            assert service["endpoints"] == [f"http://{target}"]
            service["endpoints"] = [f"http://{target}:15006"]
        assert k8s == compose, name


def test_k8s_configs_pass_sidecar_check(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = make_keys(tmp_path / "keys")
    for name in SERVICES:
        copy = localise(K8S / "config" / f"{name}.yaml", keys, tmp_path)
        status, errors = check_in_process(copy, capsys)
        assert status == 0, f"{name}: {errors}"


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_kustomize_renders_the_mesh() -> None:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    config_maps = {o["metadata"]["name"] for o in rendered if o["kind"] == "ConfigMap"}
    deployments = [o for o in rendered if o["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {*SERVICES, "jaeger"}
    for o in rendered:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == NAMESPACE
    for deployment in deployments:
        for volume in deployment["spec"]["template"]["spec"].get("volumes", []):
            sources = volume.get("projected", {}).get("sources") or [volume]
            for name in (source.get("configMap", {}).get("name") for source in sources):
                # Generated names carry a content hash; the JWKS and the CA bundle are
                # made outside kustomize.
                assert name in (None, "mesh-jwks", "mesh-ca") or name in config_maps, name
    assert EDGE in {d["metadata"]["name"] for d in deployments}
