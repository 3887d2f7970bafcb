"""Prometheus metrics of one gateway application (``GET /metrics``).

Each application has its own ``CollectorRegistry`` (tests build several apps in one process). When
``PROMETHEUS_MULTIPROC_DIR`` is set (the launcher sets it for more than one gunicorn worker), the values
of all worker processes are summed by prometheus_client's multiprocess collector instead.

Timings measured by the stream worker (queue wait, decode, inference, batch size) travel inside each
result message and are observed here, so one scrape of the gateway shows the whole live path.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

_MS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: Reasons a frame is dropped instead of answered (label values of ``frames_dropped_total``).
DROP_REASONS = ("rate_limited", "too_large", "bad_image", "replaced", "stale", "redis_unavailable",
                "bad_header")


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions_active = Gauge("densecap_stream_sessions_active", "Open live websocket sessions",
                                     registry=r, multiprocess_mode="livesum")
        self.sessions_total = Counter("densecap_stream_sessions", "Live sessions opened", registry=r)
        self.sessions_refused = Counter("densecap_stream_sessions_refused",
                                        "Live sessions refused", ["reason"], registry=r)
        self.frames_in = Counter("densecap_stream_frames_in", "Frames received from clients", registry=r)
        self.frames_dropped = Counter("densecap_stream_frames_dropped", "Frames dropped instead of answered",
                                      ["reason"], registry=r)
        for reason in DROP_REASONS:
            self.frames_dropped.labels(reason)
        self.results_out = Counter("densecap_stream_results", "Results sent to clients", registry=r)
        self.queue_wait = Histogram("densecap_stream_queue_wait_seconds",
                                    "Gateway ingest to worker pickup", registry=r, buckets=_MS_BUCKETS)
        self.decode_time = Histogram("densecap_stream_decode_seconds", "JPEG decode time in the worker",
                                     registry=r, buckets=_MS_BUCKETS)
        self.inference_time = Histogram("densecap_stream_inference_seconds",
                                        "Model time of the batch holding the frame", registry=r,
                                        buckets=_MS_BUCKETS)
        self.batch_size = Histogram("densecap_stream_batch_size", "Batch size the frame was run in "
                                    "(observed once per frame)", registry=r,
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
        self.e2e = Histogram("densecap_stream_e2e_seconds",
                             "Gateway receive of a frame to gateway send of its result", registry=r,
                             buckets=_MS_BUCKETS)
        self.listener_reconnects = Counter("densecap_stream_listener_reconnects",
                                           "Times the pub/sub result listener reconnected to Redis", registry=r)

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
