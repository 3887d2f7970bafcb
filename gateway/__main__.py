"""``python -m gateway``: make sure a TLS certificate and an API token exist, then exec gunicorn.

Everything comes from ``DENSECAP_*`` settings (``densecap_core/settings.py``). gunicorn runs the
``gthread`` worker (each open websocket holds one thread for its life, so the pool is sized for the
accepted sessions plus headroom for /healthz, /metrics and REST), serves TLS itself, and has its control
socket off (it would be created under ``~/.gunicorn``, which containers and tests must not depend on).

``--print-command`` shows the gunicorn command line instead of running it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from densecap_core.settings import Settings
from gateway import auth, tls

#: Threads kept free for HTTP requests (health checks, metrics, REST) when every session slot is taken.
HTTP_HEADROOM_THREADS = 16


def gunicorn_command(settings: Settings, cert: Path, key: Path) -> list[str]:
    from gateway.app import session_limit
    workers = max(1, settings.gateway_workers)
    # A worker process may end up holding every session it admits; its pool must never run dry.
    threads = session_limit(settings) + HTTP_HEADROOM_THREADS
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return [
        sys.executable, "-m", "gunicorn",
        "--worker-class", "gthread",
        "--workers", str(workers),
        "--threads", str(threads),
        "--worker-connections", str(threads * 4),
        "--bind", f"{host}:{settings.port}",
        "--certfile", str(cert),
        "--keyfile", str(key),
        "--no-control-socket",
        "--config", "python:gateway.gunicorn_conf",
        "--timeout", "30",
        "--graceful-timeout", "5",
        "--keep-alive", "5",
        # %(U)s is the path without the query string: a ?token= never reaches the log.
        "--access-logfile", "-",
        "--access-logformat", '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms',
        "gateway.app:create_app()",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--print-command", action="store_true", help="print the gunicorn command and exit")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    state_dir = Path(settings.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        cert, key = tls.ensure_certificate(state_dir, settings.cert_file, settings.key_file)
    except FileNotFoundError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    if not settings.api_tokens:
        # Made here, before gunicorn forks, so all worker processes read the same file.
        auth.load_or_create_token(state_dir)
        token_hint = f"API token: in {state_dir / 'token'} (open https://localhost:{settings.port}/live/#token=<it>)"
    else:
        token_hint = "API tokens: from DENSECAP_API_TOKENS"

    if settings.gateway_workers > 1:
        # Sum metrics over gunicorn worker processes; start from an empty directory each run.
        mp_dir = state_dir / "prometheus"
        shutil.rmtree(mp_dir, ignore_errors=True)
        mp_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mp_dir)

    cmd = gunicorn_command(settings, cert, key)
    if args.print_command:
        print(" ".join(cmd))
        return 0
    print(f"gateway: https://{settings.host}:{settings.port}/ (certificate {cert}); {token_hint}; "
          f"Redis {settings.redis_url_redacted}", file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
