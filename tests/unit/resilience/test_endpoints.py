import random
from collections import Counter
from types import TracebackType
from typing import Any

import aiohttp
import pytest

from sidecar.clock import FakeClock
from sidecar.config.settings import HealthCheck, OutlierPolicy
from sidecar.resilience.classify import Outcome
from sidecar.resilience.endpoints import Endpoints, OnEject

OUTLIER = OutlierPolicy(consecutive_failures=3, base_ejection=30, max_ejected_percent=50)


def urls(n: int) -> list[str]:
    return [f"http://e{i}:15006" for i in range(n)]


def make(
    n: int,
    outlier: OutlierPolicy = OUTLIER,
    clock: FakeClock | None = None,
    health_check: HealthCheck | None = None,
    on_eject: OnEject | None = None,
) -> Endpoints:
    return Endpoints(
        urls(n),
        outlier,
        health_check,
        clock=clock or FakeClock(),
        rng=random.Random(5),
        service="billing",
        on_eject=on_eject,
    )


def fail(endpoints: Endpoints, index: int, times: int) -> None:
    for _ in range(times):
        endpoints.endpoints[index].record(Outcome.FAILURE)


def test_pick_prefers_the_less_loaded_of_two() -> None:
    endpoints = make(2)
    busy, idle = endpoints.endpoints
    busy.start()
    busy.start()
    assert all(endpoints.pick() is idle for _ in range(50))


def test_pick_never_chooses_the_most_loaded_of_many() -> None:
    endpoints = make(4)
    loads = [5, 1, 2, 3]
    for endpoint, load in zip(endpoints.endpoints, loads, strict=True):
        for _ in range(load):
            endpoint.start()
    picks = Counter(endpoints.pick().url for _ in range(2000))
    assert endpoints.endpoints[0].url not in picks  # it loses every pair it is in
    assert picks.most_common(1)[0][0] == endpoints.endpoints[1].url


def test_pick_spreads_equal_load() -> None:
    endpoints = make(3)
    picks = Counter(endpoints.pick().url for _ in range(3000))
    assert len(picks) == 3 and min(picks.values()) > 600


def test_start_finish_counts_in_flight_and_records() -> None:
    endpoints = make(2)
    endpoint = endpoints.endpoints[0]
    endpoint.start()
    assert endpoint.in_flight == 1
    endpoint.finish(Outcome.FAILURE)
    assert endpoint.in_flight == 0 and endpoint.consecutive_failures == 1
    endpoint.start()
    endpoint.finish(None)  # cancelled: no verdict
    assert endpoint.consecutive_failures == 1
    endpoint.finish(Outcome.SUCCESS)
    assert endpoint.in_flight == 0 and endpoint.consecutive_failures == 0


def test_consecutive_failures_eject_and_the_endpoint_returns() -> None:
    clock = FakeClock()
    endpoints = make(2, clock=clock)
    bad, good = endpoints.endpoints
    fail(endpoints, 0, 2)
    bad.record(Outcome.SUCCESS)
    fail(endpoints, 0, 2)
    assert not bad.ejected  # never three in a row
    fail(endpoints, 0, 1)
    assert bad.ejected
    assert all(endpoints.pick() is good for _ in range(20))
    assert endpoints.state() == [
        {"url": bad.url, "healthy": True, "ejected": True},
        {"url": good.url, "healthy": True, "ejected": False},
    ]
    clock.advance(30)
    assert not bad.ejected


def test_ejection_grows_with_each_ejection() -> None:
    clock = FakeClock()
    seen: list[tuple[str, str, float]] = []
    endpoints = make(2, clock=clock, on_eject=lambda *e: seen.append(e))
    bad = endpoints.endpoints[0]
    for expected in (30, 60, 90):
        fail(endpoints, 0, 3)
        assert bad.ejected
        clock.advance(expected - 0.1)
        assert bad.ejected
        clock.advance(0.1)
        assert not bad.ejected
    assert [s for _, _, s in seen] == [30, 60, 90]
    assert seen[0][:2] == ("billing", bad.url)


def test_ejection_time_is_capped_at_max_ejection() -> None:
    clock = FakeClock()
    seen: list[float] = []
    outlier = OutlierPolicy(consecutive_failures=1, base_ejection=30, max_ejection=100)
    endpoints = make(2, outlier, clock=clock, on_eject=lambda *e: seen.append(e[2]))
    bad = endpoints.endpoints[0]
    for _ in range(6):
        fail(endpoints, 0, 1)
        clock.advance(seen[-1] - 0.1)
        assert bad.ejected
        clock.advance(0.1)
        assert not bad.ejected
    assert seen == [30, 60, 90, 100, 100, 100]


def test_max_ejection_shorter_than_base_ejection_leaves_base_ejection() -> None:
    clock = FakeClock()
    seen: list[float] = []
    outlier = OutlierPolicy(consecutive_failures=1, base_ejection=600, max_ejection=300)
    endpoints = make(2, outlier, clock=clock, on_eject=lambda *e: seen.append(e[2]))
    for _ in range(2):
        fail(endpoints, 0, 1)
        clock.advance(seen[-1])
    assert seen == [600, 600]  # as Envoy: the longer of the two is the cap


