"""Opt-in dynamic int8 language model: same regions as float, captions close, clear refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ELEPHANT, ROOT, child_env
from densecap_core.checkpoint import make_random_checkpoint
from densecap_core.inference import Captioner
from densecap_core.model.quantize import apply_quantize
from densecap_core.settings import Settings


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("q") / "random.pt")


@pytest.fixture(scope="module")
def attention_checkpoint(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("qa") / "random-attention.pt", lm_grid_attention=True)


@pytest.mark.parametrize("which", ["checkpoint", "attention_checkpoint"])
def test_int8_language_model_keeps_boxes_and_scores(which, request):
    checkpoint = request.getfixturevalue(which)
    torch.set_num_threads(1)
    ref = Captioner(str(checkpoint), device="cpu").caption([str(ELEPHANT)])[0]
    cap = Captioner(str(checkpoint), device="cpu", quantize="int8-lm")
    got = cap.caption([str(ELEPHANT)])[0]
    assert cap.settings["quantize"] == "int8-lm"
    assert [r.box for r in got.regions] == [r.box for r in ref.regions]
    assert [r.score for r in got.regions] == [r.score for r in ref.regions]
    assert len(ref.regions) > 0
    # A random model's near-uniform logits are the worst case for int8; a trained one agrees far more
    # (docs/benchmarks.md). Still, most captions of this one must survive.
    same = sum(a.caption == b.caption for a, b in zip(got.regions, ref.regions))
    assert same / len(ref.regions) >= 0.5


def test_refusals_are_clear(checkpoint):
    with pytest.raises(ValueError, match="quantize must be one of"):
        Captioner(str(checkpoint), device="cpu", quantize="int4")
    model = Captioner(str(checkpoint), device="cpu").model
    with pytest.raises(ValueError, match="CPU only"):
        apply_quantize(model, "int8-lm", torch.device("cuda"))  # refused before anything moves to a GPU


def test_setting_reaches_the_stream_worker(monkeypatch, checkpoint):
    monkeypatch.setenv("DENSECAP_QUANTIZE", "int8-lm")
    assert Settings.from_env().quantize == "int8-lm"
    assert Settings().quantize == "none"
    out = subprocess.run([sys.executable, "-m", "worker.stream_worker"], capture_output=True, text=True, cwd=ROOT,
                         env=child_env(DENSECAP_QUANTIZE="bogus", DENSECAP_DEVICE="cpu", DENSECAP_CHECKPOINT=str(checkpoint),
                                       DENSECAP_REDIS_URL="redis://127.0.0.1:1/0"), timeout=180)
    assert out.returncode == 2 and "quantize must be one of" in out.stderr
