"""``densecap synth``: write a synthetic scene dataset in Visual Genome format, and/or a Y4M clip.

    densecap synth --out data/synth --num-images 10000 --seed 0            # images + VG JSON + splits + truth
    densecap synth --video clip.y4m --frames 100 --fps 10 --video-size 320x240   # a moving scene for browsers

Formats and guarantees: ``densecap_core/data/synth.py`` and ``docs/data.md``. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from densecap_core.data.scene import RELATION_CHOICES, RELATION_ORDERS, SceneOptions
from densecap_core.data.synth import SynthOptions, write_dataset, write_video


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 320x240, got {text!r}") from None
    if w <= 0 or h <= 0 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"video sizes must be even and positive (I420), got {w}x{h}")
    return w, h


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", help="output folder for the image dataset")
    parser.add_argument("--num-images", type=int, default=0, help="number of images (with --out)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--image-size", type=int, default=256, help="longer side of each image (default 256)")
    parser.add_argument("--aspect-jitter", type=float, default=0.25,
                        help="shorter side is image-size x U(1-j, 1) (default 0.25; 0 gives squares)")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--min-objects", type=int, default=2)
    parser.add_argument("--max-objects", type=int, default=8)
    defaults = SceneOptions()
    parser.add_argument("--relation-choice", choices=RELATION_CHOICES, default=defaults.relation_choice,
                        help="which describable pairs of unique objects get a relation region: 'near' (every pair "
                             "whose gap is at most half the smaller object's size; default) or 'random' (the "
                             "generators before 2026-11-27: 1..--max-relations pairs drawn at random)")
    parser.add_argument("--relation-probability", type=float, default=None,
                        help=f"with --relation-choice random: chance an image gets relation regions "
                             f"(default {defaults.relation_probability})")
    parser.add_argument("--max-relations", type=int, default=None,
                        help=f"with --relation-choice random: relation regions per image at most "
                             f"(default {defaults.max_relations})")
    parser.add_argument("--group-probability", type=float, default=defaults.group_probability,
                        help=f"chance an image gets a group of 2-4 alike objects "
                             f"(default {defaults.group_probability})")
    parser.add_argument("--relation-order", choices=RELATION_ORDERS, default=defaults.relation_order,
                        help="which object a relation phrase names first: 'reading' (the left or upper one; default) "
                             "or 'random' (the first generator's coin flip)")
    parser.add_argument("--jpeg-quality", type=int, default=92)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes drawing images (output does not depend on it)")
    parser.add_argument("--video", help="also write a Y4M clip of a moving scene here (and PATH.json beside it)")
    parser.add_argument("--frames", type=int, default=100, help="frames in the clip (default 100)")
    parser.add_argument("--fps", type=int, default=10, help="frame rate written in the Y4M header (default 10)")
    parser.add_argument("--video-size", type=_size, default=(320, 240), help="WIDTHxHEIGHT, even (default 320x240)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if not args.out and not args.video:
        print("densecap synth: nothing to do; give --out DIR --num-images N and/or --video PATH.y4m",
              file=sys.stderr)
        return 2
    if args.out:
        if args.num_images <= 0:
            print("densecap synth: --num-images must be at least 1 with --out", file=sys.stderr)
            return 2
        if not 2 <= args.min_objects <= args.max_objects:
            print("densecap synth: need 2 <= --min-objects <= --max-objects", file=sys.stderr)
            return 2
        random_knobs = {k: v for k, v in (("relation_probability", args.relation_probability),
                                          ("max_relations", args.max_relations)) if v is not None}
        if random_knobs and args.relation_choice != "random":
            flags = " and ".join("--" + k.replace("_", "-") for k in random_knobs)
            verb = "apply" if len(random_knobs) > 1 else "applies"
            print(f"densecap synth: {flags} {verb} to --relation-choice random only", file=sys.stderr)
            return 2
        try:
            scene = SceneOptions(min_objects=args.min_objects, max_objects=args.max_objects,
                                 group_probability=args.group_probability, relation_order=args.relation_order,
                                 relation_choice=args.relation_choice, **random_knobs)
        except ValueError as exc:
            print(f"densecap synth: {exc}", file=sys.stderr)
            return 2
        options = SynthOptions(num_images=args.num_images, seed=args.seed, image_size=args.image_size,
                               aspect_jitter=args.aspect_jitter, val_fraction=args.val_fraction,
                               test_fraction=args.test_fraction, jpeg_quality=args.jpeg_quality,
                               workers=max(1, args.workers), scene=scene)
        start = time.perf_counter()
        try:
            summary = write_dataset(args.out, options, progress=not args.quiet)
        except ValueError as exc:
            print(f"densecap synth: {exc}", file=sys.stderr)
            return 2
        seconds = time.perf_counter() - start
        summary["seconds"] = round(seconds, 2)
        summary["images_per_second"] = round(args.num_images / max(seconds, 1e-9), 1)
        print(json.dumps(summary))
    if args.video:
        w, h = args.video_size
        doc = write_video(args.video, frames=args.frames, fps=args.fps, width=w, height=h, seed=args.seed,
                          progress=not args.quiet)
        print(f"wrote {args.video} ({doc['frames']} frames {w}x{h} at {doc['fps']} fps) and its truth JSON")
    return 0
