"""uvicorn's HTTP protocols with the service's JSON error shape for requests it refuses itself.

A request the HTTP parser rejects (a Content-Length of `abc`, a broken request line or header) never
reaches the app: uvicorn answers 400 in plain text. These subclasses answer
`{"error": "bad_request", "detail": ...}` instead, naming what the parser said. `stpm serve` passes
`protocol_class()` to uvicorn as `http=`.

They also bound what a client may cost before its request reaches the app (HeadLimits): a request's head
larger than `max_header_bytes` is answered 431 as it arrives (uvicorn has no such limit with httptools,
whose buffering of one long header is quadratic: 64 MB cost 4 CPU-s and stalled the event loop), and a
head not complete `header_timeout_s` after its first byte, or a connection that sends nothing for that
long, is answered 408 and closed (uvicorn has no header timeout; its keep-alive timeout only runs between
requests). Body limits are app.middleware's; the concurrency limit is uvicorn's (`stpm serve`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def _body(msg: str) -> bytes:
    exc = sys.exc_info()[1]  # called from uvicorn's `except <parser error>:` block
    reason = str(exc).strip() if exc is not None else ""
    if isinstance(reason, str) and reason.startswith(("b'", 'b"')):
        reason = reason[2:-1]
    detail = f"malformed HTTP request: {reason}" if reason else f"malformed HTTP request ({msg})"
    return json.dumps({"error": "bad_request", "detail": detail}).encode()


@functools.cache
def head_limits() -> tuple[int, float]:
    """(max_header_bytes, header_timeout_s) of this process's settings (read once, from STPM_* / .env)."""
    from app.settings import Settings

    s = Settings()
    return s.max_header_bytes, s.header_timeout_s


def _json_response(status: bytes, error: str, detail: str) -> bytes:
    body = json.dumps({"error": error, "detail": detail}).encode()
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class HeadLimits:
    """Mixin before a uvicorn HTTP protocol: the size and the time of each request's head are bounded."""

    transport: asyncio.Transport
    _head_bytes = 0
    _head_timer: asyncio.TimerHandle | None = None

    def reading_head(self) -> bool:
        raise NotImplementedError

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        super().data_received(data)  # type: ignore[misc]
        if self.transport.is_closing():
            return
        if not self.reading_head():
            self._head_bytes = 0
            self._cancel_head_timer()
            return
        self._head_bytes += len(data)
        limit = head_limits()[0]
        if self._head_bytes > limit:
            self._refuse(b"431 Request Header Fields Too Large", "header_too_large",
                         f"the request's head exceeds {limit} bytes (setting max_header_bytes)")
        else:
            self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = asyncio.get_running_loop().call_later(head_limits()[1], self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and self.reading_head():
            self._refuse(b"408 Request Timeout", "header_timeout",
                         f"the request's head did not arrive within {head_limits()[1]:g} s (setting header_timeout_s)")

    def _refuse(self, status: bytes, error: str, detail: str) -> None:
        self._cancel_head_timer()
        self.transport.write(_json_response(status, error, detail))
        self.transport.close()


class JSONErrorsH11Protocol(HeadLimits, H11Protocol):
    def reading_head(self) -> bool:
        """h11 waits for a request line and headers (IDLE until it has parsed them all)."""
        return self.conn.their_state is h11.IDLE

    def send_400_response(self, msg: str) -> None:
        body = _body(msg)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for data in (self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")),
                     self.conn.send(h11.Data(data=body)), self.conn.send(h11.EndOfMessage())):
            self.transport.write(data)
        self.transport.close()


try:
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
except ImportError:  # httptools not installed: uvicorn uses h11
    HttpToolsProtocol = None


if HttpToolsProtocol is not None:

    class JSONErrorsHttpToolsProtocol(HeadLimits, HttpToolsProtocol):
        _in_head = True  # a new connection waits for its first request's head

        def reading_head(self) -> bool:
            return self._in_head

        def on_message_begin(self) -> None:
            self._in_head = True
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def send_400_response(self, msg: str) -> None:
            body = _body(msg)
            content = [STATUS_LINE[400]]
            for name, value in self.server_state.default_headers:
                content.extend([name, b": ", value, b"\r\n"])
            content.extend([b"content-type: application/json\r\n",
                            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                            b"connection: close\r\n", b"\r\n", body])
            self.transport.write(b"".join(content))
            self.transport.close()


def protocol_class() -> type:
    """httptools' protocol when installed (uvicorn's "auto" choice), else h11's, with JSON 400s.
    Module-level classes: uvicorn pickles its config for worker processes."""
    return JSONErrorsH11Protocol if HttpToolsProtocol is None else JSONErrorsHttpToolsProtocol
