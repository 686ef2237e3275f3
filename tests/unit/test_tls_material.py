"""`MeshTLS`: contexts swapped when the files change, refused files kept out, expiry told."""

from __future__ import annotations

import asyncio
import datetime
import logging
from pathlib import Path

import pytest

from deploy.process import CertRing
from sidecar.clock import FakeClock
from sidecar.config.settings import TLS
from sidecar.tls.material import WATCH_INTERVAL, MeshTLS

TD = "mesh.test"
DAY = 86400.0


def ring_and_tls(tmp_path: Path, clock: FakeClock | None = None) -> tuple[CertRing, MeshTLS]:
    ring = CertRing(tmp_path, trust_domain=TD).generate(["a", "b"])
    tls = MeshTLS(TLS(**ring.tls("a")), service="a", trust_domain=TD,
                  clock=clock or FakeClock(wall=datetime.datetime.now(datetime.UTC).timestamp()))
    tls.load()
    return ring, tls


def test_new_files_make_new_contexts_and_bad_ones_are_refused(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture):
    ring, tls = ring_and_tls(tmp_path)
    first = tls.current
    assert not tls.changed()
    ring.issue("a", days=30)
    assert tls.changed() and tls.reload()
    assert tls.server is not first.server and tls.client is not first.client
    assert tls.expiry()[0][1] < 31 * DAY
    # b's certificate in a's place: the SPIFFE ID is wrong, so the contexts in use stay.
    second = tls.current
    ring.cert_file("a").write_bytes(ring.cert_file("b").read_bytes())
    ring.key_file("a").write_bytes(ring.key_file("b").read_bytes())
    with caplog.at_level(logging.ERROR, logger="sidecar.tls"):
        assert not tls.reload()
    assert tls.current is second
    assert "this service is spiffe://mesh.test/a" in caplog.records[-1].__dict__["problem"]


def test_expiry_and_readiness_follow_the_clock(tmp_path: Path) -> None:
    # Certificates keep whole seconds: issued at a whole second that the clock
    # reads half a second later, this one has two days less half a second left,
    # however long making the ring took.
    issued = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    clock = FakeClock(wall=issued.timestamp() + 0.5)
    ring, tls = ring_and_tls(tmp_path, clock)
    ring.issue("a", days=2, now=issued)
    tls.reload()
    kinds = dict(tls.expiry())
    assert 1.9 * DAY < kinds["certificate"] <= 2 * DAY and kinds["ca"] > 3000 * DAY
    assert tls.not_ready() == []
    clock.advance(2 * DAY)
    assert tls.expiry()[0][1] < 0
    [reason] = tls.not_ready()
    assert reason.startswith("tls.cert_file: the certificate expired at ")


def test_the_expiry_warning_comes_once_a_day_while_it_holds(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture):
    clock = FakeClock(wall=datetime.datetime.now(datetime.UTC).timestamp())
    ring, tls = ring_and_tls(tmp_path, clock)
    with caplog.at_level(logging.WARNING, logger="sidecar.tls"):
        tls.warn_if_expiring()
        assert caplog.records == []  # 90 days left, the warning starts at 30
        ring.issue("a", days=10)
        tls.reload()
        tls.warn_if_expiring()
        clock.advance(3600)
        tls.warn_if_expiring()
        clock.advance(DAY)
        tls.warn_if_expiring()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].getMessage().startswith("the certificate expires soon")
    assert warnings[0].__dict__["days_left"] == pytest.approx(10, abs=0.1)


async def test_the_watcher_reloads_once_the_files_have_settled(tmp_path: Path) -> None:
    clock = FakeClock(wall=datetime.datetime.now(datetime.UTC).timestamp())
    ring, tls = ring_and_tls(tmp_path, clock)
    first = tls.current
    watching = asyncio.ensure_future(tls.watch())
    try:
        await asyncio.sleep(0)
        ring.issue("a", days=20)
        for _ in range(3):  # each turn is one WATCH_INTERVAL on the fake clock
            await asyncio.sleep(0)
        assert tls.current is not first
        assert clock.sleeps[:3] == [WATCH_INTERVAL] * 3
    finally:
        watching.cancel()
