"""``densecap benchmark``: sweeps give one row per combination, FLOP counts behave like FLOPs, int8 quantisation
of the language model keeps its regions, and bad or GPU-only options fail with a clear message on a CPU."""

from __future__ import annotations

import json

import pytest
import torch

from densecap_core.cli import main as densecap
from densecap_core.commands.benchmark import benchmark_config


def rows_of(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_sweep_prints_one_row_per_combination(capsys):
    assert densecap(["benchmark", "--configs", "tiny", "--repeat", "1", "--threads", "1", "--image-size", "160,224",
                     "--pre-nms-top-k", "0,100", "--vocab-size", "50", "--json"]) == 0
    rows = rows_of(capsys)
    assert [(r["input"], r["pre_nms_top_k"]) for r in rows] == [
        ("160x120", None), ("160x120", 100), ("224x168", None), ("224x168", 100)]
    for r in rows:
        assert r["vocab_size"] == 50 and r["threads"] == 1 and r["ms_per_image"] > 0
        assert abs(sum(r["stage_share"].values()) - 1) < 0.01


def test_flops_grow_with_input_area_and_vocabulary():
    torch.set_num_threads(1)
    small = benchmark_config("tiny", 0, 1, torch.device("cpu"), image_size=160, vocab_size=50, flops=True)
    big = benchmark_config("tiny", 0, 1, torch.device("cpu"), image_size=320, vocab_size=50, flops=True)
    assert "ms_per_image" not in small  # repeat 0: count only
    ratio = big["stage_gflops"]["backbone"] / small["stage_gflops"]["backbone"]
    assert 3.5 < ratio < 4.5, ratio  # convolutions scale with pixels
    wide = benchmark_config("tiny", 0, 1, torch.device("cpu"), image_size=160, vocab_size=5000, flops=True, rate=1e11)
    assert wide["stage_gflops"]["language_model"] > 5 * small["stage_gflops"]["language_model"]
    assert wide["floor_ms_per_image"] == pytest.approx(1000 * wide["gflops_per_image"] * 1e9 / 1e11, rel=0.01)


def test_int8_language_model_keeps_the_regions():
    torch.set_num_threads(1)
    f = benchmark_config("tiny", 1, 1, torch.device("cpu"), image_size=160, vocab_size=2000)
    q = benchmark_config("tiny", 1, 1, torch.device("cpu"), image_size=160, vocab_size=2000, quantize="int8-lm")
    assert q["quantize"] == "int8-lm" and q["regions_per_image"] == f["regions_per_image"]


def test_stages_of_a_model_that_attends_over_the_grid(tmp_path):
    """The stage timer hands the language model the kept regions' RoI grids when it reads them."""
    from densecap_core.checkpoint import make_random_checkpoint

    torch.set_num_threads(1)
    path = make_random_checkpoint(tmp_path / "attention.pt", lm_grid_attention=True)
    row = benchmark_config("tiny", 1, 1, torch.device("cpu"), str(path), image_size=160)
    assert row["regions_per_image"] > 0 and row["stage_share"]["language_model"] > 0


@pytest.mark.parametrize("unions", [0, 6])
def test_stage_timer_keeps_the_regions_detection_keeps(tmp_path, unions):
    """The timed stages are detection cut into pieces: same regions as ``model(batch)``, union pass included."""
    from densecap_core.checkpoint import load_checkpoint, make_random_checkpoint
    from densecap_core.commands.benchmark import _stage_fns

    torch.set_num_threads(1)
    model = load_checkpoint(make_random_checkpoint(tmp_path / "m.pt", lm_grid_attention=True)).model.eval()
    model.union_proposals = unions
    torch.manual_seed(3)
    batch, sizes = model.prepare_batch([torch.randint(0, 255, (3, 120, 160), dtype=torch.uint8) for _ in range(2)])
    st, fns = _stage_fns(model, batch, sizes)
    with torch.inference_mode():
        for fn in fns:
            fn()
        detected = model(batch, image_sizes=sizes)
    assert len(st["codes"]) == sum(len(d["boxes"]) for d in detected) > 0


def test_bad_options_refuse_clearly(capsys):
    assert densecap(["benchmark", "--configs", "tiny", "--repeat", "1", "--union-proposals", "-1"]) == 2
    assert "--union-proposals must be 0 (off)" in capsys.readouterr().out
    assert densecap(["benchmark", "--configs", "tiny", "--repeat", "1", "--half"]) == 2
    assert "--half needs --device cuda" in capsys.readouterr().out
    assert densecap(["benchmark", "--configs", "tiny", "--quantize", "int4"]) == 2
    assert "--quantize must be one of" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert densecap(["benchmark", "--configs", "tiny", "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().out
    assert densecap(["benchmark", "--checkpoint", "no-such.pt", "--repeat", "1"]) == 2
    assert "no-such.pt does not exist" in capsys.readouterr().out


def test_checkpoint_default_times_the_embedded_model(capsys):
    assert densecap(["benchmark", "--checkpoint", "default", "--repeat", "1", "--threads", "1", "--json"]) == 0
    (row,) = rows_of(capsys)
    # the embedded model's own settings: its vocabulary and input size, its union pass
    assert row["vocab_size"] == 76 and row["input"] == "320x240" and row["union_proposals"] == 10
    assert row["beam_size"] == 3  # and its beam search


def test_channels_last_gives_the_same_regions():
    torch.set_num_threads(1)
    a = benchmark_config("tiny", 1, 2, torch.device("cpu"), image_size=160, vocab_size=50)
    b = benchmark_config("tiny", 1, 2, torch.device("cpu"), image_size=160, vocab_size=50, channels_last=True)
    assert b["channels_last"] and b["batch"] == 2 and b["regions_per_image"] == a["regions_per_image"]
