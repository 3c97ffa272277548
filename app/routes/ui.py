"""The web page for people: `/` serves app/static/index.html, `/ui/<file>` its assets.

Plain HTML/CSS/JS shipped inside the package (no build step, no CDN: works offline). The page and its
assets are public (see PUBLIC_PATHS / PUBLIC_PREFIXES, added to app.state by create_app) so that it can
load and then ask for the API key; every API call it makes sends the key as `X-API-Key`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.errors import APIError

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
PUBLIC_PATHS = {"/"}
PUBLIC_PREFIXES = ["/ui/"]

# Only same-origin scripts, styles and requests; images may also be data: (heatmaps) and blob: (previews).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "Cache-Control": "no-cache",  # revalidate: a new release shows up on reload
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}

router = APIRouter(include_in_schema=False)


# The page's files, listed once: a request names one of these or gets 404 (no path is ever built from it).
ASSETS = frozenset(p.name for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in MEDIA)


def _file(name: str) -> FileResponse:
    if name not in ASSETS:
        raise APIError(404, "not_found", f"no file /ui/{name[:100]!r}")
    path = STATIC_DIR / name
    headers = dict(HEADERS)
    if path.suffix == ".html":
        headers["Content-Security-Policy"] = CSP
        headers["X-Frame-Options"] = "DENY"
    return FileResponse(path, media_type=MEDIA[path.suffix], headers=headers)


@router.get("/")
async def index() -> FileResponse:
    return _file("index.html")


@router.get("/ui/{name}")
async def asset(name: str) -> FileResponse:
    return _file(name)
