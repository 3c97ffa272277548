"""uvicorn's HTTP protocols with the service's JSON error shape for requests it refuses itself.

A request the HTTP parser rejects (a Content-Length of `abc`, a broken request line or header) never
reaches the app: uvicorn answers 400 in plain text. These subclasses answer
`{"error": "bad_request", "detail": ...}` instead, naming what the parser said. `stpm serve` passes
`protocol_class()` to uvicorn as `http=`.
"""

from __future__ import annotations

import json
import sys

from uvicorn.protocols.http.h11_impl import H11Protocol


def _body(msg: str) -> bytes:
    exc = sys.exc_info()[1]  # called from uvicorn's `except <parser error>:` block
    reason = str(exc).strip() if exc is not None else ""
    if isinstance(reason, str) and reason.startswith(("b'", 'b"')):
        reason = reason[2:-1]
    detail = f"malformed HTTP request: {reason}" if reason else f"malformed HTTP request ({msg})"
    return json.dumps({"error": "bad_request", "detail": detail}).encode()


class JSONErrorsH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        import h11

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

    class JSONErrorsHttpToolsProtocol(HttpToolsProtocol):
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
