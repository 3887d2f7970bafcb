"""``densecap convert-t7`` on small Torch7 files with the original checkpoint's structure.

The real ``densecap-pretrained-vgg16.t7`` (1.2 GB) is not available to tests, so ``fake_densecap`` builds the same
object tree (checkpoint table, DenseCapModel with its nets, LocalizationLayer with the RPN, nngraph gModule
with annotated nodes, torch-rnn LSTM, LanguageModel with idx_to_token, gradWeight buffers...) with a VGG-16 of
tiny widths, writes it with tests/t7writer.py, and checks that the conversion puts every tensor in its place
and that our modules compute what the original's formulas compute (reimplemented here in numpy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from densecap_core import cli
from densecap_core.checkpoint import load_checkpoint
from densecap_core.convert_t7 import ConversionError, convert_t7, torch_rnn_gates_to_pytorch
from densecap_core.inference import Captioner
from t7writer import T7Object, T7Tensor, write_t7

F32 = np.float32


@dataclass
class Spec:
    widths: tuple[int, ...] = (4, 6, 8, 8, 8)
    rpn: int = 6
    anchors: tuple[tuple[float, float], ...] = ((24, 48), (48, 24), (64, 64))
    roi: int = 7
    fc: int = 16
    embed: int = 8           # W, different from H so transposes cannot hide
    hidden: int = 12         # H
    words: tuple[str, ...] = tuple(f"word{i:02d}" for i in range(20)) + ("<UNK>",)
    seq_length: int = 12
    ceil: bool = True
    dropout_v2: bool = True
    lstm_rows_extra: int = 0  # >0 makes the LSTM weight the wrong shape
    with_language_model: bool = True
    lm_idx_to_token: bool = True
    nets_skip: tuple[str, ...] = ()
    seed: int = 0
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # filled by fake_densecap: name -> written array


def _empty() -> np.ndarray:
    return np.zeros((0,), F32)


def _module(typename: str, **fields) -> T7Object:
    return T7Object(typename, {"train": False, "output": _empty(), "gradInput": _empty(), **fields})


def _seq(*modules, typename="nn.Sequential") -> T7Object:
    return _module(typename, modules=list(modules))


def _linear(spec: Spec, rng, name: str, out_dim: int, in_dim: int, std: float = 0.3) -> T7Object:
    w = rng.normal(0, std, (out_dim, in_dim)).astype(F32)
    b = rng.normal(0, 0.1, out_dim).astype(F32)
    spec.arrays[f"{name}.weight"], spec.arrays[f"{name}.bias"] = w, b
    return _module("nn.Linear", weight=w, bias=b, gradWeight=np.zeros_like(w), gradBias=np.zeros_like(b))


def _conv(spec: Spec, rng, name: str, out_dim: int, in_dim: int, k: int, std: float) -> T7Object:
    w = rng.normal(0, std, (out_dim, in_dim, k, k)).astype(F32)
    b = rng.normal(0, 0.05, out_dim).astype(F32)
    spec.arrays[f"{name}.weight"], spec.arrays[f"{name}.bias"] = w, b
    return _module("nn.SpatialConvolution", nInputPlane=in_dim, nOutputPlane=out_dim, kW=k, kH=k, dW=1, dH=1,
                   padW=k // 2, padH=k // 2, weight=w, bias=b, gradWeight=np.zeros_like(w),
                   gradBias=np.zeros_like(b), finput=_empty(), fgradInput=_empty())


def _relu() -> T7Object:
    return _module("nn.ReLU", inplace=True, threshold=0, val=0)


def _pool(ceil: bool) -> T7Object:
    return _module("nn.SpatialMaxPooling", kW=2, kH=2, dW=2, dH=2, padW=0, padH=0, ceil_mode=ceil,
                   indices=np.zeros((0,), np.int64))


def _dropout(spec: Spec) -> T7Object:
    return _module("nn.Dropout", p=0.5, v2=spec.dropout_v2, noise=_empty())


def _node(module, name: str | None) -> T7Object:
    data = {"module": module, "annotations": {"name": name} if name else {}}
    return T7Object("nngraph.Node", {"data": data, "children": [], "visited": False, "id": 0})


def fake_densecap(spec: Spec) -> dict:
    """The original checkpoint's object tree (see docs/convert-t7.md), sized by ``spec``."""
    rng = np.random.default_rng(spec.seed)
    w1, w2, w3, w4, w5 = spec.widths
    layers, cin, n = [], 3, 0
    for block, (width, reps) in enumerate(zip(spec.widths, (2, 2, 3, 3, 3))):
        for _ in range(reps):
            # He-like init so activations keep a useful scale through 13 layers of random weights
            layers += [_conv(spec, rng, f"conv{n}", width, cin, 3, std=np.sqrt(2 / (9 * cin))), _relu()]
            cin, n = width, n + 1
        if block < 4:
            layers.append(_pool(spec.ceil))
    conv_net1, conv_net2 = _seq(*layers[:10]), _seq(*layers[10:])
    k = len(spec.anchors)
    anchors = np.array(spec.anchors, F32).T.copy()  # 2 x k: widths; heights
    make_anchors = _module("nn.MakeAnchors", x0=8.5, y0=8.5, sx=16, sy=16, anchors=anchors)
    reshape = _module("nn.ReshapeBoxFeatures", k=k)
    box_branch = _seq(_conv(spec, rng, "rpn_box", 4 * k, spec.rpn, 1, std=0.05),
                      _module("nn.RegularizeLayer", w=5e-5),
                      _seq(_seq(make_anchors, reshape), reshape, typename="nn.ConcatTable"),
                      _seq(_module("nn.ApplyBoxTransform"), _module("nn.Identity"), typename="nn.ConcatTable"))
    score_branch = _seq(_conv(spec, rng, "rpn_score", 2 * k, spec.rpn, 1, std=0.3), reshape)
    rpn = _seq(_conv(spec, rng, "rpn_conv", spec.rpn, w5, 3, std=0.3), _relu(),
               _seq(box_branch, score_branch, typename="nn.ConcatTable"), _module("nn.FlattenTable"))
    model_opt = {"cnn_name": "vgg-16", "backend": "cudnn", "vocab_size": len(spec.words),
                 "seq_length": spec.seq_length, "field_centers": [8.5, 8.5, 16, 16], "input_dim": w5,
                 "output_height": spec.roi, "output_width": spec.roi, "final_nms_thresh": 0.3, "std": 0.01,
                 "rnn_size": spec.hidden, "rnn_encoding_size": spec.embed, "mid_box_reg_weight": 0.05,
                 "idx_to_token": {i + 1: t for i, t in enumerate(spec.words)}}
    localization = _module("nn.LocalizationLayer", opt=model_opt, test_nms_thresh=0.7, test_max_proposals=1000,
                           test_clip_boxes=True, nets={
                               "rpn": rpn,
                               "box_sampler_helper": _module("nn.BoxSamplerHelper", box_sampler=_module(
                                   "nn.BoxSampler", box_iou=_module("nn.BoxIoU"), low_thresh=0.3)),
                               "roi_pooling": _module("nn.BilinearRoiPooling", height=spec.roi, width=spec.roi),
                               "obj_crit_pos": _module("nn.OurCrossEntropyCriterion")})
    view = _module("nn.View", size=np.array([-1], np.int64), numElements=1, numInputDims=3)
    recog_base = _seq(view, _linear(spec, rng, "fc6", spec.fc, w5 * spec.roi ** 2, std=0.1), _relu(),
                      _dropout(spec), _linear(spec, rng, "fc7", spec.fc, spec.fc), _relu(), _dropout(spec))
    objectness = _linear(spec, rng, "objectness", 1, spec.fc, std=0.5)
    box_reg = _linear(spec, rng, "box_reg", 4, spec.fc, std=0.01)
    v, e, h = len(spec.words), spec.embed, spec.hidden
    lookup = rng.normal(0, 1, (v + 2, e)).astype(F32)
    spec.arrays["lookup"] = lookup
    lstm_w = rng.normal(0, 1 / np.sqrt(e + h), (e + h + spec.lstm_rows_extra, 4 * h)).astype(F32)
    lstm_b = rng.normal(0, 0.2, 4 * h).astype(F32)
    spec.arrays["lstm.weight"], spec.arrays["lstm.bias"] = lstm_w, lstm_b
    lstm = _module("nn.LSTM", input_dim=e, hidden_dim=h, weight=lstm_w, bias=lstm_b, gradWeight=np.zeros_like(lstm_w),
                   gradBias=np.zeros_like(lstm_b), remember_states=False, cell=_empty(), gates=_empty(),
                   h0=_empty(), c0=_empty())
    output = _linear(spec, rng, "output", v + 1, h, std=1.0)
    output.fields["bias"][v] = -3.0  # make END less likely so random captions have words
    image_encoder = _seq(_linear(spec, rng, "image_encoder", e, spec.fc, std=0.5), _relu(),
                         _module("nn.View", size=np.array([1, -1], np.int64)))
    lookup_table = _module("nn.LookupTable", weight=T7Tensor(lookup), gradWeight=np.zeros_like(lookup),
                           paddingValue=0)
    rnn = _seq(lstm, _module("nn.View"), output, _module("nn.View"))
    lm_fields = dict(vocab_size=v, input_encoding_size=e, image_vector_dim=spec.fc, rnn_size=h,
                     seq_length=spec.seq_length, num_layers=1, dropout=0, START_TOKEN=v + 1, END_TOKEN=v + 1,
                     NULL_TOKEN=v + 2, image_encoder=image_encoder, lookup_table=lookup_table, rnn=rnn,
                     sample_argmax=True, net=_seq(_seq(image_encoder, lookup_table, typename="nn.ParallelTable"),
                                                  _module("nn.JoinTable", dimension=1), rnn))
    if spec.lm_idx_to_token:
        lm_fields["idx_to_token"] = {i + 1: t for i, t in enumerate(spec.words)}
    language_model = _module("nn.LanguageModel", **lm_fields) if spec.with_language_model else None
    # nngraph: the recognition gModule, its nodes annotated as DenseCapModel annotates them
    nodes = [_node(_module("nn.Identity"), None), _node(recog_base, "recog_base"),
             _node(objectness, "objectness_branch"), _node(_module("nn.PosSlicer"), "code_slicer"),
             _node(box_reg, "box_reg_branch"), _node(language_model, None)]
    for a, b in zip(nodes, nodes[1:]):
        a.fields["children"].append(b)
        b.fields["data"]["mapindex"] = [a.fields["data"]]
    graph = T7Object("graph.Graph", {"nodes": nodes, "edges": [T7Object("graph.Edge", {"from": a, "to": b})
                                                               for a, b in zip(nodes, nodes[1:])]})
    nodes[-1].fields["graph"] = graph  # a cycle, as the reader must survive them
    modules = [m for m in (recog_base, objectness, box_reg, language_model) if m is not None]
    recog_net = _module("nn.gModule", modules=modules, forwardnodes=nodes, fg=graph, innode=nodes[0],
                        outnode=nodes[-1], nInputs=4, name="recognition_network")
    nets = {"conv_net1": conv_net1, "conv_net2": conv_net2, "localization_layer": localization,
            "recog_base": recog_base, "objectness_branch": objectness, "box_reg_branch": box_reg,
            "language_model": language_model, "recog_net": recog_net}
    for name in spec.nets_skip:
        nets.pop(name)
    model = T7Object("DenseCapModel", {
        "opt": model_opt, "nets": {k: m for k, m in nets.items() if m is not None},
        "net": _seq(conv_net1, conv_net2, localization, recog_net),
        "crits": {"objectness_crit": _module("nn.LogisticCriterion"),
                  "lm_crit": _module("nn.TemporalCrossEntropyCriterion")},
        "finetune_cnn": False, "train": False})
    train_opt = dict(model_opt, idx_to_token={str(i + 1): t for i, t in enumerate(spec.words)},
                     learning_rate=1e-5, checkpoint_path="checkpoint.t7", gpu=0)
    return {"opt": train_opt, "iter": 1200000, "loss_history": {10: {"total_loss": 12.5}},
            "results_history": {}, "model": model}


