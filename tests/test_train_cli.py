"""`densecap train` end to end on a tiny synthetic set: checkpoints, metrics log, curves, resume, seeding."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from densecap_core.checkpoint import load_checkpoint


def _cli(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densecap_core.cli", *args], cwd=cwd, capture_output=True,
                          text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    assert _cli("synth", "--out", str(d / "s"), "--num-images", "24", "--image-size", "160", "--seed", "3",
                "--quiet", cwd=d).returncode == 0
    r = _cli("preprocess", "--region-data", str(d / "s/region_descriptions.json"), "--image-data",
             str(d / "s/image_data.json"), "--splits", str(d / "s/densecap_splits.json"), "--image-dir",
             str(d / "s/images"), "--image-size", "160", "--min-token-instances", "1", "--output-h5",
             str(d / "t.h5"), "--output-json", str(d / "t.json"), "--quiet", cwd=d)
    assert r.returncode == 0, r.stderr
    return d


def _train(d, out, iterations, *extra):
    config = [] if "--init" in extra else ["--config", "tiny"]  # --init takes the checkpoint's
    return _cli("train", "--data-h5", str(d / "t.h5"), "--data-json", str(d / "t.json"), *config,
                "--image-size", "160", "--out", str(out), "--iterations", str(iterations), "--batch-size", "2",
                "--warmup", "2", "--val-every", "4", "--val-images", "3", "--no-meteor", "--threads", "1",
                *extra, cwd=d)


def test_train_writes_checkpoints_logs_and_plot_and_resumes(tiny_data):
    out = tiny_data / "run"
    r = _train(tiny_data, out, 6)
    assert r.returncode == 0, r.stderr
    for name in ("last.pt", "best.pt", "train_state.pt", "metrics.jsonl", "curves.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r["kind"] == "val"] == [4, 6]
    ck = load_checkpoint(out / "last.pt")
    assert ck.card["iterations"] == 6 and ck.config.image_size == 160 and len(ck.vocab) > 10
    r = _train(tiny_data, out, 10, "--resume")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out / "last.pt").card["iterations"] == 10
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["iter"] for r in rows) == 10


def test_train_is_seeded(tiny_data):
    a, b = tiny_data / "a", tiny_data / "b"
    assert _train(tiny_data, a, 3, "--val-every", "0").returncode == 0
    assert _train(tiny_data, b, 3, "--val-every", "0").returncode == 0
    sa, sb = load_checkpoint(a / "last.pt").model.state_dict(), load_checkpoint(b / "last.pt").model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_preload_trains_exactly_as_reading_from_the_file(tiny_data):
    """--preload (the GPU recipe: the split held in device memory) changes where samples come from, not what."""
    a, b = tiny_data / "from-file", tiny_data / "preloaded"
    assert _train(tiny_data, a, 3, "--val-every", "0").returncode == 0
    r = _train(tiny_data, b, 3, "--val-every", "0", "--preload")
    assert r.returncode == 0, r.stderr
    assert "preload" in r.stderr  # its progress bar
    sa, sb = load_checkpoint(a / "last.pt").model.state_dict(), load_checkpoint(b / "last.pt").model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_train_reports_missing_data_clearly(tmp_path):
    r = _cli("train", "--data-h5", str(tmp_path / "no.h5"), "--data-json", str(tmp_path / "no.json"),
             "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and "densecap preprocess" in r.stderr
    r = _cli("train", "--data-h5", str(tmp_path / "no.h5"), "--data-json", str(tmp_path / "no.json"),
             "--out", str(tmp_path / "o"), "--resume", cwd=tmp_path)
    assert r.returncode == 2


def test_train_set_overrides_the_config_and_refuses_unknown_fields(tiny_data):
    out = tiny_data / "set"
    r = _train(tiny_data, out, 2, "--val-every", "0", "--set", "final_nms_thresh=0.45", "--set", "roi_stride=8")
    assert r.returncode == 0, r.stderr
    cfg = load_checkpoint(out / "last.pt").config
    assert cfg.final_nms_thresh == 0.45 and cfg.roi_stride == 8
    r = _train(tiny_data, tiny_data / "typo", 2, "--set", "final_nms=0.4")
    assert r.returncode == 2 and "final_nms_thresh" in r.stderr and not (tiny_data / "typo" / "last.pt").exists()
    r = _train(tiny_data, tiny_data / "bad", 2, "--set", "roi_stride=4")
    assert r.returncode == 2 and "roi_stride=4 needs the tiny backbone" in r.stderr and "Traceback" not in r.stderr


def test_channels_last_trains_the_same_model_and_saves_plain_layout(tiny_data):
    """Channels-last (the default) changes the memory layout oneDNN works in, not the model it trains."""
    a, b = tiny_data / "nhwc", tiny_data / "nchw"
    assert _train(tiny_data, a, 3, "--val-every", "0", "--precision", "fp32").returncode == 0
    r = _train(tiny_data, b, 3, "--val-every", "0", "--no-channels-last", "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    live_a = torch.load(a / "train_state.pt", weights_only=False)["model"]
    live_b = torch.load(b / "train_state.pt", weights_only=False)["model"]
    conv = next(k for k, v in live_a.items() if v.dim() == 4 and v.shape[-1] > 1)  # a 3x3 kernel
    assert live_a[conv].is_contiguous(memory_format=torch.channels_last) and not live_a[conv].is_contiguous()
    assert live_b[conv].is_contiguous()
    sa, sb = load_checkpoint(a / "last.pt").model.state_dict(), load_checkpoint(b / "last.pt").model.state_dict()
    assert all(v.is_contiguous() for v in sa.values())  # the checkpoint file holds the plain layout
    # Three Adam steps from the same seed: equal up to float rounding (Adam's first steps are ~lr per weight).
    assert max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa) < 5e-3


def test_bf16_precision_trains_under_autocast_and_saves_float32(tiny_data):
    """--precision bf16 changes the step's arithmetic (so the weights differ from float32's, a little), not what
    is saved: float32 weights, the precision in the card. auto is bf16 only on a CPU with native kernels."""
    from densecap_core.training import training_dtype
    a, b = tiny_data / "p-fp32", tiny_data / "p-bf16"
    assert _train(tiny_data, a, 3, "--val-every", "0", "--precision", "fp32").returncode == 0
    r = _train(tiny_data, b, 3, "--val-every", "0", "--precision", "bf16")
    assert r.returncode == 0, r.stderr
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert (ca.card["train_precision"], cb.card["train_precision"]) == ("fp32", "bf16")
    sa, sb = dict(ca.model.named_parameters()), dict(cb.model.named_parameters())
    live = torch.load(b / "train_state.pt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in live["model"].values() if v.is_floating_point())
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)  # autocast did change the arithmetic
    # Three Adam steps (each moves a weight by about the learning rate, 1e-3) apart at most; batch-norm
    # statistics, which follow the activations, are left out.
    diff = max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)
    assert diff < 1e-2, diff
    assert training_dtype("fp32", torch.device("cpu")) == torch.float32
    assert training_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert training_dtype("auto", torch.device("cuda")) == torch.float32
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert training_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    with pytest.raises(ValueError, match="precision"):
        training_dtype("fp16", torch.device("cpu"))
    r = _train(tiny_data, tiny_data / "p-bad", 2, "--precision", "fp16")
    assert r.returncode == 2 and "--precision" in r.stderr and not (tiny_data / "p-bad").exists()


def test_training_flushes_denormals_only_while_it_runs(tiny_data):
    """Subnormal floats read as 0 during training (speed, late in a run); the process gets torch's default back."""
    from densecap_core.config import get_config
    from densecap_core.data.h5dataset import DenseCapH5Dataset
    from densecap_core.data.h5layout import read_idx_to_token
    from densecap_core.training import TrainOptions, train
    from densecap_core.vocab import Vocabulary

    def subnormal_product() -> float:
        return float(torch.tensor(1e-40, dtype=torch.float32) * 1.0)  # below float32's smallest normal, 1.2e-38

    seen = []

    def validate(model, it):
        seen.append(subnormal_product())
        return {"map": 0.0, "detmap": 0.0}

    vocab = Vocabulary(read_idx_to_token(tiny_data / "t.json"))
    dataset = DenseCapH5Dataset(tiny_data / "t.h5", "train")
    try:
        for flush, expected in ((True, 0.0), (False, pytest.approx(1e-40, rel=1e-3))):
            seen.clear()
            train(get_config("tiny", image_size=160), vocab, dataset,
                  TrainOptions(out=tiny_data / f"flush-{flush}", iterations=2, val_every=0, flush_denormal=flush),
                  validate=validate, progress=False)
            assert seen == [expected]
            assert subnormal_product() != 0.0  # put back when train() returned
    finally:
        dataset.close()


