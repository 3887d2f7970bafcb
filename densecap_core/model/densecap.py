"""``DenseCapModel``: the fully convolutional localization network (FCLN) of the paper, wired stage by stage.

    images -> Backbone -> LocalizationLayer (anchors, RPN, sampler | proposals)
           -> bilinear RoI features -> RecognitionHead (codes, objectness, final box deltas)
           -> LanguageModel (captions) -> postprocess (final NMS)

Train mode: ``model(images, targets, image_sizes)`` returns a dict of losses: the five weighted losses of the
original (``mid_objectness``, ``mid_box_reg``, ``end_objectness``, ``end_box_reg``, ``captioning``), the
``box_decay`` regulariser and ``total`` (their sum, what to back-propagate; the original applied the decay's
gradient but left it out of its printed total). Batches of several images are allowed (the original used 1):
each image is sampled separately and the recognition losses are averaged over all sampled regions.

Eval mode: returns one dict per image: ``boxes`` (K x 4, xyxy in input pixels), ``scores`` (K, in [0, 1]),
``tokens`` (K x T word ids, 0-padded), sorted by descending score.

Images are B x 3 x H x W tensors normalised by ``normalize`` and padded at the right/bottom; ``image_sizes``
gives each image's (height, width) before padding.
"""

from __future__ import annotations

import itertools
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_area, box_iou

from ..config import CAFFE_BGR_MEAN, IMAGENET_RGB_MEAN, IMAGENET_RGB_STD, TRAINING_STEP_FIELDS, ModelConfig
from .backbone import Backbone
from .box_ops import box_deltas, clip_boxes, cxcywh_to_xyxy, xyxy_to_cxcywh
from .language_model import LanguageModel
from .localization import LocalizationLayer, propose, rpn_losses, sample_boxes
from .postprocess import final_detections
from .recognition import RecognitionHead, box_geometry
from .roi import bilinear_roi_features

#: Words that state a count in a caption, for ``count_head`` ("a pair of", "a couple of" count two). Visual
#: Genome's phrases use the same words ("two men", "a pair of shoes").
COUNT_WORD_VALUES = {"two": 2, "pair": 2, "couple": 2, "both": 2, "three": 3, "four": 4, "five": 5, "six": 6,
                     "seven": 7, "eight": 8, "nine": 9, "ten": 10}


# Shift and scale of the loose copies of each truth box (``train_loose_rois``): +-20% gives them a mean IoU of
# ~0.67 with their truth box, about how far the detected boxes of group and relation regions land.
LOOSE_JITTER = 0.2


