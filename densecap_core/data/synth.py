"""Write a synthetic dense-captioning dataset in Visual Genome format, and Y4M clips of moving scenes.

``write_dataset(out_dir, SynthOptions(...))`` writes::

    out_dir/images/<image_id>.jpg
    out_dir/region_descriptions.json  [{"id", "regions": [{"region_id", "image_id", "x", "y", "width",
                                        "height", "phrase"}]}]   (boxes 0-indexed, continuous pixels)
    out_dir/image_data.json           [{"image_id", "id", "width", "height"}]
    out_dir/densecap_splits.json      {"train": [ids], "val": [ids], "test": [ids]}
    out_dir/regions_meta.json         the structured truth of every object and region (docs/data.md)

Image ``i`` (id ``i + 1``) depends only on ``(seed, i)``, so the output is byte-identical for a seed whatever
the number of worker processes, and a larger dataset starts with the images of a smaller one.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from densecap_core.data import draw, grammar, scene as scenes
from densecap_core.data.scene import Scene, SceneOptions
from densecap_core.data.y4m import Y4MWriter, check_size

META_FORMAT = "densecap-synth-v1"
# Distinct streams of one seed: per-image scenes, the split permutation, the video.
_STREAM_IMAGE, _STREAM_SPLIT, _STREAM_VIDEO = 1, 2, 3


@dataclass
class SynthOptions:
    num_images: int
    seed: int = 0
    image_size: int = 256  # the longer side
    aspect_jitter: float = 0.25  # the shorter side is image_size * U(1 - jitter, 1)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    jpeg_quality: int = 92
    workers: int = 1
    scene: SceneOptions = field(default_factory=SceneOptions)


def _box_list(box) -> list[int]:
    return [int(v) for v in box]


def image_size_for(rng: np.random.Generator, size: int, jitter: float) -> tuple[int, int]:
    """``(width, height)``: longer side ``size``, shorter side jittered, both even, random orientation."""
    short = int(round(size * rng.uniform(1.0 - jitter, 1.0) / 2.0)) * 2
    long_side = size - size % 2
    return (long_side, short) if rng.random() < 0.5 else (short, long_side)


def scene_regions(scene: Scene, rng: np.random.Generator) -> list[dict]:
    """Region records (truth + box + phrase) of a scene: every object, its group, its relations."""
    regions: list[dict] = []
    for k, obj in enumerate(scene.objects):
        regions.append({"kind": "object", "objects": [k], **obj.attributes(), "box": _box_list(obj.box),
                        "phrase": grammar.object_phrase(obj.attributes(), rng)})
    for members in scene.groups:
        first = scene.objects[members[0]]
        box = scenes.union_box([scene.objects[m].box for m in members])
        regions.append({"kind": "group", "objects": list(members), "shape": first.shape, "colour": first.colour,
                        "count": len(members), "box": _box_list(box),
                        "phrase": grammar.group_phrase(first.shape, first.colour, len(members), rng)})
    for rel in scene.relations:
        a, b = scene.objects[rel.subject], scene.objects[rel.object]
        box = scenes.union_box([a.box, b.box])
        regions.append({"kind": "relation", "objects": [rel.subject, rel.object], "relation": rel.relation,
                        "subject": a.attributes(), "object": b.attributes(), "box": _box_list(box),
                        "phrase": grammar.relation_phrase(a.attributes(), rel.relation, b.attributes(), rng)})
    return regions


def _lighting_record(scene: Scene) -> dict:
    return {k: round(v, 4) for k, v in asdict(scene.lighting).items()}


def make_image(index: int, options: SynthOptions) -> tuple[np.ndarray, dict]:
    """Sample and draw image ``index``: its pixels and its truth record (regions without ids yet)."""
    rng = np.random.default_rng([options.seed, _STREAM_IMAGE, index])
    width, height = image_size_for(rng, options.image_size, options.aspect_jitter)
    scene = scenes.sample_scene(rng, width, height, options.scene)
    pixels = scenes.render_scene(scene)
    record = {
        "image_id": index + 1, "width": width, "height": height,
        "background": scene.background.kind, "lighting": _lighting_record(scene),
        "objects": [{**o.attributes(), "box": _box_list(o.box), "occluded": round(o.occluded, 4),
                     "group": o.group} for o in scene.objects],
        "regions": scene_regions(scene, rng),
    }
    return pixels, record


def _write_one(job: tuple[int, SynthOptions, str]) -> dict:
    index, options, image_dir = job
    pixels, record = make_image(index, options)
    Image.fromarray(pixels).save(Path(image_dir) / f"{record['image_id']}.jpg", quality=options.jpeg_quality)
    return record


def split_ids(ids: list[int], seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[int]]:
    """Deterministic random split by fractions (each list sorted)."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction > 1:
        raise ValueError("split fractions must be >= 0 and val + test <= 1")
    order = np.random.default_rng([seed, _STREAM_SPLIT]).permutation(len(ids))
    n_val = int(round(len(ids) * val_fraction))
    n_test = int(round(len(ids) * test_fraction))
    shuffled = [ids[i] for i in order]
    return {"train": sorted(shuffled[n_val + n_test:]), "val": sorted(shuffled[:n_val]),
            "test": sorted(shuffled[n_val:n_val + n_test])}


