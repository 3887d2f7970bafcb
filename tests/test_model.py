"""The model library: stages, losses, overfitting, checkpoints, Captioner input handling."""

from __future__ import annotations

import io
import itertools
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from densecap_core.checkpoint import CheckpointError, load_checkpoint, make_random_checkpoint, save_checkpoint
from densecap_core.config import VGG16_ANCHORS, anchors_from, get_config
from densecap_core.inference import Captioner
from densecap_core.model import build_model
import densecap_core.model.densecap as densecap_module
from densecap_core.model.densecap import (caption_rows, first_of_each, inside_a_larger_box, pair_union_boxes,
                                         triple_union_boxes, truth_unions)
from densecap_core.model.box_ops import apply_box_deltas, box_deltas, cxcywh_to_xyxy, xyxy_to_cxcywh
from densecap_core.model.localization import make_anchors, sample_boxes
from densecap_core.model.postprocess import final_detections
from densecap_core.model.roi import bilinear_roi_features
from densecap_core.vocab import Vocabulary, tokenize


def small_config(**kw):
    base = dict(image_size=128, backbone_widths=(16, 24, 32, 48), feature_channels=48, rpn_channels=48,
                fc_dim=128, embed_dim=32, hidden_dim=64, sampler_batch_size=64, sampler_max_positive=32,
                num_proposals=20, pre_nms_top_k=300)
    base.update(kw)
    return get_config("tiny", **base)


def scene_image():
    im = Image.new("RGB", (128, 128), (200, 200, 200))
    d = ImageDraw.Draw(im)
    d.rectangle([10, 10, 60, 50], fill=(220, 30, 30))
    d.ellipse([70, 60, 120, 118], fill=(30, 30, 220))
    return im


def scene_tensor() -> torch.Tensor:
    """``scene_image()`` as a uint8 3 x H x W tensor (a copy: from_numpy warns on PIL's read-only buffer)."""
    return torch.from_numpy(np.array(scene_image())).permute(2, 0, 1)


def test_box_parametrisation_round_trips():
    torch.manual_seed(0)
    a = cxcywh_to_xyxy(torch.rand(50, 4) * torch.tensor([100, 100, 50, 50]) + torch.tensor([0, 0, 5, 5]))
    b = cxcywh_to_xyxy(torch.rand(50, 4) * torch.tensor([100, 100, 50, 50]) + torch.tensor([0, 0, 5, 5]))
    assert torch.allclose(apply_box_deltas(a, box_deltas(a, b)), b, atol=1e-3)
    assert torch.allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(a)), a, atol=1e-5)


def test_vgg16_config_is_the_original():
    cfg = get_config("vgg16")
    assert cfg.anchors == VGG16_ANCHORS and cfg.num_anchors == 12
    assert (cfg.rpn_channels, cfg.sampler_batch_size, cfg.sampler_max_positive) == (256, 256, 128)
    assert (cfg.sampler_high_thresh, cfg.sampler_low_thresh, cfg.rpn_nms_thresh, cfg.final_nms_thresh) == (0.7, 0.3, 0.7, 0.3)
    assert (cfg.fc_dim, cfg.embed_dim, cfg.hidden_dim, cfg.max_caption_length) == (4096, 512, 512, 15)
    assert cfg.pixel_format == "bgr255" and cfg.image_size == 720 and cfg.num_proposals == 1000
    assert (cfg.mid_objectness_weight, cfg.mid_box_reg_weight, cfg.end_objectness_weight, cfg.end_box_reg_weight,
            cfg.captioning_weight, cfg.box_reg_decay) == (0.1, 0.05, 0.1, 0.1, 1.0, 5e-5)
    assert cfg.roi_mapping == "original" and cfg.train_gt_rois == 0 and not cfg.detach_proposals
    model = build_model(cfg, 10)
    assert model.localization.head.conv.weight.shape == (256, 512, 3, 3)
    assert model.localization.head.box.weight.shape == (48, 256, 1, 1)
    assert model.localization.head.score.weight.shape == (24, 256, 1, 1)
    assert model.recognition.fc6.weight.shape == (4096, 512 * 7 * 7)
    assert model.language_model.embedding.weight.shape == (13, 512)  # rows 1..V, START V+1, NULL V+2
    assert model.language_model.output.weight.shape == (11, 512)  # V words + END
    frozen = [p.requires_grad for p in model.backbone.parameters()]
    assert frozen[:8] == [False] * 8 and all(frozen[8:])  # conv1_x, conv2_x never trained
    assert not model.localization.head.box.weight.any()  # zero init: first proposals are the anchors


