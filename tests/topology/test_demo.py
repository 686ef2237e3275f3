"""`make demo`, run as a newcomer runs it, in loopback mode (no root needed).

The demo is a subprocess with a time limit; its output must tell the whole
story: verified callers, a refusal's problem+json, strict mTLS refusing plain
text and a client without a certificate, breakers opening and closing, every
certificate rotated under load with no failed call, a trace tree per
encounter, the audit trail with SPIFFE IDs verified, and every sidecar
exiting 0 on SIGTERM.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.topology import APPS, SERVICES
from tests.support.otlp import OtlpReceiver

ROOT = Path(__file__).resolve().parents[2]
RUN_WITHIN = 120  # seconds; the demo limits itself to 75
RULE = "=" * 72


def run_demo(workdir: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    env |= {"DEMO_MODE": "loopback", "DEMO_WORKDIR": str(workdir), **extra}
    return subprocess.run(
        [sys.executable, "-m", "deploy.demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_WITHIN,
        check=False,
    )


def section(output: str, title: str) -> str:
    """The text under the heading that starts with `title`, up to the next heading."""
    start = output.index("\n" + title)
    body = output.index("\n", output.index(RULE, start))  # past the rule under the title
    end = output.find("\n" + RULE, body)
    return output[start : end if end != -1 else None]


@pytest.mark.timeout(RUN_WITHIN + 20)
def test_the_demo_tells_the_whole_story_and_exits_0(tmp_path: Path) -> None:
    done = run_demo(tmp_path)
    output = done.stdout
    assert done.returncode == 0, output[-4000:] + done.stderr[-4000:]
    assert "Mode: loopback (DEMO_MODE=loopback)" in output

    encounters = section(output, "2. Encounters")
    assert encounters.count("Encounter for TEST-PATIENT-00") == 3
    for caller, callee in [
        ("edge", "healthcare-api"),
        ("healthcare-api", "insurance-verification"),
        ("healthcare-api", "billing-engine"),
        ("insurance-verification", "compliance-monitor"),
        ("billing-engine", "compliance-monitor"),
    ]:
        hop = rf"{caller} -> {callee} +20[012] +app saw x-source-service: {caller}\n"
        assert re.search(hop, encounters), hop

    trees = section(output, "3. One trace per encounter")
    assert len(re.findall(r"^trace [0-9a-f]{32} ", trees, re.M)) == 3
    for service in APPS:
        assert re.search(rf"\[{service}, server\] [0-9.]+ ms -> 20[012]", trees), service
    assert re.search(r"^  POST /encounters \[edge, client\]", trees, re.M)
    assert re.search(r"^    POST /encounters \[healthcare-api, server\]", trees, re.M)

    refusals = section(output, "4. Refused calls")
    assert "POST billing-engine /claims -> 403, x-sidecar-reason: policy_denied" in refusals
    assert '"type": "https://sidecar.dev/problems/policy-denied"' in refusals
    assert "-> 400, x-sidecar-reason: tls_required" in refusals
    assert re.search(r"POST https://\S+/encounters -> refused during the TLS handshake", refusals)

    failing = section(output, "5. A failing dependency")
    assert "503 upstream_connect_failure" in failing
    assert "insurance-verification 503 circuit_open, billing-engine 503 circuit_open" in failing
    assert '"reason": "circuit_open"' in failing
    assert "insurance-verification -> compliance-monitor: open" in failing
    assert 'sidecar_circuit_state{peer="compliance-monitor",state="open"} 1.0' in failing

    recovered = section(output, "6. compliance-monitor comes back")
    assert "reports: insurance-verification 202, billing-engine 202" in recovered
    assert "insurance-verification -> compliance-monitor: closed" in recovered
    assert "billing-engine -> compliance-monitor: closed" in recovered

    rotation = section(output, "7. Every certificate replaced under load")
    for service in SERVICES:
        changed = re.search(rf"{service} +not after (\S+) -> (\S+)\n", rotation)
        assert changed and changed.group(1) != changed.group(2), service
    done_under_load = re.search(r"(\d+) encounters \((\d+) calls between sidecars\) during "
                                r"the rotation: 0 failed\.", rotation)
    assert done_under_load and int(done_under_load.group(1)) > 0, rotation
    assert 'sidecar_certificate_expiry_seconds{kind="certificate"}' in rotation

    stopping = section(output, "8. Stopping")
    for service in SERVICES:
        assert re.search(rf"{service} sidecar +exit 0\n", stopping), service

    audit = section(output, "9. The audit trail")
    assert audit.count(": intact: ") == len(SERVICES)
    assert audit.count("\n  exit 0") == len(SERVICES)
    assert re.search(
        r"inbound +edge -> billing-engine POST /claims 403 policy_denied denied "
        r"mtls=spiffe://intelluxe\.local/edge ", audit
    )
    assert re.search(r"inbound +anonymous -> healthcare-api \S+ \S+ 400 tls_required denied "
                     r"plain ", audit)
    for service in SERVICES:
        assert (tmp_path / "audit" / f"{service}.jsonl").stat().st_size > 0
    assert "Everything above happened as described." in output


@pytest.mark.timeout(RUN_WITHIN + 20)
def test_with_an_otlp_endpoint_set_the_sidecars_export_there(tmp_path: Path) -> None:
    with OtlpReceiver() as collector:
        done = run_demo(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=collector.url)
        spans = collector.spans
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    trees = section(done.stdout, "3. One trace per encounter")
    assert f"The sidecars export to {collector.url}" in trees
    # The apps' own call tree takes the place of the span tree.
    assert "edge -> healthcare-api" in trees
    assert {span["service_name"] for span in spans} == set(SERVICES)
    printed = set(re.findall(r"^trace ([0-9a-f]{32}) ", trees, re.M))
    assert len(printed) == 3 and printed <= {span["trace_id"] for span in spans}


def test_an_unknown_mode_is_refused_with_exit_2(tmp_path: Path) -> None:
    done = run_demo(tmp_path, DEMO_MODE="docker")
    assert done.returncode == 2
    assert "DEMO_MODE must be auto, netns or loopback" in done.stderr
    assert not (tmp_path / "keys").exists()
