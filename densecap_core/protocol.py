"""The Redis contract: every key, channel, TTL and message encoding the gateway and workers share.

Torch-free. No Redis key or channel string appears anywhere else in the project.

Live frames (at-most-once, newest frame wins), for a stream session ``sid``:

- ``dc:frame:{sid}``   the newest frame (``pack_frame`` bytes), ``PX`` = frame TTL; a newer frame overwrites it.
- ``dc:pending:{sid}`` a flag set with ``NX`` next to the frame; only when it was newly set does the gateway
  push ``sid`` on ``dc:ready``. So each session has at most one ticket on the ready list.
- ``dc:ready``         the shared list of session tickets that stream workers pop (FIFO across sessions).
- ``dc:inbox:{worker}`` a stream worker's own list: its blocking pop moves one ticket there, and the take
  script that follows in the same round trip empties it (``pop_frames``);
- ``dc:taken:{worker}:{n}`` where that script moves the n-th frame of the batch (RENAME, TTL kept) for the
  ``MGET`` + ``DEL`` pipelined behind it.
- ``dc:result:{sid}``  the pub/sub channel a worker publishes the session's result on (JSON).
- ``dc:workers``       a sorted set of stream worker name -> last heartbeat (unix seconds).

Bulk jobs keep their state under ``dc:job:*`` (see the jobs section below) and RQ's own ``rq:*`` keys.
"""

from __future__ import annotations

import json
import struct
from typing import Any

PREFIX = "dc:"

# --- live frames -------------------------------------------------------------------------------

READY_LIST = PREFIX + "ready"
WORKERS_ZSET = PREFIX + "workers"
RESULT_PATTERN = PREFIX + "result:*"
#: A worker counts as alive while its heartbeat is younger than this many seconds.
WORKER_ALIVE_S = 5.0


def frame_slot_key(sid: str) -> str:
    return f"{PREFIX}frame:{sid}"


def pending_key(sid: str) -> str:
    return f"{PREFIX}pending:{sid}"


def result_channel(sid: str) -> str:
    return f"{PREFIX}result:{sid}"


def sid_from_result_channel(channel: str | bytes) -> str:
    if isinstance(channel, bytes):
        channel = channel.decode()
    return channel[len(PREFIX + "result:"):]


_HEADER = struct.Struct("!I")


def pack_frame(meta: dict[str, Any], payload: bytes) -> bytes:
    """Frame slot value: 4-byte big-endian header length, JSON header (seq, timestamps), then the JPEG."""
    header = json.dumps(meta, separators=(",", ":")).encode()
    return _HEADER.pack(len(header)) + header + payload


def unpack_frame(blob: bytes) -> tuple[dict[str, Any], bytes]:
    if len(blob) < _HEADER.size:
        raise ValueError("frame slot value is shorter than its header")
    (n,) = _HEADER.unpack_from(blob)
    meta = json.loads(blob[_HEADER.size:_HEADER.size + n])
    return meta, blob[_HEADER.size + n:]


#: The ticket half of an ingest, in one transaction behind a plain ``SET`` of the frame slot: set the
#: session's ticket flag (``NX``) and, only if it was newly set, push the session's ticket; returns 1 when it
#: pushed one. The frame itself never passes through Lua: copying 68 KB into a script and out again cost
#: Redis ~70-95 us per frame, a plain ``SET`` ~1-2 us (docs/benchmarks.md). The ready list is trimmed to
#: ARGV[3] entries so it stays bounded while no worker is running.
FRAME_TICKET_LUA = """
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  redis.call('LPUSH', KEYS[2], ARGV[2])
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[3]) - 1)
  return 1
end
return 0
"""

#: Upper bound on tickets in the ready list (one per session; a stale ticket costs a worker one empty take).
READY_MAX = 10_000


