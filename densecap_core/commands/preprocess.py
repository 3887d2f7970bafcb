"""``densecap preprocess``: Visual Genome format (regions, images, splits) -> one HDF5 file + vocabulary JSON.

    densecap preprocess --region-data VG/region_descriptions.json --image-data VG/image_data.json \\
        --splits info/densecap_splits.json --image-dir VG/VG_100K --image-dir VG/VG_100K_2 \\
        --output-h5 data/VG-regions.h5 --output-json data/VG-regions-dicts.json

Decisions against the original ``preprocess.py``: ``densecap_core/data/preprocess.py`` and ``docs/data.md``.
Exit status: 0 on success (skipped images are listed, not fatal), 1 when nothing usable remains or captions
use words outside a given vocabulary (`--vocab-from`), 2 when that vocabulary cannot be read.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from densecap_core.data import h5layout
from densecap_core.data.preprocess import PreprocessError, PreprocessOptions, preprocess


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--region-data", required=True, help="region_descriptions.json (VG format)")
    parser.add_argument("--image-data", help="image_data.json (sizes the boxes were drawn on; optional)")
    parser.add_argument("--splits", required=True, help="densecap_splits.json: {train, val, test: [image ids]}")
    parser.add_argument("--image-dir", action="append", required=True,
                        help="folder of <image_id>.jpg; repeat for VG_100K and VG_100K_2 (first match wins)")
    parser.add_argument("--output-h5", required=True)
    parser.add_argument("--output-json", required=True)
    parser.add_argument("--image-size", type=int, default=720, help="longer side after resizing (default 720)")
    parser.add_argument("--max-token-length", type=int, default=15, help="drop longer captions; 0 keeps all")
    parser.add_argument("--min-token-instances", type=int, default=15,
                        help="rarer words become <UNK> (default 15)")
    parser.add_argument("--vocab-splits", default="train",
                        help="splits whose captions count for the vocabulary (default train; the original "
                             "used train,val,test)")
    parser.add_argument("--vocab-from", metavar="FILE",
                        help="encode the captions with an existing vocabulary, in its order, instead of counting "
                             "them: a preprocess JSON, a checkpoint, or 'default' (the embedded model), so that "
                             "model can be fine-tuned on this data (`densecap train --init`). Captions with words "
                             "outside it are refused unless it has <UNK>")
    parser.add_argument("--max-images", type=int, default=-1, help="only the first N images by id (-1: all)")
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="image decoding processes")
    parser.add_argument("--compression", choices=("none", "lzf", "gzip"), default="none",
                        help="compress the images dataset (lzf is fast; default none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def load_vocabulary(source: str) -> tuple[str, ...]:
    """The words, in order, of a preprocess JSON (``idx_to_token``), a checkpoint file or ``default``."""
    path = Path(source)
    if source != "default" and not path.is_file():
        raise PreprocessError(f"--vocab-from {source}: no such file")
    if source == "default" or path.suffix in (".pt", ".pth"):
        from ..checkpoint import CheckpointError, load_checkpoint

        try:
            return tuple(load_checkpoint(source, map_location="cpu").vocab.to_list())
        except CheckpointError as exc:
            raise PreprocessError(f"--vocab-from {source}: {exc}") from None
    try:
        return tuple(h5layout.read_idx_to_token(path))
    except (ValueError, KeyError, TypeError):
        raise PreprocessError(f"--vocab-from {source}: not a preprocess JSON (no idx_to_token numbered 1..N) "
                              "and not a checkpoint (.pt)") from None


def run(args: argparse.Namespace) -> int:
    try:
        vocabulary = load_vocabulary(args.vocab_from) if args.vocab_from else None
    except PreprocessError as exc:
        print(f"densecap preprocess: {exc}", file=sys.stderr)
        return 2
    options = PreprocessOptions(vocabulary=vocabulary,
        image_size=args.image_size, max_token_length=args.max_token_length,
        min_token_instances=args.min_token_instances, max_images=args.max_images,
        num_workers=max(1, args.num_workers),
        vocab_splits=tuple(s.strip() for s in args.vocab_splits.split(",") if s.strip()),
        compression=None if args.compression == "none" else args.compression)
    start = time.perf_counter()
    try:
        report = preprocess(args.region_data, args.splits, args.image_dir, args.output_h5, args.output_json,
                            image_json=args.image_data, options=options, progress=not args.quiet)
    except PreprocessError as exc:
        print(f"densecap preprocess: {exc}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    skipped = len(report.missing) + len(report.bad)
    print(f"skipped images: {skipped}; wrote {args.output_h5} and {args.output_json} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0
