"""``python -m worker.stream_worker``: the live-frame worker.

Loop (Redis contract in ``densecap_core/protocol.py``):

1. pop up to ``batch_size`` session tickets from the ready list and take each session's newest frame
   (deleting its ticket flag first), in one round trip (``protocol.pop_frames``): block up to 1 s for
   the first, take whatever else is waiting, and, when the previous batch held several sessions, gather
   more for at most ``batch_wait_ms`` (a micro-batch across sessions; a lone session never waits);
2. drop frames older than ``max_frame_age_s`` (the client is told: ``dropped``/``stale``);
3. run the model once on the batch; an unreadable frame gives an ``error`` for its session only;
4. publish each session's result (with its ``seq`` and the timings) in one pipeline.

A heartbeat thread writes this worker's name into the workers sorted set every ``heartbeat_s``, only
after the model is loaded and warmed up (so ``/healthz`` counts workers that can answer). SIGTERM or
SIGINT finish the current batch and stop. Lost Redis connections are retried with backoff for ever.

The model sits behind one callable, ``Predict = (list[Frame]) -> list[ImageResult]``, built from a
``Captioner`` by ``captioner_predictor``; tests and benchmarks can pass any other callable.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from densecap_core import protocol
from densecap_core.imageio import ImageError, decode_image
from densecap_core.schema import ImageResult
from densecap_core.settings import Settings

log = logging.getLogger("densecap.stream_worker")

#: How long one BRPOP waits for a ticket; bounds how late a stop request is noticed.
POP_BLOCK_S = 1.0
BACKOFF_MAX_S = 2.0


@dataclass
class Frame:
    """One frame taken from a session's slot: header (``seq``, ``ts``, ``t_in``...) and image bytes."""

    sid: str
    meta: dict[str, Any]
    image: bytes
    queue_ms: float = 0.0


Predict = Callable[[list[Frame]], list[ImageResult]]


def with_find(result: ImageResult, query: str | None, log_probs, error: str | None) -> ImageResult:
    """``result`` with its ``find``: the region where the model most readily says ``query`` (its log p added),
    or why the query cannot be read; unchanged without a query."""
    if query is None:
        return result
    if error is not None:
        result.find = {"query": query, "error": error}
    elif len(result.regions):
        k = max(range(len(result.regions)), key=lambda j: float(log_probs[j]))
        result.find = {"query": query, "best": {**result.regions[k].to_dict(), "rank": k,
                                                "log_prob": round(float(log_probs[k]), 3)}}
    else:
        result.find = {"query": query, "best": None}
    return result


def frame_query(frame: Frame) -> str | None:
    """The session's find phrase this frame carries; the gateway only stores non-empty strings, and anything else
    in a header (a foreign writer, a bad upgrade) means none rather than a failed batch."""
    query = frame.meta.get("query")
    return query if isinstance(query, str) and query.strip() else None


def captioner_predictor(captioner, max_pixels: int) -> Predict:
    """Wrap a ``Captioner``: decode each frame (timed, pixel cap checked first), then one batched forward.

    An unreadable frame becomes an ``ImageResult`` with ``error`` set; the other frames still run.
    Timings per result: ``decode_ms`` (this frame), ``inference_ms`` (the whole batch's model call).
    """

    def predict(frames: list[Frame]) -> list[ImageResult]:
        results: list[ImageResult | None] = [None] * len(frames)
        decoded, decode_ms = [], {}
        for i, frame in enumerate(frames):
            t0 = time.perf_counter()
            try:
                decoded.append((i, decode_image(frame.image, max_pixels=max_pixels, name=f"frame {frame.meta.get('seq')}")))
            except ImageError as exc:
                results[i] = ImageResult(name=frame.sid, width=0, height=0, error=str(exc))
            decode_ms[i] = (time.perf_counter() - t0) * 1000
        if decoded:
            t0 = time.perf_counter()
            pils, names = [im for _, im in decoded], [frames[i].sid for i, _ in decoded]
            queries = [frame_query(frames[i]) for i, _ in decoded]
            if any(queries):  # a session asked to find something: same pass, plus the query's log p per region
                outs = [with_find(res, q, scores, error)
                        for (res, scores, error), q in zip(captioner.match_each(pils, names, queries), queries)]
            else:
                outs = captioner.caption(pils, names=names, on_error="record")
            inference_ms = (time.perf_counter() - t0) * 1000
            for (i, _), out in zip(decoded, outs):
                out.timings = {"inference_ms": inference_ms}
                results[i] = out
        for i, res in enumerate(results):
            res.timings["decode_ms"] = decode_ms[i]
        return results  # type: ignore[return-value]

    return predict


