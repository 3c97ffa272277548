"""Pure ASGI middlewares (no BaseHTTPMiddleware: they add no per-request task or body copy).

* RequestLimitMiddleware: refuses a body whose Content-Length exceeds the limit (or is not a number)
  before reading it, caps streamed (chunked) bodies as they arrive, and answers 408 when a client
  stops sending its body for `body_timeout_s` (a stalled upload must not hold a request, or a
  graceful shutdown, open), or has not sent all of it `body_deadline_s` after it began (a body dripped a
  byte at a time).
* APIKeyMiddleware: secure by default; every path needs the key unless listed in
  ``app.state.public_paths`` (exact) or ``app.state.public_prefixes``.
* MetricsMiddleware: request counts and latency by route template (unmatched paths share one label).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import APIError
from app.metrics import Metrics


async def send_json(send: Send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": hdrs + (headers or [])})
    await send({"type": "http.response.body", "body": data})


CLOSE = {"Connection": "close"}  # the unread rest of the body must not be parsed as the next request


class BodyTooLarge(APIError):
    def __init__(self, limit: int, what: str = "request body"):
        super().__init__(
            413, "payload_too_large", f"{what} exceeds the limit of {limit} bytes (setting max_request_bytes)",
            headers=CLOSE,
        )


class BodyTimeout(APIError):
    def __init__(self, seconds: float, received: int):
        super().__init__(
            408, "body_timeout",
            f"the request body stalled: no data for {seconds:g} s after {received} bytes (setting body_timeout_s)",
            headers=CLOSE,
        )


class BodyDeadline(APIError):
    def __init__(self, seconds: float, received: int):
        super().__init__(
            408, "body_timeout",
            f"the request body did not arrive within {seconds:g} s ({received} bytes so far; setting body_deadline_s)",
            headers=CLOSE,
        )


class RequestLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout_s: float | None = None,
                 body_deadline_s: float | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s
        self.body_deadline_s = body_deadline_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        for k, v in scope["headers"]:
            if k == b"content-length":
                text = v.decode("latin-1")
                if not text.strip().isdigit():  # uvicorn's parsers catch most; this is the backstop
                    return await send_json(send, 400, {
                        "error": "bad_request",
                        "detail": f"invalid Content-Length {text[:40]!r}: a number of bytes is expected"},
                        [(b"connection", b"close")])
                n = int(text)
                if n > limit:
                    err = BodyTooLarge(limit)
                    # Connection: close - the unread body must not be parsed as the next request.
                    return await send_json(
                        send, 413, {"error": err.error, "detail": err.detail}, [(b"connection", b"close")]
                    )
        seen = 0
        started = False
        body_done = False
        timeout, deadline = self.body_timeout_s, self.body_deadline_s
        ends = None if deadline is None else time.monotonic() + deadline

        async def limited_receive() -> Message:
            nonlocal seen, body_done
            if body_done or (timeout is None and ends is None):
                msg = await receive()  # after the body: e.g. waiting for a disconnect, no deadline
            else:
                left = None if ends is None else ends - time.monotonic()
                wait = left if timeout is None else timeout if left is None else min(timeout, left)
                try:
                    msg = await asyncio.wait_for(receive(), max(wait, 0.0))
                except asyncio.TimeoutError:
                    raise (BodyTimeout(timeout, seen) if wait == timeout else BodyDeadline(deadline, seen)) from None
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
                body_done = not msg.get("more_body", False)
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (BodyTooLarge, BodyTimeout, BodyDeadline) as e:  # raised outside the routes' exception handling
            if started:
                raise
            await send_json(send, e.status_code, {"error": e.error, "detail": e.detail}, [(b"connection", b"close")])


def _extract_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for k, v in headers:
        if k == b"x-api-key":
            return v.strip()
    for k, v in headers:
        if k == b"authorization":
            scheme, _, token = v.partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
    return None


def has_valid_key(headers: list[tuple[bytes, bytes]], api_key: str) -> bool:
    """Whether a request carries the API key (for public routes that show more to a keyed client)."""
    given = _extract_key(headers)
    return given is not None and hmac.compare_digest(given, api_key.encode())


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str, state):
        self.app = app
        self.key = api_key.encode()
        self.state = state  # app.state: public_paths / public_prefixes may be extended by other routers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if path in self.state.public_paths or path.startswith(tuple(self.state.public_prefixes)):
            return await self.app(scope, receive, send)
        given = _extract_key(scope["headers"])
        if given is None or not hmac.compare_digest(given, self.key):
            detail = (
                "missing API key: send it as header `X-API-Key: KEY` or `Authorization: Bearer KEY`"
                if given is None
                else "invalid API key"
            )
            return await send_json(
                send, 401, {"error": "unauthorized", "detail": detail}, [(b"www-authenticate", b"Bearer")]
            )
        return await self.app(scope, receive, send)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, label, str(status)).inc()
            self.metrics.latency.labels(method, label).observe(time.perf_counter() - t0)
