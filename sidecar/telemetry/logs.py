"""JSON-lines logging on stdout that can only carry what it is explicitly given.

Each line is `{"ts", "level", "logger", "msg"}` plus the whitelisted fields
passed with `event(...)` or `extra=`. Three rules keep request data out
(SPEC "Audit log": never bodies, queries, header values, tokens, raw paths):

- `msg` is the message template as written in code; `%` arguments are never
  interpolated, since they are where request data would slip in. Put values
  in fields instead.
- Only field names in `FIELDS` are written; any other is left out and its
  name listed under `unlogged_fields`, so the omission shows in tests.
- An exception is written as its type name only: messages may quote the
  request (a bad header line, a URL).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from typing import IO, Any

from sidecar.clock import rfc3339_ms

# Names a caller may attach to a log line. Each one names configuration,
# service-level state or a count, never a part of a request.
FIELDS = frozenset(
    {
        "service",
        "services",
        "listeners",
        "listener",
        "address",
        "policy_rules",
        "event_loop",
        "config_file",
        "key_path",
        "spiffe_id",
        "not_after",
        "days_left",
        "problem",
        "changed",
        "exporter",
        "endpoint",
        "healthy",
        "peer",
        "state",
        "previous",
        "ejections",
        "duration_s",
        "timeout_s",
        "dropped",
        "total",
        "cause",
        "count",
        "in_flight",
        "signal",
        "direction",
        "status",
        "reason",
        "error",
        "task",
        "version",
        "detail",
        "http_parser",
        "workflow",
        "step",
    }
)

# Attributes every LogRecord has; whatever else a record holds came from `extra`.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_REFUSED = "_sidecar_refused"  # names `event` was given but may not write
_OURS = "_sidecar_json"  # marks the handler setup_logging installed, so a second call replaces it
_MAX_DEPTH = 3


class JsonFormatter(logging.Formatter):
    """One JSON object per record, built only from whitelisted parts."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": rfc3339_ms(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.msg if isinstance(record.msg, str) else type(record.msg).__name__,
        }
        unlogged = list(getattr(record, _REFUSED, ()))
        for name, value in vars(record).items():
            if name in _RECORD_ATTRS or name.startswith("_"):
                continue
            if name in FIELDS:
                doc[name] = _plain(value)
            else:
                unlogged.append(name)
        if unlogged:
            doc["unlogged_fields"] = sorted(unlogged)
        if record.exc_info and record.exc_info[0] is not None:
            doc["exc_type"] = record.exc_info[0].__name__
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def setup_logging(level: str | int = "INFO", *, stream: IO[str] | None = None) -> logging.Handler:
    """Route every log record in the process to JSON lines on `stream` (stdout).

    Calling it again replaces the handler it installed before. aiohttp's
    access log is switched off (it writes request lines with their query
    strings), and the OpenTelemetry SDK's own export chatter is silenced:
    the tracing module counts and reports dropped spans itself.
    """
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _OURS, True)
    root.addHandler(handler)
    root.setLevel(numeric)
    access = logging.getLogger("aiohttp.access")
    access.setLevel(logging.CRITICAL + 1)
    access.propagate = False
    logging.getLogger("opentelemetry").setLevel(logging.CRITICAL + 1)
    return handler


def event(
    msg: str, /, *, level: int = logging.INFO, logger: str = "sidecar", **fields: object
) -> None:
    """Log a structured event: a constant message plus named fields from `FIELDS`.

    For startup (listeners, services, policy size), reloads, breaker changes,
    ejections and dropped spans. Exceptions passed as values are written as
    their type name.
    """
    log = logging.getLogger(logger)
    if not log.isEnabledFor(level):
        return
    extra = {name: value for name, value in fields.items() if name in FIELDS}
    refused = [name for name in fields if name not in FIELDS]
    if refused:
        # Not passed as fields: a name like `name` or `args` would clash with the record.
        extra[_REFUSED] = refused
    log.log(level, msg, extra=extra)


def _plain(value: object, depth: int = 0) -> object:
    """`value` as JSON-ready data; anything else (an exception, an object) as its type name."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, BaseException):
        return type(value).__name__
    if depth < _MAX_DEPTH:
        if isinstance(value, list | tuple | set | frozenset):
            items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
            return [_plain(item, depth + 1) for item in items]
        if isinstance(value, Mapping):
            return {str(key): _plain(item, depth + 1) for key, item in value.items()}
    return type(value).__name__