class FrameIngest:
    """The gateway side of the frame slot: ``ingest(sid, meta, jpeg)`` in one Redis round trip.

    One ``MULTI``/``EXEC``: ``EXISTS dc:frame:{sid}`` (an older frame no worker has taken yet: it is being
    replaced), ``SET dc:frame:{sid} PX ttl``, then ``FRAME_TICKET_LUA``, atomically.
    """

    def __init__(self, client, frame_ttl_s: float):
        self._client = client
        self._ttl_ms = max(1, int(frame_ttl_s * 1000))

    def ingest(self, sid: str, meta: dict[str, Any], jpeg: bytes) -> tuple[bool, bool]:
        """Store the newest frame of ``sid``; returns ``(replaced_an_untaken_frame, pushed_a_ticket)``."""
        slot = frame_slot_key(sid)
        pipe = self._client.pipeline(transaction=True)
        pipe.exists(slot)
        pipe.set(slot, pack_frame(meta, jpeg), px=self._ttl_ms)
        pipe.eval(FRAME_TICKET_LUA, 2, pending_key(sid), READY_LIST, self._ttl_ms, sid, READY_MAX)
        replaced, _, ticketed = pipe.execute()
        return bool(replaced), bool(ticketed)


#: The worker's side of the frame slots, after its blocking ``BLMOVE`` of one ticket into its inbox (or
#: alone, when gathering a micro-batch): up to ARGV[1] tickets, the inbox's first, then more from the ready
#: list, oldest first. For each session once: delete its ticket flag, then RENAME its frame slot to the
#: worker's n-th "taken" key (ARGV[4] .. n), which the ``MGET`` pipelined behind reads. Frames are moved,
#: never read by the script: a 68 KB frame through Lua costs Redis ~90 us, a RENAME ~1 us. Returns the
#: session ids in order; a session whose frame expired has its taken key deleted (so ``MGET`` says nil).
#: The flag goes before the frame is taken, so a frame arriving later gets a ticket of its own. The slot
#: and flag keys are built here from ARGV[2] / ARGV[3] (prefix .. sid): fine on one Redis, not on a Cluster.
FRAME_TAKE_LUA = """
local max_n = tonumber(ARGV[1])
local sids = redis.call('LPOP', KEYS[1], max_n) or {}
if #sids < max_n then
  local more = redis.call('RPOP', KEYS[2], max_n - #sids)
  if more then for _, sid in ipairs(more) do sids[#sids + 1] = sid end end
end
local out, seen = {}, {}
for _, sid in ipairs(sids) do
  if not seen[sid] then
    seen[sid] = true
    redis.call('DEL', ARGV[3] .. sid)
    out[#out + 1] = sid
    local taken = ARGV[4] .. #out
    if redis.call('EXISTS', ARGV[2] .. sid) == 1 then
      redis.call('RENAME', ARGV[2] .. sid, taken)
    else
      redis.call('DEL', taken)
    end
  end
end
return out
"""


def worker_inbox_key(worker_name: str) -> str:
    return f"{PREFIX}inbox:{worker_name}"


def _taken_prefix(worker_name: str) -> str:
    return f"{PREFIX}taken:{worker_name}:"


def worker_taken_key(worker_name: str, n: int) -> str:
    """Where ``FRAME_TAKE_LUA`` moves the ``n``-th frame (1-based) of a worker's batch; it keeps the frame's TTL."""
    return f"{_taken_prefix(worker_name)}{n}"