def test_failures_while_ejected_are_ignored() -> None:
    clock = FakeClock()
    endpoints = make(2, clock=clock)
    fail(endpoints, 0, 3)
    fail(endpoints, 0, 10)  # late answers from before the ejection
    assert endpoints.endpoints[0].ejections == 1
    clock.advance(30)
    assert endpoints.endpoints[0].consecutive_failures == 0


def test_never_more_than_max_ejected_percent() -> None:
    endpoints = make(5)  # 50% of 5, rounded down: 2
    for i in range(5):
        fail(endpoints, i, 3)
    assert [e.ejected for e in endpoints.endpoints] == [True, True, False, False, False]
    assert len(endpoints.available()) == 3


def test_capped_endpoint_is_ejected_once_there_is_room() -> None:
    clock = FakeClock()
    endpoints = make(2, clock=clock)
    fail(endpoints, 0, 3)
    fail(endpoints, 1, 3)
    assert not endpoints.endpoints[1].ejected
    clock.advance(30)  # the first returns
    fail(endpoints, 1, 1)  # still failing: now there is room
    assert endpoints.endpoints[1].ejected


def test_only_endpoint_is_never_ejected() -> None:
    endpoints = make(1, OutlierPolicy(consecutive_failures=1, max_ejected_percent=100))
    fail(endpoints, 0, 50)
    assert not endpoints.endpoints[0].ejected
    assert endpoints.pick() is endpoints.endpoints[0]


def test_percent_rounds_down() -> None:
    endpoints = make(3, OutlierPolicy(consecutive_failures=1, max_ejected_percent=30))
    fail(endpoints, 0, 5)
    assert not endpoints.endpoints[0].ejected  # 30% of 3 is 0.9: nobody


def test_every_endpoint_unhealthy_falls_back_to_all() -> None:
    endpoints = make(2)
    for endpoint in endpoints.endpoints:
        endpoint.healthy = False
    assert endpoints.pick() in endpoints.endpoints


def test_unhealthy_endpoint_not_picked() -> None:
    endpoints = make(3)
    endpoints.endpoints[1].healthy = False
    assert all(endpoints.pick() is not endpoints.endpoints[1] for _ in range(100))


def test_invalid_settings_refused() -> None:
    with pytest.raises(ValueError):
        Endpoints([], OUTLIER, clock=FakeClock())
    with pytest.raises(ValueError):
        Endpoints(urls(2), OutlierPolicy(max_ejected_percent=150), clock=FakeClock())


# --- active health checks -------------------------------------------------------------------


class FakeResponse:
    def __init__(self, status: int) -> None:
        self.status = status

    async def __aenter__(self) -> "FakeResponse":
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


class FakeSession:
    """Answers health probes from a table: a status, or an exception to raise."""

    def __init__(self, answers: dict[str, int | Exception]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, float | None, bool]] = []

    def get(
        self, url: str, *, allow_redirects: bool, timeout: aiohttp.ClientTimeout, **tls: Any
    ) -> FakeResponse:
        self.asked.append((url, timeout.total, allow_redirects))
        answer = self.answers[url]
        if isinstance(answer, Exception):
            raise answer
        return FakeResponse(answer)


CHECK = HealthCheck(path="/healthz", interval=10, timeout=1)


async def test_probe_marks_health() -> None:
    endpoints = make(3, health_check=CHECK)
    session = FakeSession(
        {
            "http://e0:15006/healthz": 200,
            "http://e1:15006/healthz": 503,
            "http://e2:15006/healthz": aiohttp.ClientConnectionError(),
        }
    )
    await endpoints.probe_all(session)  # type: ignore[arg-type]
    assert [e.healthy for e in endpoints.endpoints] == [True, False, False]
    assert all(timeout == 1 and not redirects for _, timeout, redirects in session.asked)
    session.answers["http://e1:15006/healthz"] = 204
    await endpoints.probe_all(session)  # type: ignore[arg-type]
    assert [e.healthy for e in endpoints.endpoints] == [True, True, False]
    assert endpoints.state()[2] == {"url": "http://e2:15006", "healthy": False, "ejected": False}


async def test_probe_timeout_is_unhealthy() -> None:
    endpoints = make(2, health_check=CHECK)
    session = FakeSession(
        {"http://e0:15006/healthz": TimeoutError(), "http://e1:15006/healthz": 200}
    )
    await endpoints.probe_all(session)  # type: ignore[arg-type]
    assert [e.healthy for e in endpoints.endpoints] == [False, True]


async def test_probe_loop_probes_every_interval() -> None:
    clock = FakeClock()
    endpoints = make(1, clock=clock, health_check=CHECK)
    session = FakeSession({"http://e0:15006/healthz": 200})

    async def stop_after_three(seconds: float) -> None:
        clock.sleeps.append(seconds)
        if len(clock.sleeps) == 3:
            raise RuntimeError("stop")

    clock.sleep = stop_after_three  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await endpoints.probe_loop(session)  # type: ignore[arg-type]
    assert len(session.asked) == 3
    assert clock.sleeps == [10, 10, 10]


async def test_no_health_check_no_probes() -> None:
    endpoints = make(2)
    session = FakeSession({})
    await endpoints.probe_loop(session)  # type: ignore[arg-type]
    assert session.asked == []
