"""``densecap caption``: caption one image or a folder (the original ``run_model.lua``).

    densecap caption --input-image tests/data/elephant.jpg                 # top captions, printed
    densecap caption --input-dir photos/ --output-vis-dir out/vis          # then: densecap view out/vis
    densecap caption --input-dir photos/ --output-dir out/drawn --json > photos.json
    densecap caption --input-txt images.txt --output-vis-dir out/vis          # one path per line

Outputs and their coordinate frames (docs/formats.md has the details):

- ``--output-vis-dir DIR``: ``DIR/results.json`` in the original viewer format plus each image resized so its
  long side is ``--image-size`` (as the original saved it). Boxes in results.json are in pixels of *that saved
  image*, so the viewer and old tools draw them as they are.
- ``--output-dir DIR``: each image at its original resolution with the top boxes and captions drawn in,
  under its own file name.
- ``--json``: one JSON document on stdout with boxes in pixels of the *original* image (the API's frame).
- neither: a short summary per image (its top five captions) on stdout.

Exit status: 0 when every input was captioned, 1 when some inputs could not be read (each is reported on
stderr and skipped; the others still run and are written), 2 for usage errors (no input, a missing path, no
checkpoint, an output folder that would overwrite the inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from densecap_core.schema import ImageResult, Region, viewer_document

RESULTS_JSON = "results.json"
#: ``--box-width`` and ``--text-size`` mean pixels on an image of this long side: the original drew on the
#: image resized to 720 px. Larger images get proportionally thicker lines and bigger text.
DRAW_REFERENCE_SIDE = 720
SUMMARY_TOP = 5
#: How often a long run rewrites results.json, so an interrupted run still leaves the images done so far.
RESULTS_FLUSH_S = 30.0
BOX_FRAME_NOTE = ("boxes are [x, y, w, h], 0-indexed, in pixels of the image file img_name beside this "
                  "results.json (resized so its long side is image_size); original_size is [width, height] of "
                  "the input: multiply x and w by original width / saved width, y and h by original height / "
                  "saved height to map back")


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError("use auto, cpu, cuda or cuda:N")
    return value


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return number


def _nonneg_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be 0 or a positive integer")
    return number


def _nonneg_float(value: str) -> float:
    number = float(value)
    if not number >= 0.0:  # also refuses nan
        raise argparse.ArgumentTypeError("must be 0 or more")
    return number


def _unit_float(value: str) -> float:
    number = float(value)
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError("must be in (0, 1]")
    return number


def add_input_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    """One of --input-image, --input-dir, --input-txt, for a command that will ``verb`` them (``list_inputs``)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input-image", type=Path, metavar="PATH", help=f"one image to {verb}")
    source.add_argument("--input-dir", type=Path, metavar="DIR",
                        help=f"{verb} every file in this folder whose name does not start with '.', in sorted order")
    source.add_argument("--input-txt", type=Path, metavar="FILE",
                        help=f"{verb} the images a text file lists, one path per line (the original's -input_txt)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model flags of every command that runs the model on images (caption, extract-features)."""
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", default=None, metavar="PATH",
                       help="checkpoint file (default: $DENSECAP_CHECKPOINT, else the embedded default model)")
    model.add_argument("--image-size", type=_positive_int, default=None, metavar="PX",
                       help="long side the image is resized to before the model (default: the checkpoint's; "
                            "the original used 720)")
    model.add_argument("--rpn-nms-thresh", type=_unit_float, default=None, metavar="IOU",
                       help="NMS IoU threshold on proposals (default: the checkpoint's; original 0.7)")
    model.add_argument("--final-nms-thresh", type=_unit_float, default=None, metavar="IOU",
                       help="NMS IoU threshold on final boxes (default: the checkpoint's; original 0.3)")
    model.add_argument("--num-proposals", type=_positive_int, default=None, metavar="N",
                       help="proposals kept after the RPN (default: the checkpoint's; original 1000)")
    model.add_argument("--union-proposals", type=_nonneg_int, default=None, metavar="N",
                       help="also recognise the union box of every pair among the top N detections (relations); "
                            "0 = off (default: the checkpoint's)")
    model.add_argument("--beam-size", type=_positive_int, default=None, metavar="N",
                       help="caption by beam search over N prefixes; 1 = greedy argmax, the original "
                            "(default: the checkpoint's)")
    model.add_argument("--beam-length-alpha", type=_nonneg_float, default=None, metavar="A",
                       help="with --beam-size > 1: rank finished captions by log p / (words + 1) ** A "
                            "(default: the checkpoint's)")
    model.add_argument("--device", type=_device, default=None, metavar="DEVICE",
                       help="auto (CUDA if present), cpu, cuda or cuda:N (default: $DENSECAP_DEVICE or auto)")
    model.add_argument("--batch-size", type=_positive_int, default=None, metavar="N",
                       help="images per forward pass (default: $DENSECAP_BATCH_SIZE or 8)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Exit status: 0 all captioned, 1 some inputs unreadable (reported, skipped), 2 usage error. "
                     "results.json boxes are in pixels of the saved, resized image; --json boxes are in pixels "
                     "of the original image (docs/formats.md).")
    add_input_arguments(parser, "caption")
    add_model_arguments(parser)
    parser.add_argument("--max-images", type=_positive_int, default=None, metavar="N",
                        help="caption at most this many inputs (default: all; the original stopped at 100)")
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", type=Path, default=None, metavar="DIR",
                     help="write each image with its boxes and captions drawn in, under the same file name")
    out.add_argument("--num-to-draw", type=int, default=10, metavar="N", help="boxes drawn per image in --output-dir (10)")
    out.add_argument("--box-width", type=_positive_int, default=2, metavar="PX",
                     help="box line width in pixels of a 720 px image (2); thicker on larger images")
    out.add_argument("--text-size", type=float, default=2, metavar="SIZE",
                     help="caption size as in the original (2 ~ 16 px text on a 720 px image)")
    out.add_argument("--output-vis-dir", type=Path, default=None, metavar="DIR",
                     help="write results.json and resized images for the viewer (`densecap view DIR`)")
    out.add_argument("--json", action="store_true",
                     help="print all results as one JSON document on stdout (boxes in original image pixels)")