def make_redis(settings: Settings) -> redis.Redis:
    # socket_timeout must outlast the blocking pop, or every idle BRPOP would look like a dead server.
    return redis.Redis.from_url(
        **settings.redis_kwargs(), socket_connect_timeout=2.0, socket_timeout=POP_BLOCK_S + 4.0,
        socket_keepalive=True, retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError])


class StreamWorker:
    def __init__(self, settings: Settings, predict: Predict, *, name: str | None = None,
                 client: redis.Redis | None = None):
        self.settings = settings
        self.predict = predict
        self.name = name or settings.worker_name or f"{socket.gethostname()}:{os.getpid()}"
        self.redis = client or make_redis(settings)
        self.stop_event = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self.frames_done = 0
        self._last_batch = 0

    # --- lifecycle ------------------------------------------------------------------------------

    def request_stop(self, *_args) -> None:
        self.stop_event.set()

    def run(self) -> None:
        """Serve until ``request_stop``; the batch in hand is finished first."""
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._heartbeat_thread.start()
        log.info("stream worker %s serving (batch %d, wait %.1f ms, max frame age %.2f s)", self.name,
                 self.settings.batch_size, self.settings.batch_wait_ms, self.settings.max_frame_age_s)
        backoff = 0.05
        down_since = None
        while not self.stop_event.is_set():
            try:
                self.step()
                if down_since is not None:
                    log.warning("Redis is back after %.1f s", time.monotonic() - down_since)
                    down_since = None
                backoff = 0.05
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("Redis at %s unreachable (%s); retrying", self.settings.redis_url_redacted,
                                exc.__class__.__name__)
                self.stop_event.wait(backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
        self._heartbeat_thread.join(5)
        try:
            protocol.remove_worker(self.redis, self.name)
        except redis.RedisError:
            pass
        log.info("stream worker %s stopped after %d frames", self.name, self.frames_done)

    def _heartbeat_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                protocol.heartbeat(self.redis, self.name, time.time())
            except redis.RedisError:
                pass  # the main loop reports the outage
            self.stop_event.wait(self.settings.heartbeat_s)

    # --- one batch ------------------------------------------------------------------------------

    def step(self) -> int:
        """Pop, take, predict and publish one micro-batch. Returns the number of frames answered."""
        s = self.settings
        # Wait for more tickets only while sessions are arriving together (the last batch had several):
        # a lone session would pay the whole window on every frame and gain nothing from it. The window
        # also ends once the batch is as large as the last one: with N sessions a worker serves N frames a
        # batch, and waiting out the window for an N+1th that does not exist costs every frame its length.
        wait_s = s.batch_wait_ms / 1000.0 if self._last_batch > 1 else 0.0
        taken = protocol.pop_frames(self.redis, self.name, s.batch_size, POP_BLOCK_S, wait_s,
                                    enough=self._last_batch)
        if not taken:
            return 0
        self._last_batch = len(taken)
        now = time.time()
        frames: list[Frame] = []
        pipe = self.redis.pipeline(transaction=False)
        for sid, blob in taken:
            if blob is None:
                continue  # expired, or already taken through an earlier ticket
            try:
                meta, image = protocol.unpack_frame(blob)
            except ValueError:
                pipe.publish(protocol.result_channel(sid), protocol.encode_message(
                    protocol.error_message("internal", "the frame slot held an unreadable value")))
                continue
            age = now - float(meta.get("t_in", now))
            if age > s.max_frame_age_s:
                pipe.publish(protocol.result_channel(sid), protocol.encode_message(
                    protocol.dropped_message(meta, "stale", age_ms=round(age * 1000, 1))))
                continue
            frames.append(Frame(sid=sid, meta=meta, image=image, queue_ms=age * 1000))
        if frames:
            for frame, message in zip(frames, self._answer(frames)):
                pipe.publish(protocol.result_channel(frame.sid), protocol.encode_message(message))
        if len(pipe):
            pipe.execute()
        self.frames_done += len(frames)
        return len(frames)

    def _answer(self, frames: list[Frame]) -> list[dict[str, Any]]:
        """One message per frame: its result, or an error for that frame alone."""
        try:
            results = self.predict(frames)
            if len(results) != len(frames):
                raise RuntimeError(f"predict returned {len(results)} results for {len(frames)} frames")
        except Exception as exc:  # a model failure must cost this batch, not the worker
            log.exception("batch of %d frames failed", len(frames))
            return [protocol.error_message("internal", f"the worker failed on this frame ({exc.__class__.__name__})",
                                           f.meta.get("seq")) for f in frames]
        messages = []
        for frame, res in zip(frames, results):
            if res.error is not None:
                messages.append(protocol.error_message("bad_image", res.error, frame.meta.get("seq")))
                continue
            d = res.to_dict()
            limit = frame.meta.get("max_regions")
            if limit:
                d["regions"] = d["regions"][:limit]
            timings = {"queue_ms": round(frame.queue_ms, 3), "batch_size": len(frames)}
            timings.update({k: round(v, 3) for k, v in res.timings.items() if k in ("decode_ms", "inference_ms")})
            msg = protocol.result_message(frame.meta, d, timings)
            msg["worker"] = self.name
            messages.append(msg)
        return messages


# --- the process ------------------------------------------------------------------------------


def build_predictor(settings: Settings, checkpoint: str | None = None, device: str | None = None) -> Predict:
    """Load the model once and warm it up with a full batch (``Captioner.warm_up``)."""
    from densecap_core.inference import Captioner

    captioner = Captioner(checkpoint or settings.checkpoint or None, device=device or settings.device,
                          batch_size=settings.batch_size, max_pixels=settings.max_stream_pixels,
                          quantize=settings.quantize, beam_size=settings.beam_size or None)
    warm_s = captioner.warm_up()
    log.info("model %s on %s (%s), warmed up with a batch of %d in %.2f s", captioner.config.name,
             captioner.device, captioner.checkpoint_path, captioner.batch_size, warm_s)
    predict = captioner_predictor(captioner, settings.max_stream_pixels)
    delay_ms = float(os.environ.get("DENSECAP_TEST_DELAY_MS", "0") or 0)
    if delay_ms > 0:
        from worker.testing import slowed_predictor
        log.warning("DENSECAP_TEST_DELAY_MS=%g: every batch is delayed on purpose (tests only)", delay_ms)
        predict = slowed_predictor(predict, delay_ms)
    return predict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.stream_worker",
                                     description="Serve live frames from Redis with a DenseCap model.")
    parser.add_argument("--checkpoint", help="checkpoint file (default: DENSECAP_CHECKPOINT, else the embedded model)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: DENSECAP_DEVICE, else auto)")
    parser.add_argument("--name", help="worker name in the heartbeat set (default: host:pid)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("DENSECAP_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    try:
        predict = build_predictor(settings, args.checkpoint, args.device)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"stream worker: cannot load the model: {exc}", file=sys.stderr)
        return 2
    worker = StreamWorker(settings, predict, name=args.name)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
