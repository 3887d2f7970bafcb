"""``python -m worker.job_worker``: the bulk-job worker (RQ), one process per device.

It loads the model once (``densecap_core.inference.Captioner`` from ``DENSECAP_CHECKPOINT``, else the
embedded default), then runs RQ chunks from queue ``settings.jobs_queue`` in-process: a ``SimpleWorker``
subclass, because a forking worker would reload the model per chunk and cannot use CUDA initialised in
its parent.

Recovering a chunk whose worker died (SIGKILL, OOM killer, power) in seconds, not RQ's defaults:

- ``SimpleWorker`` sends no heartbeat while a job runs, so RQ would only see a dead run after
  ``job_timeout + 60`` s plus the maintenance interval (600 s). Here a **heartbeat thread** refreshes the
  run's entry in RQ's StartedJobRegistry every ``--heartbeat-s`` with a TTL of ``--execution-ttl``;
- a **reaper thread** in every job worker runs RQ's own StartedJobRegistry cleanup every
  ``--reap-interval`` (under RQ's maintenance lock, held for seconds), which retries an expired run
  (``Retry(max=3)``, at the front of the queue) or, with retries spent, fails it and writes an error
  result per image (``densecap_core.jobs.on_chunk_failure``).

So a killed chunk is back at the head of the queue within ``execution_ttl + reap_interval + 1`` s
(defaults: 10 + 5 + 1 = 16 s) as long as any job worker runs, and the job then completes with one
result per image (results are keyed by content hash). ``SIGTERM`` finishes the current chunk and exits.
A Redis outage (restart, failover) does not end the process: RQ's work loop, which quits on it, is started
again once Redis answers (``CaptionWorker.serve``), with the model still loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time

import redis
from rq.exceptions import StopRequested
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.timeouts import TimerDeathPenalty
from rq.worker import SimpleWorker, WorkerStatus

from densecap_core.jobs import JobLimits
from densecap_core.settings import Settings

log = logging.getLogger("densecap.job_worker")

#: RQ's ``Queue.acquire_maintenance_lock`` holds its lock this long unless released.
RQ_MAINTENANCE_LOCK_S = 899
#: RQ's registry maintenance takes milliseconds; its lock held longer than this was left by a killed worker.
STALE_LOCK_S = 60
#: Longest wait between restarts of RQ's work loop after it quit on its own (see ``CaptionWorker.serve``).
RESTART_BACKOFF_MAX_S = 30.0


class CaptionWorker(SimpleWorker):
    """An RQ ``SimpleWorker`` that heartbeats the running chunk and reaps chunks of dead workers."""

    heartbeat_s: float = 2.0
    execution_ttl_s: int = 10
    reap_interval_s: float = 5.0

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        # The run's entry expires this long after the last beat; the beat thread keeps it fresh.
        return int(self.execution_ttl_s)

    def execute_job(self, job: Job, queue) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), name="chunk-heartbeat",
                                daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join(timeout=5)
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            try:
                self.maintain_heartbeats(job, execution)
            except redis.RedisError as exc:
                log.warning("heartbeat for chunk %s failed (%s); retrying", job.id, exc)

    # surviving Redis outages

    def serve(self, *, burst: bool = False, logging_level: str = "INFO") -> None:
        """RQ's work loop, started again (model kept) whenever it quits without being asked to.

        RQ's loop quits on any exception it does not expect, and Redis going away in the middle of a chunk (a
        restart, a failover) is one: the process would exit, and a supervisor would restart it and reload the
        model, or ``scripts/run`` would stop every service. Here the loop waits until Redis answers and starts
        again. The interrupted chunk has stopped heartbeating, so a reaper retries it (results are keyed by
        content hash: nothing is lost or doubled). Restarts back off from 1 s to ``RESTART_BACKOFF_MAX_S``.
        """
        backoff = 1.0
        while not self.stop_was_requested:
            started = time.monotonic()
            try:
                self.work(burst=burst, logging_level=logging_level)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("RQ's work loop lost Redis (%s)", exc.__class__.__name__)
            except StopRequested:
                return
            if burst or self.stop_was_requested:
                return
            if time.monotonic() - started > 2 * RESTART_BACKOFF_MAX_S:
                backoff = 1.0
            log.warning("RQ's work loop quit on its own; starting it again in %.0f s, once Redis answers", backoff)
            try:
                time.sleep(backoff)
                self._wait_for_redis()
                # RQ records this worker as alive until its teardown reaches Redis; a new loop needs it marked dead.
                self.register_death()
            except StopRequested:
                return
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # down again: the next round waits again
            backoff = min(RESTART_BACKOFF_MAX_S, backoff * 2)

    @property
    def stop_was_requested(self) -> bool:
        """SIGTERM/SIGINT arrived (RQ notes the time; ``_stop_requested`` alone is set only while busy)."""
        return self._stop_requested or self._shutdown_requested_date is not None

    def _wait_for_redis(self) -> None:
        delay = 0.1
        while not self.stop_was_requested:
            try:
                self.connection.ping()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(delay)
                delay = min(2.0, delay * 2)

    # reaping

    def start_reaper(self) -> threading.Thread:
        thread = threading.Thread(target=self._reap_forever, name="chunk-reaper", daemon=True)
        thread.start()
        return thread

    def _reap_forever(self) -> None:
        while True:
            time.sleep(self.reap_interval_s)
            try:
                self.reap_once()
            except redis.RedisError as exc:
                log.warning("reaper: %s", exc)
            except Exception:  # keep reaping whatever one round hit
                log.exception("reaper round failed")

    def _break_stale_rq_lock(self, lock_key: str) -> None:
        """RQ's maintenance takes the lock for 899 s and deletes it when done (in milliseconds). A worker
        killed in between would block reaping for 15 minutes; a lock of RQ's held over a minute is such a
        leftover, and is removed."""
        value, ttl = self.connection.get(lock_key), self.connection.ttl(lock_key)
        if value is not None and not value.startswith(b"reaper:") and 0 < ttl < RQ_MAINTENANCE_LOCK_S - STALE_LOCK_S:
            log.warning("removing RQ's maintenance lock on %s, held for over %d s by a worker that is gone",
                        lock_key, STALE_LOCK_S)
            self.connection.delete(lock_key)

    def reap_once(self) -> int:
        """Retry (or fail) chunks whose run stopped heartbeating; returns how many expired runs it handled."""
        handled = 0
        for queue in self.queues:
            # RQ's own maintenance lock, so this never races RQ's registry cleaning (two cleaners could
            # retry one job twice); held for seconds only, so a worker killed here blocks nobody for long.
            lock_key = queue.registry_cleaning_key
            token = f"reaper:{self.name}:{time.monotonic()}"
            self._break_stale_rq_lock(lock_key)
            if not self.connection.set(lock_key, token, nx=True, ex=max(10, int(self.reap_interval_s * 4))):
                continue
            try:
                # Callbacks run in this thread: a signal-based death penalty only works in the main thread.
                registry = StartedJobRegistry(queue.name, connection=self.connection, job_class=self.job_class,
                                              serializer=self.serializer, death_penalty_class=TimerDeathPenalty)
                handled += len(registry.get_expired_job_ids())
                registry.cleanup(exception_handlers=self._exc_handlers)
                queue.intermediate_queue.cleanup(self, queue)
            finally:
                if self.connection.get(lock_key) == token.encode():
                    self.connection.delete(lock_key)
        return handled


def load_captioner(settings: Settings, device: str | None = None):
    """The process's model: the checkpoint from settings (or the embedded default), loaded once and warmed up.

    Test-only: ``DENSECAP_TEST_DELAY_MS`` (as for the stream worker) adds that many milliseconds to every
    ``caption`` call, playing a slow model so a test can kill the worker in the middle of a chunk.
    """
    from densecap_core.inference import Captioner
    captioner = Captioner(settings.checkpoint or None, device=device or settings.device,
                          max_pixels=settings.max_image_pixels, batch_size=settings.batch_size,
                          beam_size=settings.beam_size or None)
    captioner.warm_up()  # a full batch before the first job: kernels built, memory at its working size
    delay_ms = float(os.environ.get("DENSECAP_TEST_DELAY_MS", "0") or 0)
    return SlowedCaptioner(captioner, delay_ms) if delay_ms > 0 else captioner


class SlowedCaptioner:
    """A captioner plus a fixed sleep per call (test-only, see ``load_captioner``)."""

    def __init__(self, captioner, delay_ms: float):
        self.captioner, self.delay_s = captioner, delay_ms / 1000.0
        self.settings = captioner.settings

    def caption(self, images, names=None, on_error="raise"):
        time.sleep(self.delay_s)
        return self.captioner.caption(images, names, on_error=on_error)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m worker.job_worker",
                                description="Caption bulk-job chunks from RQ (settings from DENSECAP_* variables).")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto (default: DENSECAP_DEVICE)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass within a chunk (default: DENSECAP_BATCH_SIZE)")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--name", default=None, help="worker name (default: DENSECAP_WORKER_NAME or jobs-HOST-PID)")
    p.add_argument("--heartbeat-s", type=float, default=CaptionWorker.heartbeat_s,
                   help="seconds between heartbeats of the running chunk")
    p.add_argument("--execution-ttl", type=int, default=CaptionWorker.execution_ttl_s,
                   help="seconds without a heartbeat after which a chunk counts as abandoned")
    p.add_argument("--reap-interval", type=float, default=CaptionWorker.reap_interval_s,
                   help="seconds between looks for abandoned chunks")
    p.add_argument("--maintenance-interval", type=int, default=60,
                   help="seconds between RQ's full registry maintenance (RQ's default is 600)")
    p.add_argument("--live-yield-max-s", type=float, default=0.5,
                   help="longest wait per batch while live frames are queued (0: never yield)")
    p.add_argument("--nice", type=int, default=5, help="CPU niceness added to this process (0: none)")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env()
    if args.batch_size:
        settings = Settings.from_env(batch_size=args.batch_size)
    if args.execution_ttl < 2 * args.heartbeat_s:
        print("job_worker: --execution-ttl must be at least twice --heartbeat-s", file=sys.stderr)
        return 2
    if args.nice:
        os.nice(args.nice)  # live stream workers keep the CPU when both are busy

    connection = redis.Redis.from_url(**settings.redis_kwargs())
    try:
        connection.ping()
    except redis.RedisError as exc:
        print(f"job_worker: cannot reach Redis at {settings.redis_url_redacted} ({exc}); start redis-server "
              "or set DENSECAP_REDIS_URL", file=sys.stderr)
        return 1

    from worker import jobs
    t0 = time.monotonic()
    try:
        captioner = load_captioner(settings, args.device)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"job_worker: cannot load the model: {exc}", file=sys.stderr)
        return 1
    jobs.install(captioner, limits=JobLimits.from_settings(settings), batch_size=settings.batch_size,
                 live_yield_max_s=args.live_yield_max_s)
    log.info("model loaded in %.1f s: %s", time.monotonic() - t0, getattr(captioner, "settings", {}))

    name = args.name or settings.worker_name or f"jobs-{socket.gethostname()}-{os.getpid()}"
    worker = CaptionWorker([settings.jobs_queue], connection=connection, name=name,
                           maintenance_interval=args.maintenance_interval)
    worker.heartbeat_s = args.heartbeat_s
    worker.execution_ttl_s = args.execution_ttl
    worker.reap_interval_s = args.reap_interval
    worker.start_reaper()
    log.info("job worker %s on queue %s (Redis %s); abandoned chunks retried within %.0f s",
             name, settings.jobs_queue, settings.redis_url_redacted, args.execution_ttl + args.reap_interval + 1)
    worker.serve(burst=args.burst, logging_level=args.log_level.upper())
    return 0


if __name__ == "__main__":
    sys.exit(main())