def pop_frames(client, worker_name: str, max_n: int, block_s: float, wait_s: float,
               enough: int | None = None) -> list[tuple[str, bytes | None]]:
    """Worker side: up to ``max_n`` ``(sid, frame blob or None)``, oldest ticket first, in one round trip.

    One pipeline: ``BLMOVE`` blocks up to ``block_s`` for the first ticket, moving it into this worker's
    inbox list; ``FRAME_TAKE_LUA`` takes it and every other ticket already waiting (up to ``max_n``) and
    moves their frames to this worker's taken keys; ``MGET`` + ``DEL`` read and clear those. Redis runs a
    blocked client's next pipelined commands right after the block ends, so pop and take cost one round
    trip (they were two: docs/benchmarks.md). A ticket moved into the inbox is never lost to a dropped
    connection: the next call takes it first; a frame moved but not read expires with its TTL.
    Then, for at most ``wait_s`` (the micro-batch window), polls for more until ``enough`` (default
    ``max_n``) are in hand. A session appears at most once per take; a frame of a session already in
    hand that arrives during the window had a ticket of its own and comes too (both get answers: taken
    frames are never dropped unseen). ``None``: the frame expired or was already taken. The client's
    ``socket_timeout`` must be longer than ``block_s``.
    """
    import time as _time

    inbox = worker_inbox_key(worker_name)
    taken = [worker_taken_key(worker_name, n) for n in range(1, max_n + 1)]

    def take(block: bool, n: int) -> list[tuple[str, bytes | None]]:
        pipe = client.pipeline(transaction=False)
        if block:
            pipe.blmove(READY_LIST, inbox, block_s, "RIGHT", "RIGHT")
        pipe.eval(FRAME_TAKE_LUA, 2, inbox, READY_LIST, n, frame_slot_key(""), pending_key(""),
                  _taken_prefix(worker_name))
        pipe.mget(taken[:n])
        pipe.delete(*taken[:n])
        sids, blobs = pipe.execute()[-3:-1]
        return [(sid.decode() if isinstance(sid, bytes) else sid, blob) for sid, blob in zip(sids, blobs)]

    got = take(True, max_n)
    deadline = _time.monotonic() + wait_s
    enough = min(max_n, enough or max_n)
    while got and len(got) < enough and _time.monotonic() < deadline:
        # Poll, not a blocking pop: Redis checks short blocking timeouts only on its cron tick (hz 10 ->
        # up to 100 ms late), which would stretch a 4 ms window to tens of milliseconds.
        _time.sleep(min(0.001, max(0.0, deadline - _time.monotonic())))
        got.extend(take(False, max_n - len(got)))
    return got


def publish_to_session(client, sid: str, message: dict[str, Any]) -> int:
    """Publish a message (``result``, ``dropped`` or ``error``) on the session's result channel."""
    return client.publish(result_channel(sid), encode_message(message))


def heartbeat(client, worker_name: str, now: float) -> None:
    """Record that ``worker_name`` is alive; forget workers silent for a minute."""
    pipe = client.pipeline(transaction=False)
    pipe.zadd(WORKERS_ZSET, {worker_name: now})
    pipe.zremrangebyscore(WORKERS_ZSET, "-inf", now - 60)
    pipe.execute()


def remove_worker(client, worker_name: str) -> None:
    """Forget a stopping worker: its heartbeat, and its inbox (empty unless it died mid-pop)."""
    pipe = client.pipeline(transaction=False)
    pipe.zrem(WORKERS_ZSET, worker_name)
    pipe.delete(worker_inbox_key(worker_name))
    pipe.execute()


def live_worker_count(client, now: float) -> int:
    """Stream workers whose last heartbeat is younger than ``WORKER_ALIVE_S``."""
    return int(client.zcount(WORKERS_ZSET, now - WORKER_ALIVE_S, "+inf"))


# Messages on a session's result channel. The gateway forwards them to the browser almost verbatim
# (it removes ``t_in`` and adds ``timings.server_ms``); docs/protocol.md documents them for clients.

