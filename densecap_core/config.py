"""Typed model configurations: the paper's ``vgg16`` and light configs for live CPU use.

``get_config(name, **overrides)`` returns a ``ModelConfig``. Every field has a reason; the ones that differ
from the original DenseCap say so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

# The original's 12 anchors (w, h): ratios 1:2, 2:1, 1:1 at sqrt-area ~64, 128, 256, 512 px.
VGG16_ANCHORS = ((45, 90), (90, 45), (64, 64), (90, 180), (180, 90), (128, 128),
                 (181, 362), (362, 181), (256, 256), (362, 724), (724, 362), (512, 512))
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
IMAGENET_RGB_MEAN = (0.485, 0.456, 0.406)
IMAGENET_RGB_STD = (0.229, 0.224, 0.225)


def anchors_from(sizes: tuple[float, ...], ratios: tuple[float, ...] = (0.5, 2.0, 1.0)) -> tuple[tuple[float, float], ...]:
    """Anchors (w, h) of sqrt-area ``s`` and aspect ``h/w = r`` for each size, in the original's order."""
    out = []
    for s in sizes:
        for r in ratios:
            w = s / r ** 0.5
            out.append((round(w, 1), round(w * r, 1)))
    return tuple(out)


def check_decoding(beam_size: int | None = None, beam_length_alpha: float | None = None) -> None:
    """ValueError when a caption-decoding setting is out of range (None: not given). The one check behind the
    config and the places that set these on a loaded model (``Captioner``, ``densecap evaluate/benchmark``)."""
    if beam_size is not None and beam_size < 1:
        raise ValueError(f"beam_size={beam_size}: use 1 (greedy argmax) or more (beam search)")
    if beam_length_alpha is not None and not 0 <= beam_length_alpha < float("inf"):  # also refuses nan
        raise ValueError(f"beam_length_alpha={beam_length_alpha}: use 0 (the likeliest caption) or more "
                         "(longer captions favoured)")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    # --- input ---
    image_size: int = 320            # long side after resizing (original: 720, small images upscaled too)
    pixel_format: str = "rgb01"      # "bgr255" = original Caffe VGG (BGR, 0-255, minus mean); "rgb01" = ImageNet norm
    # --- backbone ---
    backbone: str = "tiny"           # vgg16 | resnet18 | mobilenet_v3_large | tiny
    backbone_widths: tuple[int, ...] = (32, 48, 96, 128)  # only for "tiny": channels of its 4 stages
    vgg_widths: tuple[int, ...] | None = None  # only for "vgg16": channels of its 5 conv blocks; None = real VGG
                                               # (64, 128, 256, 512, 512). Tiny widths let tests build small VGGs.
    feature_channels: int = 128      # channels the RPN and RoI sampling see (a 1x1 reduction if the trunk differs)
    stride: int = 16                 # output stride of the trunk; anchors sit at stride*(j+0.5)
    freeze_backbone_layers: int = 0  # vgg16: conv1_x, conv2_x never trained (original conv_net1)
    # --- localization layer (RPN) ---
    anchors: tuple[tuple[float, float], ...] = anchors_from((24, 48, 96, 192))
    rpn_channels: int = 128          # original: 256 (train_opts' rpn_hidden_dim=512 was never read)
    sampler_batch_size: int = 128    # original: 256 boxes per image
    sampler_max_positive: int = 64   # original: at most 128 positives
    sampler_high_thresh: float = 0.7
    sampler_low_thresh: float = 0.3
    remove_outbounds: bool = True
    sample_on_predicted: bool = True  # original samples on the RPN's predicted boxes, not on anchors
    detach_proposals: bool = True     # original back-propagates into box coordinates; light configs detach (stabler)
    train_gt_rois: int = 2            # light configs also train the heads on each GT box + this many jittered
                                      # copies (+-8% shift, +-10% scale): captions learn from clean boxes early on.
                                      # The original (0) trained them on sampled RPN positives only.
    train_loose_rois: int = 0         # also train box regression and captions (not objectness) on this many loose
                                      # copies of each GT box (+-20% shift and scale, mean IoU ~0.67): detected
                                      # group and relation boxes land that far off, where the captioner failed
    train_union_rois: int = 0         # also train the head on this many unions of 2-3 random truth boxes per image
                                      # (what the test-time union pass proposes): a region where one truth box
                                      # matches at IoU >= sampler_high_thresh, else an objectness negative, so that
                                      # a box over part of a group or over two unrelated objects scores low
    train_union_matched: bool | str = True  # with train_union_rois: a union a truth box matches trains as that
                                      # region; False leaves it out (it is a near-copy of a truth box the truth rows
                                      # train already: 43% of the unions on the default data are a relation's or
                                      # group's box again, joined with its members, and their phrases crowd the
                                      # captions); "once": one union per matched truth box, the rest left out
    train_union_negatives: str = "all"  # which unions that are no region train objectness: "all"; "inside": only
                                      # those lying inside a larger region (part of a group, of a relation). Which
                                      # pairs carry a relation is the annotator's choice: a union of two unrelated
                                      # objects looks like one that does, so "inside" leaves it untrained
    caption_regions: int = 0          # positives per image the caption loss reads (0: all; the original). The
                                      # truth boxes and their copies first, then a random draw of RPN positives
    pre_nms_top_k: int | None = 600   # top-k by objectness before RPN NMS (original: all anchors; NMS on 17.8k costs 0.6 s on CPU)
    rpn_nms_thresh: float = 0.7
    num_proposals: int = 50          # kept after RPN NMS at test time (original: 1000; paper: 300)
    union_proposals: int = 0         # test time: also recognise the union box of every pair among each image's
                                      # top N first-pass detections (relations, pairs: boxes the RPN rarely
                                      # proposes); 0 = off (the original). Costs a second, small RoI pass
    union_triples: int = 0           # test time: and of every triple among the top N (groups of three; 0 = off)
    beam_size: int = 1               # test time: captions by beam search over this many prefixes (1: greedy
                                      # argmax, the original; its own beam search was never used)
    beam_length_alpha: float = 0.0   # with beam_size > 1: a finished caption scores log p / (words + 1) ** alpha
    # --- RoI sampling ---
    roi_size: int = 7
    roi_stride: int = 0              # 0: RoI features from the RPN's map; 8 (tiny): from a finer stride-8 map
    roi_mapping: str = "exact"       # "original": image-normalised == feature-normalised (stnbhwd); "exact": true stride mapping
                                     # "original_ceil": "original" on a ceil-mode-pooled map (converted Torch7 VGG)
    # --- recognition head ---
    fc_dim: int = 512                # original: VGG fc6/fc7 4096
    box_geometry: bool = False        # also feed fc6 the box's place and size in the image (6 numbers). RoI
                                      # sampling scales every box to roi_size x roi_size, so without it the
                                      # region code cannot tell a small object from a large one ("a tiny ...")
    dropout: float = 0.0             # original: 0.5 in fc6/fc7
    # --- language model ---
    embed_dim: int = 128             # original: 512
    hidden_dim: int = 256            # original: 512
    max_caption_length: int = 15
    lm_image_every_step: bool = True  # light configs also append the image code to every LSTM input ("par-inject"):
                                      # with it only at step 0 (the original), a from-scratch model learned the
                                      # language but not which colour/shape it was looking at (docs/model.md)
    lm_grid_attention: bool = False   # each word is also predicted from a soft-attention read of the region's RoI
                                      # grid: a union box's code alone does not hold its two objects (docs/model.md)
    lm_grid_context: int = 0          # self-attention layers over the grid's cells before the words read them, so a
                                      # cell can hold what else the box holds (an alike object: a group, not a
                                      # relation; how many); residual, starting as the identity (docs/model.md)
    # --- post-processing ---
    final_nms_thresh: float = 0.3
    # --- losses ---
    # Light configs weight the four detection losses 1.0: they train their trunk from scratch, where the
    # caption loss (summed over ~6 tokens) would otherwise outweigh localisation ~60:1 in the shared features.
    # The vgg16 config keeps the original's 0.1 / 0.05 / 0.1 / 0.1 (its trunk starts from ImageNet VGG).
    mid_objectness_weight: float = 1.0
    mid_box_reg_weight: float = 1.0
    end_objectness_weight: float = 1.0
    end_box_reg_weight: float = 1.0
    captioning_weight: float = 1.0
    caption_upweight_words: str = ""  # comma-separated words: the caption loss of a region whose truth caption
                                      # holds one counts caption_upweight times (kinds learnt late; on the
                                      # synthetic scenes the group phrases' count words: docs/default-model.md)
    caption_upweight: float = 1.0
    count_head: int = 0               # train a head on the region code that predicts the count its truth caption
                                      # states ("two", "a pair of", "three" ...; a caption with no count word is 1,
                                      # a count over N is N): classes 1..N, 0 = none. A training signal only (it
                                      # teaches the code how many alike things the box holds, which group phrases
                                      # need); captioning never reads it
    count_loss_weight: float = 1.0    # the weight of that head's cross-entropy in "total"
    box_reg_decay: float = 5e-5      # L2 pull of RPN deltas to 0; a regulariser, reported but not in "total" (as original)

    def __post_init__(self) -> None:
        if self.train_union_matched not in (True, False, "once"):
            raise ValueError(f"train_union_matched={self.train_union_matched!r}: use true, false or 'once'")
        if self.train_union_negatives not in ("all", "inside"):
            raise ValueError(f"train_union_negatives={self.train_union_negatives!r}: use 'all' or 'inside'")
        if self.count_head == 1 or self.count_head < 0:
            raise ValueError(f"count_head={self.count_head}: use 0 (none) or the largest count to tell apart (2 or more)")
        check_decoding(self.beam_size, self.beam_length_alpha)
        if self.lm_grid_context < 0 or (self.lm_grid_context and not self.lm_grid_attention):
            raise ValueError(f"lm_grid_context={self.lm_grid_context}: the number of layers (0 or more) over the "
                             "cells the words attend over, so it needs lm_grid_attention=true")
        if self.roi_stride not in (0, self.stride) and not (
                self.backbone == "tiny" and self.stride == 16 and self.roi_stride == 8):
            raise ValueError(f"roi_stride={self.roi_stride} needs the tiny backbone at stride 16 (roi_stride 8); "
                             f"use roi_stride=0 to sample RoIs from the RPN's map")

    @property
    def upweighted_words(self) -> list[str]:
        """``caption_upweight_words`` as a list (empty when the weight is 1: nothing is weighted)."""
        if self.caption_upweight == 1.0:
            return []
        return [w.strip() for w in self.caption_upweight_words.split(",") if w.strip()]

    def upweighted_words_missing(self, known) -> list[str]:
        """The ``upweighted_words`` not in ``known`` (a vocabulary's words), sorted."""
        return sorted(set(self.upweighted_words) - set(known))

    @property
    def num_anchors(self) -> int:
        return len(self.anchors)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["anchors"] = [list(a) for a in self.anchors]
        d["backbone_widths"] = list(self.backbone_widths)
        d["vgg_widths"] = None if self.vgg_widths is None else list(self.vgg_widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d.setdefault("lm_image_every_step", False)  # checkpoints written before the option: the original LM
        d.setdefault("lm_grid_attention", False)  # checkpoints written before the option: no attention
        return cls(**_as_field_types(d))

    def with_overrides(self, **kw) -> "ModelConfig":
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def with_training_step(self, **kw) -> "ModelConfig":
        """``with_overrides`` for fields of the training step only (``TRAINING_STEP_FIELDS``): what may change
        part of the way into a run (``densecap train --late-set``). Other fields raise ``ValueError``."""
        other = sorted(set(kw) - TRAINING_STEP_FIELDS)
        if other:
            raise ValueError(f"{', '.join(other)}: only fields of the training step can change during a run "
                             f"({', '.join(sorted(TRAINING_STEP_FIELDS))}); set the others for the whole run")
        return self.with_overrides(**kw)


CONFIGS: dict[str, ModelConfig] = {
    # Faithful to the original DenseCap (see docs/model.md for every quirk decided).
    "vgg16": ModelConfig(
        name="vgg16", image_size=720, pixel_format="bgr255", backbone="vgg16", feature_channels=512,
        freeze_backbone_layers=4, anchors=VGG16_ANCHORS, rpn_channels=256, sampler_batch_size=256,
        sampler_max_positive=128, sample_on_predicted=True, detach_proposals=False, train_gt_rois=0, pre_nms_top_k=None,
        num_proposals=1000, roi_mapping="original", fc_dim=4096, dropout=0.5, embed_dim=512, hidden_dim=512,
        lm_image_every_step=False, mid_objectness_weight=0.1, mid_box_reg_weight=0.05, end_objectness_weight=0.1, end_box_reg_weight=0.1),
    # Light configs: a smaller trunk, input, proposal count and LSTM make live CPU use possible.
    "resnet18": ModelConfig(
        name="resnet18", image_size=512, backbone="resnet18", feature_channels=256,
        anchors=anchors_from((32, 64, 128, 256)), rpn_channels=256, pre_nms_top_k=2000, num_proposals=300,
        fc_dim=1024, embed_dim=256, hidden_dim=512),
    "mobilenet": ModelConfig(
        name="mobilenet", image_size=480, backbone="mobilenet_v3_large", feature_channels=160,
        anchors=anchors_from((32, 64, 128, 256)), rpn_channels=160, pre_nms_top_k=1000, num_proposals=100,
        fc_dim=768, embed_dim=256, hidden_dim=384),
    # The embedded default model's config (docs/default-model.md), with the grid attention (since the sixth
    # session) and the caption-loss cap (since the seventh) it was trained with. Its shipped checkpoint also
    # sets the test-time union_proposals=10 and final_nms_thresh=0.4 (scripts/ship_default_model.py).
    # `roi_stride=8` with 1:3 / 3:1 anchors and `box_geometry` were tried for it and not adopted (docs/model.md);
    # `densecap train --set` selects them.
    "tiny": ModelConfig(lm_grid_attention=True, caption_regions=32),
}


# Fields that only change what a training step trains on (sampling, extra RoIs, loss weights), not the network
# or how it runs at test time: the ones ``densecap train --late-set`` may switch on part of the way into a run.
TRAINING_STEP_FIELDS = frozenset({
    "sampler_batch_size", "sampler_max_positive", "sampler_high_thresh", "sampler_low_thresh", "train_gt_rois",
    "train_loose_rois", "train_union_rois", "train_union_matched", "train_union_negatives", "caption_regions",
    "mid_objectness_weight", "mid_box_reg_weight", "end_objectness_weight", "end_box_reg_weight",
    "captioning_weight", "box_reg_decay", "caption_upweight_words", "caption_upweight", "count_loss_weight"})


def get_config(name: str, **overrides) -> ModelConfig:
    try:
        base = CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; choose one of {', '.join(CONFIGS)}") from None
    return base.with_overrides(**overrides)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["stride=8", "anchors=[[24,12],[12,24]]"]`` -> config overrides (values are JSON; bare words are strings).

    Unknown field names raise ``ValueError`` naming the known ones, so a typo never trains the wrong model.
    """
    import json

    known = {f.name for f in fields(ModelConfig)}
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(known))}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key] = value
    # Types only: the values are checked, with each other too, when the whole config is built from them.
    return _as_field_types(out)


def _as_field_types(d: dict[str, Any]) -> dict[str, Any]:
    """JSON values of config fields -> the types the dataclass holds (lists become tuples)."""
    d = dict(d)
    if "anchors" in d:
        d["anchors"] = tuple(tuple(float(x) for x in a) for a in d["anchors"])
    if "backbone_widths" in d:
        d["backbone_widths"] = tuple(int(x) for x in d["backbone_widths"])
    if d.get("vgg_widths") is not None:
        d["vgg_widths"] = tuple(int(x) for x in d["vgg_widths"])
    return d
