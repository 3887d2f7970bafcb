"""Preprocessing (VG format -> HDF5 + JSON) and the torch Dataset that reads it, on a tiny synthetic set."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from densecap_core.cli import main as cli_main
from densecap_core.data import h5layout
from densecap_core.data.h5dataset import DenseCapH5Dataset, collate
from densecap_core.data.preprocess import (PreprocessError, PreprocessOptions, build_vocabulary, preprocess,
                                           resized_size)
from densecap_core.data.synth import SynthOptions, write_dataset
from densecap_core.vocab import UNK, Vocabulary, tokenize

N_IMAGES = 16


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, SynthOptions(num_images=N_IMAGES, seed=21, val_fraction=0.25, test_fraction=0.25),
                  progress=False)
    return root


def _run(src: Path, out: Path, *, image_dirs=None, image_data=True, **kw) -> tuple:
    options = PreprocessOptions(**{"image_size": 256, "min_token_instances": 1, "num_workers": 1, **kw})
    report = preprocess(src / "region_descriptions.json", src / "densecap_splits.json",
                        image_dirs or [src / "images"], out / "d.h5", out / "d.json",
                        image_json=(src / "image_data.json") if image_data else None, options=options,
                        progress=False)
    return report, json.loads((out / "d.json").read_text())


def _truth(src: Path) -> dict[int, list[dict]]:
    return {d["id"]: d["regions"] for d in json.loads((src / "region_descriptions.json").read_text())}


def test_round_trip_boxes_and_captions_at_native_size(synth, tmp_path):
    report, doc = _run(synth, tmp_path, num_workers=2, vocab_splits=("train", "val", "test"))
    truth = _truth(synth)
    assert report.images_written == N_IMAGES and not report.missing and not report.bad
    vocab = Vocabulary(h5layout.read_idx_to_token(tmp_path / "d.json"))
    assert UNK not in vocab.token_to_idx  # every word of every split counted (the original's choice)
    with h5py.File(tmp_path / "d.h5", "r") as f:
        assert f.attrs["channel_order"] == "RGB" and f["images"].shape == (N_IMAGES, 3, 256, 256)
        assert f["labels"].shape[1] == 15
        for row in range(N_IMAGES):
            image_id = int(f["image_ids"][row])
            assert doc["idx_to_filename"][str(row + 1)] == f"{image_id}.jpg"
            lo, hi = f["img_to_first_box"][row] - 1, f["img_to_last_box"][row]
            assert list(f["box_to_img"][lo:hi]) == [row + 1] * (hi - lo)
            regions = truth[image_id]
            assert list(f["region_ids"][lo:hi]) == [r["region_id"] for r in regions]
            xywh = h5layout.to_xywh0(f["boxes"][lo:hi])
            assert xywh.tolist() == [[r["x"], r["y"], r["width"], r["height"]] for r in regions]
            decoded = [vocab.decode(ids) for ids in f["labels"][lo:hi]]
            assert decoded == [" ".join(tokenize(r["phrase"])) for r in regions]
            assert list(f["lengths"][lo:hi]) == [len(tokenize(r["phrase"])) for r in regions]
            h, w = f["image_heights"][row], f["image_widths"][row]
            with Image.open(synth / "images" / f"{image_id}.jpg") as im:
                assert (w, h) == im.size == (f["original_widths"][row], f["original_heights"][row])
                stored = f["images"][row]
                assert np.array_equal(stored[:, :h, :w], np.asarray(im).transpose(2, 0, 1))
                assert not stored[:, h:, :].any() and not stored[:, :, w:].any()


def test_downscaled_boxes_within_rounding(synth, tmp_path):
    _run(synth, tmp_path, image_size=100)
    truth = _truth(synth)
    with h5py.File(tmp_path / "d.h5", "r") as f:
        for row in range(N_IMAGES):
            regions = truth[int(f["image_ids"][row])]
            ow, oh = int(f["original_widths"][row]), int(f["original_heights"][row])
            w, h = int(f["image_widths"][row]), int(f["image_heights"][row])
            assert max(w, h) == 100 and (w, h) == resized_size(ow, oh, 100)
            lo, hi = f["img_to_first_box"][row] - 1, f["img_to_last_box"][row]
            got = h5layout.to_xyxy(f["boxes"][lo:hi])
            want = np.array([[r["x"] * w / ow, r["y"] * h / oh, (r["x"] + r["width"]) * w / ow,
                              (r["y"] + r["height"]) * h / oh] for r in regions])
            assert np.abs(got - want).max() <= 0.5 + 1e-6
            assert (got[:, 0] >= 0).all() and (got[:, 2] <= w).all() and (got[:, 3] <= h).all()


def test_vocabulary_is_deterministic_and_ordered(synth, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _, doc_a = _run(synth, tmp_path / "a", min_token_instances=3)
    _, doc_b = _run(synth, tmp_path / "b", min_token_instances=3, num_workers=2)
    assert doc_a["idx_to_token"] == doc_b["idx_to_token"]
    doc_a["info"]["options"].pop("num_workers"), doc_b["info"]["options"].pop("num_workers")
    assert doc_a == doc_b
    train = set(json.loads((synth / "densecap_splits.json").read_text())["train"])
    counts = Counter(t for i, regions in _truth(synth).items() if i in train
                     for r in regions for t in tokenize(r["phrase"]))
    words = [t for t in h5layout.read_idx_to_token(tmp_path / "a" / "d.json") if t != UNK]
    assert words == sorted((t for t, n in counts.items() if n >= 3), key=lambda t: (-counts[t], t))
    assert build_vocabulary([["b", "a", "c"], ["c", "b"]], 1) == ["b", "c", "a"]


def test_vocab_from_encodes_with_a_given_vocabulary_in_its_order(synth, tmp_path, capsys):
    """`--vocab-from`: the data of another seed, encoded with the embedded model's words in the model's order
    (what `densecap train --init default` needs), decodes to its own phrases; words outside are refused."""
    from densecap_core.checkpoint import load_checkpoint

    words = tuple(load_checkpoint(map_location="cpu").vocab.to_list())
    out = tmp_path / "given"
    out.mkdir()
    _, doc = _run(synth, out, vocabulary=words)
    assert h5layout.read_idx_to_token(out / "d.json") == list(words)
    _, counted = _run(synth, tmp_path, min_token_instances=1)
    assert counted["idx_to_token"] != doc["idx_to_token"]  # a counted vocabulary has another order
    truth = {r["region_id"]: r["phrase"] for regions in _truth(synth).values() for r in regions}
    vocab = Vocabulary(list(words))
    with h5py.File(out / "d.h5", "r") as f:
        decoded = {int(i): vocab.decode(row) for i, row in zip(f["region_ids"][:], f["labels"][:])}
    assert decoded and all(decoded[i] == " ".join(tokenize(truth[i])) for i in decoded)
    # the command line: from the preprocess JSON just written, and from the embedded model
    common = ["preprocess", "--region-data", str(synth / "region_descriptions.json"), "--splits",
              str(synth / "densecap_splits.json"), "--image-dir", str(synth / "images"), "--image-size", "128",
              "--num-workers", "1", "--quiet", "--output-h5", str(tmp_path / "c.h5"), "--output-json"]
    assert cli_main([*common, str(tmp_path / "c.json"), "--vocab-from", str(out / "d.json")]) == 0
    assert h5layout.read_idx_to_token(tmp_path / "c.json") == list(words)
    assert cli_main([*common, str(tmp_path / "c2.json"), "--vocab-from", "default"]) == 0
    assert h5layout.read_idx_to_token(tmp_path / "c2.json") == list(words)
    capsys.readouterr()
    assert cli_main([*common, str(tmp_path / "c3.json"), "--vocab-from", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("[1, 2]")
    assert cli_main([*common, str(tmp_path / "c3.json"), "--vocab-from", str(tmp_path / "junk.json")]) == 2
    assert "not a preprocess JSON" in capsys.readouterr().err
    # a word outside a vocabulary without <UNK>: refused before any image is written, naming the words
    with pytest.raises(PreprocessError, match=r"not in the given vocabulary.*'a'"):
        _run(synth, tmp_path / "short", vocabulary=tuple(w for w in words if w != "a"))
    assert not (tmp_path / "short" / "d.h5").exists()
    with pytest.raises(PreprocessError, match="twice"):
        _run(synth, tmp_path / "short", vocabulary=("a", "a"))
    # with <UNK> in the given words, outside words map to it
    _, doc = _run(synth, out, vocabulary=tuple(w for w in words if w != "a") + (UNK,))
    assert doc["idx_to_token"][str(len(words))] == UNK


def test_corrupt_and_missing_images_are_skipped_and_reported(synth, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(synth / "images", images)
    (images / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (images / "5.jpg").unlink()
    out = tmp_path / "out"
    code = cli_main(["preprocess", "--region-data", str(synth / "region_descriptions.json"),
                     "--image-data", str(synth / "image_data.json"),
                     "--splits", str(synth / "densecap_splits.json"), "--image-dir", str(images),
                     "--output-h5", str(out / "d.h5"), "--output-json", str(out / "d.json"),
                     "--image-size", "64", "--min-token-instances", "1", "--num-workers", "1", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "MISSING images skipped: 1" in printed and "5.jpg" in printed
    assert "UNREADABLE images skipped: 1" in printed and "3.jpg" in printed
    assert "skipped images: 2" in printed
    doc = json.loads((out / "d.json").read_text())
    assert set(doc["filename_to_idx"]) == {f"{i}.jpg" for i in range(1, N_IMAGES + 1)} - {"3.jpg", "5.jpg"}
    assert doc["info"]["report"]["missing"] == ["5.jpg"]
    with h5py.File(out / "d.h5", "r") as f:
        assert f["images"].shape[0] == N_IMAGES - 2 and 3 not in f["image_ids"][:]


def test_several_image_folders(synth, tmp_path):
    a, b = tmp_path / "VG_100K", tmp_path / "VG_100K_2"
    a.mkdir(), b.mkdir()
    for p in sorted((synth / "images").iterdir()):
        shutil.copy(p, (a if int(p.stem) % 2 else b) / p.name)
    report, doc = _run(synth, tmp_path, image_dirs=[a, b])
    assert report.images_written == N_IMAGES and not report.missing
    report, _ = _run(synth, tmp_path, image_dirs=[a])
    assert len(report.missing) == N_IMAGES // 2 and report.images_written == N_IMAGES // 2


def _tiny_vg(root: Path, regions: list[dict], size=(40, 30)) -> Path:
    (root / "img").mkdir(parents=True)
    Image.new("RGB", size, (10, 200, 30)).save(root / "img" / "1.jpg")
    (root / "r.json").write_text(json.dumps([{"id": 1, "regions": regions}]))
    (root / "s.json").write_text(json.dumps({"train": [1], "val": [], "test": []}))
    (root / "i.json").write_text(json.dumps([{"image_id": 1, "width": size[0] * 2, "height": size[1] * 2}]))
    return root


def test_length_filter_zero_disables_it_and_bad_boxes(tmp_path):
    long_phrase = " ".join(f"w{i}" for i in range(20))
    regions = [{"region_id": 1, "x": 0, "y": 0, "width": 10, "height": 10, "phrase": long_phrase},
               {"region_id": 2, "x": -5, "y": 50, "width": 100, "height": 40, "phrase": "A box, clipped!"},
               {"region_id": 3, "x": 90, "y": 0, "width": 5, "height": 5, "phrase": "outside"},
               {"region_id": 4, "x": 2, "y": 2, "width": 4, "height": 4, "phrase": " ?! "}]
    src = _tiny_vg(tmp_path / "vg", regions)

    def run(max_len, out):
        opt = PreprocessOptions(image_size=40, max_token_length=max_len, min_token_instances=1, num_workers=1)
        return preprocess(src / "r.json", src / "s.json", [src / "img"], out / "d.h5", out / "d.json",
                          image_json=src / "i.json", options=opt, progress=False)

    report = run(15, tmp_path / "a")
    assert (report.captions_too_long, report.captions_empty, report.boxes_empty) == (1, 1, 1)
    assert report.images_rescaled == 1  # annotated at 80x60, stored at 40x30
    with h5py.File(tmp_path / "a" / "d.h5", "r") as f:
        assert list(f["region_ids"][:]) == [2]
        # x -5..95 clipped to 0..80 on the annotated image, then halved; y 50..90 -> 50..60 -> 25..30.
        assert h5layout.to_xyxy(f["boxes"][:]).tolist() == [[0, 25, 40, 30]]
    report = run(0, tmp_path / "b")
    assert report.captions_too_long == 0 and report.label_length == 20
    with h5py.File(tmp_path / "b" / "d.h5", "r") as f:
        assert list(f["region_ids"][:]) == [1, 2] and f["lengths"][0] == 20


def test_size_mismatch_refused_and_nothing_usable_is_an_error(tmp_path):
    src = _tiny_vg(tmp_path / "vg", [{"region_id": 1, "x": 0, "y": 0, "width": 5, "height": 5, "phrase": "a b"}])
    (src / "i.json").write_text(json.dumps([{"image_id": 1, "width": 30, "height": 40}]))  # rotated
    with pytest.raises(PreprocessError, match="missing or unreadable"):
        preprocess(src / "r.json", src / "s.json", [src / "img"], tmp_path / "d.h5", tmp_path / "d.json",
                   image_json=src / "i.json", options=PreprocessOptions(min_token_instances=1, num_workers=1),
                   progress=False)
    with pytest.raises(PreprocessError, match="does not exist"):
        preprocess(src / "r.json", src / "s.json", [tmp_path / "nope"], tmp_path / "d.h5", tmp_path / "d.json",
                   progress=False)


def test_dataset_splits_crops_and_collates(synth, tmp_path):
    _run(synth, tmp_path, image_size=128)
    splits = json.loads((synth / "densecap_splits.json").read_text())
    sets = {s: DenseCapH5Dataset(tmp_path / "d.h5", s, cache_images=4) for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in sets.items()} == {s: len(ids) for s, ids in splits.items()}
    ds = sets["val"]
    seen = set()
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and max(image.shape[1:]) == 128
        boxes = target["boxes"]
        assert boxes.dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert target["labels"].shape == (len(boxes), 15)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= image.shape[2]).all()
        assert (boxes[:, 3] <= image.shape[1]).all() and (boxes[:, 2] > boxes[:, 0]).all()
        seen.add(int(target["image_id"]))
    assert seen == set(splits["val"])
    assert torch.equal(ds[0][0], ds[0][0])  # cached copy is not handed out for mutation
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == len(targets) == 2 and "boxes" in targets[1]
    # Lazy open per process: a DataLoader worker (forked after the parent read) gets its own handle.
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate)
    batches = list(loader)
    assert sum(len(b[0]) for b in batches) == len(ds)
    assert torch.equal(batches[0][0][0], ds[0][0])


def test_dataset_reads_original_bgr_files(synth, tmp_path):
    _run(synth, tmp_path, image_size=64)
    ours = DenseCapH5Dataset(tmp_path / "d.h5", "train")[0][0]
    with h5py.File(tmp_path / "d.h5", "r+") as f:  # make it look like the original's: BGR, no attribute
        del f.attrs["channel_order"]
        f["images"][...] = np.ascontiguousarray(f["images"][...][:, ::-1])
    theirs = DenseCapH5Dataset(tmp_path / "d.h5", "train")[0][0]
    assert torch.equal(ours, theirs)


def test_box_convention_round_trips():
    rng = np.random.default_rng(0)
    boxes = np.column_stack([rng.integers(0, 500, (200, 2)), rng.integers(1, 300, (200, 2))])
    stored = h5layout.from_xywh0(boxes)
    assert stored.dtype == np.int32
    assert np.array_equal(h5layout.to_xywh0(stored), boxes)
    # The original's centre: 1-indexed left edge x1 = x + 1, xc = x1 + floor(w / 2).
    assert h5layout.from_xywh0([[0, 0, 5, 4]]).tolist() == [[3, 3, 5, 4]]
    assert h5layout.to_xyxy(stored)[:, 2].tolist() == (boxes[:, 0] + boxes[:, 2]).tolist()
