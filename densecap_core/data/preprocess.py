"""Visual Genome format (region descriptions, image sizes, splits, image folders) -> one HDF5 file + JSON.

Follows the original ``preprocess.py`` (``docs/data.md``, reference section 4) with these decisions:

- Boxes in ``region_descriptions.json`` are 0-indexed, continuous pixels (what VG and ``densecap synth``
  write); the original treated x, y as 1-indexed. Boxes are clipped to the image, scaled by rounding their
  corners, and clamped to the *resized* image (the original clamped to the padded canvas).
- Images are stored RGB (the original stored BGR); the file's ``channel_order`` attribute says so.
- Vocabulary order is deterministic: by descending count, then alphabetically; ``<UNK>`` last. Counts come
  from the splits in ``vocab_splits`` (default train only; the original counted all splits).
- ``max_token_length=0`` disables the length filter (the original dropped everything); empty captions and
  boxes with no area inside the image are dropped and counted.
- Several image folders (VG ships VG_100K and VG_100K_2): the first folder holding a file wins.
- Missing and unreadable images are skipped and listed in the report; so are images whose file size does
  not match ``image_data.json`` (unless only the scale differs: then the boxes are rescaled).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from densecap_core.data import h5layout
from densecap_core.imageio import ImageError, decode_image
from densecap_core.vocab import UNK, Vocabulary, tokenize

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
#: Aspect ratios of the annotated and the stored image may differ this much before the image is refused.
ASPECT_TOLERANCE = 0.02


class PreprocessError(RuntimeError):
    """The inputs cannot be preprocessed; the message says what to fix."""


@dataclass
class PreprocessOptions:
    image_size: int = 720
    max_token_length: int = 15  # 0: keep captions of any length
    min_token_instances: int = 15
    max_images: int = -1  # -1: all
    num_workers: int = 2
    vocab_splits: tuple[str, ...] = ("train",)
    compression: str | None = None  # None, "lzf" or "gzip" for the images dataset
    vocabulary: tuple[str, ...] | None = None  # encode with these words, in this order (a trained model's, to
                                               # fine-tune it on new data), instead of counting the captions'


@dataclass
class Caption:
    region_id: int
    box: tuple[float, float, float, float]  # x, y, w, h in annotation pixels, 0-indexed
    tokens: list[str]


@dataclass
class ImageEntry:
    image_id: int
    split: int
    path: Path
    annotated_size: tuple[int, int] | None  # (width, height) from image_data.json
    captions: list[Caption]


@dataclass
class PreprocessReport:
    images_in_splits: int = 0
    images_without_regions: int = 0  # in a split but no (usable) region
    images_written: int = 0
    regions_written: int = 0
    captions_too_long: int = 0
    captions_empty: int = 0
    boxes_empty: int = 0
    images_rescaled: int = 0
    missing: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    duplicate_files: int = 0
    vocab_size: int = 0
    unk_tokens: int = 0
    label_length: int = 0

    def lines(self, limit: int = 20) -> list[str]:
        out = [f"images in splits with regions: {self.images_in_splits}",
               f"images written: {self.images_written}, regions written: {self.regions_written}",
               f"vocabulary: {self.vocab_size} tokens (incl. {UNK} if present), "
               f"{self.unk_tokens} tokens mapped to {UNK}, labels {self.label_length} wide",
               f"captions dropped: {self.captions_too_long} too long, {self.captions_empty} empty; "
               f"boxes dropped (no area in the image): {self.boxes_empty}; "
               f"images left without regions: {self.images_without_regions}"]
        if self.images_rescaled:
            out.append(f"images stored at another scale than annotated (boxes rescaled): {self.images_rescaled}")
        if self.duplicate_files:
            out.append(f"{self.duplicate_files} file names occur in several image folders; the first folder wins")
        if self.missing:
            out.append(f"MISSING images skipped: {len(self.missing)} (pass every image folder with --image-dir): "
                       + ", ".join(self.missing[:limit]) + (" ..." if len(self.missing) > limit else ""))
        if self.bad:
            out.append(f"UNREADABLE images skipped: {len(self.bad)}")
            out += [f"  {name}: {why}" for name, why in self.bad[:limit]]
            if len(self.bad) > limit:
                out.append(f"  ... and {len(self.bad) - limit} more (all listed in the output JSON's info)")
        return out


# ------------------------------------------------------------------------------------------ reading inputs


def _read_json(path: str | Path, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise PreprocessError(f"{what} file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise PreprocessError(f"{what} file {path} is not valid JSON ({exc})") from None


def load_splits(path: str | Path) -> dict[int, int]:
    """``densecap_splits.json`` -> image id -> split code (0 train, 1 val, 2 test)."""
    doc = _read_json(path, "splits")
    out: dict[int, int] = {}
    for name, code in h5layout.SPLIT_CODES.items():
        for image_id in doc.get(name, []):
            if int(image_id) in out:
                raise PreprocessError(f"{path}: image {image_id} is in more than one split; make them disjoint")
            out[int(image_id)] = code
    if not out:
        raise PreprocessError(f"{path}: no image ids under train/val/test")
    return out


def load_image_sizes(path: str | Path | None) -> dict[int, tuple[int, int]]:
    """``image_data.json`` -> image id -> (width, height); empty when no path is given."""
    if path is None:
        return {}
    return {int(d.get("image_id", d.get("id"))): (int(d["width"]), int(d["height"]))
            for d in _read_json(path, "image data")}


def index_image_dirs(dirs: list[str | Path]) -> tuple[dict[str, Path], int]:
    """Map file name and file stem -> path over all folders (the first folder wins); also count names
    found in more than one folder."""
    index: dict[str, Path] = {}
    duplicates = 0
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise PreprocessError(f"image folder {d} does not exist")
        with os.scandir(d) as it:
            for e in sorted(it, key=lambda e: e.name):
                if not e.name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                if e.name in index:
                    duplicates += 1
                    continue
                index[e.name] = Path(e.path)
                index.setdefault(os.path.splitext(e.name)[0], Path(e.path))
    return index, duplicates


def _region_id(region: dict) -> int:
    return int(region.get("region_id", region.get("id", -1)))


def collect_entries(region_data: list[dict], splits: dict[int, int], sizes: dict[int, tuple[int, int]],
                    files: dict[str, Path], options: PreprocessOptions,
                    report: PreprocessReport, progress: bool) -> list[ImageEntry]:
    """Images in a split with at least one usable caption, sorted by id, tokenised and length-filtered."""
    by_id = {int(d.get("id", d.get("image_id"))): d.get("regions", []) for d in region_data}
    wanted = sorted(i for i in by_id if i in splits and by_id[i])
    report.images_in_splits = len(wanted)
    if options.max_images > 0:
        wanted = wanted[:options.max_images]
    entries = []
    for image_id in tqdm(wanted, desc="tokenising", unit="img", disable=not progress):
        captions = []
        for r in by_id[image_id]:
            tokens = tokenize(str(r.get("phrase", "")))
            if not tokens:
                report.captions_empty += 1
                continue
            if options.max_token_length > 0 and len(tokens) > options.max_token_length:
                report.captions_too_long += 1
                continue
            try:
                box = (float(r["x"]), float(r["y"]), float(r["width"]), float(r["height"]))
            except (KeyError, TypeError, ValueError):
                raise PreprocessError(f"region {_region_id(r)} of image {image_id} lacks numeric x, y, width, "
                                      "height; is this a Visual Genome region_descriptions.json?") from None
            captions.append(Caption(_region_id(r), box, tokens))
        if not captions:
            report.images_without_regions += 1
            continue
        name = f"{image_id}.jpg"
        path = files.get(name) or files.get(str(image_id))
        if path is None:
            report.missing.append(name)
            continue
        entries.append(ImageEntry(image_id, splits[image_id], path, sizes.get(image_id), captions))
    return entries


# ---------------------------------------------------------------------------------------------- images


def resized_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """``(w, h)`` with the longer side exactly ``image_size`` (upscaling small images, as the original)."""
    scale = image_size / max(width, height)
    return (min(image_size, max(1, int(round(width * scale)))), min(image_size, max(1, int(round(height * scale)))))


def load_resized(job: tuple[str, int]) -> tuple[np.ndarray | None, tuple[int, int], str]:
    """Worker: decode (stored orientation, no EXIF rotation), resize bilinearly. Returns (3 x h x w uint8 RGB,
    (original width, height), error message or "")."""
    path, image_size = job
    try:
        im = decode_image(path, exif_transpose=False)
    except (ImageError, OSError) as exc:
        return None, (0, 0), str(exc)
    size = im.size
    target = resized_size(*size, image_size)
    if target != size:
        im = im.resize(target, Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(im, np.uint8).transpose(2, 0, 1)), size, ""


def scale_boxes(captions: list[Caption], annotated: tuple[int, int], resized: tuple[int, int],
                report: PreprocessReport) -> tuple[list[Caption], np.ndarray]:
    """Clip each box to the annotated image, scale it to the resized image by rounding its corners, keep at
    least one pixel inside. Returns the kept captions and their int 0-indexed [x, y, w, h] boxes."""
    aw, ah = annotated
    rw, rh = resized
    sx, sy = rw / aw, rh / ah
    kept, boxes = [], []
    for c in captions:
        x, y, w, h = c.box
        x0, y0 = min(max(x, 0.0), aw), min(max(y, 0.0), ah)
        x1, y1 = min(max(x + w, 0.0), aw), min(max(y + h, 0.0), ah)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            report.boxes_empty += 1
            continue
        bx0 = min(int(np.floor(x0 * sx + 0.5)), rw - 1)
        by0 = min(int(np.floor(y0 * sy + 0.5)), rh - 1)
        bx1 = min(max(int(np.floor(x1 * sx + 0.5)), bx0 + 1), rw)
        by1 = min(max(int(np.floor(y1 * sy + 0.5)), by0 + 1), rh)
        kept.append(c)
        boxes.append((bx0, by0, bx1 - bx0, by1 - by0))
    return kept, np.asarray(boxes, np.int64).reshape(-1, 4)


def _annotation_frame(entry: ImageEntry, stored: tuple[int, int], report: PreprocessReport) -> tuple[int, int] | str:
    """The size the boxes were drawn on, or an error message when the stored file cannot be that image."""
    if entry.annotated_size is None or entry.annotated_size == stored:
        return stored
    aw, ah = entry.annotated_size
    sw, sh = stored
    if abs((aw / ah) / (sw / sh) - 1.0) > ASPECT_TOLERANCE:
        return (f"file is {sw}x{sh} but image_data.json says {aw}x{ah} (another image, or rotated?); "
                "fix the file or its entry")
    report.images_rescaled += 1
    return (aw, ah)


def _image_results(entries: list[ImageEntry], options: PreprocessOptions):
    jobs = [(str(e.path), options.image_size) for e in entries]
    if options.num_workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("fork" if os.name != "nt" else "spawn")
        with ctx.Pool(options.num_workers) as pool:
            yield from pool.imap(load_resized, jobs, chunksize=4)
    else:
        yield from map(load_resized, jobs)


# ---------------------------------------------------------------------------------------------- vocabulary


def build_vocabulary(token_lists: list[list[str]], min_count: int) -> list[str]:
    """Tokens seen at least ``min_count`` times, by descending count then alphabetically (no ``<UNK>``)."""
    counts = Counter(t for tokens in token_lists for t in tokens)
    return [t for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]


def check_vocabulary(entries: list[ImageEntry], words: tuple[str, ...]) -> None:
    """Refuse (``PreprocessError``) captions with words outside a given vocabulary that has no ``<UNK>``:
    a model fine-tuned on them could never be taught those words, so they must not be dropped in silence."""
    known = set(words)
    if not words or len(known) != len(words):
        raise PreprocessError("the given vocabulary is empty or lists a word twice")
    if UNK in known:
        return
    outside = Counter(t for e in entries for c in e.captions for t in c.tokens if t not in known)
    if outside:
        listed = ", ".join(f"{w!r} ({n}x)" for w, n in outside.most_common(10))
        raise PreprocessError(f"{sum(outside.values())} word(s) of the captions are not in the given vocabulary "
                              f"of {len(words)} words, which has no {UNK}: {listed}"
                              + (" ..." if len(outside) > 10 else "")
                              + "; preprocess without --vocab-from to build a vocabulary from these captions")


# ---------------------------------------------------------------------------------------------- main


def preprocess(region_json: str | Path, split_json: str | Path, image_dirs: list[str | Path],
               output_h5: str | Path, output_json: str | Path, *, image_json: str | Path | None = None,
               options: PreprocessOptions | None = None, progress: bool = True) -> PreprocessReport:
    """Run the whole pipeline; returns the report (also stored in the output JSON's ``info``).

    Raises ``PreprocessError`` when nothing usable remains or the inputs are malformed.
    """
    import h5py  # the model extra; keep `densecap --help` and torch-free imports light

    opt = options or PreprocessOptions()
    unknown = [s for s in opt.vocab_splits if s not in h5layout.SPLIT_CODES]
    if unknown:
        raise PreprocessError(f"unknown vocabulary split(s) {unknown}; use train, val, test")
    if opt.image_size < 16:
        raise PreprocessError("--image-size must be at least 16")
    report = PreprocessReport()
    splits = load_splits(split_json)
    sizes = load_image_sizes(image_json)
    files, report.duplicate_files = index_image_dirs(list(image_dirs))
    entries = collect_entries(_read_json(region_json, "region data"), splits, sizes, files, opt, report, progress)
    if not entries:
        raise PreprocessError("no image has both a split and a usable region: check the split file's ids "
                              "against region_descriptions.json and the image folders")
    if opt.vocabulary is not None:
        check_vocabulary(entries, opt.vocabulary)

    S = opt.image_size
    out_h5 = Path(output_h5)
    out_h5.parent.mkdir(parents=True, exist_ok=True)
    written: list[tuple[ImageEntry, list[Caption], np.ndarray]] = []
    sizes_written: list[tuple[int, int, int, int]] = []  # resized h, w; original h, w
    with h5py.File(out_h5, "w") as f:
        images = f.create_dataset("images", (len(entries), 3, S, S), np.uint8, maxshape=(None, 3, S, S),
                                  chunks=(1, 3, S, S), compression=opt.compression)
        slot = np.zeros((3, S, S), np.uint8)
        results = _image_results(entries, opt)
        for entry, (pixels, stored, error) in tqdm(zip(entries, results), total=len(entries), desc="images",
                                                   unit="img", disable=not progress):
            name = entry.path.name
            if pixels is None:
                report.bad.append((name, error))
                continue
            frame = _annotation_frame(entry, stored, report)
            if isinstance(frame, str):
                report.bad.append((name, frame))
                continue
            h, w = pixels.shape[1:]
            kept, boxes = scale_boxes(entry.captions, frame, (w, h), report)
            if not kept:
                report.images_without_regions += 1
                continue
            slot[:] = 0
            slot[:, :h, :w] = pixels
            images[len(written)] = slot
            written.append((entry, kept, boxes))
            sizes_written.append((h, w, stored[1], stored[0]))
        if not written:
            raise PreprocessError("every image was missing or unreadable; see the messages above")
        images.resize(len(written), axis=0)
        vocab = _write_regions(f, written, opt, report)
        table = np.asarray(sizes_written, np.int32)
        for column, name in enumerate(("image_heights", "image_widths", "original_heights", "original_widths")):
            f.create_dataset(name, data=table[:, column])
        f.create_dataset("split", data=np.asarray([e.split for e, _, _ in written], np.int32))
        f.create_dataset("image_ids", data=np.asarray([e.image_id for e, _, _ in written], np.int64))
        f.attrs.update({"format": h5layout.FORMAT, "version": h5layout.VERSION, "channel_order": "RGB",
                        "box_format": "xcycwh, 1-indexed centres (xc = x + 1 + w // 2)",
                        "image_size": S, "vocab_size": len(vocab)})
    report.images_written = len(written)
    info = {"options": {**asdict(opt), "vocab_splits": list(opt.vocab_splits)},
            "report": {**asdict(report), "bad": [list(b) for b in report.bad]}}
    h5layout.write_vocab_json(output_json, vocab, [e.path.name for e, _, _ in written], info)
    return report


def _write_regions(f, written, opt: PreprocessOptions, report: PreprocessReport) -> list[str]:
    """Build the vocabulary over the written images (or take ``opt.vocabulary``) and write the region datasets;
    returns idx_to_token."""
    if opt.vocabulary is not None:
        words = list(opt.vocabulary)
    else:
        vocab_codes = {h5layout.SPLIT_CODES[s] for s in opt.vocab_splits}
        counted = [c.tokens for e, kept, _ in written if e.split in vocab_codes for c in kept]
        if not counted:
            raise PreprocessError(f"no captions in the vocabulary split(s) {list(opt.vocab_splits)}; "
                                  "pass --vocab-splits train,val,test or fix the splits")
        words = build_vocabulary(counted, opt.min_token_instances)
    known = set(words)
    if UNK not in known and any(t not in known for _, kept, _ in written for c in kept for t in c.tokens):
        words.append(UNK)
    vocab = Vocabulary(words)
    L = opt.max_token_length if opt.max_token_length > 0 else max(len(c.tokens) for _, k, _ in written for c in k)
    M = sum(len(kept) for _, kept, _ in written)
    labels = np.zeros((M, L), np.int32)
    lengths = np.zeros(M, np.int32)
    region_ids = np.zeros(M, np.int64)
    box_rows = np.zeros((M, 4), np.int64)
    box_to_img = np.zeros(M, np.int32)
    first = np.zeros(len(written), np.int32)
    last = np.zeros(len(written), np.int32)
    m = 0
    for i, (_, kept, boxes) in enumerate(written):
        first[i] = m + 1
        for c, box in zip(kept, boxes):
            labels[m] = vocab.encode(c.tokens, max_len=L)
            report.unk_tokens += sum(t not in known for t in c.tokens)
            lengths[m] = len(c.tokens)
            region_ids[m] = c.region_id
            box_rows[m] = box
            box_to_img[m] = i + 1
            m += 1
        last[i] = m
    f.create_dataset("labels", data=labels)
    f.create_dataset("lengths", data=lengths)
    f.create_dataset("boxes", data=h5layout.from_xywh0(box_rows))
    f.create_dataset("region_ids", data=region_ids)
    f.create_dataset("img_to_first_box", data=first)
    f.create_dataset("img_to_last_box", data=last)
    f.create_dataset("box_to_img", data=box_to_img)
    report.regions_written = M
    report.vocab_size = len(vocab)
    report.label_length = L
    return words
