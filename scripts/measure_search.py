#!/usr/bin/env python
"""How well does ``densecap search`` find an object from its phrase? On held-out synthetic scenes (the default
sampler, seed 777, never trained on), each object's phrase is the query within its own image, and a hit is a
best region with IoU >= 0.5 with the object's box (the paper's localisation measure for open-world detection).

    .venv/bin/python scripts/measure_search.py --images 200            # the embedded model

Three ways to pick the region, printed side by side:
- ``log p``: what ``densecap search`` does, the region where the model most readily says the query;
- ``caption words``: the best-scoring region whose own caption has every word of the query (a text search over
  ``densecap caption``'s output);
- ``top detection``: the best-scoring region whatever the query (the floor).
Queries come in two forms: the dataset's phrase ("a big spotted violet hexagon") and the short "a <colour>
<shape>" (ambiguous where two objects share both; then either is a hit only if it is the one asked for).

Then, for a threshold on "found": the best log p of each query where it found its object, against the best log p
of a short query for a colour and shape that no object of the scene has (one per scene), as percentiles.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from densecap_core.data import grammar, scene
from densecap_core.data.synth import SynthOptions, make_image
from densecap_core.inference import Captioner
from densecap_core.vocab import tokenize


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="default: the embedded model")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--seed", type=int, default=777)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    captioner = Captioner(args.checkpoint, device="cpu")
    options = SynthOptions(num_images=args.images, seed=args.seed, image_size=captioner.image_size)
    hits = {(form, way): [] for form in ("phrase", "short") for way in ("log p", "caption words", "top detection")}
    found_lp, absent_lp = {"phrase": [], "short": []}, []
    t0, searched = time.perf_counter(), 0
    for i in range(args.images):
        pixels, record = make_image(i, options)
        pil = Image.fromarray(pixels)
        rng = np.random.default_rng([args.seed, i])
        for region in record["regions"]:
            if region["kind"] != "object":
                continue
            attrs = {k: region[k] for k in ("shape", "colour", "size", "texture")}
            short = " ".join(grammar.object_words(attrs, rng, size_p=0, texture_p=0))
            for form, query in (("phrase", region["phrase"]), ("short", short)):
                try:
                    ((result, log_probs),) = captioner.match([pil], ["scene"], query)
                except ValueError:
                    continue  # a word the model does not know
                searched += 1
                regions = result.regions
                words = set(tokenize(query)) - {"a", "an", "the"}
                by_text = [r for r in regions if words <= set(tokenize(r.caption))]
                picks = {"log p": regions[int(np.argmax(log_probs))] if regions else None,
                         "caption words": by_text[0] if by_text else None,
                         "top detection": regions[0] if regions else None}
                for way, pick in picks.items():
                    hits[(form, way)].append(pick is not None and iou(pick.box, region["box"]) >= 0.5)
                if hits[(form, "log p")][-1]:
                    found_lp[form].append(float(np.max(log_probs)))
        present = {(o["colour"], o["shape"]) for o in record["objects"]}
        absent = [(c, s) for c in scene.COLOURS for s in scene.SHAPES if (c, s) not in present]
        colour, shape = absent[int(rng.integers(len(absent)))]
        query = " ".join(grammar.object_words({"colour": colour, "shape": shape, "size": "medium", "texture": "solid"},
                                              rng, size_p=0, texture_p=0))
        try:
            ((_, log_probs),) = captioner.match([pil], ["scene"], query)
            if len(log_probs):
                absent_lp.append(float(np.max(log_probs)))
        except ValueError:
            pass
    elapsed = time.perf_counter() - t0
    print(f"{args.images} scenes, {searched} searches in {elapsed:.0f} s ({1000 * elapsed / max(1, searched):.0f} ms "
          f"each, one image each); hit = best region at IoU >= 0.5 with the object")
    print(f"{'query':8s}  {'log p':>8s}  {'caption words':>14s}  {'top detection':>14s}  (queries)")
    for form in ("phrase", "short"):
        row = [100 * np.mean(hits[(form, way)]) for way in ("log p", "caption words", "top detection")]
        print(f"{form:8s}  {row[0]:7.1f}%  {row[1]:13.1f}%  {row[2]:13.1f}%  ({len(hits[(form, 'log p')])})")
    qs = (1, 5, 10, 50, 90, 95, 99)
    print("best log p, percentiles " + " ".join(f"p{q}" for q in qs))
    for name, values in (("phrase, found", found_lp["phrase"]), ("short query, found", found_lp["short"]),
                         ("colour + shape absent", absent_lp)):
        print(f"  {name:22s} ({len(values)}): " + " ".join(f"{np.percentile(values, q):6.2f}" for q in qs))
    for t in (-6.0, -7.0, -8.0, -9.0, -10.0):
        print(f"  threshold {t:5.1f}: {100 * np.mean(np.array(found_lp['short']) > t):5.1f}% of found short queries "
              f"and {100 * np.mean(np.array(found_lp['phrase']) > t):5.1f}% of found phrases kept, "
              f"{100 * np.mean(np.array(absent_lp) > t):5.1f}% of absent shown as found")


if __name__ == "__main__":
    main()
