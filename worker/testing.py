"""Test- and benchmark-only helpers for the stream worker. Nothing here runs unless a test or a benchmark asks.

``DENSECAP_TEST_DELAY_MS`` (read by ``worker.stream_worker.build_predictor``) wraps the real predictor
with ``slowed_predictor`` to play a slow model, so tests can show that frames are dropped, not queued.

``zero_cost_predictor`` is the *benchmark-only zero-cost model* (decode, then no regions). No setting, environment
variable or command-line option of the production worker selects it: ``build_predictor`` never refers to it, and
the only process that serves it is ``scripts/bench_live.py`` (which names its workers ``BENCHMARK-zero-cost...``
so every result it sends says where it came from). ``tests/test_bench_live.py`` pins both.
"""

from __future__ import annotations

import time

#: Prefix of the worker name (heartbeat set, the ``worker`` field of every result) of zero-cost workers.
ZERO_COST_WORKER_PREFIX = "BENCHMARK-zero-cost"


def slowed_predictor(predict, delay_ms: float):
    """``predict`` plus a fixed sleep of ``delay_ms`` per batch (a stand-in for a slow model)."""

    def slowed(frames):
        time.sleep(delay_ms / 1000.0)
        return predict(frames)

    return slowed


def zero_cost_predictor(max_pixels: int, decoder: str = "torchvision"):
    """BENCHMARK ONLY: a "model" that costs nothing, to measure what the live path itself can carry.

    Each frame is decoded exactly as a real worker must (pixel cap checked from the header first, then the
    pixels), and gets a result with no regions. ``decoder``: ``"torchvision"`` (``decode_image_tensor``, the
    fastest, JPEG via libjpeg-turbo) or ``"pillow"`` (``decode_image``, what ``Captioner`` uses). Unreadable
    frames give an ``error`` result for that frame alone, as the real predictor does. Timings:
    ``decode_ms`` per frame, ``inference_ms`` 0.
    """
    from densecap_core.imageio import ImageError
    from densecap_core.schema import ImageResult

    if decoder == "torchvision":
        from densecap_core.imageio import decode_image_tensor

        def size_of(frame):
            t = decode_image_tensor(frame.image, max_pixels=max_pixels, name=f"frame {frame.meta.get('seq')}")
            return t.shape[2], t.shape[1]
    elif decoder == "pillow":
        from densecap_core.imageio import decode_image

        def size_of(frame):
            return decode_image(frame.image, max_pixels=max_pixels, name=f"frame {frame.meta.get('seq')}").size
    else:
        raise ValueError(f"decoder must be 'torchvision' or 'pillow', not {decoder!r}")

    def predict(frames):
        results = []
        for frame in frames:
            t0 = time.perf_counter()
            try:
                w, h = size_of(frame)
                res = ImageResult(name=frame.sid, width=w, height=h, regions=[])
            except ImageError as exc:
                res = ImageResult(name=frame.sid, width=0, height=0, error=str(exc))
            res.timings = {"decode_ms": (time.perf_counter() - t0) * 1000, "inference_ms": 0.0}
            results.append(res)
        return results

    return predict
