"""The synthetic scene generator: determinism, scene statistics and guarantees, phrases, Y4M clips, the CLI."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densecap_core.cli import main as cli_main
from densecap_core.data import grammar, scene as scenes, y4m
from densecap_core.data.synth import SynthOptions, make_image, summarize, write_dataset, write_video
from densecap_core.vocab import tokenize


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def records() -> list[dict]:
    """Truth records of 200 images (drawn but not written)."""
    options = SynthOptions(num_images=200, seed=7)
    return [make_image(i, options)[1] for i in range(200)]


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path):
    write_dataset(tmp_path / "a", SynthOptions(num_images=10, seed=3, workers=1), progress=False)
    write_dataset(tmp_path / "b", SynthOptions(num_images=10, seed=3, workers=2), progress=False)
    write_dataset(tmp_path / "c", SynthOptions(num_images=10, seed=4, workers=1), progress=False)
    a, b, c = _digests(tmp_path / "a"), _digests(tmp_path / "b"), _digests(tmp_path / "c")
    assert len(a) == 10 + 4
    assert a == b
    assert a["images/1.jpg"] != c["images/1.jpg"]
    assert a["region_descriptions.json"] != c["region_descriptions.json"]


def test_files_are_visual_genome_format(tmp_path):
    write_dataset(tmp_path, SynthOptions(num_images=20, seed=1, val_fraction=0.2, test_fraction=0.1),
                  progress=False)
    descriptions = json.loads((tmp_path / "region_descriptions.json").read_text())
    image_data = {d["image_id"]: d for d in json.loads((tmp_path / "image_data.json").read_text())}
    splits = json.loads((tmp_path / "densecap_splits.json").read_text())
    meta = json.loads((tmp_path / "regions_meta.json").read_text())
    assert [d["id"] for d in descriptions] == list(range(1, 21))
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (14, 4, 2)
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == list(range(1, 21))
    region_ids = [r["region_id"] for d in descriptions for r in d["regions"]]
    assert region_ids == list(range(1, len(region_ids) + 1))
    truth = {r["region_id"]: r for im in meta["images"] for r in im["regions"]}
    for d in descriptions:
        w, h = image_data[d["id"]]["width"], image_data[d["id"]]["height"]
        with Image.open(tmp_path / "images" / f"{d['id']}.jpg") as im:
            assert im.size == (w, h) and im.mode == "RGB"
        for r in d["regions"]:
            assert r["image_id"] == d["id"]
            assert truth[r["region_id"]]["phrase"] == r["phrase"]
            assert truth[r["region_id"]]["box"] == [r["x"], r["y"], r["width"], r["height"]]


def test_statistics_meet_the_bounds(records):
    s = summarize(records)
    assert s["with_relation"] >= 0.30, s
    assert s["with_group"] >= 0.20, s
    assert s["objects_min"] >= 2 and s["objects_max"] <= 8, s
    assert s["max_occlusion"] <= scenes.MAX_OCCLUSION
    seen = {key: Counter(o[key] for r in records for o in r["objects"])
            for key in ("shape", "colour", "size", "texture")}
    assert set(seen["shape"]) == set(scenes.SHAPES) and len(scenes.SHAPES) >= 6
    assert set(seen["colour"]) == set(scenes.COLOURS) and len(scenes.COLOURS) >= 8
    assert set(seen["size"]) == set(scenes.SIZES)
    assert set(seen["texture"]) == set(scenes.TEXTURES) and len(scenes.TEXTURES) >= 3
    assert len({r["background"] for r in records}) >= 4
    # Reading order (the default) states every pair with its left or upper object first: three words remain.
    words = Counter(rel["relation"] for r in records for rel in r["regions"] if rel["kind"] == "relation")
    assert set(words) == {"left of", "above", "next to"}, words
    kinds = Counter(region["kind"] for r in records for region in r["regions"])
    assert kinds["relation"] >= 0.14 * sum(kinds.values()) and kinds["group"] >= 0.06 * sum(kinds.values()), kinds


def _centre(box) -> tuple[float, float]:
    return box[0] + box[2] / 2, box[1] + box[3] / 2


def test_relations_are_stated_in_reading_order(records):
    seen = 0
    for rec in records:
        for region in rec["regions"]:
            if region["kind"] != "relation":
                continue
            seen += 1
            (sx, sy), (ox, oy) = (_centre(rec["objects"][k]["box"]) for k in region["objects"])
            if region["relation"] == "left of":
                assert sx < ox, region
            elif region["relation"] == "above":
                assert sy < oy, region
            else:
                assert (sx, sy) < (ox, oy), region
            assert region["subject"]["colour"] == rec["objects"][region["objects"][0]]["colour"]
    assert seen >= 100


def test_random_relation_order_keeps_the_first_generators_five_words():
    options = SynthOptions(num_images=150, seed=7, scene=scenes.SceneOptions(relation_order="random"))
    words = Counter(rel["relation"] for i in range(150) for rel in make_image(i, options)[1]["regions"]
                    if rel["kind"] == "relation")
    assert set(words) == set(scenes.RELATIONS), words
    with pytest.raises(ValueError, match="relation_order"):
        scenes.SceneOptions(relation_order="alphabetical")
    with pytest.raises(ValueError, match="relation_probability"):
        scenes.SceneOptions(relation_probability=1.5)


def _describable(rec: dict) -> dict[tuple[int, int], str]:
    """Every pair of unique objects (lower index first) that a relation word describes, with its word."""
    objects, short = rec["objects"], min(rec["width"], rec["height"])
    singles = [i for i, o in enumerate(objects) if o["group"] is None]
    out = {}
    for i in singles:
        for j in singles:
            word = scenes.spatial_relation(tuple(objects[i]["box"]), tuple(objects[j]["box"]), short) if i < j else None
            if word is not None:
                out[(i, j)] = word
    return out


def test_near_choice_states_exactly_the_close_describable_pairs(records):
    """The default: a pair gets a relation region if and only if the picture says so (describable and close)."""
    stated_total = far_total = 0
    for rec in records:
        objects = rec["objects"]
        stated = {tuple(sorted(r["objects"])) for r in rec["regions"] if r["kind"] == "relation"}
        for pair, word in _describable(rec).items():
            a, b = (objects[k]["box"] for k in pair)
            close = scenes.box_gap(a, b) <= scenes.NEAR_GAP * min(max(a[2:]), max(b[2:]))
            assert (pair in stated) == close, (rec["image_id"], pair, word)
            stated_total += close
            far_total += not close
        assert stated <= set(_describable(rec)), rec["image_id"]
    assert stated_total >= 150 and far_total >= 300, (stated_total, far_total)


def test_random_choice_states_some_pairs_of_any_distance():
    options = SynthOptions(num_images=200, seed=7, scene=scenes.SceneOptions(relation_choice="random"))
    counts, far = Counter(), 0
    for i in range(200):
        rec = make_image(i, options)[1]
        relations = [r for r in rec["regions"] if r["kind"] == "relation"]
        counts[len(relations)] += 1
        for r in relations:
            a, b = (rec["objects"][k]["box"] for k in r["objects"])
            far += scenes.box_gap(a, b) > scenes.NEAR_GAP * min(max(a[2:]), max(b[2:]))
    assert max(counts) <= scenes.SceneOptions().max_relations and far >= 20, (counts, far)
    with pytest.raises(ValueError, match="relation_choice"):
        scenes.SceneOptions(relation_choice="closest")


def test_boxes_inside_and_phrases_name_exactly_one_thing(records):
    for rec in records:
        w, h = rec["width"], rec["height"]
        objects = rec["objects"]
        for region in rec["regions"]:
            x, y, bw, bh = region["box"]
            assert 0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
            assert len(tokenize(region["phrase"])) <= grammar.MAX_TOKENS
            assert grammar.caption_matches(region["phrase"], region), region
            boxes = [objects[k]["box"] for k in region["objects"]]
            assert region["box"] == list(scenes.union_box(boxes))
            if region["kind"] == "relation":
                assert scenes.spatial_relation(*boxes, min(w, h)) == region["relation"]
        combos = Counter((o["shape"], o["colour"]) for o in objects)
        groups = [r for r in rec["regions"] if r["kind"] == "group"]
        for o in objects:
            n = combos[(o["shape"], o["colour"])]
            if o["group"] is None:
                assert n == 1, "a lone object's colour+shape must be unique in its image"
            else:
                assert n == groups[0]["count"] >= 2


def test_occlusion_bound_recomputed_independently():
    """Redraw ownership from the sprites: every object keeps >= 60% of its pixels visible."""
    for i in range(40):
        rng = np.random.default_rng([11, i])
        sc = scenes.sample_scene(rng, 192, 160)
        owner = np.full((sc.height, sc.width), -1)
        for k, obj in enumerate(sc.objects):
            on = obj.sprite.mask >= 0.5
            owner[obj.y0:obj.y0 + obj.extent, obj.x0:obj.x0 + obj.extent][on] = k
        for k, obj in enumerate(sc.objects):
            area = int((obj.sprite.mask >= 0.5).sum())
            visible = int((owner == k).sum())
            assert visible >= (1 - scenes.MAX_OCCLUSION) * area - 1e-9
            assert abs((1 - visible / area) - obj.occluded) < 1e-9
        redrawn = scenes.occlusion_fractions(sc, [(o.x0, o.y0) for o in sc.objects])
        assert np.allclose(redrawn, [o.occluded for o in sc.objects])


def test_caption_checker_rejects_false_statements():
    truth = {"kind": "object", "shape": "square", "colour": "blue", "size": "small", "texture": "striped"}
    assert grammar.caption_matches("a small striped blue square", truth)
    assert grammar.caption_matches("Tiny blue box with stripes.", truth)
    assert grammar.caption_matches("a blue square", truth)
    assert not grammar.caption_matches("a large striped blue square", truth)
    assert not grammar.caption_matches("a dotted blue square", truth)
    assert not grammar.caption_matches("a small striped red square", truth)
    assert not grammar.caption_matches("a square", truth)  # colour is required
    assert not grammar.caption_matches("a blue square on a table", truth)
    rel = {"kind": "relation", "relation": "left of", "subject": {"shape": "circle", "colour": "red"},
           "object": {"shape": "star", "colour": "green"}}
    assert grammar.caption_matches("a red circle left of a green star", rel)
    assert grammar.caption_matches("a green star to the right of a red circle", rel)
    assert not grammar.caption_matches("a red circle right of a green star", rel)
    assert not grammar.caption_matches("a red circle", rel)
    group = {"kind": "group", "shape": "triangle", "colour": "yellow", "count": 3}
    assert grammar.caption_matches("three yellow triangles", group)
    assert not grammar.caption_matches("two yellow triangles", group)
    assert not grammar.caption_matches("three yellow triangle", group)


def test_y4m_clip_header_size_and_truth(tmp_path):
    path = tmp_path / "clip.y4m"
    doc = write_video(path, frames=6, fps=10, width=96, height=64, seed=5, progress=False)
    data = path.read_bytes()
    head = b"YUV4MPEG2 W96 H64 F10:1 Ip A1:1 C420jpeg\n"
    assert data.startswith(head)
    frame_bytes = 96 * 64 * 3 // 2
    assert len(data) == len(head) + 6 * (len(b"FRAME\n") + frame_bytes)
    assert data[len(head):len(head) + 6] == b"FRAME\n"
    frames = list(y4m.read_frames(path))
    assert len(frames) == 6 and frames[0].shape == (64, 96, 3)
    truth = json.loads(path.with_suffix(".json").read_text())
    assert truth == json.loads(json.dumps(doc)) and len(truth["frame_truth"]) == 6
    first = [r["box"] for r in truth["frame_truth"][0]["regions"] if r["kind"] == "object"]
    last = [r["box"] for r in truth["frame_truth"][-1]["regions"] if r["kind"] == "object"]
    assert first != last, "objects should drift"
    for frame in truth["frame_truth"]:
        shown = [k for k, o in enumerate(frame["objects"]) if o["occluded"] <= scenes.MAX_OCCLUSION]
        assert [r["objects"][0] for r in frame["regions"] if r["kind"] == "object"] == shown
        for r in frame["regions"]:
            assert set(r["objects"]) <= set(shown)
            x, y, w, h = r["box"]
            assert 0 <= x and 0 <= y and x + w <= 96 and y + h <= 64
            assert grammar.caption_matches(r["phrase"], r)
            if r["kind"] == "relation":  # reading order, as in still images
                (sx, sy), (ox, oy) = (_centre(frame["objects"][k]["box"]) for k in r["objects"])
                assert {"left of": sx < ox, "above": sy < oy, "next to": (sx, sy) < (ox, oy)}[r["relation"]], r
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.y4m", frames=2, width=95, height=64, progress=False)


def test_i420_round_trip_keeps_colours():
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :16] = (215, 35, 35)
    rgb[:, 16:32] = (40, 80, 225)
    rgb[:, 32:] = (245, 245, 245)
    back = y4m.i420_to_rgb(y4m.rgb_to_i420(rgb), 48, 32)
    assert np.abs(back.astype(int) - rgb.astype(int)).max() <= 3


def test_cli(tmp_path, capsys):
    assert cli_main(["synth", "--out", str(tmp_path / "d"), "--num-images", "3", "--quiet", "--workers", "1",
                     "--video", str(tmp_path / "v.y4m"), "--frames", "2", "--video-size", "32x24"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["images"] == 3 and summary["images_per_second"] > 0
    assert (tmp_path / "d" / "images" / "3.jpg").is_file() and (tmp_path / "v.json").is_file()
    assert cli_main(["synth"]) == 2
    assert cli_main(["synth", "--out", str(tmp_path / "e"), "--num-images", "2", "--group-probability", "-1"]) == 2
    assert "group_probability must be within [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    assert cli_main(["synth", "--out", str(tmp_path / "r"), "--num-images", "40", "--quiet", "--workers", "1",
                     "--relation-order", "random", "--relation-choice", "random", "--relation-probability", "1",
                     "--max-relations", "3", "--group-probability", "0"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["with_group"] == 0 and summary["with_relation"] >= 0.6, summary
    assert cli_main(["synth", "--out", str(tmp_path / "n"), "--num-images", "2", "--max-relations", "2"]) == 2
    assert "--max-relations applies to --relation-choice random only" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()
    with pytest.raises(SystemExit):
        cli_main(["synth", "--video", str(tmp_path / "x.y4m"), "--video-size", "33x24"])