def write_fake(path: Path, spec: Spec) -> Path:
    write_t7(path, fake_densecap(spec))
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One fake file converted once; shared by the read-only tests below."""
    tmp = tmp_path_factory.mktemp("t7")
    spec = Spec()
    src = write_fake(tmp / "fake.t7", spec)
    out = tmp / "converted.pt"
    convert_t7(src, out, progress=False)
    return spec, load_checkpoint(out), out


# --- numpy references of the original's computations -----------------------------------------------------------

def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def torch_rnn_lstm(xs: np.ndarray, weight: np.ndarray, bias: np.ndarray, h=None, c=None):
    """torch-rnn's LSTM: gates = [x, h] @ weight + bias, blocks i, f, o, g. xs: N x T x W -> (N x T x H, h, c)."""
    n, t, w = xs.shape
    hidden = bias.shape[0] // 4
    h = np.zeros((n, hidden)) if h is None else h
    c = np.zeros((n, hidden)) if c is None else c
    outs = []
    for step in range(t):
        a = xs[:, step] @ weight[:w] + h @ weight[w:] + bias
        i, f, o = sigmoid(a[:, :hidden]), sigmoid(a[:, hidden:2 * hidden]), sigmoid(a[:, 2 * hidden:3 * hidden])
        g = np.tanh(a[:, 3 * hidden:])
        c = f * c + i * g
        h = o * np.tanh(c)
        outs.append(h)
    return np.stack(outs, 1), h, c