def test_anchor_centres_follow_the_original():
    cfg = get_config("vgg16")
    anchors = make_anchors(cfg, 2, 3)
    assert anchors.shape == (12 * 2 * 3, 4)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    # anchor-major, then row, then column; 1-indexed 8.5 + 16 j is 0-indexed continuous 8 + 16 j
    assert centres[0].tolist() == [8.0, 8.0] and centres[1].tolist() == [24.0, 8.0] and centres[3].tolist() == [8.0, 24.0]
    w, h = (anchors[6, 2:] - anchors[6, :2]).tolist()
    assert (w, h) == (90.0, 45.0)  # second anchor of the list


def test_sampler_forces_best_box_and_respects_bounds():
    cfg = small_config(sampler_batch_size=16, sampler_max_positive=4)
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [-5, 0, 5, 10], [80, 80, 90, 90]],
                         dtype=torch.float)
    gt = torch.tensor([[49, 49, 61, 61], [200, 200, 210, 210]], dtype=torch.float)
    pos, matched, neg = sample_boxes(boxes, gt, (100, 100), cfg)
    assert 2 in pos.tolist()
    assert len(neg) == 16 - len(pos)
    assert 3 not in neg.tolist()  # crosses the left edge: ignored
    assert set(neg.tolist()) <= {0, 1, 4}


def test_roi_sampling_spans_box_edges():
    feat = torch.arange(10.0)[None, None, None, :].expand(1, 1, 10, 10).contiguous()  # value = column index
    box = torch.tensor([[20.0, 8.0, 68.0, 72.0]])  # column c's centre is at x = 8 (c + 0.5): columns 2 to 8
    out = bilinear_roi_features(feat, box, (80, 80), stride=8, size=7, mapping="exact")
    assert out.shape == (1, 1, 7, 7)
    assert torch.allclose(out[0, 0, 0], torch.tensor([2.0, 3, 4, 5, 6, 7, 8]), atol=1e-5)


def test_roi_stride_8_samples_rois_from_a_finer_map_and_checkpoints_without_it_keep_one_map():
    torch.manual_seed(0)
    cfg = small_config(roi_stride=8, anchors=anchors_from((24, 48, 96, 192), (0.5, 2.0, 1.0, 1 / 3, 3.0)))
    assert cfg.roi_stride == 8 and cfg.stride == 16 and cfg.num_anchors == 20
    model = build_model(cfg, 12).eval()
    batch, _ = model.prepare_batch([torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)])
    coarse, fine = model.backbone.forward_pair(batch)
    assert coarse.shape[-2:] == (6, 8) and fine.shape[-2:] == (12, 16) and fine.shape[1] == coarse.shape[1]
    assert model.roi_stride == 8
    # A checkpoint written before the field has no roi_stride in its config -> one map, as it was trained.
    old = type(cfg).from_dict({k: v for k, v in cfg.to_dict().items() if k != "roi_stride"})
    assert old.roi_stride == 0
    old_model = build_model(old, 12).eval()
    a, b = old_model.backbone.forward_pair(batch)
    assert a is b and old_model.roi_stride == 16 and old_model.backbone.lateral is None
    with pytest.raises(ValueError, match="roi_stride"):
        get_config("mobilenet", roi_stride=8)


