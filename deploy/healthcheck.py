"""Health check of a worker container: is *this* container's worker alive and serving?

    python /opt/densecap/healthcheck.py stream   # compose healthcheck / Kubernetes probe of a stream worker
    python /opt/densecap/healthcheck.py jobs     # ... of a job worker

Exit status 0 (healthy) or 1 (unhealthy, with one line on stderr saying why). Settings come from the same
``DENSECAP_*`` variables as the worker, so the check reaches the same Redis with the same password.

- ``stream``: the worker's heartbeat in the workers set (``densecap_core.protocol``) is younger than
  ``protocol.WORKER_ALIVE_S``. The worker only starts beating once its model is loaded and warmed up, so a
  worker still loading is unhealthy (compose's ``start_period`` covers that).
- ``jobs``: an RQ worker of this container is registered on the jobs queue (RQ drops the registration of a
  worker whose heartbeats stopped).

Which entry is this container's: ``DENSECAP_WORKER_NAME`` when set, else the workers' default names, which
start with the host name (``<host>:<pid>`` for stream workers, ``jobs-<host>-<pid>`` for job workers); in a
container or pod the host name is the container's own.
"""

from __future__ import annotations

import socket
import sys
import time


def stream_worker_alive(client, name: str | None, host: str, now: float) -> bool:
    from densecap_core import protocol
    fresh = client.zrangebyscore(protocol.WORKERS_ZSET, now - protocol.WORKER_ALIVE_S, "+inf")
    members = [m.decode() if isinstance(m, bytes) else m for m in fresh]
    if name:
        return name in members
    return any(m.startswith(f"{host}:") for m in members)


def job_worker_registered(client, queue_name: str, name: str | None, host: str) -> bool:
    from rq import Queue, Worker
    names = [w.name for w in Worker.all(queue=Queue(queue_name, connection=client))]
    if name:
        return name in names
    return any(n.startswith(f"jobs-{host}-") for n in names)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in (["stream"], ["jobs"]):
        print("usage: healthcheck.py stream|jobs", file=sys.stderr)
        return 2
    import redis

    from densecap_core.settings import Settings

    settings = Settings.from_env()
    host = socket.gethostname()
    name = settings.worker_name or None
    client = redis.Redis.from_url(**settings.redis_kwargs(), socket_connect_timeout=3, socket_timeout=3)
    try:
        if args == ["stream"]:
            ok = stream_worker_alive(client, name, host, time.time())
            what = f"no heartbeat from stream worker {name or host + ':*'} in the last few seconds"
        else:
            ok = job_worker_registered(client, settings.jobs_queue, name, host)
            what = f"no job worker {name or 'jobs-' + host + '-*'} registered on queue {settings.jobs_queue}"
    except redis.RedisError as exc:
        print(f"unhealthy: Redis at {settings.redis_url_redacted}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"unhealthy: {what}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
