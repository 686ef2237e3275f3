"""OTLP/HTTP export with the request body written by `encoding.encode_request`.

Only the encoding changes: the SDK's exporter still resolves the endpoint,
headers, compression, TLS and timeout (with their OTEL_EXPORTER_OTLP_*
variables), and its HTTP client still sends, retries and backs off. grpc
export keeps the SDK's encoder: its stub takes a message, not bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult

from sidecar.telemetry.encoding import encode_request

log = logging.getLogger("sidecar.tracing")

# What of the SDK exporter's insides the direct path uses. An SDK without them
# (another version) exports as the SDK does; test_encoding.py notices.
SEAM = ("_client", "_metrics", "_max_request_size", "_shutdown")


class DirectHttpExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP span exporter, sending bytes our encoder wrote."""

    @property
    def direct(self) -> bool:
        """Whether the installed SDK lets the body be ours."""
        return all(hasattr(self, name) for name in SEAM)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not self.direct or self._shutdown:  # shut down: the SDK logs and refuses
            return super().export(spans)
        with self._metrics.export_operation(len(spans)) as outcome:
            try:
                body = encode_request(spans)
            except Exception as error:  # a span the encoder cannot write fails its batch only
                log.error("could not encode a span batch: %s", type(error).__name__)
                outcome.error = error
                return SpanExportResult.FAILURE
            if 0 < self._max_request_size < len(body):
                log.warning("span batch of %d bytes over the request size limit", len(body))
                return SpanExportResult.FAILURE
            sent = self._client.export(body)
            if not sent.success:
                outcome.error = sent.error
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