def conv_same(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Stride-1 zero-padded convolution of C x H x W by O x C x k x k (Torch's SpatialConvolution)."""
    k = w.shape[-1]
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p)))
    hh, ww = x.shape[1:]
    out = np.zeros((w.shape[0], hh, ww))
    for dy in range(k):
        for dx in range(k):
            out += np.einsum("oc,chw->ohw", w[:, :, dy, dx], xp[:, dy:dy + hh, dx:dx + ww])
    return out + b[:, None, None]


def original_rpn(features: np.ndarray, a: dict, anchors, x0=8.5, sx=16.0):
    """The original RPN on one C x H x W map: boxes (kHW x 4, our xyxy frame) and raw scores (kHW x 2)."""
    hidden = np.maximum(conv_same(features, a["rpn_conv.weight"], a["rpn_conv.bias"]), 0)
    box = conv_same(hidden, a["rpn_box.weight"], a["rpn_box.bias"])
    score = conv_same(hidden, a["rpn_score.weight"], a["rpn_score.bias"])
    k, (_, hh, ww) = len(anchors), hidden.shape
    boxes, scores = [], []
    for ai, (wa, ha) in enumerate(anchors):  # ReshapeBoxFeatures: anchor-major, then row, then column
        for y in range(hh):
            for x in range(ww):
                tx, ty, tw, th = box[ai * 4:ai * 4 + 4, y, x]
                xa, ya = x0 + sx * x, x0 + sx * y  # MakeAnchors: 1-indexed centres
                xc, yc, bw, bh = xa + tx * wa, ya + ty * ha, wa * np.exp(tw), ha * np.exp(th)
                # 1-indexed (xc, yc, w, h) -> our 0-indexed xyxy: x1 = xc - (w-1)/2 - 1, x2 = xc + (w-1)/2
                boxes.append([xc - (bw - 1) / 2 - 1, yc - (bh - 1) / 2 - 1, xc + (bw - 1) / 2, yc + (bh - 1) / 2])
                scores.append(score[ai * 2:ai * 2 + 2, y, x])
    assert len(boxes) == k * hh * ww
    return np.array(boxes), np.array(scores)


