"""``densecap benchmark``: ms per image for each model config at its input size, and where the time goes.

    densecap benchmark --configs tiny,mobilenet,resnet18,vgg16 --threads 2 --repeat 5
    densecap benchmark --configs tiny --threads 1,2 --image-size 240,320,480 --json      # sweeps: every combination
    densecap benchmark --configs tiny --pre-nms-top-k 0,300,600,2000 --vocab-size 1000,10000
    densecap benchmark --configs tiny --quantize none,int8-lm                             # dynamic int8 LSTM + Linear
    densecap benchmark --configs vgg16 --flops --repeat 0                                 # FLOPs per stage, no timing
    densecap benchmark --configs vgg16 --device cuda --half --channels-last --batch 1,4,8,16 --floor

Stages: backbone, proposals (RPN head + anchors + top-k + NMS), RoI features (bilinear sampling), recognition
(fc6/fc7 + heads + final NMS) and language model (greedy decoding). Randomly initialised weights: stage cost does
not depend on the weights, except that an untrained RPN can keep fewer proposals after NMS (the number of
regions captioned is printed beside each row). Use ``--checkpoint`` to time a trained model.

Every option that takes a comma-separated list is swept; one row per combination. ``--flops`` counts the
floating-point operations of each stage (``torch.utils.flop_counter``: convolutions and matrix products, 2 per
multiply-add; NMS, RoI sampling and element-wise work are not counted). ``--floor`` measures the device's
dense matrix-multiply rate in the run's dtype and reports FLOPs / rate: the time the counted work would take at
that rate, a physical floor the measured time can be held against.
"""

from __future__ import annotations

import itertools
import json
import time
from contextlib import nullcontext
from dataclasses import replace

import torch

from ..checkpoint import CheckpointError
from ..config import CONFIGS, check_decoding, get_config
from ..model import build_model
from ..model.localization import propose
from ..model.postprocess import final_detections
from ..model.recognition import box_geometry
from ..model.quantize import QUANTIZE_MODES, quantize_language_model
from ..model.roi import bilinear_roi_features

STAGES = ("backbone", "proposals", "roi_features", "recognition", "language_model")


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def add_arguments(p) -> None:
    p.add_argument("--configs", default="tiny,mobilenet,resnet18,vgg16",
                   help=f"comma-separated configs among {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--checkpoint", help="time this trained checkpoint ('default': the embedded model) instead of "
                   "random weights")
    p.add_argument("--threads", default="2", help="torch CPU threads; a list sweeps them (default 2)")
    p.add_argument("--repeat", type=int, default=5,
                   help="timed runs per row after one warm-up (default 5; 0 with --flops: count only)")
    p.add_argument("--batch", default="1", help="images per forward pass; a list sweeps them (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--image-size", default="",
                   help="long side of the input in pixels (4:3 images); a list sweeps them (default: the config's)")
    p.add_argument("--pre-nms-top-k", default="",
                   help="proposals kept by objectness before RPN NMS, 0 = all anchors (default: the config's)")
    p.add_argument("--num-proposals", default="", help="proposals kept after RPN NMS (default: the config's)")
    p.add_argument("--union-proposals", default="",
                   help="top detections whose pair unions get a second pass, 0 = off (default: the config's)")
    p.add_argument("--beam-size", default="",
                   help="caption by beam search over N prefixes, 1 = greedy; a list sweeps them (default: the "
                        "model's)")
    p.add_argument("--vocab-size", default="1000",
                   help="words in the random model's vocabulary (output layer size; default 1000)")
    p.add_argument("--quantize", default="none",
                   help="none, or int8-lm: dynamic int8 quantisation of the language model's LSTM and Linear "
                        "layers (torch.ao.quantization.quantize_dynamic, CPU only); a list compares them")
    p.add_argument("--half", action="store_true", help="float16 autocast (CUDA only; as the Captioner does there)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format for the convolutions")
    p.add_argument("--flops", action="store_true", help="count the FLOPs of each stage (one pass)")
    p.add_argument("--floor", action="store_true",
                   help="also measure the device's matmul rate and report FLOPs / rate (implies --flops)")
    p.add_argument("--json", action="store_true", help="print one JSON line per row instead of a table")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _stage_fns(model, batch: torch.Tensor, sizes):
    """The five stages as callables sharing state, in order (each one uses what the previous left)."""
    cfg, st = model.config, {}

    def backbone():
        st["feats"], st["roi_feats"] = model.backbone.forward_pair(batch)

    def proposals():
        _, _, scores, boxes = model.localization(st["feats"])
        st["props"] = [propose(boxes[i], scores[i], s, cfg, model.num_proposals, model.rpn_nms_thresh)
                       for i, s in enumerate(sizes)]

    def roi_features():
        feats = st["roi_feats"]
        st["rois"] = torch.cat([bilinear_roi_features(feats[i:i + 1], p, s, model.roi_stride, cfg.roi_size, cfg.roi_mapping)
                                for i, (p, s) in enumerate(zip(st["props"], sizes))])

    def recognition():
        geometry = (torch.cat([box_geometry(p, s) for p, s in zip(st["props"], sizes)])
                    if cfg.box_geometry else None)
        grids = st["rois"] if model.language_model.uses_grid else None
        recognized = (*model.recognition(st["rois"], geometry), grids)
        props = st["props"]
        if model.union_proposals >= 2 or model.union_triples >= 3:  # the second pass (its RoI sampling counts)
            props, recognized = model._add_union_proposals(st["roi_feats"], props, recognized, sizes)
        codes, logits, deltas, grids = recognized
        kept, start = [], 0
        for p, s in zip(props, sizes):
            keep, _, _ = final_detections(p, logits[start:start + len(p)], deltas[start:start + len(p)], s,
                                          model.final_nms_thresh)
            kept.append(start + keep)
            start += len(p)
        kept = torch.cat(kept)
        st["codes"] = codes[kept]
        st["grids"] = None if grids is None else grids[kept]

    def language_model():
        grids = st["grids"]
        model.language_model.decode(st["codes"].float(), None if grids is None else grids.float(),
                                    model.beam_size, model.beam_length_alpha)

    return st, (backbone, proposals, roi_features, recognition, language_model)


