"""Bulk jobs: the state of a folder being captioned, kept in Redis, shared by the gateway and the job workers.

Torch-free and RQ-free at import time (the gateway imports it; RQ is imported only where chunks are
enqueued or cancelled). Every Redis key comes from ``densecap_core.protocol`` (bulk jobs section).

Vocabulary:

- a **job** is a set of **items**: a name (a relative path such as ``sub/a.jpg``) and the sha256 of its
  bytes. Several names may hold the same bytes; those bytes are stored and captioned once.
- a **chunk** is one RQ job: up to ``chunk_size`` content hashes of one job, captioned in one go by a job
  worker (``worker.jobs.caption_chunk``).

Guarantees (the contract the gateway, the worker and the tests rely on):

- **Exactly one result per content hash.** ``store_result`` writes ``results[sha]`` with HSET, so a chunk
  that runs twice (a retry after a crash, or two uploads racing) overwrites; a name enters the results log
  (the cursor clients follow) only the first time it gets a result.
- **Nothing lost.** A chunk is enqueued *before* its hashes are marked queued; if the gateway dies in
  between, the chunk still runs, and a client that re-registers the items is told to upload what is
  neither queued nor done. A chunk that fails for good (retries spent) gets an error result per image
  (``on_chunk_failure``), so every job ends with a result (possibly an error) for every item.
- **Bounded memory.** Image bytes live in Redis only between upload and captioning (deleted by
  ``store_result``; ``blob_ttl_s`` is a backstop), and a job may hold at most ``backlog_bytes`` of them:
  beyond that ``Backlogged`` (HTTP 429) tells the uploader to wait for the workers.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from densecap_core import protocol
from densecap_core.schema import ImageResult

JOB_ID_RE = re.compile(r"^[0-9a-f]{32}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_NAME_CHARS = 1024
#: The RQ function a chunk runs, named by string so the gateway never imports the worker (or torch).
CHUNK_FUNCTION = "worker.jobs.caption_chunk"
CHUNK_FAILURE_CALLBACK = "densecap_core.jobs.on_chunk_failure"

# --- errors ----------------------------------------------------------------------------------------------


class JobError(Exception):
    """A request about a job that cannot be served. ``status``/``code`` map onto the REST error body."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, **extra: Any):
        super().__init__(message)
        self.message = message
        self.extra = extra


class UnknownJob(JobError):
    status, code = 404, "unknown_job"


class JobCanceled(JobError):
    status, code = 409, "job_canceled"


class BadItem(JobError):
    status, code = 400, "bad_item"


class Backlogged(JobError):
    status, code = 429, "backlogged"


# --- limits and names ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobLimits:
    """The knobs of the bulk path; ``from_settings`` reads them from the one settings object."""

    chunk_size: int = 8
    max_image_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    backlog_bytes: int = 256 * 1024 * 1024
    job_ttl_s: int = 7 * 24 * 3600
    #: Uploaded bytes wait at most this long for a worker (a backstop: captioning deletes them).
    blob_ttl_s: int = 24 * 3600
    #: A chunk may run ``base + per_image * n`` seconds before RQ kills it (SIGALRM) and retries it.
    chunk_timeout_base_s: int = 60
    chunk_timeout_per_image_s: int = 30
    #: Retries after a failure, a timeout or an abandoned run (worker killed); then error results.
    chunk_retries: int = 3

    @classmethod
    def from_settings(cls, settings) -> "JobLimits":
        return cls(chunk_size=max(1, int(settings.chunk_size)),
                   max_image_bytes=int(settings.max_upload_bytes),
                   max_image_pixels=int(settings.max_image_pixels),
                   backlog_bytes=int(getattr(settings, "job_backlog_bytes", cls.backlog_bytes)),
                   job_ttl_s=int(getattr(settings, "job_ttl_s", cls.job_ttl_s)),
                   blob_ttl_s=min(cls.blob_ttl_s, int(getattr(settings, "job_ttl_s", cls.job_ttl_s))))

    def chunk_timeout_s(self, n_images: int) -> int:
        return self.chunk_timeout_base_s + self.chunk_timeout_per_image_s * max(1, n_images)


