"""`densecap caption`: the real command on real files with a small random checkpoint.

The random model's captions are random words and its boxes meaningless; what is checked is the command:
inputs, skipping and reporting, exit codes, the files it writes and their coordinate frames.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import child_env
from densecap_core import cli
from densecap_core.commands.caption import clip_record, write_json_atomic

IMAGE_SIZE = 256  # small, so the tests stay quick on two cores


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from densecap_core.checkpoint import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "random.pt", config="tiny", seed=0)


@pytest.fixture
def image_folder(tmp_path: Path, elephant_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    elephant = Image.open(elephant_path)
    elephant.save(folder / "a_elephant.jpg")
    elephant.rotate(90, expand=True).resize((240, 360)).save(folder / "b_tall.png")
    Image.new("L", (90, 50), 128).save(folder / "c_small.bmp")       # grey, smaller than IMAGE_SIZE
    (folder / "d_corrupt.jpg").write_bytes(b"this is not an image")
    (folder / "e_truncated.jpg").write_bytes(elephant_path.read_bytes()[:4000])
    elephant.save(folder / ".hidden.jpg")                             # names starting with '.' are skipped
    (folder / "subfolder").mkdir()                                    # folders are not inputs
    return folder


def _caption(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densecap_core.cli", "caption", *args], env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_single_image_prints_a_summary(checkpoint: Path, elephant_path: Path):
    proc = _caption("--input-image", str(elephant_path), "--checkpoint", str(checkpoint),
                    "--image-size", str(IMAGE_SIZE), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith(f"{elephant_path} (720x480): ")
    n_regions = int(lines[0].split(": ")[1].split()[0])
    assert len(lines) == 1 + min(5, n_regions) and n_regions > 0
    assert "captioned 1 of 1 images" in proc.stderr


def test_folder_with_bad_files(checkpoint: Path, image_folder: Path, tmp_path: Path):
    vis, drawn = tmp_path / "vis", tmp_path / "drawn"
    proc = _caption("--input-dir", str(image_folder), "--checkpoint", str(checkpoint), "--image-size",
                    str(IMAGE_SIZE), "--device", "cpu", "--batch-size", "2", "--output-vis-dir", str(vis),
                    "--output-dir", str(drawn), "--json")
    assert proc.returncode == 1, proc.stderr  # some inputs failed, the others were written
    assert "d_corrupt.jpg" in proc.stderr and "e_truncated.jpg" in proc.stderr
    assert ".hidden" not in proc.stderr + proc.stdout
    assert "captioned 3 of 5 images" in proc.stderr

    # results.json: the original format, good images only, in sorted order, boxes inside the saved images.
    doc = json.loads((vis / "results.json").read_text())
    assert set(doc) == {"results", "opt"}
    assert doc["opt"]["image_size"] == IMAGE_SIZE and doc["opt"]["input_dir"] == str(image_folder)
    records = doc["results"]
    assert [r["img_name"] for r in records] == ["a_elephant.jpg", "b_tall.png", "c_small.bmp"]
    for record in records:
        assert {"img_name", "boxes", "scores", "captions"} <= set(record)
        assert len(record["boxes"]) == len(record["scores"]) == len(record["captions"]) > 0
        assert record["scores"] == sorted(record["scores"], reverse=True)
        saved = Image.open(vis / record["img_name"])
        assert max(saved.size) == IMAGE_SIZE  # resized like the original, small images upscaled too
        for x, y, w, h in record["boxes"]:
            assert 0 <= x and 0 <= y and w >= 0 and h >= 0
            assert x + w <= saved.width + 1e-6 and y + h <= saved.height + 1e-6
    assert records[0]["original_size"] == [720, 480]
    assert sorted(p.name for p in vis.iterdir()) == ["a_elephant.jpg", "b_tall.png", "c_small.bmp", "results.json"]

    # --json: every input in order, failures with their error, boxes in the original image's pixels.
    images = json.loads(proc.stdout)["images"]
    assert [Path(i["name"]).name for i in images] == ["a_elephant.jpg", "b_tall.png", "c_small.bmp",
                                                      "d_corrupt.jpg", "e_truncated.jpg"]
    assert [bool(i.get("error")) for i in images] == [False, False, False, True, True]
    for image, record in zip(images[:3], records):
        assert [image["width"], image["height"]] == record["original_size"]
        saved_w, saved_h = Image.open(vis / record["img_name"]).size
        sx, sy = image["width"] / saved_w, image["height"] / saved_h
        # The two frames describe the same boxes: --json = results.json boxes x (original / saved), per axis.
        for region, (x, y, w, h) in zip(image["regions"], record["boxes"]):
            assert region["box"] == pytest.approx([x * sx, y * sy, w * sx, h * sy], abs=0.011 * max(sx, sy) + 0.011)
            x, y, w, h = region["box"]
            assert x + w <= image["width"] + 0.01 and y + h <= image["height"] + 0.01

    # --output-dir: the originals at their own size, with boxes drawn.
    assert sorted(p.name for p in drawn.iterdir()) == ["a_elephant.jpg", "b_tall.png", "c_small.bmp"]
    for name in ("b_tall.png", "c_small.bmp"):
        original, with_boxes = Image.open(image_folder / name).convert("RGB"), Image.open(drawn / name)
        assert with_boxes.size == original.size
        assert with_boxes.tobytes() != original.tobytes()


def test_max_images_and_json_in_process(checkpoint: Path, image_folder: Path, capsys):
    rc = cli.main(["caption", "--input-dir", str(image_folder), "--checkpoint", str(checkpoint),
                   "--image-size", str(IMAGE_SIZE), "--max-images", "2", "--json", "--device", "cpu",
                   "--union-proposals", "3", "--beam-size", "2", "--beam-length-alpha", "1.5"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    doc = json.loads(out.out)
    assert [Path(i["name"]).name for i in doc["images"]] == ["a_elephant.jpg", "b_tall.png"]
    assert doc["opt"]["max_images"] == 2 and doc["opt"]["device"] == "cpu" and doc["opt"]["union_proposals"] == 3
    assert doc["opt"]["beam_size"] == 2 and doc["opt"]["beam_length_alpha"] == 1.5


def test_input_txt_lists_the_images_in_its_order(checkpoint: Path, image_folder: Path, tmp_path: Path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# as the original's -input_txt\n{image_folder / 'b_tall.png'}\n\n"
                       f"{image_folder / 'gone.jpg'}\n{image_folder / 'a_elephant.jpg'}\n")
    rc = cli.main(["caption", "--input-txt", str(listing), "--checkpoint", str(checkpoint),
                   "--image-size", str(IMAGE_SIZE), "--json", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 1 and "gone.jpg: no such file" in out.err
    images = json.loads(out.out)["images"]
    assert [Path(i["name"]).name for i in images] == ["b_tall.png", "gone.jpg", "a_elephant.jpg"]
    assert images[0]["regions"] and "error" in images[1] and images[2]["regions"]


@pytest.mark.parametrize("make_args, message", [
    (lambda d, c: [], "one of the arguments --input-image --input-dir --input-txt is required"),
    (lambda d, c: ["--input-image", str(d / "missing.jpg")], "no such file"),
    (lambda d, c: ["--input-dir", str(d / "missing")], "no such folder"),
    (lambda d, c: ["--input-dir", str(d / "empty")], "no files to caption"),
    (lambda d, c: ["--input-dir", str(d / "in"), "--output-vis-dir", str(d / "in")], "would overwrite them"),
    (lambda d, c: ["--input-dir", str(d / "in"), "--output-dir", str(d / "o"), "--output-vis-dir", str(d / "o")],
     "must differ"),
    (lambda d, c: ["--input-dir", str(d / "in"), "--checkpoint", str(d / "nope.pt")], "does not exist"),
    (lambda d, c: ["--input-dir", str(d / "in"), "--device", "gpu"], "use auto, cpu, cuda"),
    (lambda d, c: ["--input-dir", str(d / "in"), "--union-proposals", "-1"], "must be 0 or a positive integer"),
])
def test_usage_errors_exit_2(tmp_path: Path, capsys, make_args, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jpg").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".dotfile").write_bytes(b"")
    assert _exit_code(["caption", *make_args(tmp_path, None)]) == 2
    assert message in capsys.readouterr().err


def _exit_code(argv: list[str]) -> int:
    """What `densecap ARGV` exits with, whether argparse exits (SystemExit) or the command returns."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return int(exc.code)


def test_write_json_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path):
    target = tmp_path / "results.json"
    write_json_atomic(target, {"results": [1, 2, 3], "opt": {}})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"results": [object()], "opt": {}})  # fails halfway through the dump
    assert json.loads(target.read_text()) == {"results": [1, 2, 3], "opt": {}}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_clip_record_keeps_boxes_inside_the_saved_image():
    record = {"img_name": "x.jpg", "boxes": [[-1.0, 2.0, 10.0, 10.0], [250.0, 100.0, 6.5, 60.0]],
              "scores": [1.0, 0.5], "captions": ["a", "b"]}
    clipped = clip_record(record, 256, 150)
    assert clipped["boxes"] == [[0.0, 2.0, 9.0, 10.0], [250.0, 100.0, 6.0, 50.0]]
    assert record["boxes"][0] == [-1.0, 2.0, 10.0, 10.0]  # the input is left alone
