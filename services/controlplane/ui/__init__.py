"""The rating page: static HTML/JS/CSS served by the control plane under ``/ui/``.

The page itself holds no secret and needs no token; every call it makes to ``/v1`` carries the bearer
token the rater typed in (kept in ``sessionStorage``), videos included (fetched, then shown from blob
URLs). A strict Content-Security-Policy allows only this page's own script and style, and the script
writes data with ``textContent`` only, so a prompt such as ``<img src=x onerror=...>`` stays text.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response

from services.controlplane.domain.errors import NotFound

STATIC_DIR = Path(__file__).parent / "static"
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

router = APIRouter(prefix="/ui", tags=["ui"], include_in_schema=False)


def _file(name: str) -> FileResponse:
    if name not in FILES:
        raise NotFound(f"no file {name!r} in the rating page")
    return FileResponse(STATIC_DIR / name, media_type=FILES[name], headers=SECURITY_HEADERS)


@router.get("")
def ui_root() -> Response:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/")
def index() -> FileResponse:
    """The rating page."""
    return _file("index.html")


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    """The page's script and style sheet (a fixed list: nothing else under the directory is served)."""
    return _file(name)