def validate_item_name(name: Any) -> str:
    """Return ``name`` if it is a safe relative path (``a.jpg``, ``sub/b.png``), else raise ``BadItem``.

    Refused: empty names, absolute paths, drive letters, backslashes, control characters and ``.``, ``..``
    or empty components. The client writes outputs under these names, so this is a path-safety check.
    """
    if not isinstance(name, str) or not name:
        raise BadItem("a file has an empty name; give every file a name such as 'photo.jpg'")
    shown = repr(name[:200])
    if len(name) > MAX_NAME_CHARS:
        raise BadItem(f"file name {shown}... is longer than {MAX_NAME_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise BadItem(f"file name {shown} contains control characters")
    if "\\" in name:
        raise BadItem(f"file name {shown} contains a backslash; use '/' between folders")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise BadItem(f"file name {shown} is an absolute path; send paths relative to the folder you submit")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise BadItem(f"file name {shown} has an empty, '.' or '..' path component; "
                      "send paths relative to the folder you submit, without '..'")
    return name


def validate_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise UnknownJob(f"no job with id {job_id[:80]!r}: job ids are 32 hexadecimal digits "
                         "as returned by POST /api/v1/jobs")
    return job_id


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- Lua scripts (each one atomic; KEYS[1..10] are protocol.job_keys(job_id)) -------------------------------

_LUA_EXPIRE_ALL = """
local function expire_all(ttl)
  for i = 1, 10 do redis.call('EXPIRE', KEYS[i], ttl) end
end
"""

# ARGV: ttl, then name, sha pairs. Returns one status per pair: 'done', 'queued' or 'need'.
_REGISTER_LUA = _LUA_EXPIRE_ALL + """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('NOJOB') end
local function drop_name(sha, name)
  local cur = redis.call('HGET', KEYS[3], sha)
  if not cur then return end
  local kept = {}
  for n in string.gmatch(cur, '[^\\n]+') do if n ~= name then table.insert(kept, n) end end
  if #kept == 0 then redis.call('HDEL', KEYS[3], sha) else redis.call('HSET', KEYS[3], sha, table.concat(kept, '\\n')) end
end
local out = {}
for i = 2, #ARGV, 2 do
  local name, sha = ARGV[i], ARGV[i + 1]
  local old = redis.call('HGET', KEYS[2], name)
  if old ~= sha then
    if old then
      drop_name(old, name)
      redis.call('SREM', KEYS[6], name)
      redis.call('SREM', KEYS[7], name)
    end
    redis.call('HSET', KEYS[2], name, sha)
    local cur = redis.call('HGET', KEYS[3], sha)
    if cur then redis.call('HSET', KEYS[3], sha, cur .. '\\n' .. name) else redis.call('HSET', KEYS[3], sha, name) end
    local res = redis.call('HGET', KEYS[5], sha)
    if res then
      redis.call('SADD', KEYS[6], name)
      if cjson.decode(res)['error'] ~= nil then redis.call('SADD', KEYS[7], name) end
      redis.call('RPUSH', KEYS[8], name)
    end
  end
  if redis.call('SISMEMBER', KEYS[6], name) == 1 then table.insert(out, 'done')
  elseif redis.call('HEXISTS', KEYS[4], sha) == 1 then table.insert(out, 'queued')
  else table.insert(out, 'need') end
end
expire_all(tonumber(ARGV[1]))
return out
"""

# ARGV: ttl, then sha, size pairs. Marks hashes without a result as queued; returns how many it marked.
_MARK_QUEUED_LUA = _LUA_EXPIRE_ALL + """
local marked = 0
for i = 2, #ARGV, 2 do
  local sha, size = ARGV[i], ARGV[i + 1]
  if redis.call('HEXISTS', KEYS[5], sha) == 0 and redis.call('HSETNX', KEYS[4], sha, size) == 1 then
    redis.call('HINCRBY', KEYS[1], 'backlog_bytes', tonumber(size))
    marked = marked + 1
  end
end
expire_all(tonumber(ARGV[1]))
return marked
"""

# KEYS[11] = the blob. ARGV: sha, result JSON, is_error (0/1), ttl, now, recent_max, only_if_absent (0/1).
# Returns 1 for a new result, 0 for an overwrite (or nothing, with only_if_absent), -1 when the job is gone.
_STORE_RESULT_LUA = _LUA_EXPIRE_ALL + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local sha = ARGV[1]
if ARGV[7] == '1' and redis.call('HEXISTS', KEYS[5], sha) == 1 then return 0 end
local new = redis.call('HSET', KEYS[5], sha, ARGV[2])
redis.call('HINCRBY', KEYS[1], 'computed', 1)
local names = redis.call('HGET', KEYS[3], sha)
if names then
  for name in string.gmatch(names, '[^\\n]+') do
    if redis.call('SADD', KEYS[6], name) == 1 then
      redis.call('RPUSH', KEYS[8], name)
      redis.call('LPUSH', KEYS[9], ARGV[5])
    end
    if ARGV[3] == '1' then redis.call('SADD', KEYS[7], name) else redis.call('SREM', KEYS[7], name) end
  end
end
redis.call('LTRIM', KEYS[9], 0, tonumber(ARGV[6]) - 1)
local size = redis.call('HGET', KEYS[4], sha)
if size then
  redis.call('HDEL', KEYS[4], sha)
  redis.call('HINCRBY', KEYS[1], 'backlog_bytes', -tonumber(size))
end
redis.call('DEL', KEYS[11])
redis.call('HSET', KEYS[1], 'updated', ARGV[5])
expire_all(tonumber(ARGV[4]))
return new
"""


# --- the store -------------------------------------------------------------------------------------------


class JobStore:
    """Job state over one Redis client (bytes replies, i.e. ``decode_responses=False``; thread-safe)."""

    def __init__(self, redis_client, limits: JobLimits | None = None):
        self.r = redis_client
        self.limits = limits or JobLimits()
        self._register = self.r.register_script(_REGISTER_LUA)
        self._mark_queued = self.r.register_script(_MARK_QUEUED_LUA)
        self._store_result = self.r.register_script(_STORE_RESULT_LUA)

    # creation and lookup

    def create(self, label: str = "", owner: str = "") -> str:
        """A new, open job; returns its id. ``owner`` (opaque, e.g. a hash of the creating API token) is kept
        for the gateway to decide who may see the job; ``""`` means every token may."""
        job_id = uuid.uuid4().hex
        now = time.time()
        ttl = self.limits.job_ttl_s
        pipe = self.r.pipeline()
        pipe.hset(protocol.job_key(job_id), mapping={
            "id": job_id, "label": label[:200], "created": now, "updated": now, "sealed": 0, "canceled": 0,
            "backlog_bytes": 0, "computed": 0, "stored": 0, "owner": owner})
        pipe.expire(protocol.job_key(job_id), ttl)
        pipe.zadd(protocol.JOBS_ZSET, {job_id: now})
        # Listing only: forget jobs whose state has expired.
        pipe.zremrangebyscore(protocol.JOBS_ZSET, "-inf", now - ttl)
        pipe.execute()
        return job_id

    def meta(self, job_id: str) -> dict[str, str]:
        """The job's fields; ``UnknownJob`` if the id is malformed, never existed or has expired."""
        validate_job_id(job_id)
        raw = self.r.hgetall(protocol.job_key(job_id))
        if not raw:
            raise UnknownJob(f"no job with id {job_id!r} (never created, or expired "
                             f"{self.limits.job_ttl_s // 3600} h after its last change)")
        return {k.decode(): v.decode() for k, v in raw.items()}

    def require_open(self, job_id: str) -> dict[str, str]:
        meta = self.meta(job_id)
        if meta.get("canceled") == "1":
            raise JobCanceled(f"job {job_id} was canceled; create a new job to caption these images")
        return meta

    def list_jobs(self, limit: int = 50, owner: str | None = None) -> list[str]:
        """The newest job ids; with ``owner``, only jobs of that owner or of none (``create``)."""
        if owner is None:
            ids = self.r.zrevrange(protocol.JOBS_ZSET, 0, max(0, limit - 1))
            return [i.decode() for i in ids]
        out: list[str] = []
        start, page = 0, max(limit, 200)
        while len(out) < limit:
            ids = self.r.zrevrange(protocol.JOBS_ZSET, start, start + page - 1)
            if not ids:
                break
            pipe = self.r.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(protocol.job_key(job_id.decode()), "owner")
            out += [i.decode() for i, o in zip(ids, pipe.execute()) if (o or b"").decode() in ("", owner)]
            start += page
        return out[:limit]

    # items

    def register(self, job_id: str, items: Sequence[tuple[str, str]]) -> list[str]:
        """Add or update ``(name, sha256)`` items; returns ``'done' | 'queued' | 'need'`` per item.

        ``need`` means the bytes must be uploaded. A name whose bytes changed gets the new hash (its old
        result no longer counts). Names must already be validated.
        """
        if not items:
            return []
        args: list[Any] = [self.limits.job_ttl_s]
        for name, sha in items:
            args += [name, sha]
        try:
            out = self._register(keys=protocol.job_keys(job_id), args=args)
        except Exception as exc:  # redis.ResponseError, without importing redis here
            if "NOJOB" in str(exc):
                raise UnknownJob(f"no job with id {job_id!r}") from exc
            raise
        return [s.decode() if isinstance(s, bytes) else s for s in out]

    def put_blob(self, job_id: str, sha: str, data: bytes) -> None:
        pipe = self.r.pipeline()
        pipe.set(protocol.job_blob_key(job_id, sha), data, ex=self.limits.blob_ttl_s)
        pipe.hincrby(protocol.job_key(job_id), "stored", 1)  # uploads that were kept (resume shows none repeat)
        pipe.execute()

    def mark_queued(self, job_id: str, sizes: dict[str, int]) -> int:
        """Mark hashes as handed to a chunk (skipping any that already have a result)."""
        if not sizes:
            return 0
        args: list[Any] = [self.limits.job_ttl_s]
        for sha, size in sizes.items():
            args += [sha, int(size)]
        return int(self._mark_queued(keys=protocol.job_keys(job_id), args=args))

    def check_backlog(self, job_id: str, meta: dict[str, str] | None = None) -> None:
        meta = meta if meta is not None else self.meta(job_id)
        held = int(meta.get("backlog_bytes", 0) or 0)
        if held >= self.limits.backlog_bytes:
            raise Backlogged(f"job {job_id} already holds {held} bytes of images waiting for a worker "
                             f"(limit {self.limits.backlog_bytes}); retry this upload in a few seconds",
                             retry_after=2)

    def add_chunk(self, job_id: str, rq_job_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.sadd(protocol.job_chunks_key(job_id), rq_job_id)
        pipe.expire(protocol.job_chunks_key(job_id), self.limits.job_ttl_s)
        pipe.execute()

    # results

    def store_result(self, job_id: str, sha: str, result: ImageResult, *, only_if_absent: bool = False) -> int:
        """Write the result for ``sha`` and free its image bytes: 1 new, 0 overwritten, -1 job gone.

        ``only_if_absent`` (for error results written on a worker's behalf) never replaces a result that
        another run of the same bytes has written meanwhile.
        """
        record = result.to_dict()
        record.pop("name", None)  # one result serves every name holding these bytes
        keys = protocol.job_keys(job_id) + [protocol.job_blob_key(job_id, sha)]
        return int(self._store_result(keys=keys, args=[
            sha, json.dumps(record, separators=(",", ":")), 0 if result.ok else 1, self.limits.job_ttl_s,
            f"{time.time():.3f}", protocol.JOB_RECENT_MAX, 1 if only_if_absent else 0]))

    def record_rejected(self, job_id: str, name: str, sha: str, error: str) -> None:
        """An item refused at upload (too large, not an image): an error result, no captioning."""
        self.register(job_id, [(name, sha)])
        self.store_result(job_id, sha, ImageResult(name=name, width=0, height=0, error=error))

    def without_result(self, job_id: str, shas: Sequence[str]) -> list[str]:
        """The hashes among ``shas`` that have no result yet (a retried chunk skips the others)."""
        if not shas:
            return []
        pipe = self.r.pipeline(transaction=False)
        for sha in shas:
            pipe.hexists(protocol.job_results_key(job_id), sha)
        return [sha for sha, has in zip(shas, pipe.execute()) if not has]

    def get_blobs(self, job_id: str, shas: Sequence[str]) -> list[bytes | None]:
        if not shas:
            return []
        return self.r.mget([protocol.job_blob_key(job_id, sha) for sha in shas])

    def display_names(self, job_id: str, shas: Sequence[str]) -> list[str]:
        """A name holding each hash (the first registered), for messages; the hash itself if none."""
        if not shas:
            return []
        found = self.r.hmget(protocol.job_hashnames_key(job_id), list(shas))
        return [f.decode().split("\n", 1)[0] if f else sha for sha, f in zip(shas, found)]

    def is_canceled(self, job_id: str) -> bool:
        return self.r.hget(protocol.job_key(job_id), "canceled") == b"1"

    def set_opt_once(self, job_id: str, opt: dict[str, Any]) -> None:
        """Record the inference settings the first worker used (results.json's ``opt``)."""
        self.r.hsetnx(protocol.job_key(job_id), "opt", json.dumps(opt, separators=(",", ":")))

    def results_page(self, job_id: str, cursor: int = 0, limit: int = 500) -> tuple[list[dict[str, Any]], int]:
        """Results in arrival order from ``cursor``: ``(records, next_cursor)``.

        A record is ``ImageResult.to_dict()`` with the item's ``name`` and its ``sha256``. In the rare case
        that a name's bytes changed after it had a result, the name appears again later; the last wins.
        """
        cursor = max(0, int(cursor))
        names = self.r.lrange(protocol.job_log_key(job_id), cursor, cursor + max(1, int(limit)) - 1)
        if not names:
            return [], cursor
        shas = self.r.hmget(protocol.job_names_key(job_id), names)
        lookups = [s for s in shas if s is not None]
        results = dict(zip(lookups, self.r.hmget(protocol.job_results_key(job_id), lookups))) if lookups else {}
        records = []
        for name, sha in zip(names, shas):
            raw = results.get(sha) if sha is not None else None
            if raw is None:
                continue
            record = {"name": name.decode(), "sha256": sha.decode(), **json.loads(raw)}
            records.append(record)
        return records, cursor + len(names)

    # lifecycle

    def seal(self, job_id: str) -> list[str]:
        """Declare the job complete (no more items). Returns the names still lacking bytes; seals only if none."""
        self.require_open(job_id)
        # One snapshot (MULTI/EXEC): read one by one, an item a worker finished between the read of the done
        # set and the read of the queued hash was in neither, and a finished upload was refused as missing.
        pipe = self.r.pipeline(transaction=True)
        pipe.hgetall(protocol.job_names_key(job_id))
        pipe.smembers(protocol.job_done_key(job_id))
        pipe.hkeys(protocol.job_queued_key(job_id))
        names, done, queued = pipe.execute()
        queued = set(queued)
        missing = sorted(n.decode() for n, sha in names.items() if n not in done and sha not in queued)
        if not missing:
            self.r.hset(protocol.job_key(job_id), mapping={"sealed": 1, "updated": time.time()})
        return missing

    def cancel(self, job_id: str) -> list[str]:
        """Mark canceled, drop the waiting image bytes; returns the chunk ids (the caller cancels them in RQ)."""
        self.meta(job_id)
        queued = [s.decode() for s in self.r.hkeys(protocol.job_queued_key(job_id))]
        pipe = self.r.pipeline()
        pipe.hset(protocol.job_key(job_id), mapping={"canceled": 1, "backlog_bytes": 0, "updated": time.time()})
        pipe.delete(protocol.job_queued_key(job_id))
        for sha in queued:
            pipe.delete(protocol.job_blob_key(job_id, sha))
        pipe.smembers(protocol.job_chunks_key(job_id))
        chunk_ids = pipe.execute()[-1]
        return sorted(c.decode() for c in chunk_ids)

    def status(self, job_id: str) -> dict[str, Any]:
        """Counts, state, rate (images/s) and ETA (s). States: open, running, finished, canceled."""
        meta = self.meta(job_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.hlen(protocol.job_names_key(job_id))
        pipe.scard(protocol.job_done_key(job_id))
        pipe.scard(protocol.job_failed_key(job_id))
        pipe.hlen(protocol.job_queued_key(job_id))
        pipe.llen(protocol.job_log_key(job_id))
        pipe.lrange(protocol.job_recent_key(job_id), 0, -1)
        images, done, failed, queued, log_len, recent = pipe.execute()
        now = time.time()
        rate = completion_rate([float(t) for t in recent], now)
        pending = images - done
        sealed = meta.get("sealed") == "1"
        if meta.get("canceled") == "1":
            state = "canceled"
        elif sealed and pending == 0:
            state = "finished"
        elif queued or done:
            state = "running"
        else:
            state = "open"
        eta = round(pending / rate, 1) if rate > 0 and pending and state == "running" else None
        return {
            "id": job_id, "label": meta.get("label", ""), "state": state, "sealed": sealed,
            "created": float(meta.get("created", 0)), "updated": float(meta.get("updated", 0)),
            "counts": {"images": images, "done": done, "failed": failed, "pending": pending,
                       "queued_unique": queued, "results": log_len},
            "backlog_bytes": int(meta.get("backlog_bytes", 0) or 0),
            "computed": int(meta.get("computed", 0) or 0), "stored": int(meta.get("stored", 0) or 0),
            "rate": round(rate, 3), "eta_s": eta,
            "opt": json.loads(meta["opt"]) if meta.get("opt") else {},
        }


def completion_rate(recent: Sequence[float], now: float, window_s: float = 60.0) -> float:
    """Images per second from recent completion times (newest first).

    Over the last ``window_s`` seconds when it holds any completion, so the rate falls when work stalls;
    else over the recent list itself (a finished job still reports the pace it ran at).
    """
    if not recent:
        return 0.0
    in_window = [t for t in recent if t >= now - window_s]
    if in_window:
        span = now - in_window[-1]
        return len(in_window) / max(span, 1.0)
    if len(recent) >= 2 and recent[0] > recent[-1]:
        return (len(recent) - 1) / (recent[0] - recent[-1])
    return 0.0


def chunked(items: Sequence[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield list(items[start:start + size])


# --- RQ glue (rq imported lazily) ------------------------------------------------------------------------


def enqueue_chunks(store: JobStore, queue_name: str, job_id: str, sizes: dict[str, int]) -> list[str]:
    """Enqueue chunks of at most ``chunk_size`` hashes, then mark those hashes queued.

    Order matters: enqueue first, mark second (see the module docstring). Returns the RQ job ids.
    """
    from rq import Callback, Queue, Retry

    limits = store.limits
    queue = Queue(queue_name, connection=store.r)
    ids = []
    for shas in chunked(list(sizes), limits.chunk_size):
        rq_job = queue.enqueue(
            CHUNK_FUNCTION, job_id, shas,
            job_timeout=limits.chunk_timeout_s(len(shas)),
            retry=Retry(max=limits.chunk_retries, enqueue_at_front=True),
            on_failure=Callback(CHUNK_FAILURE_CALLBACK),
            result_ttl=3600, failure_ttl=7 * 24 * 3600, meta={"max_retries": limits.chunk_retries},
            description=f"caption {len(shas)} images of job {job_id}")
        store.add_chunk(job_id, rq_job.id)
        store.mark_queued(job_id, {sha: sizes[sha] for sha in shas})
        ids.append(rq_job.id)
    return ids


def cancel_chunks(redis_client, chunk_ids: Iterable[str]) -> int:
    """Cancel the chunks still waiting in RQ (a running one stops at its next batch). Returns how many."""
    from rq.exceptions import InvalidJobOperation, NoSuchJobError
    from rq.job import Job, JobStatus

    canceled = 0
    for chunk_id in chunk_ids:
        try:
            job = Job.fetch(chunk_id, connection=redis_client)
            if job.get_status() in (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
                job.cancel()
                canceled += 1
        except (NoSuchJobError, InvalidJobOperation):
            continue
    return canceled


def on_chunk_failure(rq_job, connection, exc_type=None, exc_value=None, traceback=None) -> None:
    """RQ failure callback of every chunk (also run for abandoned chunks found by registry cleanup).

    While retries are left RQ will run the chunk again, so nothing is written. Once they are spent, each
    image of the chunk that still has no result gets an error result, so the job can finish.
    """
    if rq_job.retries_left:
        return
    job_id, shas = rq_job.args[0], list(rq_job.args[1])
    store = JobStore(connection)
    reason = exc_type.__name__ if isinstance(exc_type, type) else "worker lost"
    detail = f": {exc_value}" if exc_value else ""
    attempts = 1 + int(rq_job.meta.get("max_retries", 0)) - int(rq_job.retries_left or 0)
    for sha in store.without_result(job_id, shas):
        store.store_result(job_id, sha, ImageResult(
            name=sha, width=0, height=0,
            error=f"captioning failed after {attempts} attempt(s) ({reason}{detail}); "
                  "submit again with --new-job to try this image again"), only_if_absent=True)
