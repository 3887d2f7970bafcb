"""The benchmark-only zero-cost model: it answers frames (decode, no regions), it can only be served by
scripts/bench_live.py under a labelled name, and no production setting reaches it. Plus one short real run
of the capacity benchmark (redis-server, gunicorn over TLS, zero-cost workers, wss clients)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from dataclasses import fields

import pytest

from conftest import ROOT, child_env
from densecap_core.settings import Settings
from worker.stream_worker import Frame
from worker.testing import ZERO_COST_WORKER_PREFIX, zero_cost_predictor

sys.path.insert(0, str(ROOT / "scripts"))
from bench_live import make_frames  # noqa: E402


def test_zero_cost_model_decodes_and_answers_without_regions():
    good = make_frames(n=1)[0]
    for decoder in ("torchvision", "pillow"):
        predict = zero_cost_predictor(max_pixels=640 * 480, decoder=decoder)
        frames = [Frame("a", {"seq": 1}, good), Frame("b", {"seq": 2}, b"not a jpeg"),
                  Frame("c", {"seq": 3}, good[:2000])]
        ok, bad, truncated = predict(frames)
        assert (ok.width, ok.height, ok.regions, ok.error) == (640, 480, [], None)
        assert ok.timings["inference_ms"] == 0.0 and ok.timings["decode_ms"] > 0
        assert bad.error and truncated.error, decoder
        too_big = zero_cost_predictor(max_pixels=640 * 480 - 1, decoder=decoder)(frames[:1])[0]
        assert "over the limit" in too_big.error
    with pytest.raises(ValueError):
        zero_cost_predictor(100, decoder="magic")


def test_no_production_setting_or_option_selects_the_zero_cost_model():
    import worker.stream_worker as stream_worker

    assert "zero_cost" not in inspect.getsource(stream_worker)
    assert not [f.name for f in fields(Settings) if "zero" in f.name or "bench" in f.name]
    out = subprocess.run([sys.executable, "-m", "worker.stream_worker", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=child_env(), timeout=120)
    assert out.returncode == 0 and "zero" not in out.stdout.lower() and "bench" not in out.stdout.lower()
    # The benchmark's own worker refuses a name that does not say what it is.
    out = subprocess.run([sys.executable, "scripts/bench_live.py", "--serve-zero-cost-worker", "--name", "gpu-1"],
                         capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=120)
    assert out.returncode != 0 and ZERO_COST_WORKER_PREFIX in out.stderr


@pytest.mark.slow
def test_capacity_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "points.json"
    png = tmp_path / "capacity.png"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_live.py", "--sessions", "1,3", "--stream-workers", "1",
         "--gateway-workers", "1", "--seconds", "2", "--warmup", "0.5", "--json", str(out), "--plot", str(png)],
        capture_output=True, text=True, cwd=ROOT, env=child_env(OMP_NUM_THREADS="1"), timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    points = json.loads(out.read_text())["points"]
    assert [p["sessions"] for p in points] == [1, 3]
    for p in points:
        assert p["fps"] > 0 and p["errors"] == [] and p["not_results"] == 0
        assert p["stream_workers"] == 1 and p["decode_ms_p50"] > 0
        assert 0 < p["rtt_ms_p50"] <= p["rtt_ms_p99"]
        assert 0 < p["session_fps_min"] <= p["session_fps_max"]
    assert png.stat().st_size > 10_000


def test_parts_benchmark_runs(tmp_path):
    out = tmp_path / "parts.json"
    proc = subprocess.run([sys.executable, "scripts/bench_parts.py", "-n", "40", "--json", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=child_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fig = json.loads(out.read_text())
    for key in ("pillow_decode_us", "torchvision_decode_us", "jpeg_size_us", "ingest_pipeline_redis_cpu_us",
                "ingest_lua_copy_redis_cpu_us", "ingest_multi_exec_client_cpu_us", "metrics_multiprocess_us_per_frame"):
        assert fig[key] > 0, key


def test_stream_benchmark_interleaves_bare_and_path_and_reports_every_figure(tmp_path):
    """scripts/bench_stream.py end to end on a tiny random model: two pairs of 2 blocks of 3 frames each."""
    out = tmp_path / "stream.json"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_stream.py", "--frames", "6", "--block", "3", "--repeat", "2",
         "--size", "320", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, env=child_env(OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fig = json.loads(out.read_text())
    assert fig["repeat"] == 2 and len(fig["ratios"]) == 2 and fig["client_mask"] == "numpy"
    assert fig["bare_fps"] > 0 and fig["path_fps"] > 0 and 0 < fig["ratio"] < 5
    for key in ("added_ms_p50", "queue_ms_p50", "server_other_ms_p50", "client_wire_ms_p50", "model_ms_p50"):
        assert fig[key] == fig[key] and fig[key] >= 0, key  # a number, not NaN
    assert "frames without a result" not in proc.stderr