def test_box_geometry_is_hand_checked_and_only_models_configured_for_it_take_it():
    from densecap_core.model.recognition import box_geometry

    g = box_geometry(torch.tensor([[0.0, 0, 64, 48], [160, 120, 320, 240]]), (240, 320))
    want = torch.tensor([[0.1, 0.1, 0.2, 0.2, math.log(64 / 240), math.log(48 / 240)],
                         [0.75, 0.75, 0.5, 0.5, math.log(160 / 240), math.log(120 / 240)]])
    assert torch.allclose(g, want, atol=1e-6)
    torch.manual_seed(0)
    model = build_model(small_config(box_geometry=True), 12).eval()
    feats = torch.randn(2, 48, 7, 7)
    same = feats[:1].expand(2, -1, -1, -1)  # one appearance, two box sizes: the codes must differ
    codes = model.recognition.codes(same, box_geometry(torch.tensor([[0.0, 0, 20, 20], [0, 0, 90, 90]]), (96, 128)))
    assert not torch.allclose(codes[0], codes[1])
    with pytest.raises(ValueError, match="box_geometry"):
        model.recognition(feats)
    # A checkpoint written before the field: no geometry layer, as it was trained.
    old = type(model.config).from_dict({k: v for k, v in small_config().to_dict().items() if k != "box_geometry"})
    assert old.box_geometry is False and build_model(old, 12).recognition.geometry is None


def test_box_geometry_lets_the_captions_name_a_size_the_roi_features_cannot_show(tmp_path):
    """RoI sampling scales every box to 7 x 7: one appearance in a small and a large box gives the same
    features. With the box's geometry the head and language model learn "small" vs "large" from them;
    without it they could only say one caption for both."""
    from densecap_core.model.recognition import box_geometry

    torch.manual_seed(0)
    cfg = small_config(box_geometry=True, lm_grid_attention=False)  # the code alone must carry the size
    vocab = Vocabulary(["a", "small", "large", "red", "square"])
    model = build_model(cfg, len(vocab))
    feats = torch.randn(1, 48, 7, 7).expand(2, -1, -1, -1)
    geometry = box_geometry(torch.tensor([[8.0, 8, 29, 29], [20, 10, 120, 110]]), (128, 128))
    labels = torch.tensor([vocab.encode("a small red square"), vocab.encode("a large red square")])
    opt = torch.optim.Adam(list(model.recognition.parameters()) + list(model.language_model.parameters()), lr=3e-3)
    for _ in range(400):  # at 200 steps Adam can still be mid-swing (seen: both captions "large" at step 200)
        codes = model.recognition.codes(feats, geometry)
        loss = model.language_model.loss(model.language_model(codes, labels), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        tokens = model.language_model.greedy_decode(model.recognition.codes(feats, geometry))
    assert [vocab.decode(t) for t in tokens.tolist()] == ["a small red square", "a large red square"]
    path = save_checkpoint(tmp_path / "g.pt", model, cfg, vocab, {})
    assert load_checkpoint(path).config.box_geometry is True


def test_grid_attention_names_what_sits_where_in_the_box_when_the_code_cannot(tmp_path):
    """Two union boxes whose region codes are identical but whose grids hold a red thing left and a blue one
    right, or the other way round. Only a language model that reads the grid can say which comes first (a
    code-only one gets the same input for both, so it must say one caption for both)."""
    torch.manual_seed(0)
    cfg = small_config(lm_grid_attention=True)
    vocab = Vocabulary(["a", "red", "blue", "circle", "left", "of"])
    model = build_model(cfg, len(vocab))
    lm = model.language_model
    red, blue = torch.randn(48, 1, 1), torch.randn(48, 1, 1)
    grid = torch.zeros(2, 48, 7, 7)
    grid[0, :, :, :3], grid[0, :, :, 4:] = red, blue
    grid[1, :, :, :3], grid[1, :, :, 4:] = blue, red
    codes = torch.randn(1, cfg.fc_dim).expand(2, -1)
    labels = torch.tensor([vocab.encode("a red circle left of a blue circle"),
                           vocab.encode("a blue circle left of a red circle")])
    opt = torch.optim.Adam(lm.parameters(), lr=3e-3)
    for _ in range(150):
        loss = lm.loss(lm(codes, labels, grid), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert [vocab.decode(t) for t in lm.greedy_decode(codes, grid).tolist()] == [
        "a red circle left of a blue circle", "a blue circle left of a red circle"]
    with pytest.raises(ValueError, match="RoI grid"):
        lm.greedy_decode(codes)
    path = save_checkpoint(tmp_path / "a.pt", model, cfg, vocab, {})
    again = load_checkpoint(path).model.language_model
    assert torch.equal(again.greedy_decode(codes, grid), lm.greedy_decode(codes, grid))
    # Checkpoints written before the option load without attention, as they were trained.
    old = type(cfg).from_dict({k: v for k, v in small_config().to_dict().items() if k != "lm_grid_attention"})
    assert old.lm_grid_attention is False and build_model(old, 12).language_model.attention is None


def test_empty_ground_truth_gives_zero_box_losses():
    torch.manual_seed(0)
    cfg = small_config()
    model = build_model(cfg, 12).train()
    batch, sizes = model.prepare_batch([torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)])
    losses = model(batch, [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0, 15), dtype=torch.long)}], sizes)
    assert losses["mid_box_reg"].item() == 0 and losses["end_box_reg"].item() == 0 and losses["captioning"].item() == 0
    assert losses["mid_objectness"].item() > 0


