"""The job worker's recovery machinery and chunk function on a real redis-server, without loading a model:
the reaper retries an abandoned chunk through RQ's own cleanup, respects RQ's maintenance lock and breaks a
stale one; a chunk isolates an image that breaks its batch; a chunk with retries spent leaves error results."""

from __future__ import annotations

import time

import pytest
from rq import Queue, Retry
from rq.executions import Execution
from rq.job import JobStatus

from densecap_core import jobs as jobs_core
from densecap_core.jobs import JobLimits, JobStore, sha256_hex
from densecap_core.schema import ImageResult
from worker import jobs as worker_jobs
from worker.job_worker import CaptionWorker


def abandoned_chunk(r, queue: Queue, retries: int = 2):
    """A chunk that a (now dead) worker started and stopped heartbeating 10 s ago."""
    job = queue.enqueue(jobs_core.CHUNK_FUNCTION, "0" * 32, ["a" * 64], retry=Retry(max=retries))
    queue.remove(job)
    with r.pipeline() as pipe:
        execution = Execution.create(job, ttl=60, pipeline=pipe, worker_name="dead-worker")
        job.set_status(JobStatus.STARTED, pipeline=pipe)
        pipe.execute()
    r.zadd(queue.started_job_registry.key, {execution.composite_key: time.time() - 10})
    return job


def test_reaper_retries_an_abandoned_chunk(redis_server):
    r = redis_server.client()
    queue = Queue("reap", connection=r)
    job = abandoned_chunk(r, queue)
    reaper = CaptionWorker([queue], connection=r, name="alive-worker")
    assert reaper.reap_once() == 1
    job.refresh()
    assert job.get_status() == JobStatus.QUEUED and job.retries_left == 1
    assert queue.job_ids == [job.id]  # at the front, ready for the next free worker
    assert reaper.reap_once() == 0 and queue.job_ids == [job.id]  # not retried twice
    assert r.get(queue.registry_cleaning_key) is None  # the lock was released


def test_reaper_respects_and_breaks_rq_maintenance_lock(redis_server):
    r = redis_server.client()
    queue = Queue("lock", connection=r)
    job = abandoned_chunk(r, queue)
    reaper = CaptionWorker([queue], connection=r, name="alive-worker")
    r.set(queue.registry_cleaning_key, 1, ex=899)  # RQ's maintenance is running right now
    assert reaper.reap_once() == 0 and job.get_status(refresh=True) == JobStatus.STARTED
    r.expire(queue.registry_cleaning_key, 800)  # ...and was left by a worker killed 99 s ago
    assert reaper.reap_once() == 1 and job.get_status(refresh=True) == JobStatus.QUEUED


def test_spent_retries_leave_an_error_result_per_image(redis_server):
    r = redis_server.client()
    store = JobStore(r)
    job_id = store.create()
    a, b = sha256_hex(b"A"), sha256_hex(b"B")
    store.register(job_id, [("a.jpg", a), ("b.jpg", b)])
    store.store_result(job_id, a, ImageResult("a", 10, 10))
    queue = Queue("spent", connection=r)
    chunk = queue.enqueue(jobs_core.CHUNK_FUNCTION, job_id, [a, b], retry=Retry(max=1), meta={"max_retries": 1})
    jobs_core.on_chunk_failure(chunk, r, RuntimeError, RuntimeError("boom"), None)
    assert store.status(job_id)["counts"]["done"] == 1  # a retry is still due: nothing written
    chunk.retries_left = 0
    jobs_core.on_chunk_failure(chunk, r, RuntimeError, RuntimeError("boom"), None)
    records = {rec["name"]: rec for rec in store.results_page(job_id, 0, 10)[0]}
    assert "error" not in records["a.jpg"]  # a result that exists is kept
    assert "after 2 attempt(s)" in records["b.jpg"]["error"] and "boom" in records["b.jpg"]["error"]


class FussyCaptioner:
    """Raises for a whole batch that contains b"bad", like a model bug one odd image triggers."""

    settings = {"config": "fake"}

    def __init__(self):
        self.calls = []

    def caption(self, blobs, names, on_error="raise"):
        self.calls.append(len(blobs))
        if b"bad" in blobs:
            raise RuntimeError("shape mismatch")
        return [ImageResult(n, 4, 4) for n in names]


def test_one_bad_image_does_not_fail_its_batch():
    captioner = FussyCaptioner()
    out = worker_jobs.caption_isolating_failures(captioner, [b"1", b"2", b"bad", b"4"], ["1", "2", "3", "4"])
    assert [r.ok for r in out] == [True, True, False, True]
    assert "shape mismatch" in out[2].error and captioner.calls[0] == 4


def test_out_of_memory_on_one_image_is_left_to_rq():
    class OutOfMemoryError(RuntimeError):
        pass

    class Hungry:
        def caption(self, blobs, names, on_error="raise"):
            raise OutOfMemoryError("CUDA out of memory")

    with pytest.raises(OutOfMemoryError):
        worker_jobs.caption_isolating_failures(Hungry(), [b"1", b"2"], ["1", "2"])


def test_live_frames_pause_a_chunk_only_while_a_stream_worker_lives(redis_server):
    from densecap_core import protocol
    r = redis_server.client()
    assert worker_jobs.wait_for_live_frames(r, 1.0) < 0.05  # nothing waiting
    r.lpush(protocol.READY_LIST, "sid")
    assert worker_jobs.wait_for_live_frames(r, 1.0) < 0.05  # frames, but no stream worker: bulk-only
    protocol.heartbeat(r, "stream-1", time.time())
    assert 0.25 <= worker_jobs.wait_for_live_frames(r, 0.3) < 0.6  # yields, up to the limit
    assert JobLimits().chunk_timeout_s(8) == 60 + 30 * 8
