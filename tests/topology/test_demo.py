"""`make demo`, run as a newcomer runs it, in loopback mode (no root needed).

The demo is a subprocess with a time limit; its output must tell the whole
story: encounters as sagas with the callers each app saw, a trace tree per
encounter, a refusal's problem+json, strict mTLS refusing plain text and a
client without a certificate, a saga compensated, a sidecar killed mid-saga
whose saga completes after the restart with one claim, events and audit
records arriving after compliance-monitor returns, breakers opening and
closing, every certificate rotated under load with no failed call, the
audit trail with SPIFFE IDs verified, and every sidecar exiting 0 on SIGTERM.
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
RUN_WITHIN = 150  # seconds; the demo limits itself to 95
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

    encounters = section(output, "2. Encounters as sagas")
    assert encounters.count("Encounter for TEST-PATIENT-00") == 3
    for caller, callee in [
        ("edge", "healthcare-api"),
        ("healthcare-api", "insurance-verification"),
        ("healthcare-api", "billing-engine"),
    ]:
        hop = rf"{caller} -> {callee} +20[012] +app saw x-source-service: {caller}\n"
        assert re.search(hop, encounters), hop
    for caller in ("insurance-verification", "billing-engine"):
        hop = rf"{caller} -> compliance-monitor +202 +queued by {caller}'s sidecar \(fan-out\)"
        assert re.search(hop, encounters), hop
    assert encounters.count("saga: completed (verify done, claim done, notify done)") == 2
    assert "saga: compensated (verify failed, claim pending, notify pending)" in encounters

    trees = section(output, "3. One trace per encounter")
    assert len(re.findall(r"^trace [0-9a-f]{32} ", trees, re.M)) == 3
    for service in APPS:
        assert re.search(rf"\[{service}, server\] [0-9.]+ ms -> 20[012]", trees), service
    assert re.search(r"^  POST /encounters \[edge, client\]", trees, re.M)
    assert re.search(r"^    POST /encounters \[healthcare-api, server\]", trees, re.M)
    assert re.search(r"^      saga encounter verify \[healthcare-api, internal\]", trees, re.M)
    assert "fanout compliance-monitor [billing-engine, internal]" in trees

    refusals = section(output, "4. Refused calls")
    assert "POST billing-engine /claims -> 403, x-sidecar-reason: policy_denied" in refusals
    assert '"type": "https://sidecar.dev/problems/policy-denied"' in refusals
    assert "-> 400, x-sidecar-reason: tls_required" in refusals
    assert re.search(r"POST https://\S+/encounters -> refused during the TLS handshake", refusals)

    rollback = section(output, "5. A saga whose billing step fails")
    assert "Encounter: 409 " in rollback
    assert "saga: compensated (verify compensated, claim failed, notify pending)" in rollback

    crash = section(output, "6. healthcare-api's sidecar is killed mid-saga")
    assert "SIDECAR_CRASH_AT=after-action:claim" in crash
    assert "(the sidecar exited with -9: SIGKILL)" in crash
    assert "billing-engine answered 200 (replayed: True), one claim." in crash
    assert "The client posted ENC-DEMO-CRASH again: 201" in crash
    assert "saga: completed (verify done, claim done, notify done); claim attempts: 2" in crash

    away = section(output, "7. compliance-monitor stops")
    assert "encounter 1: 201" in away and "encounter 2: 201" in away
    assert "insurance-verification -> compliance-monitor: open" in away
    assert "billing-engine -> compliance-monitor: open" in away
    assert 'sidecar_circuit_state{peer="compliance-monitor",state="open"} 1.0' in away
    assert re.search(r"insurance-verification: fan-outs \{'running': [1-9]", away)

    back = section(output, "8. compliance-monitor comes back")
    assert len(re.findall(r"^  event \d+: coverage-verified ", back, re.M)) == 2
    assert len(re.findall(r"^  event \d+: claim-submitted ", back, re.M)) == 2
    assert "insurance-verification -> compliance-monitor: closed" in back
    assert "billing-engine -> compliance-monitor: closed" in back
    for service in SERVICES:
        assert re.search(rf"^  {service} +\d+ records, intact: True$", back, re.M), service

    rotation = section(output, "9. Every certificate replaced under load")
    for service in SERVICES:
        changed = re.search(rf"{service} +not after (\S+) -> (\S+)\n", rotation)
        assert changed and changed.group(1) != changed.group(2), service
    done_under_load = re.search(r"(\d+) encounters \((\d+) calls between sidecars\) during "
                                r"the rotation: 0 failed\.", rotation)
    assert done_under_load and int(done_under_load.group(1)) > 0, rotation
    assert 'sidecar_certificate_expiry_seconds{kind="certificate"}' in rotation

    stopping = section(output, "10. Stopping")
    for service in SERVICES:
        assert re.search(rf"{service} sidecar +exit 0\n", stopping), service

    audit = section(output, "11. The audit trail")
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
