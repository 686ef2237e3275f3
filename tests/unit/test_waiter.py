"""`sidecar wait`'s backoff: aiohttp-retry set explicitly, every discarded answer released."""

from __future__ import annotations

from unittest import mock

import aiohttp

from sidecar import waiter


def test_attempts_fit_the_timeout() -> None:
    assert waiter.attempts_within(0) == 1
    # 0.05 + 0.1 + 0.2 + 0.4 = 0.75 s of delays: five polls in one second.
    assert waiter.attempts_within(1.0) == 5
    # Past the ramp, one poll a second (MAX_DELAY).
    assert waiter.attempts_within(61.55) - waiter.attempts_within(1.55) == 60


def test_backoff_doubles_from_the_first_delay_to_the_cap() -> None:
    backoff = waiter._Backoff(attempts=10)
    delays = [backoff.get_timeout(attempt) for attempt in range(1, 8)]
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_backoff_is_configured_for_a_readiness_poll_only() -> None:
    backoff = waiter._Backoff(attempts=3)
    assert backoff.methods == {"GET"}
    assert set(backoff.statuses) == {503}
    assert backoff.retry_all_server_errors is False
    assert set(backoff.exceptions) == {aiohttp.ClientConnectionError, TimeoutError}


def test_each_discarded_answer_is_released() -> None:
    backoff = waiter._Backoff(attempts=3)
    discarded = mock.Mock(spec=aiohttp.ClientResponse, status=503)
    backoff.get_timeout(1, discarded)
    discarded.release.assert_called_once_with()
    assert backoff.last == "it answered 503"
    backoff.get_timeout(2, None)  # a refused connection: nothing to release
    assert backoff.last == "it did not answer"


def test_a_wildcard_bind_is_probed_on_loopback() -> None:
    assert waiter.probe_host("0.0.0.0") == "127.0.0.1"
    assert waiter.probe_host("::") == "::1"
    assert waiter.probe_host("127.0.0.2") == "127.0.0.2"
    assert waiter.probe_host("localhost") == "localhost"