@pytest.mark.parametrize("attention,dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)],
                         ids=["code-only", "grid-attention", "grid-attention-bf16-training"])
def test_small_model_overfits_one_image(attention, dtype):
    """Trains on one image (under bfloat16 autocast in the last case, as `densecap train` does on CPUs with native
    bfloat16) and then runs inference in float32, as every user of a checkpoint does."""
    torch.manual_seed(0)
    cfg = small_config(lm_grid_attention=attention)
    vocab = Vocabulary(["a", "red", "blue", "square", "circle"])
    model = build_model(cfg, len(vocab)).train()
    image = scene_tensor()
    target = {"boxes": torch.tensor([[10.0, 10, 61, 51], [70, 60, 121, 119]]),
              "labels": torch.tensor([vocab.encode("a red square"), vocab.encode("a blue circle")])}
    batch, sizes = model.prepare_batch([image])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for step in range(150):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            losses = model(batch, [target], sizes)
        assert losses["total"].dtype == torch.float32
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        first = first if first is not None else losses["total"].item()
    last = losses["total"].item()
    assert last < first / 10, (first, last)
    model.eval()
    out = model(batch, image_sizes=sizes)[0]
    captions = {vocab.decode(t) for t in out["tokens"][:4].tolist()}
    assert captions & {"a red square", "a blue circle"}
    assert torch.allclose(torch.sigmoid(out["logits"]), out["scores"])  # the unsaturated ranking evaluate uses
    # The GT-box setting: the given boxes come back unchanged, each with its own caption.
    given = model.caption_boxes(batch, [target["boxes"]], sizes)[0]
    assert torch.equal(given["boxes"], target["boxes"]) and ((0 < given["scores"]) & (given["scores"] < 1)).all()
    assert torch.allclose(torch.sigmoid(given["logits"]), given["scores"])
    assert [vocab.decode(t) for t in given["tokens"].tolist()] == ["a red square", "a blue circle"]
    none = model.caption_boxes(batch, [torch.zeros(0, 4)], sizes)[0]
    assert none["boxes"].shape == (0, 4) and none["tokens"].shape == (0, cfg.max_caption_length)


@pytest.mark.parametrize("attention,unions", [(False, 0), (True, 0), (True, 5)],
                         ids=["code-only", "grid-attention", "grid-attention+union-proposals"])
def test_eval_outputs_are_sorted_and_batched_equals_one_by_one(attention, unions):
    torch.manual_seed(0)
    model = build_model(small_config(lm_grid_attention=attention, union_proposals=unions), 12).eval()
    # Same-size images: no padding, so batching must not change any number. (Mixed sizes are zero-padded
    # at the right/bottom, which changes features near those edges, as in any padded detector batch.)
    ims = [torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8), torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)]
    batch, sizes = model.prepare_batch(ims)
    together = model(batch, image_sizes=sizes)
    for im, out in zip(ims, together):
        b1, s1 = model.prepare_batch([im])
        alone = model(b1, image_sizes=s1)[0]
        assert torch.allclose(alone["scores"], out["scores"], atol=1e-4)
        assert torch.equal(alone["tokens"], out["tokens"])
        assert (out["scores"][:-1] >= out["scores"][1:]).all()
        assert (out["boxes"][:, 2] <= im.shape[2] + 1e-3).all() and (out["boxes"][:, 3] <= im.shape[1] + 1e-3).all()


