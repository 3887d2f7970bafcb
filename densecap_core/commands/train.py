"""``densecap train``: train a model on a preprocessed HDF5 dataset (CPU or CUDA).

    densecap synth --out data/synth --num-images 12000 --image-size 320 --seed 1
    densecap preprocess --region-data data/synth/region_descriptions.json --image-data data/synth/image_data.json \\
        --splits data/synth/densecap_splits.json --image-dir data/synth/images --image-size 320 \\
        --min-token-instances 1 --output-h5 data/synth.h5 --output-json data/synth.json
    densecap train --data-h5 data/synth.h5 --data-json data/synth.json --config tiny --out runs/tiny \\
        --minutes 60 --regions-meta data/synth/regions_meta.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ..config import CONFIGS, get_config, parse_overrides
from ..model.densecap import COUNT_WORD_VALUES
from ..training import PRECISIONS, TrainOptions, train
from ..vocab import Vocabulary


def add_arguments(p) -> None:
    p.add_argument("--data-h5", required=True, help="HDF5 file written by `densecap preprocess`")
    p.add_argument("--data-json", required=True, help="its JSON (vocabulary, file names)")
    p.add_argument("--config", choices=sorted(CONFIGS), help="model config (default tiny; not with --init)")
    p.add_argument("--image-size", type=int, help="override the config's input size (long side)")
    p.add_argument("--set", dest="overrides", action="append", metavar="FIELD=VALUE",
                   help="override a config field (JSON value; repeatable), e.g. --set stride=8 "
                        "--set final_nms_thresh=0.5; the checkpoint records the config it trained")
    p.add_argument("--late-set", dest="late_overrides", action="append", metavar="FIELD=VALUE",
                   help="switch a training-step field (extra RoIs, sampling, loss weights; repeatable) to this "
                        "value once the run is --late-from of the way through its schedule, e.g. "
                        "--late-set train_union_rois=16; the checkpoint keeps the config it started with")
    p.add_argument("--late-from", type=float, default=0.7, help="fraction of the schedule (iterations or "
                   "--minutes, whichever ends it first; as the learning rate's) after which --late-set applies "
                   "(default 0.7)")
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, curves.png")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from train_state.pt")
    p.add_argument("--init", metavar="CHECKPOINT", help="start from this checkpoint's weights and config (--set "
                   "still applies; --config is not used): fine-tuning. Its vocabulary must be the data's; "
                   "'default' is the embedded model")
    p.add_argument("--iterations", type=int, default=20000, help="optimiser steps (default 20000)")
    p.add_argument("--minutes", type=float, help="stop after this many minutes (validates and saves first)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--val-every", type=int, default=2000, help="iterations between validations (0: only at the end)")
    p.add_argument("--val-images", type=int, default=200)
    p.add_argument("--regions-meta", help="synthetic data: regions_meta.json, to report caption exactness")
    p.add_argument("--no-meteor", action="store_true", help="validate without Java: METEOR scored as 0 "
                   "(detection mAP stays exact; caption mAP is then meaningless)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--preload", action="store_true", help="read the training split into memory (on the device) "
                   "once before training: for a GPU, where HDF5 reads would otherwise be the bottleneck")
    p.add_argument("--no-channels-last", action="store_true", help="train on the CPU in the plain NCHW memory "
                   "layout (channels-last, the default, has faster convolutions; results are the same up to rounding)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="arithmetic of the training step "
                   "(default fp32, which made the shipped model): bf16 runs it under bfloat16 autocast (weights, "
                   "optimizer state and losses stay float32; 1.5-1.7x a step on a CPU with native bfloat16 "
                   "kernels, about the same model in the same minutes: docs/default-model.md); auto picks bf16 on "
                   "such a CPU (AVX512-BF16/AMX) and fp32 elsewhere, CUDA included")
    p.add_argument("--keep-denormals", action="store_true", help="do not flush subnormal floats to zero while "
                   "training on the CPU (flushing, the default, avoids their slow path late in a run)")
    p.add_argument("--captioner-only", action="store_true", help="a captioner stage after a full run (needs "
                   "--init): train the language model alone on each image's truth boxes and the copies the config "
                   "adds (train_gt_rois, train_union_rois, train_loose_rois), with the trunk, RPN and recognition "
                   "head frozen, so detection stays exactly as it was; several times the caption samples a second "
                   "of a full step (docs/model.md)")
    p.add_argument("--max-train-images", type=int, help="use only the first N training images (debugging)")


class _ZeroScorer:
    def score(self, pairs):
        return [0.0 for _ in pairs]


def _load_init(path: str, vocab: Vocabulary):
    """The checkpoint ``--init`` names, refused (ValueError) unless its vocabulary is the data's: word ids index
    the language model's embedding and output rows, so another vocabulary would train the wrong words."""
    from ..checkpoint import CheckpointError, load_checkpoint

    try:
        ck = load_checkpoint(path, map_location="cpu")
    except CheckpointError as exc:
        raise ValueError(f"--init: {exc}") from None
    if ck.vocab.to_list() != vocab.to_list():
        raise ValueError(f"--init: {path} has a vocabulary of {len(ck.vocab)} words that differs from the data's "
                         f"({len(vocab)} words); fine-tune on data preprocessed with the same vocabulary")
    return ck


