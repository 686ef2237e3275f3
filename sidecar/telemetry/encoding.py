"""Ended spans to the bytes of an OTLP `ExportTraceServiceRequest`, written directly.

The SDK's encoder builds a protobuf Python object per span, per attribute
and per value before serialising them, and that was most of what a sampled
span cost (`bench/span_cost.py`). Here the same message is written as bytes
straight from the `ReadableSpan`s: length-delimited fields, varints and
fixed-width integers, per the public protobuf wire format. Field numbers and
wire types are read from the installed opentelemetry-proto descriptors, so
they cannot drift from the schema the SDK uses.

The output decodes to the message the SDK's `encode_spans` builds, field for
field and in the same order, today byte for byte (checked on the layers'
spans in tests/unit/telemetry/test_encoding.py, on any values in
tests/unit/properties/test_span_encoding.py), with the SDK's choices: which
empty fields are still present (status, resource, scope, an attribute's
value), `flags` carrying only the is-remote bits, and an attribute whose
value cannot be encoded (an integer outside int64, a string that is not
valid UTF-8, an unknown type) left out and logged, the rest of the span kept.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import (
    ResourceSpans,
    ScopeSpans,
    Span,
    SpanFlags,
    Status,
)
from opentelemetry.sdk.resources import Resource as SdkResource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope as SdkScope
from opentelemetry.trace import Link, SpanContext, SpanKind

log = logging.getLogger("sidecar.tracing")

# ---- field tags, from the descriptors

_WIRE_TYPE = {
    FieldDescriptor.TYPE_STRING: 2,
    FieldDescriptor.TYPE_BYTES: 2,
    FieldDescriptor.TYPE_MESSAGE: 2,
    FieldDescriptor.TYPE_FIXED64: 1,
    FieldDescriptor.TYPE_DOUBLE: 1,
    FieldDescriptor.TYPE_SFIXED64: 1,
    FieldDescriptor.TYPE_FIXED32: 5,
    FieldDescriptor.TYPE_SFIXED32: 5,
    FieldDescriptor.TYPE_FLOAT: 5,
    FieldDescriptor.TYPE_INT32: 0,
    FieldDescriptor.TYPE_INT64: 0,
    FieldDescriptor.TYPE_UINT32: 0,
    FieldDescriptor.TYPE_UINT64: 0,
    FieldDescriptor.TYPE_SINT32: 0,
    FieldDescriptor.TYPE_SINT64: 0,
    FieldDescriptor.TYPE_ENUM: 0,
    FieldDescriptor.TYPE_BOOL: 0,
}
_INT64 = range(-(2**63), 2**63)


def _varint(value: int) -> bytes:
    """`value` (0 or more, below 2**64) as a base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(message: Descriptor, field: str) -> bytes:
    described = message.fields_by_name[field]
    return _varint(described.number << 3 | _WIRE_TYPE[described.type])


_SMALL_VARINTS = [_varint(n) for n in range(0x80)]  # lengths and counts are mostly small
_TRACE_ID_LENGTH, _SPAN_ID_LENGTH = _SMALL_VARINTS[16], _SMALL_VARINTS[8]