def test_pair_union_boxes_cover_each_pair_once():
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 5, 30, 40], [5, 50, 8, 60]])
    assert pair_union_boxes(boxes).tolist() == [[0, 0, 30, 40], [0, 0, 10, 60], [5, 5, 30, 60]]
    assert pair_union_boxes(boxes[:1]).shape == (0, 4) and pair_union_boxes(boxes[:0]).shape == (0, 4)


def test_triple_union_boxes_cover_each_triple_once():
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 5, 30, 40], [5, 50, 8, 60], [40, 40, 45, 45]])
    assert triple_union_boxes(boxes).tolist() == [[0, 0, 30, 60], [0, 0, 45, 45], [0, 0, 45, 60], [5, 5, 45, 60]]
    assert triple_union_boxes(boxes[:2]).shape == (0, 4)


def test_union_proposals_are_recognised_as_if_they_were_proposals():
    """The second pass's rows, merged in, equal one recognition pass over each image's proposals + unions
    (two images of different sizes: the interleaving must keep each image's rows together)."""
    torch.manual_seed(0)
    model = build_model(small_config(lm_grid_attention=True, union_proposals=4), 12).eval()
    ims = [torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8), torch.randint(0, 255, (3, 128, 80), dtype=torch.uint8)]
    batch, sizes = model.prepare_batch(ims)
    with torch.no_grad():
        _, features = model.backbone.forward_pair(batch)
        proposals = [torch.tensor([[4.0, 4, 40, 30], [60, 50, 120, 90], [10, 60, 50, 95], [70, 5, 110, 40],
                                   [30, 20, 90, 70]]), torch.tensor([[2.0, 2, 30, 50], [40, 70, 78, 120]])]
        first = model._recognize(features, proposals, sizes)
        merged_props, merged = model._add_union_proposals(features, proposals, first, sizes)
        again = model._recognize(features, merged_props, sizes)
    assert [len(p) for p in merged_props] == [5 + 6, 2 + 1]  # C(4, 2) pairs of the top 4; C(2, 2) of 2
    for a, b in zip(merged, again):
        assert torch.allclose(a, b, atol=1e-5)
    # The appended boxes are the unions of the first pass's top detections (after its regression and NMS).
    _, logits, deltas, _ = first
    _, top, _ = final_detections(proposals[0], logits[:5], deltas[:5], sizes[0], model.final_nms_thresh)
    assert torch.allclose(merged_props[0][5:], pair_union_boxes(top[:4]))
    assert torch.equal(merged_props[0][:5], proposals[0])
    # union_triples: and the union of every triple among the top 3 (one per image with three detections)
    model.union_proposals, model.union_triples = 2, 3
    with torch.no_grad():
        merged_props, _ = model._add_union_proposals(features, proposals, first, sizes)
    assert [len(p) for p in merged_props] == [5 + 1 + 1, 2 + 1 + 0]
    assert torch.allclose(merged_props[0][5:], torch.cat((pair_union_boxes(top[:2]), triple_union_boxes(top[:3]))))


def test_caption_rows_keep_the_truth_boxes_and_draw_the_rest():
    assert caption_rows(10, 4, 0).tolist() == list(range(14))  # 0: all (the original)
    assert caption_rows(5, 4, 32).tolist() == list(range(9))  # they fit
    torch.manual_seed(0)
    rows = caption_rows(64, 14, 32)
    assert len(rows) == 32 and len(set(rows.tolist())) == 32 and (rows[1:] > rows[:-1]).all()
    assert set(range(64, 78)) <= set(rows.tolist())  # every truth box and copy
    assert caption_rows(64, 40, 32).tolist() == list(range(64, 96))  # more truth boxes than room: the first ones