def run(args) -> int:
    from ..data.h5dataset import DenseCapH5Dataset
    from ..evaluation.model_eval import evaluate_model
    from ..inference import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    for path in (args.data_h5, args.data_json):
        if not Path(path).is_file():
            print(f"densecap train: {path} does not exist (make it with `densecap preprocess`)", file=sys.stderr)
            return 2
    meta = json.loads(Path(args.data_json).read_text())
    idx_to_token = meta["idx_to_token"]
    vocab = Vocabulary([idx_to_token[str(i)] for i in range(1, len(idx_to_token) + 1)])
    init = None
    try:
        overrides = parse_overrides(args.overrides)
        late_overrides = parse_overrides(args.late_overrides)
        if not 0 <= args.late_from <= 1:
            raise ValueError(f"--late-from {args.late_from}: a fraction of the schedule, 0 to 1")
        if args.init and args.config:
            raise ValueError(f"--init takes the model config from {args.init}: leave out --config {args.config} "
                             "(change single fields with --set)")
        if args.captioner_only and not args.init:
            raise ValueError("--captioner-only trains the captioner of a trained model: name it with --init")
        if args.init:
            init = _load_init(args.init, vocab)
            config = init.config.with_overrides(image_size=args.image_size, **overrides)
        else:
            config = get_config(args.config or "tiny", image_size=args.image_size, **overrides)
        try:  # a field of the network, or a bad value (train_union_negatives=x), is refused before any work
            late_config = config.with_training_step(**late_overrides)
        except ValueError as exc:
            raise ValueError(f"--late-set {exc}") from None
        missing = sorted({w for c in (config, late_config) for w in c.upweighted_words_missing(vocab.token_to_idx)})
        if missing:
            raise ValueError(f"caption_upweight_words: {', '.join(missing)} not in the data's vocabulary "
                             f"({args.data_json})")
        if config.count_head and not set(COUNT_WORD_VALUES) & set(vocab.token_to_idx):
            raise ValueError(f"count_head: the data's vocabulary ({args.data_json}) has no count word "
                             f"({', '.join(COUNT_WORD_VALUES)}), so every region would count one")
    except (ValueError, TypeError) as exc:
        print(f"densecap train: {exc}", file=sys.stderr)
        return 2
    train_set = DenseCapH5Dataset(args.data_h5, "train")
    if args.max_train_images:
        train_set = torch.utils.data.Subset(train_set, range(min(args.max_train_images, len(train_set))))
    val_set = DenseCapH5Dataset(args.data_h5, "val")
    regions_meta = None
    if args.regions_meta:
        from ..evaluation.exactness import load_regions_meta
        regions_meta = load_regions_meta(args.regions_meta)
    device = resolve_device(args.device)
    scorer = None

    def validate(model, it):
        nonlocal scorer
        if scorer is None:
            if args.no_meteor:
                scorer = _ZeroScorer()
            else:
                from ..evaluation.meteor import MeteorScorer
                scorer = MeteorScorer()
        t0 = time.monotonic()
        result = evaluate_model(model, vocab, val_set, image_size=config.image_size, scorer=scorer,
                                max_images=args.val_images, regions_meta=regions_meta, progress=False)
        keep = {k: result[k] for k in ("map", "detmap") if k in result}
        if "exactness" in result:
            keep["exactness"] = {k: v.get("exact") for k, v in result["exactness"].items()}
        keep["seconds"] = round(time.monotonic() - t0, 1)
        print(f"\n[val @ {it}] mAP {100 * keep['map']:.2f}  detection mAP {100 * keep['detmap']:.2f}"
              + (f"  exact {keep['exactness']}" if "exactness" in keep else ""), file=sys.stderr)
        return keep

    opts = TrainOptions(out=Path(args.out), iterations=args.iterations, time_budget_min=args.minutes,
                        batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, val_every=args.val_every,
                        val_images=args.val_images, seed=args.seed, device=str(device),
                        preload=args.preload, channels_last=not args.no_channels_last,
                        flush_denormal=not args.keep_denormals, precision=args.precision,
                        late_overrides=late_overrides, late_from=args.late_from,
                        captioner_only=args.captioner_only)
    card = {"dataset": str(Path(args.data_h5).name), "train_images": len(train_set), "seed": args.seed,
            "image_size": config.image_size, "vocab_size": len(vocab),
            "command": "densecap train " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "densecap train",
            "device": str(device), "threads": torch.get_num_threads()}
    if init is not None:
        from ..model import build_model

        try:  # a --set that changes a layer's shape cannot start from these weights
            build_model(config, len(vocab)).load_init_state(init.model.state_dict())
        except RuntimeError as exc:
            print(f"densecap train: --init: {args.init}'s weights do not fit the model the --set options make: "
                  f"{str(exc).splitlines()[0]} ...", file=sys.stderr)
            return 2
        card["init_from"] = args.init
    try:
        summary = train(config, vocab, train_set, opts, validate=validate, resume=args.resume, card=card,
                        init_state=init.model.state_dict() if init is not None else None)
    finally:
        if scorer is not None and hasattr(scorer, "close"):
            scorer.close()
    print(json.dumps({k: v for k, v in summary.items()}, default=str))
    return 0