def result_message(meta: dict[str, Any], result_dict: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """``{"type": "result", seq, ts, t_in, width, height, regions: [{box, caption, score}], timings[, find]}``.

    ``meta`` is the frame's header as stored by the gateway (``seq``, ``ts``, ``t_in``);
    ``result_dict`` is ``ImageResult.to_dict()``; ``timings`` are milliseconds (and ``batch_size``); ``find``
    is there when the session has a query (docs/protocol.md, *Find*).
    """
    msg = {"type": "result", "seq": meta.get("seq"), "ts": meta.get("ts"), "t_in": meta.get("t_in"),
           "width": result_dict["width"], "height": result_dict["height"],
           "regions": result_dict.get("regions", []), "timings": timings}
    if result_dict.get("find") is not None:
        msg["find"] = result_dict["find"]
    return msg


def dropped_message(meta: dict[str, Any], reason: str, **extra: Any) -> dict[str, Any]:
    """``{"type": "dropped", seq, ts, reason}``: the frame will get no result (``stale``, ``replaced``...)."""
    return {"type": "dropped", "seq": meta.get("seq"), "ts": meta.get("ts"), "t_in": meta.get("t_in"),
            "reason": reason, **extra}


def error_message(code: str, message: str, seq: int | None = None, **extra: Any) -> dict[str, Any]:
    """``{"type": "error", code, message[, seq]}``; with a ``seq`` the error is about that frame only."""
    msg: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if seq is not None:
        msg["seq"] = seq
    msg.update(extra)
    return msg


def encode_message(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


def decode_message(data: bytes | str) -> dict[str, Any]:
    return json.loads(data)


# --- bulk jobs ---------------------------------------------------------------------------------
#
# A bulk job ``jid`` (32 hex digits) is a set of named images captioned by RQ chunks (densecap_core.jobs
# holds the logic). Every key below expires ``job_ttl`` after the job's last write.
#
# - ``dc:jobs``                 sorted set: job id -> creation time (unix seconds), for listing.
# - ``dc:job:{jid}``            hash: the job's fields (created, sealed, canceled, opt, backlog bytes, counters).
# - ``dc:job:{jid}:names``      hash: item name (a relative path such as ``sub/a.jpg``) -> sha256 of its bytes.
# - ``dc:job:{jid}:hashnames``  hash: sha256 -> the names holding those bytes, newline-separated.
# - ``dc:job:{jid}:queued``     hash: sha256 -> size in bytes, for images stored and handed to a chunk.
# - ``dc:job:{jid}:blob:{sha}`` string: the image bytes, deleted once captioned (TTL as a backstop).
# - ``dc:job:{jid}:results``    hash: sha256 -> ``ImageResult`` JSON (one per content hash: a retried chunk
#   overwrites its entry, it never adds a second one).
# - ``dc:job:{jid}:done``       set of names that have a result; ``:failed`` the subset whose result is an error.
# - ``dc:job:{jid}:log``        list of names in the order their results arrived: the results cursor.
# - ``dc:job:{jid}:recent``     list of recent completion times (newest first, capped), for rate and ETA.
# - ``dc:job:{jid}:chunks``     set of the RQ job ids of the job's chunks (so cancel can remove queued ones).
#
# RQ keeps its own ``rq:*`` keys for the chunks (queue ``settings.jobs_queue``).

JOBS_ZSET = PREFIX + "jobs"
#: Completion times kept per job for the rate estimate.
JOB_RECENT_MAX = 512


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def job_names_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:names"


def job_hashnames_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:hashnames"


def job_queued_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:queued"


def job_blob_key(job_id: str, sha256: str) -> str:
    return f"{PREFIX}job:{job_id}:blob:{sha256}"


def job_results_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:results"


def job_done_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:done"


def job_failed_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:failed"


def job_log_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:log"


def job_recent_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:recent"


def job_chunks_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:chunks"


def job_keys(job_id: str) -> list[str]:
    """All per-job keys except the blobs (those are per image), in a fixed order the job scripts rely on."""
    return [job_key(job_id), job_names_key(job_id), job_hashnames_key(job_id), job_queued_key(job_id),
            job_results_key(job_id), job_done_key(job_id), job_failed_key(job_id), job_log_key(job_id),
            job_recent_key(job_id), job_chunks_key(job_id)]
