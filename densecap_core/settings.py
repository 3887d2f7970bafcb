"""One settings object per process, read from ``DENSECAP_*`` environment variables.

Torch-free. Defaults work on one machine. Secrets (API tokens, the Redis password) come from the
environment or from files named by it, never from code, and never appear in ``repr`` or logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def _env(name: str, default: str) -> str:
    return os.environ.get(f"DENSECAP_{name}", default)


def _secret(name: str) -> str:
    """A secret from ``DENSECAP_<NAME>`` or from the file named by ``DENSECAP_<NAME>_FILE``."""
    value = os.environ.get(f"DENSECAP_{name}")
    if value:
        return value.strip()
    path = os.environ.get(f"DENSECAP_{name}_FILE")
    if path and Path(path).is_file():
        return Path(path).read_text().strip()
    return ""


@dataclass(frozen=True)
class Settings:
    # Redis
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: str = field(default="", repr=False)
    # Gateway
    host: str = "0.0.0.0"
    port: int = 8443
    state_dir: Path = Path("var")  # certificate, generated token, job uploads
    cert_file: str = ""
    key_file: str = ""
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    allowed_origins: tuple[str, ...] = ()  # empty: same origin as the request's Host only
    max_sessions: int = 32
    gateway_workers: int = 1  # gunicorn processes; each accepts max_sessions // gateway_workers sessions
    max_message_bytes: int = 2 * 1024 * 1024
    max_stream_pixels: int = 1920 * 1088
    max_image_pixels: int = 40_000_000
    max_upload_bytes: int = 50 * 1024 * 1024
    max_fps_per_session: float = 30.0
    # A client may stall this long inside a TLS handshake or a request read before its connection is dropped
    # (gateway/conn_guard.py: gunicorn alone would hold a thread for ever).
    client_stall_timeout_s: float = 10.0
    # Live frames
    frame_ttl_s: float = 2.0
    max_frame_age_s: float = 1.0
    # Workers
    checkpoint: str = ""  # empty: the embedded default model
    device: str = "auto"
    quantize: str = "none"  # "int8-lm": dynamic int8 language model on CPU workers (densecap_core/model/quantize.py)
    beam_size: int = 0  # captions by beam search over N (1: greedy, cheaper on a slow live worker); 0: the checkpoint's
    batch_size: int = 8
    batch_wait_ms: float = 4.0
    heartbeat_s: float = 1.0
    worker_name: str = ""
    jobs_queue: str = "densecap-jobs"
    chunk_size: int = 8
    # Bulk jobs: bytes of uploaded, not yet captioned images one job may hold in Redis (uploads beyond get
    # HTTP 429 until workers catch up), and how long a job's state lives after its last write.
    job_backlog_bytes: int = 256 * 1024 * 1024
    job_ttl_s: int = 7 * 24 * 3600

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        tokens = tuple(t for t in _secret("API_TOKENS").replace(",", " ").split() if t)
        values = dict(
            redis_url=_env("REDIS_URL", cls.redis_url),
            redis_password=_secret("REDIS_PASSWORD"),
            host=_env("HOST", cls.host),
            port=int(_env("PORT", str(cls.port))),
            state_dir=Path(_env("STATE_DIR", str(cls.state_dir))),
            cert_file=_env("CERT_FILE", ""),
            key_file=_env("KEY_FILE", ""),
            api_tokens=tokens,
            allowed_origins=tuple(o for o in _env("ALLOWED_ORIGINS", "").replace(",", " ").split() if o),
            max_sessions=int(_env("MAX_SESSIONS", str(cls.max_sessions))),
            gateway_workers=int(_env("GATEWAY_WORKERS", str(cls.gateway_workers))),
            max_message_bytes=int(_env("MAX_MESSAGE_BYTES", str(cls.max_message_bytes))),
            max_stream_pixels=int(_env("MAX_STREAM_PIXELS", str(cls.max_stream_pixels))),
            max_image_pixels=int(_env("MAX_IMAGE_PIXELS", str(cls.max_image_pixels))),
            max_upload_bytes=int(_env("MAX_UPLOAD_BYTES", str(cls.max_upload_bytes))),
            max_fps_per_session=float(_env("MAX_FPS_PER_SESSION", str(cls.max_fps_per_session))),
            client_stall_timeout_s=float(_env("CLIENT_STALL_TIMEOUT_S", str(cls.client_stall_timeout_s))),
            frame_ttl_s=float(_env("FRAME_TTL_S", str(cls.frame_ttl_s))),
            max_frame_age_s=float(_env("MAX_FRAME_AGE_S", str(cls.max_frame_age_s))),
            checkpoint=_env("CHECKPOINT", ""),
            device=_env("DEVICE", cls.device),
            quantize=_env("QUANTIZE", cls.quantize),
            beam_size=int(_env("BEAM_SIZE", str(cls.beam_size)) or 0),
            batch_size=int(_env("BATCH_SIZE", str(cls.batch_size))),
            batch_wait_ms=float(_env("BATCH_WAIT_MS", str(cls.batch_wait_ms))),
            heartbeat_s=float(_env("HEARTBEAT_S", str(cls.heartbeat_s))),
            worker_name=_env("WORKER_NAME", ""),
            jobs_queue=_env("JOBS_QUEUE", cls.jobs_queue),
            chunk_size=int(_env("CHUNK_SIZE", str(cls.chunk_size))),
            job_backlog_bytes=int(_env("JOB_BACKLOG_BYTES", str(cls.job_backlog_bytes))),
            job_ttl_s=int(_env("JOB_TTL_S", str(cls.job_ttl_s))),
        )
        values.update(overrides)
        return cls(**values)

    def redis_kwargs(self) -> dict:
        """Keyword arguments for ``redis.Redis.from_url`` (password kept out of the URL and the logs)."""
        kw = {"url": self.redis_url}
        if self.redis_password:
            kw["password"] = self.redis_password
        return kw

    @property
    def redis_url_redacted(self) -> str:
        """The Redis URL with any password removed, for logs and error messages."""
        parts = urlsplit(self.redis_url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))

    def describe(self) -> dict:
        """Settings safe to print: secrets replaced by whether they are set."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("redis_password", "api_tokens"):
                v = f"<{'set' if v else 'unset'}>"
            elif f.name == "redis_url":
                v = self.redis_url_redacted
            out[f.name] = str(v) if isinstance(v, Path) else v
        return out