def test_init_starts_from_a_checkpoint_and_refuses_what_does_not_fit(tiny_data):
    base = tiny_data / "init-base"
    assert _train(tiny_data, base, 3, "--val-every", "0").returncode == 0
    start = load_checkpoint(base / "last.pt").model.state_dict()
    same = tiny_data / "init-0"  # no step taken: the weights are the checkpoint's
    r = _train(tiny_data, same, 0, "--val-every", "0", "--init", str(base / "last.pt"))
    assert r.returncode == 0, r.stderr
    ck = load_checkpoint(same / "last.pt")
    assert all(torch.equal(start[k], v) for k, v in ck.model.state_dict().items())
    assert ck.card["init_from"] == str(base / "last.pt")
    tuned = tiny_data / "init-2"  # fine-tuning with a training option the checkpoint did not have
    r = _train(tiny_data, tuned, 2, "--val-every", "0", "--init", str(base / "last.pt"), "--set", "train_union_rois=4")
    assert r.returncode == 0, r.stderr
    ck = load_checkpoint(tuned / "last.pt")
    assert ck.config.train_union_rois == 4 and ck.card["iterations"] == 2
    assert not all(torch.equal(start[k], v) for k, v in ck.model.state_dict().items())
    r = _train(tiny_data, tiny_data / "init-vocab", 1, "--init", "default")  # the embedded model's 76 words
    assert r.returncode == 2 and "vocabulary" in r.stderr and "Traceback" not in r.stderr
    r = _train(tiny_data, tiny_data / "init-shape", 1, "--init", str(base / "last.pt"), "--set", "fc_dim=64")
    assert r.returncode == 2 and "do not fit" in r.stderr and "Traceback" not in r.stderr
    r = _train(tiny_data, tiny_data / "init-config", 1, "--init", str(base / "last.pt"), "--config", "tiny")
    assert r.returncode == 2 and "leave out --config" in r.stderr and not (tiny_data / "init-config").exists()
    r = _train(tiny_data, tiny_data / "init-missing", 1, "--init", str(tiny_data / "nope.pt"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_late_set_switches_the_training_step_part_of_the_way_and_refuses_other_fields(tiny_data):
    plain, late = tiny_data / "late-0", tiny_data / "late-1"
    assert _train(tiny_data, plain, 8, "--val-every", "0").returncode == 0
    # warm-up 2 of 8 iterations: the schedule is half done after iteration 5
    r = _train(tiny_data, late, 8, "--val-every", "0", "--late-set", "train_union_rois=4", "--late-from", "0.5")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (late / "metrics.jsonl").read_text().splitlines()]
    switched = [row for row in rows if row["kind"] == "late"]
    assert [(row["iter"], row["overrides"]) for row in switched] == [(5, {"train_union_rois": 4})]
    ck = load_checkpoint(late / "last.pt")
    assert ck.config.train_union_rois == 0  # the checkpoint keeps the config the run started with
    assert ck.card["late_overrides"] == {"train_union_rois": 4} and ck.card["late_from"] == 0.5
    a, b = load_checkpoint(plain / "last.pt").model.state_dict(), ck.model.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)
    for args, message in ((("--late-set", "stride=8"), "only fields of the training step"),
                          (("--late-set", "train_union_negatives=some"), "use 'all' or 'inside'"),
                          (("--late-set", "train_union_rois=4", "--late-from", "1.5"), "0 to 1")):
        r = _train(tiny_data, tiny_data / "late-bad", 1, *args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert not (tiny_data / "late-bad").exists()


def test_switch_training_config_refuses_fields_of_the_network():
    from densecap_core.config import get_config
    from densecap_core.model import build_model

    config = get_config("tiny", image_size=160)
    model = build_model(config, 20)
    model.switch_training_config(config.with_overrides(train_union_rois=4, caption_regions=8))
    assert model.config.train_union_rois == 4 and model.localization.config.caption_regions == 8
    with pytest.raises(ValueError, match="fc_dim"):
        model.switch_training_config(config.with_overrides(fc_dim=64))
    assert model.config.train_union_rois == 4


def test_captioner_only_trains_the_language_model_alone_and_needs_a_trained_model(tiny_data):
    base = tiny_data / "cap-base"
    assert _train(tiny_data, base, 3, "--val-every", "0").returncode == 0
    start = load_checkpoint(base / "last.pt").model.state_dict()
    stage = tiny_data / "cap-stage"
    r = _train(tiny_data, stage, 4, "--init", str(base / "last.pt"), "--captioner-only", "--set", "train_union_rois=4")
    assert r.returncode == 0, r.stderr
    ck = load_checkpoint(stage / "last.pt")
    assert ck.card["captioner_only"] is True and ck.card["iterations"] == 4
    after = ck.model.state_dict()
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    # every language-model weight moved; nothing else did, batch-norm statistics included
    assert changed and all(k.startswith("language_model.") for k in changed), sorted(changed)[:5]
    assert any(k.startswith("backbone.") and k.endswith("running_mean") for k in start)
    rows = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row["kind"] == "train"]
    assert train_rows and set(train_rows[-1]["losses"]) == {"captioning", "total"}
    assert (stage / "curves.png").is_file() and [row["iter"] for row in rows if row["kind"] == "val"] == [4]
    r = _train(tiny_data, tiny_data / "cap-scratch", 1, "--captioner-only")
    assert r.returncode == 2 and "--init" in r.stderr and "Traceback" not in r.stderr
    assert not (tiny_data / "cap-scratch").exists()


