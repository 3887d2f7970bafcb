"""Static pages: the live webcam client at ``/live/`` (``/`` redirects there), and ``/auth/check``.

Files come from ``client/static/live/``. The page itself needs no token (it holds no data); the user
enters the token in the page, which sends it as a websocket subprotocol.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, abort, jsonify, redirect, send_from_directory

from gateway.app import require_token

bp = Blueprint("pages", __name__)

STATIC_ROOT = Path(__file__).resolve().parents[1] / "client" / "static"
LIVE_DIR = STATIC_ROOT / "live"

# No third-party origins at all; the camera only for this origin; websockets to this origin.
_SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; connect-src 'self' wss: ws:; img-src 'self' data: blob:; "
                                "media-src 'self' blob: mediastream:; style-src 'self'; script-src 'self'; "
                                "frame-ancestors 'none'"),
    "Permissions-Policy": "camera=(self)",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@bp.after_app_request
def _security_headers(response):
    if response.mimetype in ("text/html", "application/javascript", "text/javascript", "text/css"):
        for k, v in _SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
    return response


@bp.get("/")
def index():
    return redirect("/live/", code=302)


@bp.get("/live")
def live_no_slash():
    return redirect("/live/", code=301)


@bp.get("/live/")
def live_page():
    return _send_live("index.html")


@bp.get("/live/<path:filename>")
def live_asset(filename: str):
    return _send_live(filename)


@bp.get("/auth/check")
@require_token
def auth_check():
    """200 when the presented token is valid, 401 otherwise: lets the page tell a bad token apart from
    a network failure (a refused websocket handshake shows up in the browser only as close code 1006)."""
    return jsonify({"ok": True})


def _send_live(filename: str):
    if not (LIVE_DIR / "index.html").is_file():
        abort(404, description="the live client is not installed (client/static/live is missing)")
    response = send_from_directory(LIVE_DIR, filename, max_age=0)
    response.headers["Cache-Control"] = "no-cache"
    return response
