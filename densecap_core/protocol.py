"""The Redis contract: every key, channel, TTL and message encoding the gateway and workers share.

Torch-free. No Redis key or channel string appears anywhere else in the project.

Live frames (at-most-once, newest frame wins), for a stream session ``sid``:

- ``dc:frame:{sid}``   the newest frame (``pack_frame`` bytes), ``PX`` = frame TTL; a newer frame overwrites it.
- ``dc:pending:{sid}`` a flag set with ``NX`` next to the frame; only when it was newly set does the gateway
  push ``sid`` on ``dc:ready``. So each session has at most one ticket on the ready list.
- ``dc:ready``         the shared list of session tickets that stream workers pop (FIFO across sessions).
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


def encode_message(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


def decode_message(data: bytes | str) -> dict[str, Any]:
    return json.loads(data)