def _length(value: int) -> bytes:
    return _SMALL_VARINTS[value] if value < 0x80 else _varint(value)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: string, bytes or an embedded message."""
    return tag + _length(len(payload)) + payload


def _tags(message: Descriptor) -> dict[str, bytes]:
    """The tag of each field of `message`, by field name."""
    return {field.name: _tag(message, field.name) for field in message.fields}


_REQUEST = _tags(ExportTraceServiceRequest.DESCRIPTOR)
_RS = _tags(ResourceSpans.DESCRIPTOR)
_RESOURCE = _tags(Resource.DESCRIPTOR)
_SS = _tags(ScopeSpans.DESCRIPTOR)
_SCOPE = _tags(InstrumentationScope.DESCRIPTOR)
_SPAN = _tags(Span.DESCRIPTOR)
_EVENT = _tags(Span.Event.DESCRIPTOR)
_LINK = _tags(Span.Link.DESCRIPTOR)
_STATUS = _tags(Status.DESCRIPTOR)
_KV = _tags(KeyValue.DESCRIPTOR)
_ANY = _tags(AnyValue.DESCRIPTOR)
_ARRAY_VALUES = _tags(ArrayValue.DESCRIPTOR)["values"]
_KVLIST_VALUES = _tags(KeyValueList.DESCRIPTOR)["values"]

_KINDS = {kind: _varint(Span.SpanKind.Value(f"SPAN_KIND_{kind.name}")) for kind in SpanKind}
_HAS_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_FIXED64, _FIXED32, _DOUBLE = struct.Struct("<Q"), struct.Struct("<I"), struct.Struct("<d")


# ---- the request


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """`spans` as an ExportTraceServiceRequest, grouped by resource, then by scope."""
    groups: dict[SdkResource, dict[SdkScope | None, list[bytes]]] = {}
    # A Resource hashes by dumping its attributes to JSON: once per object, not per span.
    by_object: dict[int, dict[SdkScope | None, list[bytes]]] = {}
    for span in spans:
        scopes = by_object.get(id(span.resource))
        if scopes is None:
            scopes = by_object[id(span.resource)] = groups.setdefault(span.resource, {})
        scopes.setdefault(span.instrumentation_scope or None, []).append(
            _field(_SS["spans"], encode_span(span))
        )
    return b"".join(
        _field(_REQUEST["resource_spans"], _resource_spans(resource, scopes))
        for resource, scopes in groups.items()
    )


def _resource_spans(resource: SdkResource, scopes: dict[SdkScope | None, list[bytes]]) -> bytes:
    parts = [_field(_RS["resource"], _attributes(_RESOURCE["attributes"], resource.attributes))]
    for scope, spans in scopes.items():
        parts.append(_field(_RS["scope_spans"], _scope_spans(scope, spans)))
    if resource.schema_url:
        parts.append(_field(_RS["schema_url"], resource.schema_url.encode()))
    return b"".join(parts)


def _scope_spans(scope: SdkScope | None, spans: list[bytes]) -> bytes:
    described = b""
    if scope is not None:
        described = _string(_SCOPE["name"], scope.name) + _string(_SCOPE["version"], scope.version)
        described += _attributes(_SCOPE["attributes"], scope.attributes)
    schema_url = scope.schema_url if scope is not None else None
    schema = _string(_SS["schema_url"], schema_url)
    return b"".join((_field(_SS["scope"], described), *spans, schema))


# ---- one span


def encode_span(span: ReadableSpan) -> bytes:
    """One `Span` message (its fields, without the enclosing tag)."""
    context = span.get_span_context()
    assert context is not None, "an ended span has a context"
    parent = span.parent
    parts = [
        _SPAN["trace_id"], _TRACE_ID_LENGTH, context.trace_id.to_bytes(16, "big"),
        _SPAN["span_id"], _SPAN_ID_LENGTH, context.span_id.to_bytes(8, "big"),
        _string(_SPAN["trace_state"], _trace_state(context)),
    ]  # fmt: skip
    if parent is not None:
        parts += (_SPAN["parent_span_id"], _SPAN_ID_LENGTH, parent.span_id.to_bytes(8, "big"))
    parts += (_string(_SPAN["name"], span.name), _SPAN["kind"], _KINDS[span.kind])
    if span.start_time:
        parts += (_SPAN["start_time_unix_nano"], _FIXED64.pack(span.start_time))
    if span.end_time:
        parts += (_SPAN["end_time_unix_nano"], _FIXED64.pack(span.end_time))
    parts.append(_attributes(_SPAN["attributes"], span.attributes))
    parts.append(_count(_SPAN["dropped_attributes_count"], span.dropped_attributes))
    parts.extend(_event(event) for event in span.events)
    parts.append(_count(_SPAN["dropped_events_count"], span.dropped_events))
    parts.extend(_link(link) for link in span.links)
    parts.append(_count(_SPAN["dropped_links_count"], span.dropped_links))
    if span.status is not None:
        parts.append(_field(_SPAN["status"], _status(span)))
    parts += (_SPAN["flags"], _FIXED32.pack(_flags(parent)))
    return b"".join(parts)


def _trace_state(context: SpanContext) -> str:
    return ",".join(f"{key}={value}" for key, value in context.trace_state.items())


def _status(span: ReadableSpan) -> bytes:
    code = span.status.status_code.value
    encoded = _STATUS["code"] + _varint(code) if code else b""
    return _string(_STATUS["message"], span.status.description) + encoded


def _flags(context: SpanContext | None) -> int:
    """Only whether the parent (or the linked span) is remote, as the SDK's encoder sets."""
    return _HAS_IS_REMOTE | (_IS_REMOTE if context is not None and context.is_remote else 0)