def original_greedy_captions(codes: np.ndarray, a: dict, v: int, seq_length: int) -> np.ndarray:
    """LanguageModel:sample with sample_argmax: image step, START, then the previous argmax; 1-indexed tokens."""
    enc = np.maximum(codes @ a["image_encoder.weight"].T + a["image_encoder.bias"], 0)
    _, h, c = torch_rnn_lstm(enc[:, None], a["lstm.weight"], a["lstm.bias"])
    words = np.full(len(codes), v + 1)  # START
    seq = np.zeros((len(codes), seq_length), dtype=np.int64)
    for t in range(seq_length):
        x = a["lookup"][words - 1][:, None]  # LookupTable row t (1-indexed) is token t
        out, h, c = torch_rnn_lstm(x, a["lstm.weight"], a["lstm.bias"], h, c)
        scores = out[:, 0] @ a["output.weight"].T + a["output.bias"]
        words = scores.argmax(1) + 1  # class j (1-indexed) = word j, V + 1 = END
        seq[:, t] = words
    return seq


def decode_original(seq: np.ndarray, v: int) -> np.ndarray:
    """The original's sequence (END = V+1, words continue after it) -> ours (0 after the first END)."""
    out = seq.copy()
    for row in out:
        ended = np.nonzero(row == v + 1)[0]
        if len(ended):
            row[ended[0]:] = 0
    return out