def test_caption_losses_read_the_truth_boxes_and_reach_the_language_model_only():
    from densecap_core.config import get_config
    from densecap_core.model import build_model

    torch.manual_seed(0)
    model = build_model(get_config("tiny", image_size=96, train_gt_rois=2, train_union_rois=3), 12)
    images = torch.randn(2, 3, 96, 96)
    targets = [{"boxes": torch.tensor([[4.0, 4, 40, 40], [50, 50, 90, 90]]), "labels": torch.tensor([[1, 2, 0], [3, 0, 0]])},
               {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0, 3), dtype=torch.long)}]
    losses = model.caption_losses(images, targets, [(96, 96), (96, 96)])
    assert set(losses) == {"captioning", "total"} and losses["total"].item() > 0
    losses["total"].backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith("language_model.") for n in grads)
    # no truth box in any image: a zero loss that still back-propagates
    empty = model.caption_losses(images[1:], targets[1:], [(96, 96)])
    assert empty["total"].item() == 0 and empty["total"].requires_grad


def test_caption_upweight_words_must_be_in_the_data_vocabulary(tiny_data):
    r = _train(tiny_data, tiny_data / "upweight", 2, "--val-every", "0", "--set", 'caption_upweight_words="a,zebra"',
               "--set", "caption_upweight=2")
    assert r.returncode == 2 and "zebra not in the data's vocabulary" in r.stderr and "Traceback" not in r.stderr
    r = _train(tiny_data, tiny_data / "upweight", 2, "--val-every", "0", "--late-set",
               'caption_upweight_words="zebra"', "--late-set", "caption_upweight=2")
    assert r.returncode == 2 and "zebra not in" in r.stderr and not (tiny_data / "upweight").exists()
    r = _train(tiny_data, tiny_data / "upweight", 2, "--val-every", "0", "--set", 'caption_upweight_words="a"',
               "--set", "caption_upweight=2")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(tiny_data / "upweight" / "last.pt").config.upweighted_words == ["a"]


