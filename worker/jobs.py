"""The RQ job functions of the bulk path (run by ``python -m worker.job_worker``).

A chunk is ``caption_chunk(job_id, shas)``: up to ``chunk_size`` content hashes of one bulk job. It is
idempotent, so RQ may run it more than once (a retry after a timeout, or after its worker was killed):

- hashes that already have a result are skipped (a retry resumes where the killed run stopped);
- results are written per content hash (``JobStore.store_result``), overwriting, never appending.

The captioner is process-wide: ``install(captioner, ...)`` is called once by the worker after it loaded the
model, and every chunk the process runs uses it. It is any object with
``caption(list_of_bytes, names, on_error="record") -> list[ImageResult]`` and a ``settings`` dict (the
``Captioner`` of ``densecap_core.inference``). This module imports no torch itself.

Live frames come first: between two batches a chunk waits (up to ``live_yield_max_s``) while live frames
are queued and a stream worker is alive, so a GPU shared with stream workers is handed to them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

from densecap_core import protocol
from densecap_core.jobs import JobLimits, JobStore, chunked
from densecap_core.schema import ImageResult

log = logging.getLogger("densecap.job_worker")

#: How often a yielding chunk looks at the live ready list again.
LIVE_POLL_S = 0.01


@dataclass
class ChunkRunner:
    """What a chunk needs besides its arguments: the model and how to share the device with live frames."""

    captioner: Any
    limits: JobLimits
    batch_size: int = 8
    live_yield_max_s: float = 0.5


_runner: ChunkRunner | None = None


def install(captioner, *, limits: JobLimits, batch_size: int = 8, live_yield_max_s: float = 0.5) -> ChunkRunner:
    """Make ``captioner`` the one every chunk of this process uses (called once, before the worker starts)."""
    global _runner
    _runner = ChunkRunner(captioner, limits, max(1, int(batch_size)), max(0.0, float(live_yield_max_s)))
    return _runner


def current_runner() -> ChunkRunner:
    if _runner is None:
        raise RuntimeError("no captioner installed: chunks run inside `python -m worker.job_worker`, "
                           "which loads the model and calls worker.jobs.install() first")
    return _runner


def caption_chunk(job_id: str, shas: Sequence[str]) -> dict[str, Any]:
    """Caption the images ``shas`` of job ``job_id`` in batches; returns counts for RQ's result."""
    from rq import get_current_job

    runner = current_runner()
    connection = get_current_job().connection
    store = JobStore(connection, runner.limits)
    if store.is_canceled(job_id):
        return {"job": job_id, "canceled": True, "captioned": 0}
    store.set_opt_once(job_id, dict(getattr(runner.captioner, "settings", {}) or {}))
    todo = store.without_result(job_id, list(shas))
    captioned, waited = 0, 0.0
    for batch in chunked(todo, runner.batch_size):
        waited += wait_for_live_frames(connection, runner.live_yield_max_s)
        if store.is_canceled(job_id):
            return {"job": job_id, "canceled": True, "captioned": captioned}
        blobs = store.get_blobs(job_id, batch)
        present = [(sha, data) for sha, data in zip(batch, blobs) if data is not None]
        for sha, data in zip(batch, blobs):
            if data is None:
                # Another run of the same bytes may have finished (and freed them) meanwhile: never overwrite.
                store.store_result(job_id, sha, ImageResult(
                    name=sha, width=0, height=0,
                    error=f"the image's bytes were gone from Redis before a worker took it (kept "
                          f"{runner.limits.blob_ttl_s // 3600} h); submit again with --new-job"),
                    only_if_absent=True)
        # Named for messages ("sub/a.jpg: not a readable image"); stored per hash, whatever the name.
        labels = store.display_names(job_id, [sha for sha, _ in present])
        results = caption_isolating_failures(runner.captioner, [d for _, d in present], labels)
        for (sha, _), result in zip(present, results):
            store.store_result(job_id, sha, result)
        captioned += len(present)
    return {"job": job_id, "captioned": captioned, "skipped": len(shas) - len(todo),
            "live_wait_s": round(waited, 3)}


def wait_for_live_frames(connection, max_wait_s: float) -> float:
    """Wait while live frames are queued and a stream worker is alive, at most ``max_wait_s``; returns the wait.

    Bulk chunks share the device with the stream workers; this hands it to them between batches. With
    no stream worker alive (a bulk-only deployment) nothing waits, whatever sits in the ready list.
    """
    if max_wait_s <= 0:
        return 0.0
    start = time.monotonic()
    while time.monotonic() - start < max_wait_s:
        if not connection.llen(protocol.READY_LIST):
            break
        if protocol.live_worker_count(connection, time.time()) == 0:
            break
        time.sleep(LIVE_POLL_S)
    return time.monotonic() - start


def _is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def caption_isolating_failures(captioner, blobs: list[bytes], names: list[str]) -> list[ImageResult]:
    """``captioner.caption(..., on_error="record")``; if the batch raises, split it to find the culprit.

    An unreadable image already comes back as an error result. Anything else a batch raises (a model bug
    triggered by one odd image, memory exhausted by a large batch) is retried on halves, so one image
    cannot fail its neighbours. A single image that still raises gets an error result, except for out of
    memory on a single image: that is the device's state, not the image's, so it propagates and RQ
    retries the chunk.
    """
    if not blobs:
        return []
    from rq.timeouts import BaseTimeoutException

    try:
        return list(captioner.caption(blobs, names, on_error="record"))
    except BaseTimeoutException:
        raise  # the chunk ran out of time: RQ retries it
    except Exception as exc:
        if _is_out_of_memory(exc):
            _free_device_cache()
        if len(blobs) == 1:
            if _is_out_of_memory(exc):
                raise
            log.exception("image %s failed to caption", names[0])
            return [ImageResult(name=names[0], width=0, height=0,
                                error=f"captioning raised {exc.__class__.__name__}: {exc}")]
        mid = len(blobs) // 2
        return (caption_isolating_failures(captioner, blobs[:mid], names[:mid])
                + caption_isolating_failures(captioner, blobs[mid:], names[mid:]))


def _free_device_cache() -> None:
    import sys
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