@torch.inference_mode()
def time_stages(model, batch: torch.Tensor, sizes, device: torch.device, autocast=None) -> tuple[dict[str, float], int]:
    """One forward pass split into stages; returns (seconds per stage, regions captioned)."""
    st, fns = _stage_fns(model, batch, sizes)
    t = {}
    with autocast or nullcontext():
        for name, fn in zip(STAGES, fns):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            t[name] = time.perf_counter() - t0
    return t, len(st["codes"])


@torch.inference_mode()
def count_flops(model, batch: torch.Tensor, sizes, autocast=None) -> dict[str, int]:
    """FLOPs of each stage for this batch (convolutions and matrix products; see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    _, fns = _stage_fns(model, batch, sizes)
    out = {}
    with autocast or nullcontext():
        for name, fn in zip(STAGES, fns):
            with FlopCounterMode(display=False) as counter:
                fn()
            out[name] = int(counter.get_total_flops())
    return out


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 4096, repeat: int = 10) -> float:
    """The device's measured dense matmul rate in FLOP/s for ``n x n`` matrices of ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        a @ b
    _sync(device)
    return 2 * n ** 3 * repeat / (time.perf_counter() - t0)


def load_model(name: str, checkpoint: str | None, vocab_size: int):
    """A model in eval mode and its config: the checkpoint's, or a seeded random one of config ``name``."""
    if checkpoint:
        from ..checkpoint import load_checkpoint
        ck = load_checkpoint(checkpoint)
        return ck.model.eval(), ck.config
    cfg = get_config(name)
    torch.manual_seed(0)
    return build_model(cfg, vocab_size).eval(), cfg


def benchmark_config(name: str, repeat: int, batch_size: int, device: torch.device, checkpoint: str | None = None, *,
                     image_size: int | None = None, pre_nms_top_k: int | None = None, num_proposals: int | None = None,
                     union_proposals: int | None = None, beam_size: int | None = None, vocab_size: int = 1000,
                     quantize: str = "none",
                     half: bool = False, channels_last: bool = False, flops: bool = False,
                     rate: float | None = None) -> dict:
    """Time one configuration; ``pre_nms_top_k=0`` means all anchors. Returns one row (a dict)."""
    model, cfg = load_model(name, checkpoint, vocab_size)
    test_time = {}  # settings the weights do not depend on
    if image_size:
        test_time["image_size"] = image_size
    if pre_nms_top_k is not None:
        test_time["pre_nms_top_k"] = pre_nms_top_k or None
    if test_time:
        cfg = replace(cfg, **test_time)
        model.config = cfg
    if num_proposals:
        model.num_proposals = num_proposals
    if union_proposals is not None:
        if union_proposals < 0:
            raise ValueError(f"--union-proposals must be 0 (off) or a positive number, not {union_proposals}")
        model.union_proposals = union_proposals
    if beam_size is not None:
        check_decoding(beam_size)
        model.beam_size = beam_size
    if half and device.type != "cuda":
        raise ValueError("--half needs --device cuda (float16 convolutions are slow or missing on CPUs)")
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, not {quantize!r}")
    if quantize != "none" and device.type != "cpu":
        raise ValueError("--quantize int8-lm runs on the CPU only (dynamic quantisation has no CUDA kernels)")
    model = model.to(device)
    if channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    h = int(cfg.image_size * 0.75)  # a 4:3 image at the config's input size
    gen = torch.Generator().manual_seed(1)  # the same images in every row
    images = [torch.randint(0, 255, (3, h, cfg.image_size), dtype=torch.uint8, generator=gen).to(device)
              for _ in range(batch_size)]
    batch, sizes = model.prepare_batch(images)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cuda", dtype=torch.float16) if half else None
    row = {"config": cfg.name, "input": f"{cfg.image_size}x{h}", "batch": batch_size, "device": str(device),
           "threads": torch.get_num_threads(), "half": half, "channels_last": channels_last,
           "pre_nms_top_k": cfg.pre_nms_top_k, "num_proposals": model.num_proposals,
           "union_proposals": model.union_proposals, "beam_size": model.beam_size,
           "vocab_size": model.language_model.vocab_size, "quantize": quantize}
    if device.type == "cuda":
        row["gpu"] = torch.cuda.get_device_name(device)
    if flops or rate:  # counted on the float model: quantised kernels are invisible to the counter
        f = count_flops(model, batch, sizes, autocast)
        row["gflops_per_image"] = round(sum(f.values()) / batch_size / 1e9, 3)
        row["stage_gflops"] = {k: round(v / batch_size / 1e9, 3) for k, v in f.items()}
        if rate:
            row["matmul_tflops"] = round(rate / 1e12, 3)
            row["floor_ms_per_image"] = round(1000 * sum(f.values()) / batch_size / rate, 3)
    if quantize == "int8-lm":
        quantize_language_model(model)
    if repeat <= 0:
        return row
    time_stages(model, batch, sizes, device, autocast)  # warm-up
    totals = {s: 0.0 for s in STAGES}
    regions = 0
    for _ in range(repeat):
        t, regions = time_stages(model, batch, sizes, device, autocast)
        for k, v in t.items():
            totals[k] += v
    per_image_ms = {k: 1000 * v / repeat / batch_size for k, v in totals.items()}
    total = sum(per_image_ms.values())
    row.update({"ms_per_image": round(total, 1), "images_per_s": round(1000 / total, 2),
                "regions_per_image": regions // batch_size,
                "stage_ms": {k: round(v, 1) for k, v in per_image_ms.items()},
                "stage_share": {k: round(v / total, 3) for k, v in per_image_ms.items()}})
    return row