def test_count_head_trains_from_scratch_and_from_weights_without_it(tiny_data):
    out = tiny_data / "count"
    r = _train(tiny_data, out, 2, "--val-every", "0", "--set", "count_head=4")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(out / "last.pt").config.count_head == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("count" in row["losses"] for row in rows if row["kind"] == "train")
    plain = tiny_data / "count-init-plain"
    assert _train(tiny_data, plain, 2, "--val-every", "0").returncode == 0
    r = _train(tiny_data, tiny_data / "count-init", 2, "--val-every", "0", "--init", str(plain / "last.pt"),
               "--set", "count_head=4")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(tiny_data / "count-init" / "last.pt").model.count_head is not None


def test_count_head_is_refused_when_the_vocabulary_has_no_count_word(tiny_data, tmp_path):
    meta = json.loads((tiny_data / "t.json").read_text())
    assert {"two", "three"} & set(meta["idx_to_token"].values())  # the synthetic scenes have groups
    meta["idx_to_token"] = {k: (f"{v}x" if v in ("two", "pair", "three", "four") else v)
                            for k, v in meta["idx_to_token"].items()}
    (tmp_path / "t.json").write_text(json.dumps(meta))
    (tmp_path / "t.h5").symlink_to(tiny_data / "t.h5")
    r = _train(tmp_path, tmp_path / "run", 2, "--val-every", "0", "--set", "count_head=4")
    assert r.returncode == 2 and "has no count word" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_grid_context_is_added_by_set_onto_init_weights_and_refused_without_the_attention(tiny_data):
    plain = tiny_data / "ctx-init-plain"
    assert _train(tiny_data, plain, 2, "--val-every", "0").returncode == 0
    r = _train(tiny_data, tiny_data / "ctx-init", 2, "--val-every", "0", "--init", str(plain / "last.pt"),
               "--set", "lm_grid_context=1")
    assert r.returncode == 0, r.stderr
    assert len(load_checkpoint(tiny_data / "ctx-init" / "last.pt").model.language_model.attention.context) == 1
    r = _train(tiny_data, tiny_data / "ctx-bad", 2, "--set", "lm_grid_attention=false", "--set", "lm_grid_context=1")
    assert r.returncode == 2 and "needs lm_grid_attention" in r.stderr and "Traceback" not in r.stderr
    assert not (tiny_data / "ctx-bad").exists()
