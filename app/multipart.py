"""Upload routes parse their multipart body here first, so every problem gets a precise answer.

FastAPI reads a form body of any content type (JSON becomes an empty form, so the client hears
"missing field 'files'"), reports python-multipart's errors as "Invalid multipart data", and accepts
a body that ends before its closing boundary (the last, cut-off file simply disappears). Routes of
the `MultipartRoute` class instead answer:

* 415 `unsupported_media_type` when the Content-Type is not multipart/form-data, naming it;
* 400 `invalid_multipart` for a missing or malformed boundary, a body the parser cannot read (with the
  parser's own reason), or a body that ends before its closing boundary (a truncated upload);
* 413 for more parts or larger text fields than Starlette's form limits;
* 507 `insufficient_storage` when the temporary folder the uploads are spooled to is full.

The parsed form is left on the request, where Starlette keeps it (`Request._form`), so FastAPI's own
handler validates the fields from it without reading the body again.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.formparsers import MultiPartException, MultiPartParser

from app.errors import APIError

BOUNDARY_RE = re.compile(rb"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")  # RFC 2046 bchars
MAX_FIELDS = 1000
MAX_FILES = 1000
MAX_PART_SIZE = 1024 * 1024  # a non-file field


class _CheckedParser(MultiPartParser):
    """Starlette's parser, remembering whether the closing boundary was seen."""

    ended = False

    def on_end(self) -> None:
        self.ended = True
        super().on_end()


def _reason(exc: BaseException) -> str:
    """The parser's own words: python-multipart's error behind Starlette's generic one."""
    while exc is not None:
        if isinstance(exc, FormParserError) and str(exc):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return ""


async def parse_multipart(request: Request) -> None:
    """Parse the body as multipart/form-data (cached on the request) or raise APIError."""
    where = f"{request.method} {request.url.path}"
    raw = request.headers.get("content-type")
    if not raw:
        raise APIError(415, "unsupported_media_type", f"{where} takes multipart/form-data; the request has no "
                       "Content-Type")
    ctype, params = parse_options_header(raw)
    if ctype != b"multipart/form-data":
        raise APIError(415, "unsupported_media_type", f"{where} takes multipart/form-data (files in the field "
                       f"'files'); got Content-Type {ctype.decode('latin-1')[:100]!r}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise APIError(400, "invalid_multipart", "Content-Type multipart/form-data has no boundary parameter")
    if not BOUNDARY_RE.match(boundary):
        raise APIError(400, "invalid_multipart", f"invalid multipart boundary {boundary[:80]!r}: 1-70 characters "
                       "of letters, digits and '()+_,-./:=? (RFC 2046)")
    parser = _CheckedParser(request.headers, request.stream(), max_files=MAX_FILES, max_fields=MAX_FIELDS,
                            max_part_size=MAX_PART_SIZE)
    try:
        form = await parser.parse()
    except OSError as e:  # a file part over 1 MB is spooled to TMPDIR, which may be full
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise APIError(507, "insufficient_storage", "the server's temporary storage (TMPDIR, where uploads over "
                           "1 MB are spooled) is full; nothing was stored: retry later") from None
        raise
    except MultiPartException as e:
        reason = _reason(e)
        if reason:
            raise APIError(400, "invalid_multipart", f"malformed multipart body: {reason}") from None
        status = 413 if e.message.startswith(("Too many", "Part exceeded", "Field exceeded")) else 400
        raise APIError(status, "invalid_multipart", f"multipart body refused: {e.message}") from None
    if not parser.ended:
        await form.close()
        raise APIError(400, "invalid_multipart", "the multipart body ends before its closing boundary "
                       f"(--{boundary.decode('latin-1')}--): the upload is truncated")
    request._form = form


class MultipartRoute(APIRoute):
    """An APIRoute whose body is multipart/form-data, checked and parsed by `parse_multipart`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:  # GET / DELETE routes of the same router
            return handler

        async def route_handler(request: Request) -> Response:
            await parse_multipart(request)
            return await handler(request)

        return route_handler
