"""The gateway's Flask application factory.

``create_app(settings)`` builds one application with its own Redis client, metrics registry, session
registry and result router; nothing lives in module globals, so tests can build several apps side by
side. gunicorn starts it as ``gateway.app:create_app()`` (see ``gateway/__main__.py``).

Blueprints: ``health`` (``/healthz``, ``/livez``, ``/metrics``), ``stream`` (``/ws/stream``), ``pages``
(``/``, ``/live/``) and, when the module exists, ``gateway.jobs_api.bp`` (bulk jobs).

Helpers for blueprints: ``get_state()``, ``get_settings()``, ``get_redis()`` and the ``require_token``
decorator (token scheme in ``gateway/auth.py``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import redis
from flask import Flask, current_app, jsonify, request
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from densecap_core.settings import Settings
from gateway import auth

log = logging.getLogger("densecap.gateway")

#: Extension key under ``app.extensions``.
EXTENSION = "densecap"


@dataclass
class GatewayState:
    """Everything one application instance owns. Reached through ``get_state()``."""

    settings: Settings
    redis: redis.Redis
    tokens: tuple[str, ...] = field(repr=False)
    metrics: Any = None  # gateway.metrics.GatewayMetrics
    sessions: Any = None  # gateway.sessions.SessionRegistry
    router: Any = None  # gateway.results.ResultRouter
    #: Set when the process is stopping (gateway/gunicorn_conf.py): sessions close with 1001.
    shutting_down: threading.Event = field(default_factory=threading.Event)


def make_redis(settings: Settings) -> redis.Redis:
    """The gateway's Redis client: short timeouts and a few quick retries.

    A session's handler thread calls Redis for every frame; when Redis is down it must fail fast
    (the frame is dropped and the client told) instead of hanging the socket.
    """
    return redis.Redis.from_url(
        **settings.redis_kwargs(),
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.01), retries=2),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=10,
    )


def resolve_tokens(settings: Settings) -> tuple[str, ...]:
    """The accepted API tokens: ``DENSECAP_API_TOKENS``, else the generated single-machine token file."""
    if settings.api_tokens:
        return settings.api_tokens
    return (auth.load_or_create_token(settings.state_dir),)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the gateway application. ``settings`` defaults to ``Settings.from_env()``."""
    settings = settings or Settings.from_env()
    app = Flask("gateway", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes

    from gateway.metrics import GatewayMetrics
    from gateway.results import ResultRouter
    from gateway.sessions import SessionRegistry

    state = GatewayState(settings=settings, redis=make_redis(settings), tokens=resolve_tokens(settings))
    state.metrics = GatewayMetrics()
    state.sessions = SessionRegistry(limit=session_limit(settings))
    state.router = ResultRouter(settings, state.sessions, state.metrics)
    app.extensions[EXTENSION] = state

    from gateway import health, pages, stream, wsmask
    wsmask.install()  # numpy unmasking of received websocket frames (gateway/wsmask.py)
    app.register_blueprint(health.bp)
    app.register_blueprint(stream.bp)
    app.config["SOCK_SERVER_OPTIONS"] = stream.server_options(settings)
    app.register_blueprint(pages.bp)
    if importlib.util.find_spec("gateway.jobs_api") is not None:
        from gateway import jobs_api
        app.register_blueprint(jobs_api.bp)

    @app.errorhandler(413)
    def _too_large(_exc):
        return error_response(413, "too_large",
                              f"request body is over {settings.max_upload_bytes} bytes; send fewer or smaller files")

    return app


def session_limit(settings: Settings) -> int:
    """Live sessions one gateway process accepts: its share of ``max_sessions`` (at least one)."""
    workers = max(1, getattr(settings, "gateway_workers", 1))
    return max(1, settings.max_sessions // workers)


def get_state() -> GatewayState:
    return current_app.extensions[EXTENSION]


def get_settings() -> Settings:
    return get_state().settings


def get_redis() -> redis.Redis:
    """The application's Redis client (thread-safe; shared by all request threads of the process)."""
    return get_state().redis


def error_response(status: int, code: str, message: str, **extra: Any):
    """A JSON error body ``{"error": {"code", "message"}}`` with an HTTP status."""
    body = {"error": {"code": code, "message": message, **extra}}
    return jsonify(body), status


def request_is_authenticated() -> bool:
    return auth.token_is_valid(auth.presented_token(request), get_state().tokens)


def unauthorized_response():
    return error_response(
        401, "unauthorized",
        "missing or invalid API token: send 'Authorization: Bearer <token>' (or the websocket subprotocol "
        "'token.<token>'); the single-machine token is in <state_dir>/token")


def require_token(view: Callable) -> Callable:
    """Decorator for REST views: answer 401 with a JSON error unless a valid token is presented."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        if not request_is_authenticated():
            return unauthorized_response()
        return view(*args, **kwargs)

    return wrapper