def test_caption_loss_reads_at_most_caption_regions_per_image():
    torch.manual_seed(0)
    model = build_model(small_config(caption_regions=6), 12).train()
    seen = []
    forward = model.language_model.forward
    model.language_model.forward = lambda codes, labels, grid=None: seen.append(len(codes)) or forward(codes, labels, grid)
    im = scene_tensor()
    batch, sizes = model.prepare_batch([im, im])
    target = {"boxes": torch.tensor([[10.0, 10, 61, 51], [70, 60, 121, 119]]),
              "labels": torch.randint(1, 12, (2, 15))}
    losses = model(batch, [target, target], sizes)
    assert seen == [12] and math.isfinite(float(losses["captioning"].detach()))
    losses["total"].backward()


def test_loose_copies_train_box_regression_and_captions_but_not_objectness():
    im = scene_tensor()
    target = {"boxes": torch.tensor([[10.0, 10, 61, 51], [70, 60, 121, 119]]),
              "labels": torch.randint(1, 12, (2, 15), generator=torch.Generator().manual_seed(1))}
    results = {}
    for loose in (0, 1):
        torch.manual_seed(0)
        model = build_model(small_config(train_loose_rois=loose), 12).train()
        seen = []
        forward = model.language_model.forward
        model.language_model.forward = lambda codes, labels, grid=None: seen.append(len(codes)) or forward(
            codes, labels, grid)
        batch, sizes = model.prepare_batch([im])
        torch.manual_seed(5)  # the same sampled boxes both times (the loose copies are drawn after them)
        results[loose] = ({k: float(v.detach()) for k, v in model(batch, [target], sizes).items()}, seen[0])
    (plain, rows_plain), (with_loose, rows_loose) = results[0], results[1]
    assert rows_loose == rows_plain + 2  # one loose copy of each of the two truth boxes is captioned
    assert with_loose["end_objectness"] == pytest.approx(plain["end_objectness"], rel=1e-6)  # not scored
    assert with_loose["end_box_reg"] != pytest.approx(plain["end_box_reg"], rel=1e-3)  # regressed


def test_checkpoint_round_trips_exactly(tmp_path):
    torch.manual_seed(1)
    cfg = small_config()
    vocab = Vocabulary(["x", "y", "z"])
    model = build_model(cfg, 3)
    path = save_checkpoint(tmp_path / "m.pt", model, cfg, vocab, {"dataset": "unit", "metrics": {"map": 0.5}})
    blob = torch.load(path, weights_only=True)  # our format loads without unpickling code
    assert blob["format"] == "densecap-live/1"
    ck = load_checkpoint(path)
    assert ck.config == cfg and ck.vocab.to_list() == ["x", "y", "z"] and ck.card["metrics"]["map"] == 0.5
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck.model.state_dict()[k]), k


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.t7"
    bad.write_bytes(b"\x00\x01torch7 junk")
    with pytest.raises(CheckpointError, match="convert-t7"):
        load_checkpoint(bad)


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    path = make_random_checkpoint(tmp_path_factory.mktemp("ck") / "rand.pt", image_size=160)
    return Captioner(str(path), device="cpu")


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_captioner_accepts_every_mode_and_maps_boxes_to_the_input(captioner, elephant_path):
    base = Image.open(elephant_path).convert("RGB").resize((300, 200))
    inputs = {
        "path": str(elephant_path),
        "bytes": elephant_path.read_bytes(),
        "rgb": base, "L": base.convert("L"), "RGBA": base.convert("RGBA"), "P": base.convert("P"),
        "CMYK": base.convert("CMYK"),
        "I;16": Image.fromarray((np.asarray(base.convert("L")).astype("uint16") * 257)),
    }
    results = captioner.caption(list(inputs.values()), names=list(inputs))
    for (name, src), res in zip(inputs.items(), results):
        w, h = (Image.open(src).size if name in ("path",) else (720, 480) if name == "bytes" else (300, 200))
        assert (res.width, res.height) == (w, h), name
        assert res.regions, name
        for r in res.regions:
            x, y, bw, bh = r.box
            assert -0.01 <= x and x + bw <= w + 0.01 and -0.01 <= y and y + bh <= h + 0.01, (name, r.box)
        scores = [r.score for r in res.regions]
        assert scores == sorted(scores, reverse=True)


