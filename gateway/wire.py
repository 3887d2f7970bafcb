"""The browser <-> gateway wire protocol of ``/ws/stream`` (documented in ``docs/protocol.md``).

Client -> server: binary messages carry one frame each: a 16-byte header, then the JPEG bytes.

=======  ======  ==========================================================
offset   type    meaning
=======  ======  ==========================================================
0        4 B     magic ``b"DCF1"`` (DenseCap frame, version 1)
4        u32 BE  ``seq``: the client's frame number, echoed in the reply
8        f64 BE  ``ts``: the client's capture time in ms (any clock), echoed
16       ...     the image (JPEG; PNG is accepted too)
=======  ======  ==========================================================

Text messages (JSON) carry control: ``{"type": "config", "max_regions": N, "query": Q}`` (either field),
``{"type": "ping", "t": x}``.

Server -> client: text messages (JSON) only: ``hello``, ``result``, ``dropped``, ``error``, ``pong``.
"""

from __future__ import annotations

import struct
from typing import Any

from densecap_core import protocol

SUBPROTOCOL = "densecap.v1"
FRAME_MAGIC = b"DCF1"
_FRAME_HEADER = struct.Struct("!4sId")
FRAME_HEADER_BYTES = _FRAME_HEADER.size  # 16

# Close codes (RFC 6455 ones come from simple-websocket; 4xxx are ours).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # the gateway is shutting down: reconnect with backoff
CLOSE_TOO_BIG = 1009  # a message over max_message_bytes (sent by simple-websocket)
CLOSE_INTERNAL = 1011
CLOSE_SERVER_FULL = 4013  # no free session slot: retry later with backoff

#: Error codes of ``{"type": "error", "code": ...}`` messages.
ERROR_CODES = {
    "bad_header": "a binary message did not start with the 16-byte DCF1 frame header",
    "bad_message": "a text message was not a JSON object with a known 'type'",
    "bad_image": "the frame is not a readable image",
    "too_large": "the frame has more pixels than the gateway allows",
    "rate_limited": "frames arrive faster than the per-session limit; some were dropped",
    "unavailable": "the frame queue (Redis) is unreachable; frames are dropped until it is back",
    "server_full": "no free session slot",
    "internal": "an unexpected error in the gateway or worker",
}


class HeaderError(ValueError):
    pass


def pack_client_frame(seq: int, ts_ms: float, image: bytes) -> bytes:
    """What a client sends for one frame (used by Python clients, tests and the benchmark)."""
    return _FRAME_HEADER.pack(FRAME_MAGIC, seq & 0xFFFFFFFF, float(ts_ms)) + image


def unpack_client_frame(message: bytes) -> tuple[int, float, memoryview]:
    """``(seq, ts_ms, image)`` of a binary client message; ``HeaderError`` if it is not a DCF1 frame."""
    if len(message) < FRAME_HEADER_BYTES:
        raise HeaderError(f"binary message of {len(message)} bytes is shorter than the 16-byte frame header")
    magic, seq, ts = _FRAME_HEADER.unpack_from(message)
    if magic != FRAME_MAGIC:
        raise HeaderError("binary message does not start with the DCF1 frame header")
    return seq, ts, memoryview(message)[FRAME_HEADER_BYTES:]


def error(code: str, message: str, seq: int | None = None) -> dict[str, Any]:
    return protocol.error_message(code, message, seq)


def hello(sid: str, limits: dict[str, Any], stream_workers: int | None) -> dict[str, Any]:
    return {"type": "hello", "protocol": SUBPROTOCOL, "session": sid, "limits": limits,
            "stream_workers": stream_workers}
