"""One HTTP listener: aiohttp's low-level server with the sidecar's limits.

aiohttp answers malformed requests itself with text/plain; here those answers
become problem+json (400 `bad_request`, 431 `headers_too_large`), exception
text never reaches a log (it may quote a header), and a client slower than
`header_timeout` to send its request headers is cut off.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from sidecar.config.settings import Limits
from sidecar.http import problem
from sidecar.stack import Reply

log = logging.getLogger("sidecar.http.listener")

RawHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# Told of every request refused before it could become a call (for audit and metrics).
OnRefused = Callable[[Reply], None]


class GuardedProtocol(web_protocol.RequestHandler):
    """aiohttp's request handler plus a header timeout and problem+json errors."""

    header_timeout: float = 10.0
    on_refused: OnRefused | None = None
    answer_headers: dict[str, str] = {}  # replaced per server, never mutated

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            self._cancel_header_timer()
            self._fail_body_in_progress()
        elif (data and self._header_timer is None and not self._request_in_progress
              and not self._messages):
            self._start_header_timer()

    def _fail_body_in_progress(self) -> None:
        """A parse error in the middle of a body (a bad chunk) ends that body.

        aiohttp queues the error as the next message but leaves the body being
        read waiting for bytes that will never come; fail it so the call ends
        now, as a bad request, instead of at its timeout.
        """
        request = self._current_request
        if not self._request_in_progress or request is None or not self._messages:
            return
        error = self._messages[-1][0]
        if isinstance(error, web_protocol._ErrInfo) and not request.content.at_eof():
            request.content.set_exception(BadHttpMessage(error.message))

    def _start_header_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._header_timer = loop.call_later(self.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport is not None:
            log.info("connection cut: request headers not received within header_timeout")
            self.transport.close()

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        name = type(exc).__name__ if isinstance(exc, BaseException) else "error"
        log.warning("request failed", extra={"error": name})

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        self.log_exception("request failed", exc_info=exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already begun")
        if isinstance(exc, LineTooLong) or "Too many headers" in str(exc or ""):
            reason, detail = "headers_too_large", (
                "A request header line or the number of headers is over this sidecar's "
                "limits (limits.max_header_line, limits.max_headers).")
        elif status == 400:
            reason, detail = "bad_request", (
                "The request is not well-formed HTTP/1.1 or is ambiguous (for example both "
                "Content-Length and Transfer-Encoding). The connection is closed.")
        else:
            response = web.Response(
                status=500, content_type="application/problem+json", headers=self.answer_headers,
                text=json.dumps({"type": "about:blank", "title": "Internal error",
                                 "status": 500, "detail": "The sidecar failed on this request.",
                                 "reason": None}))
            response.force_close()
            return response
        reply = problem.reply(reason, detail, headers=self.answer_headers)
        if self.on_refused is not None:
            self.on_refused(reply)
        assert isinstance(reply.body, bytes)
        response = web.Response(status=reply.status, body=reply.body, headers=reply.headers)
        response.force_close()
        return response


class GuardedServer(web.Server):
    """A low-level server whose connections are `GuardedProtocol`s."""

    def __init__(self, handler: RawHandler, *, limits: Limits,
                 on_refused: OnRefused | None = None,
                 answer_headers: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(
            handler,
            max_line_size=limits.max_header_line,
            max_field_size=limits.max_header_line,
            max_headers=limits.max_headers,
            keepalive_timeout=limits.idle_timeout,
            access_log=None,
            handler_cancellation=True,
            **kwargs,
        )
        self.header_timeout = limits.header_timeout
        self.on_refused = on_refused
        self.answer_headers = answer_headers or {}

    def __call__(self) -> GuardedProtocol:
        protocol = GuardedProtocol(self, loop=self._loop, **self._kwargs)
        protocol.header_timeout = self.header_timeout
        protocol.on_refused = self.on_refused
        protocol.answer_headers = self.answer_headers
        return protocol

    @property
    def open_connections(self) -> int:
        return len(self.connections)


async def start(handler: RawHandler, host: str, port: int, *, limits: Limits,
                on_refused: OnRefused | None = None,
                answer_headers: dict[str, str] | None = None,
                ) -> tuple[web.ServerRunner, web.TCPSite, GuardedServer]:
    """Listen on host:port; `answer_headers` go on every answer made while parsing."""
    server = GuardedServer(handler, limits=limits, on_refused=on_refused,
                           answer_headers=answer_headers)
    # The drain has already waited up to drain_timeout when the runner is
    # cleaned up: what is still running then is cut at once.
    runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
    await site.start()
    return runner, site, server
