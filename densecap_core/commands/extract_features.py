"""``densecap extract-features``: the region codes of each image's top boxes, to one HDF5 file (the original
``extract_features.lua``), for retrieval, clustering or a model of your own on top of DenseCap's regions.

    densecap extract-features --input-txt images.txt --output-h5 feats.h5              # one path per line
    densecap extract-features --input-dir photos/ --output-h5 feats.h5 --boxes-per-image 50 --dtype float16

For image i and its k-th region (descending score; docs/formats.md, *Region features*):

- ``feats[i, k]``: the region code the language model captions from (the recognition head's output: ``fc_dim``
  values, 4096 for ``vgg16`` and a converted original model), of the proposal the final box was regressed
  from, as the original wrote;
- ``boxes[i, k]``: ``[x, y, w, h]`` in pixels of the image as given (the original: of the resized image;
  ``scales[i]`` maps between them), ``scores[i, k]``, ``captions[i, k]``;
- ``num_boxes[i]``: how many rows are real. An image with fewer detections than ``--boxes-per-image`` has zero
  rows after them (the original crashed), an unreadable one has none and its reason in ``errors[i]``.

The file is written as ``OUT.partial`` and renamed when every image is done: an interrupted run leaves the
partial file (``attrs["images_done"]`` says how far it got), never a short file under the final name.
Exit status: 0 every image done, 1 some unreadable (reported, rows empty), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from densecap_core.commands.caption import (UsageError, _load_captioner, _positive_int, add_input_arguments,
                                            add_model_arguments, batches, list_inputs, run_on_inputs)
from densecap_core.schema import ImageResult

BOX_FRAME = ("boxes are [x, y, w, h], 0-indexed, in pixels of the input image (after EXIF rotation); "
             "multiply by scales[i] for the pixels of the resized image the model saw (the original's frame)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Exit status: 0 all done, 1 some inputs unreadable (reported, rows left empty), 2 usage error."
    add_input_arguments(parser, "read")
    add_model_arguments(parser)
    parser.add_argument("--max-images", type=_positive_int, default=None, metavar="N",
                        help="at most this many inputs (default: all)")
    out = parser.add_argument_group("output")
    out.add_argument("--output-h5", type=Path, required=True, metavar="FILE", help="the HDF5 file to write")
    out.add_argument("--boxes-per-image", type=_positive_int, default=100, metavar="K",
                     help="regions kept per image, best first (100, as the original)")
    out.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                     help="storage type of feats (float16 halves the file)")


class FeatureFile:
    """The HDF5 output, written row by row into ``OUT.partial`` and renamed by ``finish``."""

    def __init__(self, path: Path, paths: list[Path], k: int, dim: int, dtype: str, opt: dict):
        import h5py

        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.partial = path, path.with_name(path.name + ".partial")
        n, text = len(paths), h5py.string_dtype()
        self.h5 = h5py.File(self.partial, "w")
        self.feats = self.h5.create_dataset("feats", (n, k, dim), dtype=dtype, chunks=(1, k, dim), fillvalue=0)
        self.boxes = self.h5.create_dataset("boxes", (n, k, 4), dtype="float32", fillvalue=0)
        self.scores = self.h5.create_dataset("scores", (n, k), dtype="float32", fillvalue=0)
        self.captions = self.h5.create_dataset("captions", (n, k), dtype=text)
        self.num_boxes = self.h5.create_dataset("num_boxes", (n,), dtype="int32", fillvalue=0)
        self.image_sizes = self.h5.create_dataset("image_sizes", (n, 2), dtype="int32", fillvalue=0)
        self.scales = self.h5.create_dataset("scales", (n,), dtype="float32", fillvalue=0)
        self.errors = self.h5.create_dataset("errors", (n,), dtype=text)
        self.h5.create_dataset("paths", data=[str(p) for p in paths], dtype=text)
        self.h5.attrs.update({"opt": json.dumps(opt), "box_frame": BOX_FRAME, "boxes_per_image": k,
                              "code_dim": dim, "images_done": 0})
        self.k = k

    def put(self, i: int, result: ImageResult, codes: np.ndarray | None, image_size: int) -> None:
        """Row ``i``: ``result``'s first ``k`` regions (already in descending score) and their codes."""
        if not result.ok or codes is None:
            self.errors[i] = result.error or "no result"
        else:
            n = min(self.k, len(result.regions))
            regions = result.regions[:n]
            self.num_boxes[i] = n
            self.image_sizes[i] = (result.width, result.height)
            self.scales[i] = image_size / max(result.width, result.height)
            if n:
                self.feats[i, :n] = codes[:n]
                self.boxes[i, :n] = np.asarray([r.box for r in regions], dtype=np.float32)
                self.scores[i, :n] = np.asarray([r.score for r in regions], dtype=np.float32)
                self.captions[i, :n] = [r.caption for r in regions]
        self.h5.attrs["images_done"] = i + 1

    def finish(self) -> None:
        self.h5.close()
        os.replace(self.partial, self.path)

    def abandon(self) -> None:
        self.h5.flush()
        self.h5.close()


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from densecap_core.settings import Settings

    settings = Settings.from_env()
    try:
        inputs = list_inputs(args)
        if args.output_h5.is_dir():
            raise UsageError(f"--output-h5 {args.output_h5} is a folder; give a file name")
        captioner = _load_captioner(args, settings)
    except UsageError as exc:
        print(f"densecap extract-features: {exc}", file=sys.stderr)
        return 2
    opt = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, **captioner.settings}
    out = FeatureFile(args.output_h5, inputs, args.boxes_per_image, captioner.config.fc_dim, args.dtype, opt)
    failed, started, i = 0, time.perf_counter(), 0
    try:
        with tqdm(total=len(inputs), unit="image", file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
            for batch in batches(inputs, captioner.batch_size):
                for result, codes in run_on_inputs(batch, settings.max_image_pixels, captioner.region_codes):
                    if codes is None:
                        failed += 1
                        tqdm.write(f"densecap extract-features: skipped {result.error}", file=sys.stderr)
                    out.put(i, result, codes, captioner.image_size)
                    i += 1
                    bar.update(1)
    except BaseException:
        out.abandon()
        print(f"densecap extract-features: stopped after {i} of {len(inputs)} images; what was done is in "
              f"{out.partial}", file=sys.stderr)
        raise
    out.finish()
    elapsed = time.perf_counter() - started
    print(f"densecap extract-features: {len(inputs) - failed} of {len(inputs)} images in {elapsed:.2f} s, "
          f"up to {args.boxes_per_image} regions each, codes of {captioner.config.fc_dim} values, in "
          f"{args.output_h5}" + (f"; {failed} could not be read (see above)" if failed else ""), file=sys.stderr)
    return 1 if failed else 0