def _print_table(rows: list[dict]) -> None:
    timed = [r for r in rows if "ms_per_image" in r]
    if timed:
        head = f"{'config':<10} {'input':>9} {'thr':>3} {'batch':>5} {'topk':>5} {'union':>5} {'beam':>4} {'vocab':>6} " \
               f"{'quant':>7} " \
               f"{'ms/img':>8} {'img/s':>7} {'regions':>7}  " + "  ".join(f"{s[:12]:>12}" for s in STAGES)
        print(head)
        for r in timed:
            shares = "  ".join(f"{r['stage_ms'][s]:>6.1f} ({100 * r['stage_share'][s]:>2.0f}%)" for s in STAGES)
            print(f"{r['config']:<10} {r['input']:>9} {r['threads']:>3} {r['batch']:>5} {str(r['pre_nms_top_k']):>5} "
                  f"{r['union_proposals']:>5} {r['beam_size']:>4} {str(r['vocab_size']):>6} {r['quantize']:>7} {r['ms_per_image']:>8.1f} "
                  f"{r['images_per_s']:>7.2f} "
                  f"{r['regions_per_image']:>7}  {shares}")
    for r in rows:
        if "gflops_per_image" in r:
            stages = ", ".join(f"{k} {v:g}" for k, v in r["stage_gflops"].items())
            line = f"{r['config']} {r['input']}: {r['gflops_per_image']:g} GFLOPs per image ({stages})"
            if "floor_ms_per_image" in r:
                line += (f"; matmul rate {r['matmul_tflops']:g} TFLOP/s -> floor {r['floor_ms_per_image']:g} ms "
                         "per image")
            print(line)


def run(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("densecap benchmark: --device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return 2
    names = ["checkpoint"] if args.checkpoint else [n.strip() for n in args.configs.split(",") if n.strip()]
    sweep = itertools.product(
        names, _ints(args.threads), _ints(args.batch), _ints(args.image_size) or [None],
        _ints(args.pre_nms_top_k) or [None], _ints(args.num_proposals) or [None],
        _ints(args.union_proposals) or [None], _ints(args.beam_size) or [None], _ints(args.vocab_size) or [1000],
        [q.strip() for q in args.quantize.split(",") if q.strip()])
    rates: dict[torch.dtype, float] = {}
    rows = []
    for name, threads, batch, size, topk, nprop, union, beam, vocab, quant in sweep:
        torch.set_num_threads(threads)
        rate = None
        if args.floor:
            dtype = torch.float16 if args.half else torch.float32
            key = (dtype, threads)
            if key not in rates:
                rates[key] = matmul_rate(device, dtype)
            rate = rates[key]
        try:
            row = benchmark_config(name, args.repeat, batch, device, args.checkpoint, image_size=size,
                                   pre_nms_top_k=topk, num_proposals=nprop, union_proposals=union, beam_size=beam,
                                   vocab_size=vocab, quantize=quant,
                                   half=args.half, channels_last=args.channels_last, flops=args.flops, rate=rate)
        except (ValueError, CheckpointError) as exc:
            print(f"densecap benchmark: {exc}")
            return 2
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if not args.json:
        print(f"device {device}, {args.repeat} runs per row" + (", float16 autocast" if args.half else "") +
              (", channels-last" if args.channels_last else ""))
        _print_table(rows)
    return 0