def test_captioner_honours_exif_rotation(captioner):
    im = Image.new("RGB", (200, 100), (120, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    res = captioner.caption([_encode(im, "JPEG", exif=exif.tobytes())])[0]
    assert (res.width, res.height) == (100, 200)


def test_captioner_refuses_bad_input_clearly(captioner, tmp_path):
    from densecap_core.imageio import ImageDecodeError, ImageTooLarge
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        captioner.caption([b"this is not an image"])
    truncated = _encode(Image.new("RGB", (64, 64), "red"), "JPEG")[:200]
    results = captioner.caption([truncated, tmp_path / "missing.jpg", Image.new("RGB", (50, 40))],
                                names=["trunc", "missing", "ok"], on_error="record")
    assert results[0].error and results[1].error and "no such file" in results[1].error
    assert results[2].ok and results[2].width == 50
    huge = Captioner.from_checkpoint_object(load_checkpoint(captioner.checkpoint_path), max_pixels=1000)
    with pytest.raises(ImageTooLarge, match="over the limit"):
        huge.caption([_encode(Image.new("RGB", (100, 100)), "PNG")])


def test_tokenize_matches_the_original_preprocess():
    assert tokenize("A man's ½ hat, (red)!") == ["a", "mans", "half", "hat", "red"]
    v = Vocabulary(["a", "red", "<UNK>"])
    assert v.encode("a green thing", max_len=5) == [1, 3, 3, 0, 0]
    assert v.decode([1, 2, v.end_token, 1]) == "a red"


def test_torch_free_modules_do_not_import_torch():
    code = ("import sys; import densecap_core, densecap_core.schema, densecap_core.protocol, "
            "densecap_core.settings, densecap_core.imageio, densecap_core.cli; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_truth_unions_are_unions_of_two_or_three_truth_boxes():
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10], [0, 40, 10, 50], [50, 50, 60, 70]])
    torch.manual_seed(3)
    unions = truth_unions(gt, 200)
    assert unions.shape == (200, 4)
    allowed = {}
    for k in (2, 3):
        for members in itertools.combinations(range(4), k):
            sub = gt[list(members)]
            allowed[tuple(torch.cat((sub[:, :2].amin(0), sub[:, 2:].amax(0))).tolist())] = k
    seen = [allowed.get(tuple(u.tolist())) for u in unions]
    assert None not in seen and set(seen) == {2, 3}  # every union is one of them, pairs and triples both drawn
    assert len(set(map(tuple, unions.tolist()))) == len(allowed)  # 200 draws reach all 10 subsets
    assert truth_unions(gt[:1], 5).shape == (0, 4) and truth_unions(gt, 0).shape == (0, 4)


def test_inside_a_larger_box_needs_most_of_the_box_inside_a_larger_one():
    regions = torch.tensor([[0.0, 0, 100, 100], [200, 200, 220, 220]])
    boxes = torch.tensor([[10.0, 10, 50, 50],     # inside the first region
                          [95, 10, 135, 50],      # an eighth of it inside: no
                          [1, 1, 99, 100.5],      # 99.5% inside
                          [195, 195, 225, 225],   # holds the second region (larger than it): no
                          [0, 0, 100, 100]])      # the region itself is not larger than itself
    assert inside_a_larger_box(boxes, regions).tolist() == [True, False, True, False, False]
    assert inside_a_larger_box(boxes, regions[:0]).tolist() == [False] * 5


def test_first_of_each_keeps_the_first_masked_position_of_each_value():
    values = torch.tensor([3, 1, 3, 2, 1, 3, 0])
    mask = torch.tensor([False, True, True, True, True, True, False])
    assert first_of_each(values, mask).tolist() == [False, True, True, True, False, False, False]
    assert first_of_each(values, torch.zeros(7, dtype=torch.bool)).tolist() == [False] * 7


