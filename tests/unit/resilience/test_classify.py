import asyncio

import pytest

from sidecar.http import problem
from sidecar.resilience.classify import (
    Outcome,
    classify,
    error_type,
    failure_kind,
    is_failure,
    is_refusal,
)
from sidecar.stack import UpstreamError
from tests.support.calls import ok

RETRY_ON = frozenset({"connect-failure", "reset", "per-try-timeout", "502", "503", "504"})


@pytest.mark.parametrize("status", [200, 204, 301, 404, 429, 499])
def test_answers_below_500_are_success(status: int) -> None:
    assert classify(ok(status), RETRY_ON) is Outcome.SUCCESS
    assert not is_failure(ok(status))


@pytest.mark.parametrize("status", [502, 503, 504])
def test_listed_5xx_are_retryable(status: int) -> None:
    assert classify(ok(status), RETRY_ON) is Outcome.RETRYABLE


def test_unlisted_5xx_is_a_plain_failure() -> None:
    assert classify(ok(500), RETRY_ON) is Outcome.FAILURE
    assert failure_kind(ok(500)) == "500"


@pytest.mark.parametrize("kind", ["connect-failure", "reset", "per-try-timeout"])
def test_listed_upstream_errors_are_retryable(kind: str) -> None:
    assert classify(UpstreamError(kind, sent=True), RETRY_ON) is Outcome.RETRYABLE


def test_overall_timeout_is_a_failure_not_listed_by_default() -> None:
    assert classify(UpstreamError("timeout", sent=True), RETRY_ON) is Outcome.FAILURE


def test_own_refusals_are_not_failures() -> None:
    for reason in ("circuit_open", "bulkhead_full"):
        reply = problem.reply(reason, "x")
        assert is_refusal(reply)
        assert not is_failure(reply)
        assert classify(reply, RETRY_ON) is Outcome.SUCCESS


def test_reason_relayed_from_far_sidecar_is_a_failure() -> None:
    relayed = ok(503, reason="circuit_open")  # not made here
    assert not is_refusal(relayed)
    assert classify(relayed, RETRY_ON) is Outcome.RETRYABLE


def test_own_timeout_reply_is_a_failure() -> None:
    assert is_failure(problem.reply("upstream_timeout", "x"))


def test_unexpected_exception_is_a_failure_never_retried() -> None:
    assert classify(RuntimeError("bug"), RETRY_ON) is Outcome.FAILURE
    assert error_type(RuntimeError("bug")) == "RuntimeError"


def test_cancellation_is_no_outcome() -> None:
    with pytest.raises(ValueError):
        classify(asyncio.CancelledError())
    assert error_type(asyncio.CancelledError()) == "cancelled"


def test_error_type_names_the_kind() -> None:
    assert error_type(UpstreamError("connect-failure", sent=False)) == "connect-failure"
    assert error_type(ok(503)) == "503"
    assert error_type(ok(200)) is None


def test_default_retry_on_is_empty() -> None:
    assert classify(ok(503)) is Outcome.FAILURE
    assert Outcome.FAILURE.failed and Outcome.RETRYABLE.failed and not Outcome.SUCCESS.failed