# --- tests ------------------------------------------------------------------------------------------------------

def test_every_tensor_lands_where_it_belongs(converted):
    spec, ckpt, _ = converted
    a, sd = spec.arrays, ckpt.model.state_dict()
    trunk = [i for i, m in enumerate(ckpt.model.backbone.trunk) if isinstance(m, torch.nn.Conv2d)]
    assert len(trunk) == 13
    for n, i in enumerate(trunk):
        np.testing.assert_array_equal(sd[f"backbone.trunk.{i}.weight"].numpy(), a[f"conv{n}.weight"])
        np.testing.assert_array_equal(sd[f"backbone.trunk.{i}.bias"].numpy(), a[f"conv{n}.bias"])
    for ours, theirs in (("localization.head.conv", "rpn_conv"), ("localization.head.box", "rpn_box"),
                         ("localization.head.score", "rpn_score"), ("recognition.fc6", "fc6"),
                         ("recognition.fc7", "fc7"), ("recognition.objectness", "objectness"),
                         ("recognition.box_reg", "box_reg"), ("language_model.image_encoder.0", "image_encoder"),
                         ("language_model.output", "output")):
        for p in ("weight", "bias"):
            np.testing.assert_array_equal(sd[f"{ours}.{p}"].numpy(), a[f"{theirs}.{p}"], err_msg=f"{ours}.{p}")
    emb = sd["language_model.embedding.weight"].numpy()
    assert emb.shape == (len(spec.words) + 3, spec.embed)
    np.testing.assert_array_equal(emb[0], 0)
    np.testing.assert_array_equal(emb[1:], a["lookup"])  # column-major in the file: strides honoured
    e, h = spec.embed, spec.hidden
    w, b = a["lstm.weight"], a["lstm.bias"]
    perm = np.r_[0:2 * h, 3 * h:4 * h, 2 * h:3 * h]  # PyTorch block (i, f, g, o) <- torch-rnn (i, f, o, g)
    np.testing.assert_array_equal(sd["language_model.lstm.weight_ih_l0"].numpy(), w[:e, perm].T)
    np.testing.assert_array_equal(sd["language_model.lstm.weight_hh_l0"].numpy(), w[e:, perm].T)
    np.testing.assert_array_equal(sd["language_model.lstm.bias_ih_l0"].numpy(), b[perm])
    np.testing.assert_array_equal(sd["language_model.lstm.bias_hh_l0"].numpy(), 0)
    np.testing.assert_array_equal(torch_rnn_gates_to_pytorch(np.arange(8.0)), [0, 1, 2, 3, 6, 7, 4, 5])