@pytest.mark.parametrize("negatives,matched", [("all", True), ("inside", True), ("all", False), ("all", "once")])
def test_union_rois_are_regions_when_a_truth_box_matches_and_objectness_negatives_else(monkeypatch, negatives,
                                                                                        matched):
    im = scene_tensor()
    a, b, c = [10.0, 10, 61, 51], [70, 60, 121, 119], [0, 90, 30, 127]
    pair = [10.0, 10, 121, 119]  # a relation region over a and b: the union of their boxes
    labels = torch.randint(1, 12, (4, 15), generator=torch.Generator().manual_seed(1))
    target = {"boxes": torch.tensor([a, b, c, pair]), "labels": labels}
    # the pair's union matches the relation box (a region); a's and c's union matches nothing and no region
    # holds 90% of it (78% lies in the relation box: a negative only with negatives="all"); the third lies inside
    # the relation box at IoU 0.64 (a negative either way)
    # (the pair's union is drawn twice: "once" keeps one of the two)
    monkeypatch.setattr(densecap_module, "truth_unions", lambda gt, count: torch.tensor(
        [[10.0, 10, 121, 119], [0, 10, 61, 127], [12, 12, 100, 100], [10.0, 10, 121, 119]]))
    results, bce = {}, F.binary_cross_entropy_with_logits
    for unions in (0, 3):
        torch.manual_seed(0)
        model = build_model(small_config(train_union_rois=unions, train_union_negatives=negatives,
                                         train_union_matched=matched), 12).train()
        seen, rows, objectness = [], [], []
        forward, recognise = model.language_model.forward, model.recognition.forward
        monkeypatch.setattr(F, "binary_cross_entropy_with_logits",
                            lambda logits, targets: objectness.append(targets) or bce(logits, targets))
        model.language_model.forward = lambda codes, labels, grid=None: seen.append(labels) or forward(
            codes, labels, grid)
        model.recognition.forward = lambda feats, geometry=None: rows.append(len(feats)) or recognise(feats, geometry)
        batch, sizes = model.prepare_batch([im])
        torch.manual_seed(5)  # the same sampled boxes both times (the unions are drawn after them)
        model(batch, [target], sizes)
        results[unions] = (objectness[0], seen[0], rows[0])
    (obj_plain, caps_plain, rows_plain), (obj_unions, caps_unions, rows_unions) = results[0], results[3]
    negatives_added, regions_added = 2 if negatives == "all" else 1, {True: 2, "once": 1, False: 0}[matched]
    # the region (unless train_union_matched is off) and the negatives go through the head
    assert rows_unions == rows_plain + regions_added + negatives_added
    assert len(caps_unions) == len(caps_plain) + regions_added  # only the one that is a region is captioned...
    extra = Counter(map(tuple, caps_unions.tolist())) - Counter(map(tuple, caps_plain.tolist()))
    assert list(extra.elements()) == [tuple(labels[3].tolist())] * regions_added  # ... with the relation's phrase
    # the end objectness loss reads them all: the region as a positive, the negatives
    assert (len(obj_unions), int(obj_unions.sum())) == (len(obj_plain) + regions_added + negatives_added,
                                                        int(obj_plain.sum()) + regions_added)


def test_train_union_options_refuse_unknown_values():
    with pytest.raises(ValueError, match="train_union_negatives"):
        small_config(train_union_negatives="some")
    with pytest.raises(ValueError, match="train_union_matched"):
        small_config(train_union_matched="twice")


def test_warm_up_runs_one_batch_of_the_largest_input(captioner):
    """A serving worker warms up with a full batch at the largest padded shape (batch_size squares of side
    image_size), so kernels and the allocator's working memory are set up before the first frame."""
    small = Captioner.from_checkpoint_object(load_checkpoint(captioner.checkpoint_path), batch_size=3)
    seen = []
    hooks = [c.model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
             for c in (captioner, small)]
    try:
        assert captioner.warm_up() > 0 and small.warm_up() > 0
    finally:
        for h in hooks:
            h.remove()
    assert seen == [(captioner.batch_size, 3, 160, 160), (3, 3, 160, 160)]