def _dump(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")


def write_dataset(out_dir: str | Path, options: SynthOptions, progress: bool = True) -> dict:
    """Write the dataset (see the module docstring); returns a summary (counts, per-kind statistics)."""
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(i, options, str(image_dir)) for i in range(options.num_images)]
    bar = tqdm(total=options.num_images, desc="synth images", unit="img", disable=not progress)
    records: list[dict] = []
    if options.workers > 1 and options.num_images > 1:
        ctx = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
        chunk = max(1, min(32, options.num_images // (options.workers * 8)))
        with ctx.Pool(options.workers) as pool:
            for record in pool.imap(_write_one, jobs, chunksize=chunk):
                records.append(record)
                bar.update()
    else:
        for job in jobs:
            records.append(_write_one(job))
            bar.update()
    bar.close()

    region_id = 0
    descriptions, image_data = [], []
    for rec in records:
        regions = []
        for region in rec["regions"]:
            region_id += 1
            region["region_id"] = region_id
            x, y, w, h = region["box"]
            regions.append({"region_id": region_id, "image_id": rec["image_id"], "x": x, "y": y, "width": w,
                            "height": h, "phrase": region["phrase"]})
        descriptions.append({"id": rec["image_id"], "regions": regions})
        image_data.append({"image_id": rec["image_id"], "id": rec["image_id"], "width": rec["width"],
                           "height": rec["height"]})
    ids = [r["image_id"] for r in records]
    splits = split_ids(ids, options.seed, options.val_fraction, options.test_fraction)
    meta = {"format": META_FORMAT, "seed": options.seed, "image_size": options.image_size,
            "attributes": {"shapes": list(scenes.SHAPES), "colours": list(scenes.COLOURS),
                           "sizes": list(scenes.SIZES), "textures": list(scenes.TEXTURES),
                           "relations": list(scenes.RELATIONS)},
            "images": records}
    _dump(out / "region_descriptions.json", descriptions)
    _dump(out / "image_data.json", image_data)
    _dump(out / "densecap_splits.json", splits)
    _dump(out / "regions_meta.json", meta)
    return summarize(records)


def summarize(records: list[dict]) -> dict:
    """Counts over image records: images, regions, objects per image, share of images with relations/groups."""
    n = max(1, len(records))
    kinds = [[r["kind"] for r in rec["regions"]] for rec in records]
    objects = [len(rec["objects"]) for rec in records]
    return {
        "images": len(records),
        "regions": sum(len(k) for k in kinds),
        "objects_min": min(objects, default=0), "objects_max": max(objects, default=0),
        "objects_mean": round(sum(objects) / n, 3),
        "with_relation": round(sum("relation" in k for k in kinds) / n, 4),
        "with_group": round(sum("group" in k for k in kinds) / n, 4),
        "max_occlusion": round(max((o["occluded"] for rec in records for o in rec["objects"]), default=0.0), 4),
    }


# ------------------------------------------------------------------------------------------------ video


def _frame_regions(scene: Scene, boxes: list[tuple[int, int, int, int]], visible: list[bool],
                   phrases: list[str], rng: np.random.Generator) -> list[dict]:
    """Regions of one video frame: every recognisable object (fixed phrase), the group when all its
    members are recognisable, the relations between recognisable objects unique in the scene that a still image
    of the default sampler would state (``scene.near_relations``)."""
    short = min(scene.width, scene.height)
    regions = [{"kind": "object", "objects": [k], **o.attributes(), "box": _box_list(boxes[k]),
                "phrase": phrases[k]} for k, o in enumerate(scene.objects) if visible[k]]
    for members in scene.groups:
        if not all(visible[m] for m in members):
            continue
        first = scene.objects[members[0]]
        regions.append({"kind": "group", "objects": list(members), "shape": first.shape, "colour": first.colour,
                        "count": len(members), "box": _box_list(scenes.union_box([boxes[m] for m in members])),
                        "phrase": grammar.group_phrase(first.shape, first.colour, len(members), rng)})
    singles = [k for k, o in enumerate(scene.objects) if o.group is None and visible[k]]
    for rel in scenes.near_relations(boxes, singles, short):
        a, b = scene.objects[rel.subject], scene.objects[rel.object]
        regions.append({"kind": "relation", "objects": [rel.subject, rel.object], "relation": rel.relation,
                        "subject": a.attributes(), "object": b.attributes(),
                        "box": _box_list(scenes.union_box([boxes[rel.subject], boxes[rel.object]])),
                        "phrase": grammar.relation_phrase(a.attributes(), rel.relation, b.attributes(), rng)})
    return regions


def write_video(path: str | Path, *, frames: int, fps: int = 10, width: int = 320, height: int = 240,
                seed: int = 0, progress: bool = True) -> dict:
    """Write a Y4M clip of one scene whose objects drift smoothly (bouncing off the borders), and
    ``<path>.json`` beside it (same stem) with what each frame shows. Returns that JSON document.

    Objects keep their drawing order; while moving they may cover each other more than placement allows in
    still images, so each frame lists every object's ``occluded`` fraction, and its regions leave out objects
    hidden more than ``MAX_OCCLUSION`` (and groups and relations that involve them).
    """
    check_size(width, height)
    if frames <= 0:
        raise ValueError("--frames must be at least 1")
    path = Path(path)
    rng = np.random.default_rng([seed, _STREAM_VIDEO])
    scene = scenes.sample_scene(rng, width, height, SceneOptions(max_objects=6))
    background = draw.render_background(scene.background, width, height)
    short = min(width, height)
    pos = np.array([[o.x0, o.y0] for o in scene.objects], np.float64)
    speed = rng.uniform(0.004, 0.012, len(pos)) * short  # pixels per frame
    angle = rng.uniform(0, 2 * math.pi, len(pos))
    vel = np.stack([np.cos(angle), np.sin(angle)], axis=1) * speed[:, None]
    limit = np.array([[width - o.extent, height - o.extent] for o in scene.objects], np.float64)
    phrases = [grammar.object_phrase(o.attributes(), rng) for o in scene.objects]
    tight = [(o.box[0] - o.x0, o.box[1] - o.y0, o.box[2], o.box[3]) for o in scene.objects]
    doc = {"width": width, "height": height, "fps": fps, "frames": frames, "seed": seed,
           "background": scene.background.kind,
           "objects": [{**o.attributes(), "group": o.group, "phrase": p} for o, p in zip(scene.objects, phrases)],
           "frame_truth": []}
    with Y4MWriter(path, width, height, fps) as out:
        for t in tqdm(range(frames), desc="synth video", unit="frame", disable=not progress):
            ipos = [(int(round(x)), int(round(y))) for x, y in pos]
            out.write(scenes.render_scene(scene, ipos, background, noise_seed=seed * 100003 + t))
            boxes = [(x + bx, y + by, bw, bh) for (x, y), (bx, by, bw, bh) in zip(ipos, tight)]
            hidden = scenes.occlusion_fractions(scene, ipos)
            visible = [h <= scenes.MAX_OCCLUSION for h in hidden]
            doc["frame_truth"].append({
                "index": t, "time_s": round(t / fps, 4),
                "objects": [{"box": _box_list(b), "occluded": round(h, 4), "visible": v}
                            for b, h, v in zip(boxes, hidden, visible)],
                "regions": _frame_regions(scene, boxes, visible, phrases, rng)})
            pos += vel
            # Bounce: reflect positions that left [0, limit] and flip that velocity component.
            over, under = pos > limit, pos < 0
            pos = np.where(over, 2 * limit - pos, np.where(under, -pos, pos))
            vel = np.where(over | under, -vel, vel)
    _dump(path.with_suffix(".json"), doc)
    return doc