def _event(event: Event) -> bytes:
    body = b"".join((
        _EVENT["time_unix_nano"] + _FIXED64.pack(event.timestamp) if event.timestamp else b"",
        _string(_EVENT["name"], event.name),
        _attributes(_EVENT["attributes"], event.attributes),
        _count(_EVENT["dropped_attributes_count"], event.dropped_attributes),
    ))  # fmt: skip
    return _field(_SPAN["events"], body)


def _link(link: Link) -> bytes:
    # As the SDK's encoder: no trace_state on links.
    context = link.context
    body = b"".join((
        _LINK["trace_id"], _TRACE_ID_LENGTH, context.trace_id.to_bytes(16, "big"),
        _LINK["span_id"], _SPAN_ID_LENGTH, context.span_id.to_bytes(8, "big"),
        _attributes(_LINK["attributes"], link.attributes),
        _count(_LINK["dropped_attributes_count"], link.dropped_attributes),
        _LINK["flags"], _FIXED32.pack(_flags(context)),
    ))  # fmt: skip
    return _field(_SPAN["links"], body)


# ---- scalars and attributes


def _string(tag: bytes, value: str | None) -> bytes:
    """A proto3 string field: absent when empty."""
    return _field(tag, value.encode()) if value else b""


def _count(tag: bytes, value: int) -> bytes:
    return tag + _varint(value) if value else b""


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    """Each attribute as a repeated KeyValue field under `tag`; unencodable ones left out."""
    if not attributes:
        return b""
    parts = []
    for key, value in attributes.items():
        try:
            parts.append(_attribute(tag, key, value))
        except Exception as error:  # as the SDK's encoder: one bad value never loses the span
            log.warning("span attribute left out of the export: %s (%s)", key, type(error).__name__)
    return b"".join(parts)


# Most attributes repeat from span to span (method, route, service names,
# status): their fields are written once and kept, up to a bound. Only str,
# int and bool values, so that a NaN (never equal to itself) cannot fill it,
# and keyed by type since True == 1.
_WRITTEN: dict[tuple[bytes, str, type, Any], bytes] = {}
_WRITTEN_MAX = 4096
_CACHED_TYPES = (str, int, bool)


def _attribute(tag: bytes, key: str, value: Any) -> bytes:
    kind = type(value)
    if kind not in _CACHED_TYPES:
        return _field(tag, _key_value(key, value))
    cache_key = (tag, key, kind, value)
    written = _WRITTEN.get(cache_key)
    if written is None:
        if len(_WRITTEN) >= _WRITTEN_MAX:
            _WRITTEN.clear()
        written = _WRITTEN[cache_key] = _field(tag, _key_value(key, value))
    return written


def _key_value(key: str, value: Any) -> bytes:
    return _string(_KV["key"], key) + _field(_KV["value"], _any_value(value))


def _any_value(value: Any) -> bytes:
    """An AnyValue: the oneof member for `value`'s type (always present, even when zero)."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return _ANY["bool_value"] + (b"\x01" if value else b"\x00")
    if isinstance(value, str):
        return _field(_ANY["string_value"], value.encode())
    if isinstance(value, int):
        if value not in _INT64:
            raise ValueError("an integer outside int64")
        return _ANY["int_value"] + _varint(value & 0xFFFF_FFFF_FFFF_FFFF)
    if isinstance(value, float):
        return _ANY["double_value"] + _DOUBLE.pack(value)
    if isinstance(value, bytes):
        return _field(_ANY["bytes_value"], value)
    if isinstance(value, Sequence):
        items = b"".join(_field(_ARRAY_VALUES, _any_value(item)) for item in value)
        return _field(_ANY["array_value"], items)
    if isinstance(value, Mapping):
        pairs = b"".join(_field(_KVLIST_VALUES, _key_value(str(k), v)) for k, v in value.items())
        return _field(_ANY["kvlist_value"], pairs)
    raise TypeError(f"no AnyValue for {type(value).__name__}")
