"""Unmasking client websocket frames with numpy instead of wsproto's pure-Python loop.

Every frame a client sends is XOR-masked with a 4-byte key (RFC 6455, 5.3); the gateway's websocket stack
(simple-websocket over wsproto) unmasks each received chunk with ``wsproto.frame_protocol.XorMaskerSimple``,
which XORs through ``bytes.translate`` four times per chunk: about 170 us of gateway CPU for a 68 KB camera
frame, on the path of every frame. The same XOR over 32-bit words in numpy takes about 25 us (measured:
docs/benchmarks.md). ``install()`` puts :class:`NumpyXorMasker` in its place for this process.

It replaces a name inside another library, so it checks first: the class must be there with the expected
``process`` method, and the replacement must give the same bytes as the original on a sample split across
chunks; otherwise nothing is changed and wsproto's own masker stays (only slower).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("densecap.gateway.wsmask")


class NumpyXorMasker:
    """Drop-in for wsproto's ``XorMaskerSimple``: ``process(chunk)`` unmasks the next chunk of one frame.

    The key position carries over between chunks (a frame arrives in TLS records of up to 16 KB).
    """

    def __init__(self, masking_key: bytes | bytearray) -> None:
        if len(masking_key) != 4:
            raise ValueError(f"a websocket masking key is 4 bytes, not {len(masking_key)}")
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytearray:
        out = bytearray(data)
        n = len(out)
        if not n:
            return out
        buf = np.frombuffer(out, np.uint8)
        words = n // 4 * 4
        if words:
            view = buf[:words].view(np.uint32)
            np.bitwise_xor(view, np.frombuffer(self._key, np.uint32)[0], out=view)
        for i in range(words, n):
            buf[i] ^= self._key[i - words]
        rotation = n % 4  # the next chunk starts this many bytes further into the key
        self._key = self._key[rotation:] + self._key[:rotation]
        return out


_ORIGINAL = None  # wsproto's own masker, kept when install() replaces it (tests compare against it)


def _original_masker():
    """wsproto's own ``XorMaskerSimple``, whether or not install() has replaced it since."""
    from wsproto import frame_protocol

    return _ORIGINAL or frame_protocol.XorMaskerSimple


def _same_as(original) -> bool:
    """Whether NumpyXorMasker gives ``original``'s bytes over uneven chunks of a sample."""
    sample = bytes(range(256)) * 41 + b"\x07\x11\x2a"
    cuts = (0, 1, 7, 4096, 4099, 10000, len(sample))
    key = b"\x9a\x3c\x05\xf1"
    ours, theirs = NumpyXorMasker(key), original(key)
    for lo, hi in zip(cuts, cuts[1:]):
        if bytes(ours.process(sample[lo:hi])) != bytes(theirs.process(sample[lo:hi])):
            return False
    return True


def install() -> bool:
    """Use NumpyXorMasker for websocket frames received by this process. Returns whether it is in use."""
    try:
        from wsproto import frame_protocol
    except ImportError:
        return False
    current = getattr(frame_protocol, "XorMaskerSimple", None)
    if current is NumpyXorMasker:
        return True
    if current is None or not callable(getattr(current, "process", None)):
        log.warning("wsproto has no XorMaskerSimple.process: keeping its own unmasking")
        return False
    try:
        agrees = _same_as(current)
    except Exception:  # noqa: BLE001 - an unexpected wsproto: keep it as it is
        agrees = False
    if not agrees:
        log.warning("wsproto's XorMaskerSimple differs from the numpy masker: keeping its own unmasking")
        return False
    global _ORIGINAL
    _ORIGINAL = current
    frame_protocol.XorMaskerSimple = NumpyXorMasker
    return True
