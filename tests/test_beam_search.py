"""Beam search in the language model (``beam_size`` > 1): it finds the caption an exhaustive search finds, it is
greedy decoding at width 1, a region's caption does not depend on the others decoded beside it, and the setting
travels with checkpoints and the command line."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch

from densecap_core.checkpoint import load_checkpoint, save_checkpoint
from densecap_core.config import get_config
from densecap_core.model import build_model
from densecap_core.model.language_model import LanguageModel
from densecap_core.vocab import Vocabulary


def _lm(vocab_size: int, max_length: int, seed: int = 0) -> LanguageModel:
    """A small random language model with grid attention over 2 x 2 cells. Its output layer is scaled up so the
    word distributions are uneven (a near-uniform model makes every caption almost equally likely), and its
    recurrent weights so the words said earlier weigh on the next (else a beam that continued from the wrong
    prefix's state would go unnoticed)."""
    torch.manual_seed(seed)
    lm = LanguageModel(vocab_size, input_dim=8, embed_dim=8, hidden_dim=16, max_length=max_length,
                       image_every_step=True, grid_channels=4, grid_cells=4).eval()
    with torch.no_grad():
        lm.output.weight.mul_(4.0)
        lm.lstm.weight_hh_l0.mul_(4.0)
        lm.lstm.weight_ih_l0.mul_(2.0)
    return lm


def _inputs(regions: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(regions, 8, generator=gen), torch.randn(regions, 4, 2, 2, generator=gen)


def _words(tokens: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(t for t in row if t) for row in tokens.tolist()]


def _exhaustive_best(lm: LanguageModel, codes, grid, alpha: float) -> list[tuple[int, ...]]:
    """Every caption of 0..max_length words (ended by END unless it fills max_length), scored by the model's
    teacher-forced log-probabilities: the best of each region by log p / (words + 1) ** alpha."""
    v, t = lm.vocab_size, lm.max_length
    captions = [c for n in range(t + 1) for c in itertools.product(range(1, v + 1), repeat=n)]
    labels = torch.tensor([list(c) + [0] * (t - len(c)) for c in captions])
    best = []
    with torch.no_grad():
        for r in range(codes.shape[0]):
            logp = torch.log_softmax(lm(codes[r:r + 1].expand(len(captions), -1), labels,
                                        grid[r:r + 1].expand(len(captions), -1, -1, -1)).float(), -1)
            scores = []
            for i, c in enumerate(captions):
                s = sum(logp[i, 1 + j, w - 1] for j, w in enumerate(c))
                if len(c) < t:
                    s = s + logp[i, 1 + len(c), v]  # END
                scores.append(float(s) / (len(c) + 1) ** alpha)
            best.append(captions[max(range(len(captions)), key=scores.__getitem__)])
    return best


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_a_beam_as_wide_as_every_caption_finds_the_best_one(alpha):
    lm = _lm(vocab_size=3, max_length=3)
    codes, grid = _inputs(6)
    found = _words(lm.beam_decode(codes, grid, beam_size=4 ** 3, length_alpha=alpha))
    assert found == _exhaustive_best(lm, codes, grid, alpha)


def test_length_alpha_changes_which_caption_wins():
    """The test above could pass with alpha ignored if the likeliest captions were also the best per word;
    here some region's winner differs between alpha 0 (the likeliest, short) and alpha 2."""
    lm = _lm(vocab_size=3, max_length=3)
    codes, grid = _inputs(12)
    short = _words(lm.beam_decode(codes, grid, beam_size=64, length_alpha=0.0))
    long = _words(lm.beam_decode(codes, grid, beam_size=64, length_alpha=2.0))
    assert short != long
    assert sum(map(len, long)) > sum(map(len, short))


def test_width_one_is_greedy_decoding():
    lm = _lm(vocab_size=7, max_length=8, seed=3)
    codes, grid = _inputs(20, seed=4)
    assert torch.equal(lm.beam_decode(codes, grid, beam_size=1), lm.greedy_decode(codes, grid))
    assert torch.equal(lm.decode(codes, grid, beam_size=1), lm.greedy_decode(codes, grid))


def test_a_regions_caption_does_not_depend_on_the_regions_beside_it():
    """Regions leave the batch as their beams end; the captions must be what each region gets alone."""
    lm = _lm(vocab_size=5, max_length=10, seed=5)
    with torch.no_grad():
        lm.output.bias[lm.vocab_size] = 1.0  # END likely enough that captions end at different lengths
    codes, grid = _inputs(16, seed=6)
    together = lm.beam_decode(codes, grid, beam_size=3, length_alpha=1.0)
    alone = torch.cat([lm.beam_decode(codes[i:i + 1], grid[i:i + 1], beam_size=3, length_alpha=1.0)
                       for i in range(16)])
    assert torch.equal(together, alone)
    lengths = {len(w) for w in _words(together)}
    assert len(lengths) > 2, lengths  # regions did leave the batch at different steps
    assert lm.beam_decode(codes[:0], grid[:0], beam_size=3).shape == (0, 10)


def test_beam_settings_travel_with_the_checkpoint(tmp_path):
    cfg = get_config("tiny").with_overrides(beam_size=3, beam_length_alpha=2.0)
    vocab = Vocabulary(["a", "red", "circle"])
    path = save_checkpoint(tmp_path / "b.pt", build_model(cfg, len(vocab)), cfg, vocab, {})
    model = load_checkpoint(path).model
    assert (model.beam_size, model.beam_length_alpha) == (3, 2.0)
    # checkpoints written before the option decode greedily, as they were measured
    old = type(cfg).from_dict({k: v for k, v in cfg.to_dict().items() if not k.startswith("beam_")})
    assert (old.beam_size, old.beam_length_alpha) == (1, 0.0)


def test_config_and_captioner_refuse_a_beam_of_no_width_or_a_negative_alpha():
    with pytest.raises(ValueError, match="beam_size"):
        get_config("tiny").with_overrides(beam_size=0)
    for alpha in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="beam_length_alpha"):
            get_config("tiny").with_overrides(beam_length_alpha=alpha)
    from densecap_core.inference import Captioner
    with pytest.raises(ValueError, match="beam_size"):  # before loading: a missing file is not what it reports
        Captioner("no-such-checkpoint.pt", device="cpu", beam_size=0)
    with pytest.raises(ValueError, match="beam_length_alpha"):
        Captioner(device="cpu", beam_length_alpha=-0.5)


@pytest.mark.parametrize("flags, message", [(["--beam-size", "0"], "beam_size=0: use 1 (greedy argmax) or more"),
                                            (["--beam-length-alpha", "-1"], "beam_length_alpha=-1.0: use 0")])
def test_evaluate_refuses_a_beam_of_no_width_or_a_negative_alpha(tmp_path, flags, message):
    out = subprocess.run([sys.executable, "-m", "densecap_core.cli", "evaluate", "--data-h5", str(tmp_path / "x.h5"),
                          *flags], capture_output=True, text=True)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_workers_take_the_beam_from_the_environment(monkeypatch, tmp_path):
    """DENSECAP_BEAM_SIZE reaches the workers' Captioner (0 or unset: the checkpoint's own); a bad one stops the
    stream worker with a clear message, before it touches Redis."""
    from conftest import ROOT, child_env
    from densecap_core.checkpoint import make_random_checkpoint
    from densecap_core.settings import Settings
    from worker.job_worker import load_captioner

    checkpoint = make_random_checkpoint(tmp_path / "random.pt")
    assert Settings().beam_size == 0
    monkeypatch.setenv("DENSECAP_BEAM_SIZE", "4")
    settings = Settings.from_env(checkpoint=str(checkpoint))
    assert settings.beam_size == 4
    assert load_captioner(settings, device="cpu").settings["beam_size"] == 4
    assert load_captioner(Settings(checkpoint=str(checkpoint)), device="cpu").settings["beam_size"] == 1
    out = subprocess.run([sys.executable, "-m", "worker.stream_worker"], capture_output=True, text=True, cwd=ROOT,
                         env=child_env(DENSECAP_BEAM_SIZE="-1", DENSECAP_DEVICE="cpu",
                                       DENSECAP_CHECKPOINT=str(checkpoint),
                                       DENSECAP_REDIS_URL="redis://127.0.0.1:1/0"), timeout=180)
    assert out.returncode == 2 and "beam_size=-1: use 1 (greedy argmax) or more" in out.stderr