# --- inputs ------------------------------------------------------------------------------------------------

class UsageError(Exception):
    """A mistake in the command line; the message says how to fix it (exit status 2)."""


def list_inputs(args: argparse.Namespace) -> list[Path]:
    """The files to caption, in order, limited by ``--max-images``. ``--input-txt`` lists one path per line;
    its paths are not checked here: a missing one is reported like an unreadable image."""
    if args.input_txt is not None:
        try:
            lines = args.input_txt.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--input-txt {args.input_txt}: cannot read it ({exc})") from exc
        paths = [Path(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not paths:
            raise UsageError(f"--input-txt {args.input_txt}: lists no images (one path per line; '#' comments)")
    elif args.input_image is not None:
        if not args.input_image.is_file():
            raise UsageError(f"--input-image {args.input_image}: no such file")
        paths = [args.input_image]
    else:
        folder = args.input_dir
        if not folder.is_dir():
            raise UsageError(f"--input-dir {folder}: no such folder")
        # Sorted, unlike the original's paths.files order, so runs are reproducible.
        paths = [folder / name for name in sorted(os.listdir(folder))
                 if not name.startswith(".") and (folder / name).is_file()]
        if not paths:
            raise UsageError(f"--input-dir {folder}: no files to caption (names starting with '.' are skipped)")
    return paths[:args.max_images] if args.max_images else paths


def check_outputs(args: argparse.Namespace, inputs: list[Path]) -> None:
    """Refuse output folders that would overwrite an input (same file name in the same folder)."""
    input_folders = {p.resolve().parent for p in inputs}
    for flag, folder in (("--output-dir", args.output_dir), ("--output-vis-dir", args.output_vis_dir)):
        if folder is not None and folder.resolve() in input_folders:
            raise UsageError(f"{flag} {folder} is the folder of the input images and would overwrite them; "
                             "choose another folder")
        if folder is not None and folder.exists() and not folder.is_dir():
            raise UsageError(f"{flag} {folder} exists and is not a folder")
    if args.output_dir and args.output_vis_dir and args.output_dir.resolve() == args.output_vis_dir.resolve():
        raise UsageError("--output-dir and --output-vis-dir must differ: the drawn images would replace the "
                         "viewer's resized ones")


def batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --- outputs -----------------------------------------------------------------------------------------------

def _temp_file(folder: Path, name: str) -> tuple[int, str]:
    """A new hidden temporary file beside ``folder/name``. Unlike ``mkstemp`` (0600) it gets the usual
    permissions (0666 minus the umask), which the renamed result keeps."""
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue


def write_json_atomic(path: Path, document: Any) -> None:
    """Write JSON to ``path`` via a temporary file and a rename, so readers never see half a file."""
    fd, tmp = _temp_file(path.parent, path.name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_image_atomic(image: Image.Image, folder: Path, name: str) -> str:
    """Save ``image`` as ``folder/name`` in the format its extension names; returns the file name used.

    A name whose extension Pillow cannot write (or has none) gets ``.jpg`` appended.
    """
    Image.init()
    fmt = Image.registered_extensions().get(Path(name).suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        name, fmt = name + ".jpg", "JPEG"
    options = {"quality": 92} if fmt == "JPEG" else {}
    fd, tmp = _temp_file(folder, name)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format=fmt, **options)
        os.replace(tmp, folder / name)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return name


def clip_record(record: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    """Clip a viewer record's boxes to a ``width`` x ``height`` image (scaling can overshoot by rounding)."""
    clipped = []
    for x, y, w, h in record["boxes"]:
        x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        clipped.append([round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)])
    return {**record, "boxes": clipped}


def in_saved_frame(result: ImageResult, width: int, height: int) -> ImageResult:
    """``result`` with boxes mapped from the original image's pixels to a ``width`` x ``height`` resize of it.

    Per axis: rounding the resized size makes the two scales differ slightly, and the saved image is exactly
    what the model saw, so its boxes must line up with it.
    """
    sx, sy = width / result.width, height / result.height
    regions = [Region((r.box[0] * sx, r.box[1] * sy, r.box[2] * sx, r.box[3] * sy), r.caption, r.score)
               for r in result.regions]
    return ImageResult(result.name, width, height, regions)


class VisWriter:
    """Collects viewer records and keeps ``DIR/results.json`` current (rewritten atomically)."""

    def __init__(self, folder: Path, opt: dict[str, Any]):
        self.folder, self.opt = folder, opt
        self.records: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()

    def add(self, result: ImageResult, pil: Image.Image, image_size: int, resize) -> None:
        saved = resize(pil, image_size)
        img_name = save_image_atomic(saved, self.folder, Path(result.name).name)
        record = clip_record(in_saved_frame(result, *saved.size).to_viewer_record(img_name=img_name), *saved.size)
        record["original_size"] = [result.width, result.height]
        self.records.append(record)
        if time.monotonic() - self.last_flush > RESULTS_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        write_json_atomic(self.folder / RESULTS_JSON, viewer_document(self.records, self.opt))
        self.last_flush = time.monotonic()


def draw_into(result: ImageResult, pil: Image.Image, args: argparse.Namespace) -> None:
    """Write ``pil`` at its own resolution with boxes drawn, lines and text scaled as on a 720 px image."""
    from densecap_core.render import draw_regions

    factor = max(1.0, max(pil.size) / DRAW_REFERENCE_SIDE)
    drawn = draw_regions(pil, result.regions, num_to_draw=args.num_to_draw,
                         box_width=max(1, round(args.box_width * factor)), text_size=args.text_size * factor)
    save_image_atomic(drawn, args.output_dir, Path(result.name).name)


def summary_lines(result: ImageResult) -> list[str]:
    lines = [f"{result.name} ({result.width}x{result.height}): {len(result.regions)} regions"]
    lines += [f"  {r.score:8.3f}  {r.caption}" for r in result.top(SUMMARY_TOP)]
    return lines


# --- the command -------------------------------------------------------------------------------------------

def _opt(args: argparse.Namespace, captioner) -> dict[str, Any]:
    """results.json's ``opt``: the flags as given, overlaid with the settings actually in effect."""
    opt = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    opt.update(captioner.settings)
    opt["box_frame"] = BOX_FRAME_NOTE
    return opt


def _load_captioner(args: argparse.Namespace, settings):
    from densecap_core.checkpoint import CheckpointError
    from densecap_core.inference import Captioner

    try:
        return Captioner(args.checkpoint or settings.checkpoint or None, device=args.device or settings.device,
                         image_size=args.image_size, rpn_nms_thresh=args.rpn_nms_thresh,
                         final_nms_thresh=args.final_nms_thresh, num_proposals=args.num_proposals,
                         union_proposals=args.union_proposals, beam_size=args.beam_size,
                         beam_length_alpha=args.beam_length_alpha,
                         max_pixels=settings.max_image_pixels, batch_size=args.batch_size or settings.batch_size)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from exc
    except RuntimeError as exc:  # e.g. --device cuda without a GPU
        raise UsageError(f"cannot load the model: {exc}") from exc


def run_on_inputs(paths: list[Path], max_pixels: int, model_call) -> list[tuple[ImageResult, Any]]:
    """Read ``paths`` and run ``model_call(images, names) -> [(ImageResult, extra)]`` on the readable ones, in
    order. An input that cannot be read, or a batch the model fails on (e.g. out of GPU memory), gives
    ``(ImageResult with error set, None)`` instead of stopping the run."""
    from densecap_core.imageio import ImageError, decode_image

    out: list[tuple[ImageResult, Any]] = []
    todo, images = [], []
    for path in paths:
        try:
            images.append(decode_image(path, max_pixels=max_pixels, name=str(path)))
            todo.append(len(out))
            out.append((ImageResult(str(path), 0, 0), None))
        except (ImageError, OSError) as exc:
            message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
            out.append((ImageResult(str(path), 0, 0, error=message), None))
    if not todo:
        return out
    names = [out[i][0].name for i in todo]
    try:
        done = model_call(images, names)
    except RuntimeError as exc:  # report it on each of these images, go on with the next batch
        done = [(ImageResult(name, 0, 0, error=f"{name}: the model failed: {exc}"), None) for name in names]
    for i, pair in zip(todo, done):
        out[i] = pair
    return out


def caption_batch(captioner, paths: list[Path], max_pixels: int) -> list[tuple[ImageResult, Image.Image | None]]:
    """Caption ``paths`` in order: (result, its image), or (a result with ``error`` set, None)."""
    def call(images, names):
        results = captioner.caption(images, names=names, on_error="record")
        return [(r, image if r.ok else None) for r, image in zip(results, images)]
    return run_on_inputs(paths, max_pixels, call)


def _final_message(args: argparse.Namespace, total: int, failed: int, elapsed: float) -> str:
    done = total - failed
    parts = [f"captioned {done} of {total} images in {elapsed:.2f} s"
             + (f" ({1000 * elapsed / done:.0f} ms/image)" if done else "")]
    if failed:
        parts.append(f"{failed} could not be captioned (see above)")
    if args.output_vis_dir:
        parts.append(f"viewer data in {args.output_vis_dir} (see it with: densecap view {args.output_vis_dir})")
    if args.output_dir:
        parts.append(f"drawn images in {args.output_dir}")
    return "densecap caption: " + "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from densecap_core.settings import Settings

    settings = Settings.from_env()
    try:
        inputs = list_inputs(args)
        check_outputs(args, inputs)
        captioner = _load_captioner(args, settings)
    except UsageError as exc:
        print(f"densecap caption: {exc}", file=sys.stderr)
        return 2
    from densecap_core.inference import resize_long_side

    vis = VisWriter(args.output_vis_dir, _opt(args, captioner)) if args.output_vis_dir else None
    summarise = not (args.json or args.output_dir or args.output_vis_dir)
    all_results: list[ImageResult] = []
    started = time.perf_counter()
    with tqdm(total=len(inputs), unit="image", file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
        try:
            for batch in batches(inputs, captioner.batch_size):
                for result, pil in caption_batch(captioner, batch, settings.max_image_pixels):
                    all_results.append(result)
                    bar.update(1)
                    if pil is None:
                        tqdm.write(f"densecap caption: skipped {result.error}", file=sys.stderr)
                        continue
                    if vis is not None:
                        vis.add(result, pil, captioner.image_size, resize_long_side)
                    if args.output_dir is not None:
                        draw_into(result, pil, args)
                    if summarise:
                        tqdm.write("\n".join(summary_lines(result)), file=sys.stdout)
        finally:
            if vis is not None:
                vis.flush()  # also after an interruption: results.json then holds the images done so far

    failed = sum(not r.ok for r in all_results)
    if args.json:
        json.dump({"images": [r.to_dict() for r in all_results], "opt": _opt(args, captioner)}, sys.stdout)
        sys.stdout.write("\n")
    print(_final_message(args, len(inputs), failed, time.perf_counter() - started), file=sys.stderr)
    return 1 if failed else 0
