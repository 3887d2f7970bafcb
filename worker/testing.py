"""Test-only helpers for the stream worker. Nothing here runs unless a test asks for it.

``DENSECAP_TEST_DELAY_MS`` (read by ``worker.stream_worker.build_predictor``) wraps the real predictor
with ``slowed_predictor`` to play a slow model, so tests can show that frames are dropped, not queued.
"""

from __future__ import annotations

import time


def slowed_predictor(predict, delay_ms: float):
    """``predict`` plus a fixed sleep of ``delay_ms`` per batch (a stand-in for a slow model)."""

    def slowed(frames):
        time.sleep(delay_ms / 1000.0)
        return predict(frames)

    return slowed