def jitter_boxes(boxes: torch.Tensor, image_size: tuple[int, int], shift: float = 0.08,
                 scale: float = 0.10, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random copies of xyxy ``boxes``: centre moved by up to ``shift`` of the size, sides scaled by +-``scale``."""
    c = xyxy_to_cxcywh(boxes)
    u = torch.rand(c.shape, generator=generator, dtype=c.dtype, device=c.device) * 2 - 1
    c = torch.stack((c[:, 0] + u[:, 0] * shift * c[:, 2], c[:, 1] + u[:, 1] * shift * c[:, 3],
                     c[:, 2] * (1 + u[:, 2] * scale), c[:, 3] * (1 + u[:, 3] * scale)), 1)
    return clip_boxes(cxcywh_to_xyxy(c), *image_size)


def pair_union_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """The union box of every pair of xyxy ``boxes`` (N x 4 -> N(N-1)/2 x 4, pairs (i, j) with i < j)."""
    i, j = torch.triu_indices(len(boxes), len(boxes), 1, device=boxes.device)
    return torch.cat((torch.minimum(boxes[i, :2], boxes[j, :2]), torch.maximum(boxes[i, 2:], boxes[j, 2:])), 1)


def triple_union_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """The union box of every triple of xyxy ``boxes`` (N x 4 -> C(N, 3) x 4)."""
    if len(boxes) < 3:
        return boxes.new_zeros((0, 4))
    idx = torch.combinations(torch.arange(len(boxes), device=boxes.device), 3)
    return torch.cat((boxes[idx, :2].amin(1), boxes[idx, 2:].amax(1)), 1)


def truth_unions(boxes: torch.Tensor, count: int, max_members: int = 3) -> torch.Tensor:
    """``count`` union boxes of random subsets of 2 to ``max_members`` of the xyxy ``boxes`` (``train_union_rois``).

    Subsets are drawn independently (a subset may repeat); none when there are fewer than two boxes."""
    n = len(boxes)
    if n < 2 or count <= 0:
        return boxes.new_zeros((0, 4))
    sizes = torch.randint(2, min(max_members, n) + 1, (count, 1), device=boxes.device)
    ranks = torch.rand(count, n, device=boxes.device).argsort(1).argsort(1)
    member = (ranks < sizes)[..., None]  # count x n x 1
    inf = torch.tensor(float("inf"), dtype=boxes.dtype, device=boxes.device)
    low = torch.where(member, boxes[None, :, :2], inf).amin(1)
    high = torch.where(member, boxes[None, :, 2:], -inf).amax(1)
    return torch.cat((low, high), 1)


def inside_a_larger_box(boxes: torch.Tensor, regions: torch.Tensor, min_fraction: float = 0.9) -> torch.Tensor:
    """Which xyxy ``boxes`` have at least ``min_fraction`` of their area inside one of the larger ``regions``
    (``train_union_negatives="inside"``: a union of two or three members of a group lies inside the group's box;
    one of two unrelated objects, in no region's box)."""
    if not len(boxes) or not len(regions):
        return torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    low = torch.maximum(boxes[:, None, :2], regions[None, :, :2])
    high = torch.minimum(boxes[:, None, 2:], regions[None, :, 2:])
    inter = (high - low).clamp(min=0).prod(2)
    area = box_area(boxes)
    larger = box_area(regions)[None, :] > area[:, None]
    return ((inter >= min_fraction * area[:, None]) & larger).any(1)


def first_of_each(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The positions where ``mask`` holds and ``values`` shows a value for the first time among them
    (``train_union_matched="once"``: one union per truth box it matches)."""
    picked = mask.nonzero().squeeze(1)
    keep = torch.zeros_like(mask)
    if len(picked):
        seen, where = torch.unique(values[picked], return_inverse=True)
        first = torch.full((len(seen),), len(picked), device=mask.device).scatter_reduce(
            0, where, torch.arange(len(picked), device=mask.device), "amin")
        keep[picked[first]] = True
    return keep


def caption_rows(num_sampled: int, num_given: int, limit: int, device=None) -> torch.Tensor:
    """Which of an image's positive RoIs (``num_sampled`` RPN positives, then ``num_given`` truth boxes and
    their jittered copies) the caption loss reads: all when ``limit`` is 0 or they fit; else every truth box
    and copy first (up to ``limit``), then a random draw of the sampled positives. The sampled positives are
    many boxes around the same few regions with the same caption (64 for ~7 regions), and the language model's
    training pass over all of them was ~40% of a light model's step (docs/model.md)."""
    total = num_sampled + num_given
    if not limit or total <= limit:
        return torch.arange(total, device=device)
    given = torch.arange(num_sampled, total, device=device)[:limit]
    room = limit - len(given)
    sampled = torch.randperm(num_sampled, device=device)[:room]
    return torch.cat((sampled, given)).sort().values


class DenseCapModel(nn.Module):
    def __init__(self, config: ModelConfig, backbone: nn.Module, localization: LocalizationLayer,
                 recognition: RecognitionHead, language_model: LanguageModel):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.localization = localization
        self.recognition = recognition
        self.language_model = language_model
        # Test-time settings (the original's setTestArgs); overridable per Captioner.
        self.rpn_nms_thresh = config.rpn_nms_thresh
        self.final_nms_thresh = config.final_nms_thresh
        self.num_proposals = config.num_proposals
        self.union_proposals = config.union_proposals
        self.union_triples = config.union_triples
        self.beam_size = config.beam_size
        self.beam_length_alpha = config.beam_length_alpha
        self.word_ids: dict[str, int] = {}  # the vocabulary's word -> id, for caption_upweight_words (training)
        # count_head: trained on the region code, never read when captioning (ModelConfig.count_head)
        self.count_head = nn.Linear(config.fc_dim, config.count_head) if config.count_head else None

    def use_vocabulary(self, word_ids: dict[str, int]) -> None:
        """Give training the vocabulary (word -> id) that ``caption_upweight_words`` names words of; refuses a
        named word the vocabulary lacks."""
        self.word_ids = dict(word_ids)
        self.upweighted_ids(self.config)

    def upweighted_ids(self, config: ModelConfig) -> list[int]:
        """The word ids of ``config.caption_upweight_words``; ValueError naming those the vocabulary lacks."""
        missing = config.upweighted_words_missing(self.word_ids)
        if missing:
            raise ValueError(f"caption_upweight_words: {', '.join(missing)} not in the vocabulary"
                             + ("" if self.word_ids else " (none was given: DenseCapModel.use_vocabulary)"))
        return [self.word_ids[w] for w in config.upweighted_words]

    def caption_weights(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Per region (rows of ``labels``, word ids): ``caption_upweight`` where the caption holds one of
        ``caption_upweight_words``, else 1; None when the config weights nothing."""
        cfg = self.config
        if not cfg.upweighted_words:
            return None
        ids = torch.tensor(self.upweighted_ids(cfg), device=labels.device, dtype=labels.dtype)
        hit = torch.isin(labels, ids).any(1)
        return torch.where(hit, cfg.caption_upweight, 1.0)

    def count_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Per region (rows of ``labels``, word ids): the class of the count its caption states, for
        ``count_head``: 0 for a caption with no count word (one thing), ``n - 1`` for a count ``n`` (capped at the
        head's largest); the largest count word of a caption decides."""
        if not self.word_ids:
            raise ValueError("count_head needs the vocabulary: DenseCapModel.use_vocabulary")
        values = {self.word_ids[w]: n for w, n in COUNT_WORD_VALUES.items() if w in self.word_ids}
        table = torch.ones(max([int(labels.max()) if labels.numel() else 0, *values]) + 1, dtype=torch.long,
                           device=labels.device)
        for i, n in values.items():
            table[i] = n
        counts = table[labels].amax(1) if labels.shape[1] else torch.ones(len(labels), dtype=torch.long,
                                                                          device=labels.device)
        return counts.clamp(max=self.config.count_head) - 1

    def load_init_state(self, state: dict) -> None:
        """Load a trained model's weights to start from (``densecap train --init``): as ``load_state_dict``,
        except that a part the config adds and the weights lack keeps its fresh start: ``count_head``,
        ``lm_grid_context`` layers (which start as the identity) and ``box_geometry``'s layer (zeroed, so it adds
        nothing to fc6 until training moves it: the model starts out as the one it was loaded from).
        RuntimeError for any other missing, unexpected or misshapen weight."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        if any(k.startswith("recognition.geometry.") for k in missing):
            with torch.no_grad():
                for p in self.recognition.geometry.parameters():
                    p.zero_()
        missing = [k for k in missing if not k.startswith(("count_head.", "language_model.attention.context.",
                                                            "recognition.geometry."))]
        if missing or unexpected:
            raise RuntimeError(f"weights that do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def switch_training_config(self, config: ModelConfig) -> None:
        """Train on from now with ``config``, which may differ from the current one only in the fields that
        change a training step (``TRAINING_STEP_FIELDS``: extra RoIs, sampling, loss weights), not the network."""
        changed = {f.name for f in fields(ModelConfig) if getattr(config, f.name) != getattr(self.config, f.name)}
        if changed - TRAINING_STEP_FIELDS:
            raise ValueError(f"cannot switch {', '.join(sorted(changed - TRAINING_STEP_FIELDS))} in a running "
                             f"model: only training-step fields ({', '.join(sorted(TRAINING_STEP_FIELDS))})")
        self.config = config
        self.localization.config = config

    # --- input -------------------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """RGB 0-255 (uint8 or float) B x 3 x H x W -> the network's input (BGR-mean for vgg16, ImageNet else)."""
        x = images.float() if not torch.is_floating_point(images) else images
        if self.config.pixel_format == "bgr255":
            mean = torch.tensor(CAFFE_BGR_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            return x.flip(1) - mean
        mean = torch.tensor(IMAGENET_RGB_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_RGB_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) * 255
        return (x - mean) / std

    def prepare_batch(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """List of RGB uint8 3 x h x w tensors (already resized) -> (normalised, zero-padded batch, sizes).

        Padding is to a multiple of the stride, filled after normalisation with 0 (the mean colour).
        """
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        s = self.config.stride
        hmax = -(-max(h for h, _ in sizes) // s) * s
        wmax = -(-max(w for _, w in sizes) // s) * s
        batch = torch.zeros((len(images), 3, hmax, wmax), device=images[0].device)
        for i, im in enumerate(images):
            batch[i, :, : im.shape[1], : im.shape[2]] = self.normalize(im[None])[0]
        return batch, sizes

    # --- forward -----------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, targets: list[dict] | None = None,
                image_sizes: list[tuple[int, int]] | None = None, with_codes: bool = False):
        """Train mode: the losses. Eval mode: the detections (see the module's docstring); ``with_codes`` adds
        ``codes`` to each, the region code (recognition head output, fc7 for vgg16) of every detection, and
        ``grids``, their RoI grids, when the language model reads them."""
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        features, roi_features = self.backbone.forward_pair(images)
        anchors, deltas, scores, boxes = self.localization(features)
        if self.training:
            if targets is None:
                raise ValueError("DenseCapModel in train mode needs targets (call model.eval() for inference)")
            return self._losses(roi_features, anchors, deltas, scores, boxes, targets, image_sizes)
        return self._detect(roi_features, scores, boxes, image_sizes, with_codes)

    @property
    def roi_stride(self) -> int:
        """Stride of the map RoI features are sampled from."""
        return self.config.roi_stride or self.config.stride

    def _losses(self, features, anchors, deltas, scores, boxes, targets, image_sizes) -> dict[str, torch.Tensor]:
        cfg = self.config
        losses: dict[str, torch.Tensor] = {}
        roi_feats, roi_boxes, num_pos, gt_boxes, gt_labels, geometry, captioned = [], [], [], [], [], [], []
        scored = []  # with train_loose_rois, per image: which rows the end objectness loss reads (not the copies)
        for i, (target, size) in enumerate(zip(targets, image_sizes)):
            gt = target["boxes"].to(boxes.dtype)
            sample_from = boxes[i] if cfg.sample_on_predicted else anchors
            pos, matched, neg = sample_boxes(sample_from.detach(), gt, size, cfg)
            for k, v in rpn_losses(deltas[i], scores[i], anchors, pos, gt[matched], neg, cfg).items():
                losses[k] = losses.get(k, 0) + v / len(targets)
            pos_boxes, neg_boxes = boxes[i][pos], boxes[i][neg]
            given, union_negatives, loose = self._truth_rois(gt, size)
            neg_boxes = torch.cat((neg_boxes, union_negatives.to(neg_boxes.dtype)))
            if given:
                pos_boxes = torch.cat([pos_boxes] + [b.to(pos_boxes.dtype) for b, _ in given])
                matched = torch.cat([matched] + [m for _, m in given])
            rois = torch.cat((pos_boxes, neg_boxes))
            if cfg.train_loose_rois:
                keep_obj = torch.ones(len(rois), dtype=torch.bool, device=rois.device)
                keep_obj[len(pos_boxes) - len(loose) * len(gt):len(pos_boxes)] = False
                scored.append(keep_obj)
            if cfg.detach_proposals:
                rois = rois.detach()
            roi_feats.append(bilinear_roi_features(features[i:i + 1], rois, size, self.roi_stride, cfg.roi_size,
                                                   cfg.roi_mapping))
            roi_boxes.append(rois)
            if cfg.box_geometry:
                geometry.append(box_geometry(rois.detach(), size))
            num_pos.append(len(pos_boxes))
            captioned.append(caption_rows(len(pos), len(pos_boxes) - len(pos), cfg.caption_regions,
                                          pos_boxes.device))
            gt_boxes.append(gt[matched])
            gt_labels.append(target["labels"][matched])
        roi_feats = torch.cat(roi_feats)
        codes, logits, final_deltas = self.recognition(roi_feats, torch.cat(geometry) if geometry else None)
        is_pos = torch.cat([torch.arange(len(r), device=logits.device) < p for r, p in zip(roi_boxes, num_pos)])
        pos_codes, pos_deltas = codes[is_pos], final_deltas[is_pos]
        pos_rois = torch.cat([r[:p] for r, p in zip(roi_boxes, num_pos)])
        gt_boxes, gt_labels = torch.cat(gt_boxes), torch.cat(gt_labels)
        obj_logits, obj_targets = logits, is_pos
        if scored:  # the loose copies train regression and captions only
            keep = torch.cat(scored)
            obj_logits, obj_targets = logits[keep], is_pos[keep]
        losses["end_objectness"] = F.binary_cross_entropy_with_logits(obj_logits, obj_targets.to(logits.dtype)) \
            * cfg.end_objectness_weight
        if pos_rois.numel():
            target = box_deltas(pos_rois, gt_boxes)
            bad = (target.abs() > 10).any(1, keepdim=True)
            losses["end_box_reg"] = F.smooth_l1_loss(pos_deltas.masked_fill(bad, 0), target.masked_fill(bad, 0),
                                                     beta=1.0) * cfg.end_box_reg_weight
        else:
            losses["end_box_reg"] = final_deltas.sum() * 0
        rows = torch.cat([r + o for r, o in zip(captioned, itertools.accumulate([0] + num_pos[:-1]))])
        grids = roi_feats[is_pos][rows] if self.language_model.uses_grid else None
        lm_logits = self.language_model(pos_codes[rows], gt_labels[rows], grids)
        losses["captioning"] = self.language_model.loss(lm_logits, gt_labels[rows],
                                                        self.caption_weights(gt_labels[rows])) * cfg.captioning_weight
        if self.count_head is not None:
            losses["count"] = F.cross_entropy(self.count_head(pos_codes[rows]), self.count_targets(gt_labels[rows])) \
                * cfg.count_loss_weight
        losses["total"] = sum(v for k, v in losses.items())
        return losses

    def _truth_rois(self, gt: torch.Tensor, size: tuple[int, int]):
        """The RoIs a training step adds to an image's sampled ones from its truth boxes ``gt``, as the config
        asks: ``(given, union_negatives, loose)``. ``given`` lists (boxes, index of their truth box) positives in
        the order they join the sampled ones: the truth boxes and their jittered copies (``train_gt_rois``), the
        unions of truth boxes a region matches (``train_union_rois``), the loose copies last (``loose``, a list
        of them; the objectness mask of ``_losses`` counts them from the end). ``union_negatives``: the unions
        that are no region, objectness negatives."""
        cfg = self.config
        truth = torch.arange(len(gt), device=gt.device)
        given = []
        if cfg.train_gt_rois and len(gt):
            given += [(b, truth) for b in [gt] + [jitter_boxes(gt, size) for _ in range(cfg.train_gt_rois - 1)]]
        union_negatives = gt.new_zeros((0, 4))
        if cfg.train_union_rois and len(gt) >= 2:
            # unions of 2-3 truth boxes, as the test-time union pass makes them: a region when one truth box
            # matches at IoU >= sampler_high_thresh (a relation, a pair), else an objectness negative (two or
            # three members of a larger group, unrelated objects), whatever its IoU with the nearest region
            unions = truth_unions(gt, cfg.train_union_rois)
            best, which = box_iou(unions, gt).max(1)
            hit = best >= cfg.sampler_high_thresh
            if cfg.train_union_matched:
                keep = first_of_each(which, hit) if cfg.train_union_matched == "once" else hit
                given.append((unions[keep], which[keep]))
            negative = ~hit
            if cfg.train_union_negatives == "inside":
                negative &= inside_a_larger_box(unions, gt)
            union_negatives = unions[negative]
        loose = [jitter_boxes(gt, size, LOOSE_JITTER, LOOSE_JITTER) for _ in range(cfg.train_loose_rois)] \
            if len(gt) else []
        given += [(b, truth) for b in loose]
        return given, union_negatives, loose

    def caption_losses(self, images: torch.Tensor, targets: list[dict],
                       image_sizes: list[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        """The caption loss alone, on each image's truth boxes and the copies the config adds to them
        (``train_gt_rois``, matched ``train_union_rois``, ``train_loose_rois``; no RPN sampling), with the
        trunk, the RPN and the recognition head run without gradients: the captioner stage of
        ``densecap train --captioner-only``, which trains the language model only. Returns ``captioning`` and
        ``total`` (the same value)."""
        cfg = self.config
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        with torch.no_grad():
            _, features = self.backbone.forward_pair(images)
            rows, labels, geometry = [], [], []
            for i, (target, size) in enumerate(zip(targets, image_sizes)):
                gt = target["boxes"].to(features.dtype)
                given, _, _ = self._truth_rois(gt, size)
                if not given:
                    continue
                rois = torch.cat([b.to(gt.dtype) for b, _ in given])
                rows.append(bilinear_roi_features(features[i:i + 1], rois, size, self.roi_stride, cfg.roi_size,
                                                  cfg.roi_mapping))
                labels.append(target["labels"][torch.cat([m for _, m in given])])
                if cfg.box_geometry:
                    geometry.append(box_geometry(rois, size))
            if rows:
                grids = torch.cat(rows)
                codes = self.recognition.codes(grids, torch.cat(geometry) if geometry else None)
        if not rows:  # no truth box in the batch: a zero that still back-propagates
            zero = sum(p.sum() for p in self.language_model.parameters()) * 0
            return {"captioning": zero, "total": zero}
        labels = torch.cat(labels)
        logits = self.language_model(codes, labels, grids if self.language_model.uses_grid else None)
        loss = self.language_model.loss(logits, labels, self.caption_weights(labels)) * cfg.captioning_weight
        return {"captioning": loss, "total": loss}

    @torch.no_grad()
    def _detect(self, features, scores, boxes, image_sizes, with_codes: bool = False) -> list[dict[str, torch.Tensor]]:
        cfg = self.config
        proposals = [propose(boxes[i], scores[i], size, cfg, self.num_proposals, self.rpn_nms_thresh)
                     for i, size in enumerate(image_sizes)]
        recognized = self._recognize(features, proposals, image_sizes)
        if self.union_proposals >= 2 or self.union_triples >= 3:
            proposals, recognized = self._add_union_proposals(features, proposals, recognized, image_sizes)
        codes, logits, deltas, grids = recognized
        outputs, kept, start = [], [], 0
        for p, size in zip(proposals, image_sizes):
            sl = slice(start, start + len(p))
            start += len(p)
            keep, final_boxes, final_scores = final_detections(p, logits[sl], deltas[sl], size, self.final_nms_thresh)
            # "logits": the same order as "scores" without float32's saturation (sigmoid is exactly 1.0 above
            # ~17, 10% of the default model's detections); what the evaluation ranks by (the original's scores)
            outputs.append({"boxes": final_boxes, "scores": final_scores, "logits": logits[sl][keep].float()})
            if with_codes:  # the codes of the proposals the final boxes were regressed from, as the original
                outputs[-1]["codes"] = codes[sl][keep]
                if grids is not None:  # and their RoI grids, which a grid-attention language model reads too
                    outputs[-1]["grids"] = grids[sl][keep]
            kept.append(sl.start + keep)
        return self._decode_into(outputs, codes, grids, torch.cat(kept) if kept else None)

    def _add_union_proposals(self, features, proposals: list[torch.Tensor], recognized: tuple, image_sizes):
        """Second pass for regions made of two things (a relation, a pair): the union box of every pair among
        each image's top ``union_proposals`` first-pass detections (and of every triple among the top
        ``union_triples``, when on), recognised and appended to its proposals.

        The RPN proposes such wide boxes poorly (its anchors are 1:2, 2:1 and 1:1 around one object), while the
        recognition head was trained on them (truth boxes of relations and groups). Returns the proposals and
        the (codes, logits, deltas, grids) of ``_recognize`` with each image's union rows after its own rows."""
        _, logits, deltas, _ = recognized
        unions, start = [], 0
        for p, size in zip(proposals, image_sizes):
            sl = slice(start, start + len(p))
            start += len(p)
            _, top, _ = final_detections(p, logits[sl], deltas[sl], size, self.final_nms_thresh)
            unions.append(torch.cat((pair_union_boxes(top[: self.union_proposals]),
                                     triple_union_boxes(top[: self.union_triples]))).to(p.dtype))
        extra = self._recognize(features, unions, image_sizes)
        n_first, n_extra = [len(p) for p in proposals], [len(u) for u in unions]
        first = torch.arange(sum(n_first), device=logits.device).split(n_first)
        second = (torch.arange(sum(n_extra), device=logits.device) + sum(n_first)).split(n_extra)
        order = torch.cat([rows for pair in zip(first, second) for rows in pair])
        merged = tuple(None if a is None else torch.cat((a, b))[order] for a, b in zip(recognized, extra))
        return [torch.cat((p, u)) for p, u in zip(proposals, unions)], merged

    def _recognize(self, features, boxes: list[torch.Tensor], image_sizes):
        """Region codes, objectness logits, final deltas and RoI grids of each image's ``boxes`` (concatenated);
        the grids only when the language model reads them (else None: a vgg16 batch's are ~100 MB)."""
        cfg = self.config
        roi_feats = torch.cat([bilinear_roi_features(features[i:i + 1], b, size, self.roi_stride, cfg.roi_size,
                                                     cfg.roi_mapping)
                               for i, (b, size) in enumerate(zip(boxes, image_sizes))])
        geometry = (torch.cat([box_geometry(b, size) for b, size in zip(boxes, image_sizes)])
                    if cfg.box_geometry else None)
        return (*self.recognition(roi_feats, geometry), roi_feats if self.language_model.uses_grid else None)

    def _decode_into(self, outputs: list[dict], codes: torch.Tensor, grids: torch.Tensor | None,
                     rows: torch.Tensor | None) -> list[dict]:
        """Caption the regions ``rows`` of ``codes``/``grids`` (all of them when None) into ``outputs`` in order."""
        if rows is not None:
            codes = codes[rows]
            grids = None if grids is None else grids[rows]
        tokens = (self.language_model.decode(codes, grids, self.beam_size, self.beam_length_alpha)
                  if outputs else None)
        start = 0
        for out in outputs:
            n = len(out["boxes"])
            out["tokens"] = tokens[start:start + n]
            start += n
        return outputs

    @torch.no_grad()
    def caption_boxes(self, images: torch.Tensor, boxes: list[torch.Tensor],
                      image_sizes: list[tuple[int, int]] | None = None) -> list[dict[str, torch.Tensor]]:
        """Caption given boxes (one K x 4 xyxy tensor per image, input pixels) instead of proposals: the paper's
        "ground-truth boxes" setting, which measures the captioner apart from localisation. Returns the same
        dicts as detection: the boxes unchanged (no final regression, no NMS), ``scores`` = the recognition
        head's object probability, ``tokens``."""
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * images.shape[0]
        if len(boxes) != images.shape[0]:
            raise ValueError(f"{len(boxes)} box lists for {images.shape[0]} images")
        _, roi_features = self.backbone.forward_pair(images)
        boxes = [b.to(device=roi_features.device, dtype=roi_features.dtype).reshape(-1, 4) for b in boxes]
        codes, logits, _, grids = self._recognize(roi_features, boxes, image_sizes)
        outputs, start = [], 0
        for b in boxes:
            outputs.append({"boxes": b, "scores": torch.sigmoid(logits[start:start + len(b)]),
                            "logits": logits[start:start + len(b)].float()})
            start += len(b)
        return self._decode_into(outputs, codes, grids, None)


def build_model(config: ModelConfig, vocab_size: int) -> DenseCapModel:
    """Build a randomly initialised model for ``config`` and a vocabulary of ``vocab_size`` words."""
    return DenseCapModel(
        config,
        backbone=Backbone(config),
        localization=LocalizationLayer(config),
        recognition=RecognitionHead(config),
        language_model=LanguageModel(vocab_size, config.fc_dim, config.embed_dim, config.hidden_dim,
                                     config.max_caption_length, config.lm_image_every_step,
                                     grid_channels=config.feature_channels if config.lm_grid_attention else 0,
                                     grid_cells=config.roi_size ** 2, grid_context=config.lm_grid_context),
    )
