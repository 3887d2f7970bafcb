"""Linear probes on a checkpoint's frozen region codes: does the code of a box carry what its phrase must say?

    .venv/bin/python scripts/probe_region_codes.py --checkpoint densecap_core/weights/default.pt \\
        --data-h5 data/synth12k-v2.h5 --regions-meta data/synth12k-v2/regions_meta.json

For the truth boxes of object and relation regions (synthetic data), it reads two things the model computes for a
box: the RoI features (7 x 7 x C, what fc6 sees) and the region code (fc7, what the language model reads), and
fits a linear classifier (softmax regression, Adam) on the training split for each attribute: an object's colour
and shape; a relation's subject colour and shape and object colour and shape (subject = the first-named object).
It prints validation accuracy per attribute. Where objects' attributes are readable and relations' are not, the
region code, not the language model, is what loses a pair's second object (docs/default-model.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from densecap_core.checkpoint import load_checkpoint
from densecap_core.data import scene
from densecap_core.data.h5dataset import DenseCapH5Dataset
from densecap_core.evaluation.exactness import load_regions_meta, region_box_xyxy
from densecap_core.model.recognition import box_geometry
from densecap_core.model.roi import bilinear_roi_features
from densecap_core.training import resize_sample

COLOUR = {c: i for i, c in enumerate(scene.COLOURS)}
SHAPE = {s: i for i, s in enumerate(scene.SHAPES)}
#: Label columns: object colour/shape (relations: the subject's), then the relation object's colour/shape.
ATTRIBUTES = ("colour", "shape", "second colour", "second shape")


def _labels(region: dict) -> list[int]:
    if region["kind"] == "relation":
        a, b = region["subject"], region["object"]
        return [COLOUR[a["colour"]], SHAPE[a["shape"]], COLOUR[b["colour"]], SHAPE[b["shape"]]]
    return [COLOUR[region["colour"]], SHAPE[region["shape"]], -1, -1]


@torch.inference_mode()
def collect(model, h5: str, meta: dict, split: str, count: int) -> dict[str, torch.Tensor]:
    """RoI features, codes, labels and an is-relation flag of the first ``count`` images' truth boxes."""
    dataset = DenseCapH5Dataset(h5, split=split)
    cfg = model.config
    feats, codes, labels, relation = [], [], [], []
    for i in range(min(count, len(dataset))):
        image, target = dataset[i]
        truth = meta[int(target["image_id"])]
        image, _ = resize_sample(image, target["boxes"].float(), cfg.image_size)
        batch, sizes = model.prepare_batch([image])
        _, roi_map = model.backbone.forward_pair(batch)
        scale = max(sizes[0]) / max(truth["width"], truth["height"])
        regions = [r for r in truth["regions"] if r["kind"] in ("object", "relation")]
        boxes = torch.tensor(np.array([region_box_xyxy(r, scale) for r in regions]), dtype=torch.float32)
        rois = bilinear_roi_features(roi_map, boxes, sizes[0], model.roi_stride, cfg.roi_size, cfg.roi_mapping)
        geometry = box_geometry(boxes, sizes[0]) if cfg.box_geometry else None
        feats.append(rois.flatten(1))
        codes.append(model.recognition.codes(rois, geometry))
        labels += [_labels(r) for r in regions]
        relation += [r["kind"] == "relation" for r in regions]
    dataset.close()
    return {"roi": torch.cat(feats), "code": torch.cat(codes), "labels": torch.tensor(labels),
            "relation": torch.tensor(relation)}


def probe(x_train, y_train, x_val, y_val, classes: int, epochs: int) -> float:
    """Validation accuracy of a softmax regression fitted on standardised inputs."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    linear = torch.nn.Linear(x_train.shape[1], classes)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_train)).split(256):
            opt.zero_grad()
            F.cross_entropy(linear(x_train[idx]), y_train[idx]).backward()
            opt.step()
    with torch.no_grad():
        return float((linear(x_val).argmax(1) == y_val).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="default: the embedded default model")
    p.add_argument("--data-h5", required=True)
    p.add_argument("--regions-meta", required=True, help="regions_meta.json of the synthetic dataset")
    p.add_argument("--train-images", type=int, default=2500, help="training-split images to fit on (default 2500)")
    p.add_argument("--val-images", type=int, default=400, help="validation images to score (default 400)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_checkpoint(args.checkpoint).model.eval()
    meta = load_regions_meta(args.regions_meta)
    started = time.perf_counter()
    train = collect(model, args.data_h5, meta, "train", args.train_images)
    val = collect(model, args.data_h5, meta, "val", args.val_images)
    print(f"{len(train['labels'])} training and {len(val['labels'])} validation boxes "
          f"({time.perf_counter() - started:.0f} s)")
    for source, name in (("code", "region code (fc7)"), ("roi", "RoI features (fc6 input)")):
        for kind, columns in (("object", (0, 1)), ("relation", (0, 1, 2, 3))):
            tr = train["relation"] if kind == "relation" else ~train["relation"]
            va = val["relation"] if kind == "relation" else ~val["relation"]
            accuracy = {ATTRIBUTES[j]: probe(train[source][tr], train["labels"][tr, j], val[source][va],
                                             val["labels"][va, j], 10, args.epochs) for j in columns}
            shown = ", ".join(f"{k} {100 * v:.1f}%" for k, v in accuracy.items())
            print(f"{name:26s} {kind:8s} ({int(tr.sum())} / {int(va.sum())} boxes): {shown}", flush=True)


if __name__ == "__main__":
    main()
