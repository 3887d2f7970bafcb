"""``densecap benchmark``: ms per image for each model config at its input size, and where the time goes.

    densecap benchmark --configs tiny,mobilenet,resnet18,vgg16 --threads 2 --repeat 5

Stages: backbone, proposals (RPN head + anchors + top-k + NMS), RoI features (bilinear sampling), recognition
(fc6/fc7 + heads + final NMS) and language model (greedy decoding). Randomly initialised weights: stage cost does
not depend on the weights, except that an untrained RPN can keep fewer proposals after NMS (the number of
regions captioned is printed beside each row). Use ``--checkpoint`` to time a trained model.
"""

from __future__ import annotations

import json
import time

import torch

from ..config import CONFIGS, get_config
from ..model import build_model
from ..model.localization import propose
from ..model.postprocess import final_detections
from ..model.roi import bilinear_roi_features

STAGES = ("backbone", "proposals", "roi_features", "recognition", "language_model")


def add_arguments(p) -> None:
    p.add_argument("--configs", default="tiny,mobilenet,resnet18,vgg16",
                   help=f"comma-separated configs among {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--checkpoint", help="time this trained checkpoint instead of random weights")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per config after one warm-up (default 5)")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON line per config instead of a table")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def time_stages(model, batch: torch.Tensor, sizes, device: torch.device) -> tuple[dict[str, float], int]:
    """One forward pass split into stages; returns (seconds per stage, regions captioned)."""
    cfg, t = model.config, {}
    _sync(device)
    t0 = time.perf_counter()
    feats = model.backbone(batch)
    _sync(device)
    t1 = time.perf_counter()
    _, _, scores, boxes = model.localization(feats)
    props = [propose(boxes[i], scores[i], s, cfg, model.num_proposals, model.rpn_nms_thresh) for i, s in enumerate(sizes)]
    _sync(device)
    t2 = time.perf_counter()
    rois = torch.cat([bilinear_roi_features(feats[i:i + 1], p, s, cfg.stride, cfg.roi_size, cfg.roi_mapping)
                      for i, (p, s) in enumerate(zip(props, sizes))])
    _sync(device)
    t3 = time.perf_counter()
    codes, logits, deltas = model.recognition(rois)
    kept, start = [], 0
    for p, s in zip(props, sizes):
        keep, _, _ = final_detections(p, logits[start:start + len(p)], deltas[start:start + len(p)], s,
                                      model.final_nms_thresh)
        kept.append(codes[start:start + len(p)][keep])
        start += len(p)
    _sync(device)
    t4 = time.perf_counter()
    codes = torch.cat(kept)
    model.language_model.greedy_decode(codes)
    _sync(device)
    t5 = time.perf_counter()
    for name, a, b in zip(STAGES, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
        t[name] = b - a
    return t, len(codes)


def benchmark_config(name: str, repeat: int, batch_size: int, device: torch.device, checkpoint: str | None = None) -> dict:
    if checkpoint:
        from ..checkpoint import load_checkpoint
        ck = load_checkpoint(checkpoint)
        model, cfg = ck.model, ck.config
    else:
        cfg = get_config(name)
        torch.manual_seed(0)
        model = build_model(cfg, 1000)
    model = model.to(device).eval()
    h = int(cfg.image_size * 0.75)  # a 4:3 image at the config's input size
    images = [torch.randint(0, 255, (3, h, cfg.image_size), dtype=torch.uint8, device=device)
              for _ in range(batch_size)]
    batch, sizes = model.prepare_batch(images)
    time_stages(model, batch, sizes, device)  # warm-up
    totals = {s: 0.0 for s in STAGES}
    regions = 0
    for _ in range(repeat):
        t, regions = time_stages(model, batch, sizes, device)
        for k, v in t.items():
            totals[k] += v
    per_image_ms = {k: 1000 * v / repeat / batch_size for k, v in totals.items()}
    total = sum(per_image_ms.values())
    return {"config": cfg.name, "input": f"{cfg.image_size}x{h}", "batch": batch_size, "device": str(device),
            "threads": torch.get_num_threads(), "ms_per_image": round(total, 1),
            "images_per_s": round(1000 / total, 2), "regions_per_image": regions // batch_size,
            "stage_ms": {k: round(v, 1) for k, v in per_image_ms.items()},
            "stage_share": {k: round(v / total, 3) for k, v in per_image_ms.items()}}


def run(args) -> int:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if args.checkpoint:
        names = ["checkpoint"]
    rows = [benchmark_config(n, args.repeat, args.batch, device, args.checkpoint) for n in names]
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    head = f"{'config':<10} {'input':>9} {'ms/img':>8} {'img/s':>7} {'regions':>7}  " + \
        "  ".join(f"{s[:12]:>12}" for s in STAGES)
    print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch}, {args.repeat} runs")
    print(head)
    for r in rows:
        shares = "  ".join(f"{r['stage_ms'][s]:>6.1f} ({100 * r['stage_share'][s]:>2.0f}%)" for s in STAGES)
        print(f"{r['config']:<10} {r['input']:>9} {r['ms_per_image']:>8.1f} {r['images_per_s']:>7.2f} "
              f"{r['regions_per_image']:>7}  {shares}")
    return 0
