#!/usr/bin/env python
"""What the DenseCap metric can give on a synthetic split at best: oracle detectors scored like a model.

Every oracle knows each image's objects and groups exactly (truth boxes, score 1). They differ in what they know
about *relation regions* and in how they phrase a caption. Pairs:

- ``none``: no relation boxes at all.
- ``all, prior``: every pair of unique objects that a relation word describes, its union box scored by the share
  of such pairs that were stated in images with as many describable pairs. With ``densecap synth
  --relation-choice random`` (the generators before 2026-11-27) nothing in the picture says which 1-3 of the
  describable pairs were stated, so this is about the best a model that sees perfectly can do there.
- ``near``: the pairs the default rule states (``scene.near_relations``: describable and close), score 1: a
  function of the picture alone, so on data of the default sampler it finds exactly the stated pairs.
- ``known``: the stated pairs themselves.

Phrases: ``truth`` (each region's own phrase), ``resampled`` (drawn again from the grammar: a captioner that
knows every attribute but not which synonyms a phrase used) or ``fixed`` (drawn with the same random state for
every region: one fixed wording per meaning, as a captioner that always says the likeliest words would).
The first row, the truth regions themselves, is a check (100 less what the metric merges at IoU 0.7).

    .venv/bin/python scripts/metric_ceiling.py --data-dir data/synth12k-v3 --split val
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from densecap_core.data import grammar
from densecap_core.data import scene as scenes
from densecap_core.evaluation.exactness import region_box_xyxy
from densecap_core.evaluation.meteor import MeteorScorer
from densecap_core.evaluation.metric import DenseCapEvaluator


def relations_of(record: dict, max_gap: float | None) -> list[tuple[int, str, int]]:
    """(subject, word, object) in reading order: every describable pair (``max_gap=None``) or the close ones."""
    objects = record["objects"]
    singles = [i for i, o in enumerate(objects) if o.get("group") is None]
    found = scenes.near_relations([tuple(o["box"]) for o in objects], singles, min(record["width"], record["height"]),
                                  max_gap=max_gap)
    return [(r.subject, r.relation, r.object) for r in found]


def attributes(obj: dict) -> dict:
    return {k: obj[k] for k in ("shape", "colour", "size", "texture")}


def phrase(region: dict, objects: list[dict], how: str, rng: np.random.Generator) -> str:
    """A caption of ``region``: its own phrase, or one drawn from the grammar (see the module docstring)."""
    if how == "truth" and "phrase" in region:
        return region["phrase"]
    return resample(region, objects, np.random.default_rng(0) if how == "fixed" else rng)


def resample(region: dict, objects: list[dict], rng: np.random.Generator) -> str:
    if region["kind"] == "object":
        return grammar.object_phrase(attributes(objects[region["objects"][0]]), rng)
    if region["kind"] == "group":
        return grammar.group_phrase(region["shape"], region["colour"], region["count"], rng)
    a, b = region["objects"]
    return grammar.relation_phrase(attributes(objects[a]), region["relation"], attributes(objects[b]), rng)


def fail(message: str) -> int:
    print(f"metric_ceiling: {message}", file=sys.stderr)
    return 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="a `densecap synth` output folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--max-images", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the rows as JSON here")
    args = parser.parse_args()

    data = Path(args.data_dir)
    missing = [name for name in ("regions_meta.json", "densecap_splits.json") if not (data / name).is_file()]
    if missing:
        return fail(f"{data} has no {' or '.join(missing)}: give a `densecap synth --out` folder")
    meta = json.loads((data / "regions_meta.json").read_text())
    splits = json.loads((data / "densecap_splits.json").read_text())
    if args.split not in splits:
        return fail(f"no split {args.split!r} in {data / 'densecap_splits.json'} (it has {', '.join(splits)})")
    ids = splits[args.split][: args.max_images]
    by_id = {r["image_id"]: r for r in meta["images"]}
    records = [by_id[i] for i in ids]

    # The prior of a describable pair being stated, by how many describable pairs its image has.
    stated_count, offered = defaultdict(int), defaultdict(int)
    pairs_of = {}
    for rec in records:
        pairs = relations_of(rec, None)
        pairs_of[rec["image_id"]] = pairs
        stated_count[len(pairs)] += sum(r["kind"] == "relation" for r in rec["regions"])
        offered[len(pairs)] += len(pairs)
    prior = {k: stated_count[k] / offered[k] for k in offered if offered[k]}

    rng = np.random.default_rng(args.seed)
    variants = [("truth regions", "-", "truth"), ("objects+groups", "none", "truth"),
                ("all pairs, prior", "all, prior", "truth"), ("all pairs, prior", "all, prior", "resampled"),
                ("all pairs, prior", "all, prior", "fixed"), ("near pairs", "near", "truth"),
                ("near pairs", "near", "resampled"), ("near pairs", "near", "fixed"),
                ("stated pairs known", "known", "resampled"), ("stated pairs known", "known", "fixed")]
    evaluators = {v: DenseCapEvaluator() for v in variants}
    counts = {"images": len(records), "regions": 0, "relations": 0, "describable pairs": 0, "near pairs": 0}
    for rec in records:
        objects, regions = rec["objects"], rec["regions"]
        near = relations_of(rec, scenes.NEAR_GAP)
        stated = {tuple(r["objects"]): r for r in regions if r["kind"] == "relation"}
        counts["regions"] += len(regions)
        counts["relations"] += len(stated)
        counts["describable pairs"] += len(pairs_of[rec["image_id"]])
        counts["near pairs"] += len(near)
        gt_boxes = np.array([region_box_xyxy(r) for r in regions])
        gt_caps = [r["phrase"] for r in regions]
        for variant in variants:
            _, pairs, how = variant
            if pairs == "-":
                preds = [(1.0, region_box_xyxy(r), r["phrase"]) for r in regions]
            else:
                preds = [(1.0, region_box_xyxy(r), phrase(r, objects, how, rng))
                         for r in regions if r["kind"] != "relation"]
            if pairs == "known":
                chosen, score = [(a, r["relation"], b) for (a, b), r in stated.items()], 0.999
            elif pairs == "near":
                chosen, score = near, 0.999
            elif pairs == "all, prior":
                chosen, score = pairs_of[rec["image_id"]], 0.99 * prior.get(len(pairs_of[rec["image_id"]]), 0.0)
            else:
                chosen = []
            for a, word, b in chosen:
                region = stated.get((a, b)) or {"kind": "relation", "objects": [a, b], "relation": word}
                box = region_box_xyxy({"box": scenes.union_box([objects[a]["box"], objects[b]["box"]])})
                preds.append((score + rng.uniform(0, 0.0001), box, phrase(region, objects, how, rng)))
            evaluators[variant].add_result(np.array([p[0] for p in preds]), np.array([p[1] for p in preds]),
                                           [p[2] for p in preds], gt_boxes, gt_caps)

    scorer = MeteorScorer()
    rows = {}
    try:
        print(f"{'relation boxes':20s} {'phrases':10s} {'mAP':>6s} {'det mAP':>8s} {'boxes':>6s}")
        for (name, _, how), evaluator in evaluators.items():
            result = evaluator.evaluate(scorer)
            row = {"map": 100 * result["map"], "detmap": 100 * result["detmap"], "boxes": result["ndet"]}
            rows[f"{name}, {how} phrases"] = row
            print(f"{name:20s} {how:10s} {row['map']:6.2f} {row['detmap']:8.2f} {row['boxes']:6d}", flush=True)
    finally:
        scorer.close()
    print(json.dumps({"counts": counts, "prior_by_describable_pairs": {str(k): round(v, 3) for k, v in
                                                                    sorted(prior.items())}}))
    if args.output:
        Path(args.output).write_text(json.dumps({"counts": counts, "rows": rows,
                                                 "prior": {str(k): v for k, v in sorted(prior.items())}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