def test_config_vocab_and_card_come_from_the_file(converted):
    spec, ckpt, _ = converted
    cfg = ckpt.config
    assert cfg.name == "vgg16" and cfg.backbone == "vgg16" and cfg.pixel_format == "bgr255"
    assert cfg.vgg_widths == spec.widths and cfg.feature_channels == spec.widths[-1]
    assert cfg.anchors == tuple((float(w), float(h)) for w, h in spec.anchors)
    assert (cfg.rpn_channels, cfg.roi_size, cfg.fc_dim) == (spec.rpn, spec.roi, spec.fc)
    assert (cfg.embed_dim, cfg.hidden_dim, cfg.max_caption_length) == (spec.embed, spec.hidden, spec.seq_length)
    assert (cfg.rpn_nms_thresh, cfg.final_nms_thresh, cfg.num_proposals, cfg.image_size) == (0.7, 0.3, 1000, 720)
    assert cfg.roi_mapping == "original_ceil" and cfg.stride == 16 and cfg.pre_nms_top_k is None
    assert ckpt.vocab.to_list() == list(spec.words)
    card = ckpt.card
    assert card["converted_from"] == "Torch7" and card["iter"] == 1200000
    assert card["claimed_metrics"]["mAP_vg_test"] == 5.70 and "not re-measured" in card["claimed_metrics"]["about"]
    assert card["source"]["file"] == "fake.t7" and len(card["source"]["sha256"]) == 64
    assert card["original_opt"]["learning_rate"] == 1e-5 and "idx_to_token" not in card["original_opt"]
    assert card["original_model_opt"]["field_centers"] == [8.5, 8.5, 16, 16]
    json.dumps(card)  # plain values only


def test_lstm_steps_match_torch_rnn(converted):
    spec, ckpt, _ = converted
    rng = np.random.default_rng(1)
    xs = rng.normal(0, 1, (3, 2, spec.embed))
    want, _, _ = torch_rnn_lstm(xs, spec.arrays["lstm.weight"].astype(np.float64), spec.arrays["lstm.bias"])
    got, _ = ckpt.model.language_model.lstm(torch.tensor(xs, dtype=torch.float32))
    np.testing.assert_allclose(got.detach().numpy(), want, atol=1e-5)


def test_greedy_captions_match_the_original_sampler(converted):
    spec, ckpt, _ = converted
    codes = np.random.default_rng(2).normal(0, 1, (6, spec.fc))
    v = len(spec.words)
    want = decode_original(original_greedy_captions(codes, spec.arrays, v, spec.seq_length), v)
    got = ckpt.model.language_model.greedy_decode(torch.tensor(codes, dtype=torch.float32)).numpy()
    np.testing.assert_array_equal(got, want)
    assert (got > 0).any()


