"""Health and metrics endpoints (no token: they reveal no captions, images or tokens).

- ``GET /livez``: 200 while the process answers HTTP (container liveness).
- ``GET /healthz``: readiness of the live path: 200 when Redis answers and at least one stream worker
  has sent a heartbeat in the last ``protocol.WORKER_ALIVE_S`` seconds, else 503; JSON either way.
- ``GET /metrics``: Prometheus text format (``gateway.metrics``).
"""

from __future__ import annotations

import time

import redis
from flask import Blueprint, Response, jsonify

from densecap_core import protocol
from gateway.app import get_state

bp = Blueprint("health", __name__)


@bp.get("/livez")
def livez():
    return jsonify({"status": "ok"})


@bp.get("/healthz")
def healthz():
    state = get_state()
    body = {"redis": "ok", "stream_workers": 0, "sessions": len(state.sessions),
            "session_limit": state.sessions.limit, "result_listener": state.router.connected.is_set()}
    try:
        body["stream_workers"] = protocol.live_worker_count(state.redis, time.time())
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        body["redis"] = f"unreachable ({exc.__class__.__name__}) at {state.settings.redis_url_redacted}"
    if body["redis"] != "ok":
        body["status"] = "redis_unreachable"
    elif body["stream_workers"] == 0:
        body["status"] = "no_stream_workers"
    else:
        body["status"] = "ok"
    return jsonify(body), (200 if body["status"] == "ok" else 503)


@bp.get("/metrics")
def metrics():
    m = get_state().metrics
    return Response(m.render(), mimetype=None, content_type=m.content_type)
