"""``densecap evaluate``: the dense-captioning mAP (METEOR 1.5) of a checkpoint on a split of an HDF5 dataset.

    densecap evaluate --checkpoint runs/tiny/best.pt --data-h5 data/synth.h5 --data-json data/synth.json \\
        --split test --regions-meta data/synth/regions_meta.json --output runs/tiny/test-metrics.json

Prints mAP and detection mAP x100 (as the original), the per-threshold table and, for synthetic data, caption
exactness. ``--gt-boxes`` captions the truth boxes instead (the paper's GT-box setting: the captioner alone).
``--output`` writes everything as JSON (fractions, not x100). Needs Java 17 for METEOR.
Exit status: 0 done, 1 the model or METEOR failed, 2 bad arguments or missing files.
The metric and its deliberate differences from the original: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import check_decoding


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="model checkpoint (default: the embedded default model)")
    p.add_argument("--data-h5", required=True, help="HDF5 file written by `densecap preprocess`")
    p.add_argument("--data-json", help="its JSON (vocabulary of the labels; default: the .json beside --data-h5)")
    p.add_argument("--split", default="val", choices=("train", "val", "test"), help="default val")
    p.add_argument("--max-images", type=int, default=-1, help="only the first N images of the split (-1: all)")
    p.add_argument("--image-size", type=int, help="resize the long side to this (default: the checkpoint's)")
    p.add_argument("--rpn-nms-thresh", type=float, help="RPN NMS IoU (default: the checkpoint's, 0.7 originally)")
    p.add_argument("--final-nms-thresh", type=float, help="final NMS IoU (default: the checkpoint's, 0.3 originally)")
    p.add_argument("--num-proposals", type=int,
                   help="proposals kept after RPN NMS (default: the checkpoint's; the original's flag was ignored)")
    p.add_argument("--union-proposals", type=int,
                   help="also recognise the union box of every pair among each image's top N detections; 0 = off "
                        "(default: the checkpoint's)")
    p.add_argument("--union-triples", type=int,
                   help="and of every triple among the top N detections; 0 = off (default: the checkpoint's)")
    p.add_argument("--beam-size", type=int,
                   help="caption by beam search over N prefixes; 1 = greedy argmax (default: the checkpoint's)")
    p.add_argument("--beam-length-alpha", type=float,
                   help="with --beam-size > 1: rank finished captions by log p / (words + 1) ** A "
                        "(default: the checkpoint's)")
    p.add_argument("--regions-meta", help="synthetic data: regions_meta.json, to report caption exactness")
    p.add_argument("--exactness-pick", choices=("score", "iou"), default="score",
                   help="which detection at IoU >= 0.5 answers for a region: highest score (default) or best IoU")
    p.add_argument("--gt-boxes", action="store_true",
                   help="caption the ground-truth boxes instead of detecting (the paper's GT-box setting): "
                        "measures the captioner apart from localisation")
    p.add_argument("--box-jitter", type=float, default=0.0, metavar="S",
                   help="with --gt-boxes: caption a random copy of each truth box (seeded), its centre moved and "
                        "sides scaled by up to S of its size (0.1, 0.2, ...): what localisation error costs the "
                        "captioner; the mean IoU of the copies is printed")
    p.add_argument("--lua-compat", action="store_true",
                   help="reproduce the original evaluator exactly (+1 pixel IoU, used[-1], 100-point float grid)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--output", help="write the results as JSON here (e.g. results.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _fail(message: str, code: int) -> int:
    print(f"densecap evaluate: {message}", file=sys.stderr)
    return code


def _data_json(args) -> Path | None:
    if args.data_json:
        return Path(args.data_json)
    beside = Path(args.data_h5).with_suffix(".json")
    return beside if beside.is_file() else None


def run(args: argparse.Namespace) -> int:
    data_json = _data_json(args)
    if args.union_proposals is not None and args.union_proposals < 0:
        return _fail(f"--union-proposals must be 0 (off) or a positive number, not {args.union_proposals}", 2)
    if args.union_triples is not None and args.union_triples < 0:
        return _fail(f"--union-triples must be 0 (off) or a positive number, not {args.union_triples}", 2)
    try:
        check_decoding(args.beam_size, args.beam_length_alpha)
    except ValueError as exc:
        return _fail(f"{exc} (--beam-size, --beam-length-alpha)", 2)
    if args.box_jitter and not args.gt_boxes:
        return _fail("--box-jitter moves the truth boxes of --gt-boxes: pass --gt-boxes too", 2)
    if not 0 <= args.box_jitter < 1:
        return _fail(f"--box-jitter must be in [0, 1), not {args.box_jitter}", 2)
    if not Path(args.data_h5).is_file():
        return _fail(f"{args.data_h5} does not exist (make it with `densecap preprocess`)", 2)
    if data_json is None or not data_json.is_file():
        return _fail(f"no vocabulary JSON for {args.data_h5}: pass --data-json (the --output-json of "
                     "`densecap preprocess`)", 2)
    if args.regions_meta and not Path(args.regions_meta).is_file():
        return _fail(f"{args.regions_meta} does not exist (it is written by `densecap synth`)", 2)

    # Heavy imports only once the arguments are known to be usable.
    import torch

    from ..checkpoint import CheckpointError, load_checkpoint
    from ..data.h5dataset import DenseCapH5Dataset
    from ..data.h5layout import read_idx_to_token
    from ..evaluation.exactness import format_exactness, load_regions_meta
    from ..evaluation.meteor import MeteorError, MeteorScorer
    from ..evaluation.metric import format_results
    from ..evaluation.model_eval import evaluate_model
    from ..inference import resolve_device
    from ..vocab import Vocabulary

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        scorer = MeteorScorer()  # checks for Java before minutes of model work
    except MeteorError as exc:
        return _fail(str(exc), 1)
    try:
        ckpt = load_checkpoint(args.checkpoint, map_location="cpu")
        device = resolve_device(args.device)
    except (CheckpointError, RuntimeError) as exc:
        return _fail(str(exc), 1 if isinstance(exc, CheckpointError) else 2)
    model = ckpt.model.to(device).eval()
    for name in ("rpn_nms_thresh", "final_nms_thresh", "num_proposals", "union_proposals",
                 "union_triples", "beam_size", "beam_length_alpha"):
        if getattr(args, name) is not None:
            setattr(model, name, getattr(args, name))
    image_size = args.image_size or ckpt.config.image_size
    dataset = DenseCapH5Dataset(args.data_h5, args.split)
    if len(dataset) == 0:
        return _fail(f"split {args.split!r} of {args.data_h5} has no images", 2)
    gt_vocab = Vocabulary(read_idx_to_token(data_json))
    regions_meta = load_regions_meta(args.regions_meta) if args.regions_meta else None

    try:
        with scorer:
            scorer.start()  # the JVM warms up (~6 s) while the first images run
            results = evaluate_model(model, ckpt.vocab, dataset, scorer=scorer, image_size=image_size,
                                     max_images=args.max_images, regions_meta=regions_meta, gt_vocab=gt_vocab,
                                     batch_size=args.batch_size, lua_compat=args.lua_compat,
                                     exactness_pick=args.exactness_pick, caption_gt_boxes=args.gt_boxes,
                                     gt_box_jitter=args.box_jitter,
                                     progress=not args.quiet)
    except MeteorError as exc:
        return _fail(str(exc), 1)
    finally:
        dataset.close()

    if args.gt_boxes:
        print("ground-truth boxes captioned (no proposals, no NMS): the figures measure the captioner alone")
    if args.box_jitter:
        print(f"each truth box moved and scaled by up to {args.box_jitter:g} of its size (seeded): mean IoU with "
              f"the truth {results['gt_box_mean_iou']}")
    print(format_results(results))
    if "exactness" in results:
        print(format_exactness(results["exactness"]))
    print(f"model {results['seconds_model']:.1f} s, metric (METEOR) {results['seconds_metric']:.1f} s, "
          f"{results['meteor_pairs']} caption pairs scored")
    if args.output:
        opt = {"checkpoint": args.checkpoint or "(embedded default)", "data_h5": args.data_h5,
               "data_json": str(data_json), "split": args.split, "max_images": args.max_images,
               "image_size": image_size, "rpn_nms_thresh": model.rpn_nms_thresh,
               "final_nms_thresh": model.final_nms_thresh, "num_proposals": model.num_proposals,
               "union_proposals": model.union_proposals, "union_triples": model.union_triples,
               "beam_size": model.beam_size, "beam_length_alpha": model.beam_length_alpha,
               "lua_compat": args.lua_compat, "gt_boxes": args.gt_boxes, "box_jitter": args.box_jitter,
               "exactness_pick": "iou" if args.gt_boxes else args.exactness_pick, "device": str(device)}
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"results": results, "opt": opt}, indent=1) + "\n")
        print(f"wrote {out}")
    return 0