def test_rpn_head_matches_the_original_formulas(converted):
    spec, ckpt, _ = converted
    features = np.random.default_rng(3).normal(0, 1, (spec.widths[-1], 4, 5))
    want_boxes, want_scores = original_rpn(features, spec.arrays, spec.anchors)
    with torch.no_grad():
        _, _, scores, boxes = ckpt.model.localization(torch.tensor(features[None], dtype=torch.float32))
    np.testing.assert_allclose(boxes[0].numpy(), want_boxes, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(scores[0].numpy(), want_scores, rtol=1e-4, atol=1e-4)
    prob = torch.softmax(scores[0], -1)[:, 0].numpy()  # channel 0 (the original's 1) is "object"
    np.testing.assert_allclose(prob, np.exp(want_scores[:, 0]) / np.exp(want_scores).sum(1), atol=1e-5)


def test_captioner_runs_the_converted_checkpoint(converted, elephant_path):
    spec, _, path = converted
    result = Captioner(str(path), device="cpu", num_proposals=50).caption(str(elephant_path))[0]
    assert result.regions and result.error is None
    words = {w for r in result.regions for w in r.caption.split()}
    assert words and words <= set(spec.words)
    assert all(0 <= r.box[0] <= result.width and 0 <= r.box[1] <= result.height for r in result.regions)


def test_cli_converts_refuses_to_overwrite_and_captions(tmp_path, elephant_path, capsys):
    src = write_fake(tmp_path / "in.t7", Spec(seed=4))
    out = tmp_path / "out.pt"
    assert cli.main(["convert-t7", str(src), str(out), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli.main(["convert-t7", str(src), str(out), "--quiet"]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert cli.main(["convert-t7", str(src), str(out), "--force", "--half", "--quiet"]) == 0
    blob = torch.load(out, weights_only=True)
    assert blob["state_dict"]["recognition.fc6.weight"].dtype == torch.float16
    capsys.readouterr()
    assert cli.main(["caption", "--checkpoint", str(out), "--input-image", str(elephant_path), "--device", "cpu",
                     "--num-proposals", "20", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "word" in json.dumps(doc)


def test_old_dropout_scaling_is_folded(tmp_path):
    spec = Spec(dropout_v2=False, seed=5)
    convert_t7(write_fake(tmp_path / "v1.t7", spec), tmp_path / "v1.pt", progress=False)
    ckpt = load_checkpoint(tmp_path / "v1.pt")
    a = spec.arrays
    x = np.random.default_rng(6).normal(0, 1, (5, spec.widths[-1], spec.roi, spec.roi))
    # Torch's v1 Dropout multiplies by (1 - p) = 0.5 at test time, after fc6 and after fc7
    h6 = np.maximum(x.reshape(5, -1) @ a["fc6.weight"].T + a["fc6.bias"], 0) * 0.5
    codes = np.maximum(h6 @ a["fc7.weight"].T + a["fc7.bias"], 0) * 0.5
    logits = codes @ a["objectness.weight"].T + a["objectness.bias"]
    enc = np.maximum(codes @ a["image_encoder.weight"].T + a["image_encoder.bias"], 0)
    with torch.no_grad():
        got_codes, got_logits, _ = ckpt.model.recognition(torch.tensor(x, dtype=torch.float32))
        got_enc = ckpt.model.language_model.image_encoder(got_codes)
    np.testing.assert_allclose(got_logits.numpy(), logits[:, 0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_enc.numpy(), enc, rtol=1e-4, atol=1e-4)
    assert any("old-style Dropout" in n for n in ckpt.card["conversion"]["notes"])


def test_parts_are_found_by_structure_when_nets_lacks_them(tmp_path):
    spec = Spec(nets_skip=("recog_base", "objectness_branch", "box_reg_branch", "language_model", "conv_net1"),
                lm_idx_to_token=False, ceil=False, seed=7)
    convert_t7(write_fake(tmp_path / "graph.t7", spec), tmp_path / "graph.pt", progress=False)
    ckpt = load_checkpoint(tmp_path / "graph.pt")
    found = ckpt.card["conversion"]["found_at"]
    assert found["recog_base"] == "the nngraph node annotated 'recog_base'"
    assert found["language_model"] == "the only LanguageModel in the model"
    assert found["conv_net1"] == "model.net.modules[1]"
    assert ckpt.config.roi_mapping == "original"  # floor-mode pools
    assert ckpt.vocab.to_list() == list(spec.words)  # from model.opt.idx_to_token
    np.testing.assert_array_equal(ckpt.model.recognition.fc7.weight.detach().numpy(), spec.arrays["fc7.weight"])


@pytest.mark.parametrize("spec, message", [
    (Spec(with_language_model=False, nets_skip=("language_model",)),
     "model.nets.language_model is missing"),
    (Spec(lstm_rows_extra=3),
     "model.nets.language_model.rnn: expected an LSTM with weight (W+H) x 4H and bias 4H for input size W=8, "
     "found weight a tensor of shape [23, 48]"),
    (Spec(words=("a", "b", "a")), "idx_to_token: vocabulary has duplicate tokens"),
], ids=["no-language-model", "wrong-lstm-shape", "duplicate-words"])
def test_clear_errors_for_broken_checkpoints(tmp_path, spec, message):
    with pytest.raises(ConversionError) as err:
        convert_t7(write_fake(tmp_path / "bad.t7", spec), tmp_path / "bad.pt", progress=False)
    assert message in str(err.value)
    assert not (tmp_path / "bad.pt").exists()


def test_clear_errors_for_files_that_are_not_t7(tmp_path, elephant_path, capsys):
    cases = {"photo.t7": elephant_path.read_bytes(), "model.t7.zip": b"PK\x03\x04" + b"\0" * 40,
             "ascii.t7": b"3\n1\n2\n", "empty.t7": b""}
    expected = {"photo.t7": "is not a Torch7 binary file", "model.t7.zip": "is a zip archive",
                "ascii.t7": "It looks like text", "empty.t7": "is not a Torch7 binary file"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert cli.main(["convert-t7", str(tmp_path / name), str(tmp_path / "o.pt"), "--quiet"]) == 1
        assert expected[name] in capsys.readouterr().err, name
    full = write_fake(tmp_path / "full.t7", Spec()).read_bytes()
    (tmp_path / "cut.t7").write_bytes(full[:len(full) // 2])
    with pytest.raises(ConversionError, match="truncated|could not be read"):
        convert_t7(tmp_path / "cut.t7", tmp_path / "o.pt", progress=False)
    with pytest.raises(ConversionError, match="does not exist"):
        convert_t7(tmp_path / "missing.t7", tmp_path / "o.pt", progress=False)
    write_t7(tmp_path / "table.t7", {"weights": np.ones(3, F32)})
    with pytest.raises(ConversionError, match="not a DenseCap checkpoint"):
        convert_t7(tmp_path / "table.t7", tmp_path / "o.pt", progress=False)
    assert not (tmp_path / "o.pt").exists()


def test_t7writer_round_trips_through_torchfile(tmp_path):
    import torchfile

    shared = np.arange(6, dtype=F32).reshape(2, 3)
    obj = {"a": [1, 2.5, "x", True], "t": shared, "again": shared, "f": T7Tensor(shared),
           "m": T7Object("nn.Linear", {"weight": shared}), "empty": np.zeros((0,), F32)}
    write_t7(tmp_path / "x.t7", obj)
    back = torchfile.load(str(tmp_path / "x.t7"))
    assert back[b"a"] == [1, 2.5, b"x", True]
    np.testing.assert_array_equal(back[b"t"], shared)
    np.testing.assert_array_equal(back[b"f"], shared)
    assert back[b"again"] is back[b"t"]
    assert back[b"m"].torch_typename() == b"nn.Linear"
    assert back[b"empty"].size == 0


@pytest.mark.parametrize("mapping, cells", [("original_ceil", 34), ("original", 33)])
def test_roi_sample_points_follow_the_original_affine_grid(mapping, cells):
    """BoxToAffine + AffineGridGeneratorBHWD + the sampler's (u+1)(S-1)/2, S the conv5_3 map size: 34 rows for
    a 540-pixel image with the original's ceil-mode pools ("original_ceil"), 33 with floor pools ("original")."""
    from densecap_core.model.roi import _feature_points

    h_img, w_img, size = 540, 720, 7
    box = torch.tensor([[100.0, 300.0, 260.0, 540.0]])  # our xyxy; touches the bottom edge
    fx, fy = _feature_points(box, (h_img, w_img), 16, size, mapping)
    x1, y1, x2, y2 = box[0].tolist()
    xc, yc, w, h = (x1 + x2) / 2 + 0.5, (y1 + y2) / 2 + 0.5, x2 - x1, y2 - y1  # the original's 1-indexed centre
    t = np.linspace(-1, 1, size)
    ux = (2 * xc - w_img - 1) / (w_img - 1) + w / w_img * t
    uy = (2 * yc - h_img - 1) / (h_img - 1) + h / h_img * t
    np.testing.assert_allclose(fx[0].numpy(), (ux + 1) * (45 - 1) / 2, atol=1e-4)
    np.testing.assert_allclose(fy[0].numpy(), (uy + 1) * (cells - 1) / 2, atol=1e-4)
