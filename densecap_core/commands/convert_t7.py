"""``densecap convert-t7``: convert the original DenseCap Torch7 checkpoint into a densecap-live checkpoint.

    densecap convert-t7 densecap-pretrained-vgg16.t7 densecap-vgg16.pt
    densecap caption --checkpoint densecap-vgg16.pt --input-image photo.jpg
    export DENSECAP_CHECKPOINT=$PWD/densecap-vgg16.pt             # the stream and job workers load it

The .t7 comes from the original repository's scripts/download_pretrained_model.sh (a 1.1 GB zip; unzip it).
Exit status: 0 converted, 1 the input cannot be converted or the output exists (the message says why),
2 usage errors. docs/convert-t7.md describes the mapping.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("input", type=Path, metavar="IN.t7", help="the original checkpoint (densecap-pretrained-vgg16.t7)")
    p.add_argument("output", type=Path, metavar="OUT.pt", help="where to write the converted checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite OUT.pt if it exists")
    p.add_argument("--half", action="store_true",
                   help="store weights as float16 (half the file size; loaded back as float32, outputs change "
                        "slightly)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes, only errors")


def run(args) -> int:
    from ..convert_t7 import ConversionError, convert_t7

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr)

    t0 = time.perf_counter()
    try:
        result = convert_t7(args.input, args.output, force=args.force, half=args.half, progress=not args.quiet,
                            log=log)
    except ConversionError as exc:
        print(f"densecap convert-t7: error: {exc}", file=sys.stderr)
        return 1
    size_mb = result.path.stat().st_size / 1e6
    print(f"wrote {result.path} ({size_mb:.1f} MB, {result.vocab_size} words, config {result.config.name}) "
          f"in {time.perf_counter() - t0:.1f} s")
    log(f"try: densecap caption --checkpoint {result.path} --input-image IMAGE")
    return 0
