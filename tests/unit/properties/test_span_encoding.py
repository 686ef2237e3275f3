"""Any batch of spans encodes to the request the SDK's OTLP encoder builds."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from sidecar.telemetry.encoding import encode_request

# Surrogates included: a string that is not valid UTF-8 must be left out as the SDK leaves it.
texts = st.text(st.characters(exclude_categories=()), max_size=12)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),  # some outside int64
    st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1]),  # and its edges, always tried
    st.floats(),  # NaN and infinities too
    texts,
    st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(texts, inner, max_size=3),
    ),
    max_leaves=4,
)
attributes = st.one_of(st.none(), st.dictionaries(texts, values, max_size=4))
contexts = st.builds(
    SpanContext,
    trace_id=st.integers(1, 2**128 - 1),
    span_id=st.integers(1, 2**64 - 1),
    is_remote=st.booleans(),
    trace_flags=st.sampled_from([TraceFlags(0), TraceFlags(1), TraceFlags(3)]),
    trace_state=st.sampled_from(
        [TraceState(), TraceState([("vendor", "abc")]), TraceState([("a", "1"), ("b", "2")])]
    ),
)
times = st.integers(0, 2**64 - 1)
events = st.builds(Event, name=texts, attributes=attributes, timestamp=times)
links = st.builds(Link, context=contexts, attributes=attributes)
statuses = st.one_of(
    st.builds(Status, st.sampled_from(list(StatusCode)), st.none() | texts), st.none()
)
resources = st.sampled_from(
    [Resource.create({"service.name": "a"}), Resource({"k": "v"}, "https://schema"),
     Resource({"k": "v"}, "https://schema")]  # equal to the one before: one group
)
scopes = st.sampled_from(
    [None, InstrumentationScope("sidecar"), InstrumentationScope("x", "1", "https://s", {"a": 1})]
)


@st.composite
def spans(draw: st.DrawFn) -> ReadableSpan:
    kept_events = draw(st.lists(events, max_size=2))
    bounded = draw(st.booleans())
    return ReadableSpan(
        name=draw(texts),
        context=draw(contexts),
        parent=draw(st.none() | contexts),
        resource=draw(resources),
        attributes=draw(attributes),
        # A bounded list counts what it dropped: dropped_events_count.
        events=BoundedList.from_seq(1, kept_events) if bounded else kept_events,
        links=draw(st.lists(links, max_size=2)),
        kind=draw(st.sampled_from(list(SpanKind))),
        status=draw(statuses),
        start_time=draw(st.none() | times),
        end_time=draw(st.none() | times),
        instrumentation_scope=draw(scopes),
    )


def canonical(body: bytes) -> bytes:
    """The request decoded and written again by protobuf itself (NaN-safe, unlike ==)."""
    return ExportTraceServiceRequest.FromString(body).SerializeToString(deterministic=True)


@given(st.lists(spans(), max_size=4))
def test_any_batch_encodes_as_the_sdk_encodes_it(batch: list[Any]) -> None:
    try:
        theirs = encode_spans(batch).SerializePartialToString()
    except ValueError:  # a name that is not UTF-8: the batch fails with both encoders
        with pytest.raises(ValueError):
            encode_request(batch)
        return
    assert canonical(encode_request(batch)) == canonical(theirs)
