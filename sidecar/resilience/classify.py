"""One verdict on every attempt's result, shared by retry, breaker, outliers and metrics.

A connect failure, reset or timeout, or a 5xx answer from upstream, is a
failure, whoever upstream made it (the far app or the far sidecar). The
sidecar's own refusals (`bulkhead_full`, `circuit_open` made here) are not:
they say nothing about the upstream's health. Because every consumer asks
this module, retry and breaker can never disagree about what failed.
"""

from __future__ import annotations

import asyncio
import enum

from sidecar import reasons
from sidecar.stack import Reply, RequestBodyError, UpstreamError


class Outcome(enum.Enum):
    SUCCESS = "success"
    RETRYABLE = "retryable"  # a failure whose kind is in `retry_on`
    FAILURE = "failure"

    @property
    def failed(self) -> bool:
        return self is not Outcome.SUCCESS


def is_refusal(result: Reply | BaseException) -> bool:
    """True for a reply this sidecar made itself without asking the upstream
    (`bulkhead_full`, `circuit_open`): it says nothing about the upstream."""
    return (isinstance(result, Reply) and result.made_here
            and reasons.is_local_refusal(result.reason))


def failure_kind(result: Reply | BaseException) -> str | None:
    """The `retry_on` name of a failure (`connect-failure`, `503`, ...), None if it is none.

    Cancellation is not an outcome at all: a caller that went away says
    nothing about the upstream, so asking about it is a programming error.
    """
    if isinstance(result, Reply):
        if is_refusal(result) or result.status < 500:
            return None
        return str(result.status)
    if isinstance(result, UpstreamError):
        return result.kind
    if isinstance(result, RequestBodyError):
        return None  # the client's body, not the upstream, failed
    if isinstance(result, Exception):
        # Not one of the transport's mapped failures: still a failure, never retried.
        return type(result).__name__
    raise ValueError(f"{type(result).__name__} is not an outcome; handle cancellation first")


def is_failure(result: Reply | BaseException) -> bool:
    return failure_kind(result) is not None


def classify(result: Reply | BaseException, retry_on: frozenset[str] = frozenset()) -> Outcome:
    """SUCCESS, RETRYABLE (a failure named in `retry_on`) or FAILURE."""
    kind = failure_kind(result)
    if kind is None:
        return Outcome.SUCCESS
    return Outcome.RETRYABLE if kind in retry_on else Outcome.FAILURE


def error_type(result: Reply | BaseException) -> str | None:
    """The name for metrics and the span's `error.type`: the failure kind, or None.

    Unlike `classify`, this accepts cancellation (`cancelled`), so telemetry
    can describe a call the app abandoned.
    """
    if isinstance(result, asyncio.CancelledError):
        return "cancelled"
    if isinstance(result, BaseException) and not isinstance(result, Exception):
        return type(result).__name__
    return failure_kind(result)
