#!/usr/bin/env python
"""Dynamic int8 quantisation of the language model: speed, caption agreement and mAP against float.

    nice -n 10 .venv/bin/python scripts/bench_quantize.py                     # random tiny model: speed + agreement
    nice -n 10 .venv/bin/python scripts/bench_quantize.py --checkpoint densecap_core/weights/default.pt \\
        --data-h5 data/synth12k.h5 --regions-meta data/synth12k/regions_meta.json --split test --max-images 300

The quantised model is the float one with its language model (LSTM + Linear layers) replaced by
``torch.ao.quantization.quantize_dynamic(..., dtype=torch.qint8)`` (``densecap benchmark --quantize int8-lm``
does the same). Boxes and scores do not depend on the language model, so both models caption the same regions:

- **agreement**: the share of regions whose caption is identical, and of caption tokens that are;
- **mAP** (with ``--data-h5``, needs Java for METEOR): ``evaluate_model`` on both models, the same split and images;
- **speed**: ms per image of the language-model stage and of the whole forward pass, float against int8.

Without ``--data-h5`` the images are random noise (agreement and speed only: a random model's captions are
random words, so agreement there is a pessimistic bound).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def images_from(args) -> tuple[list, object]:
    """uint8 3 x H x W images at the model's input size: the split's first images, or random noise."""
    import torch

    from densecap_core.training import resize_sample

    if not args.data_h5:
        gen = torch.Generator().manual_seed(0)
        return [torch.randint(0, 255, (3, 240, 320), dtype=torch.uint8, generator=gen) for _ in range(args.max_images)], None
    from densecap_core.data.h5dataset import DenseCapH5Dataset

    ds = DenseCapH5Dataset(args.data_h5, args.split)
    n = min(len(ds), args.max_images)
    out = []
    for i in range(n):
        image, target = ds[i]
        out.append(resize_sample(image, target["boxes"].float(), args.image_size)[0])
    return out, ds


def caption_tokens(model, images, batch_size: int = 4) -> tuple[list, float, float]:
    """Tokens per region of every image; seconds of the whole forward and of the language model alone."""
    import torch

    from densecap_core.commands.benchmark import time_stages

    tokens, total_s, lm_s = [], 0.0, 0.0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch, sizes = model.prepare_batch(images[start:start + batch_size])
            t0 = time.perf_counter()
            outs = model(batch, image_sizes=sizes)
            total_s += time.perf_counter() - t0
            tokens.extend(o["tokens"].tolist() for o in outs)
            lm_s += time_stages(model, batch, sizes, torch.device("cpu"))[0]["language_model"]
    return tokens, total_s, lm_s


def agreement(a: list, b: list) -> dict:
    regions = same = tok = tok_same = 0
    for img_a, img_b in zip(a, b):
        assert len(img_a) == len(img_b), "the two models captioned different regions"
        for ta, tb in zip(img_a, img_b):
            regions += 1
            same += ta == tb
            live = [(x, y) for x, y in zip(ta, tb) if x or y]
            tok += len(live)
            tok_same += sum(x == y for x, y in live)
    return {"regions": regions, "caption_identical": same / max(1, regions), "token_identical": tok_same / max(1, tok)}


def evaluate(model, vocab, args, dataset) -> dict:
    from densecap_core.data.h5layout import read_idx_to_token
    from densecap_core.evaluation.exactness import load_regions_meta
    from densecap_core.evaluation.meteor import MeteorScorer
    from densecap_core.evaluation.model_eval import evaluate_model
    from densecap_core.vocab import Vocabulary

    data_json = args.data_json or str(Path(args.data_h5).with_suffix(".json"))
    meta = load_regions_meta(args.regions_meta) if args.regions_meta else None
    with MeteorScorer() as scorer:
        scorer.start()
        res = evaluate_model(model, vocab, dataset, scorer=scorer, image_size=args.image_size,
                             max_images=args.max_images, regions_meta=meta,
                             gt_vocab=Vocabulary(read_idx_to_token(data_json)), batch_size=4, progress=False)
    out = {"map": res["map"], "detection_map": res.get("detmap")}
    if "exactness" in res:
        out["exactness"] = res["exactness"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="checkpoint (default: a random tiny model made here)")
    p.add_argument("--data-h5", help="HDF5 split for real images and mAP (default: random images, no mAP)")
    p.add_argument("--data-json")
    p.add_argument("--regions-meta", help="synthetic data: caption exactness too")
    p.add_argument("--split", default="test")
    p.add_argument("--max-images", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)

    import torch

    from densecap_core.checkpoint import load_checkpoint, make_random_checkpoint
    from densecap_core.model.quantize import quantize_language_model

    torch.set_num_threads(args.threads)
    path = args.checkpoint
    if not path:
        with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
            ck = load_checkpoint(make_random_checkpoint(Path(tmp) / "random.pt"))
        path = "(random tiny model)"
    else:
        ck = load_checkpoint(path)
    float_model = ck.model.eval()
    int8_model = copy.deepcopy(float_model)
    quantize_language_model(int8_model)
    args.image_size = ck.config.image_size
    images, dataset = images_from(args)
    print(f"{len(images)} images at {args.image_size} px, {args.threads} thread(s), checkpoint {path}", flush=True)
    caption_tokens(float_model, images[:2])  # warm-up both
    caption_tokens(int8_model, images[:2])
    fa, f_total, f_lm = caption_tokens(float_model, images)
    qa, q_total, q_lm = caption_tokens(int8_model, images)
    n = len(images)
    fig = {"checkpoint": path, "images": n, "threads": args.threads, **agreement(fa, qa),
           "float_ms_per_image": 1000 * f_total / n, "int8_ms_per_image": 1000 * q_total / n,
           "float_lm_ms_per_image": 1000 * f_lm / n, "int8_lm_ms_per_image": 1000 * q_lm / n}
    print(f"regions {fig['regions']}: captions identical {100 * fig['caption_identical']:.1f}%, tokens identical "
          f"{100 * fig['token_identical']:.1f}%")
    print(f"ms per image: forward {fig['float_ms_per_image']:.1f} float -> {fig['int8_ms_per_image']:.1f} int8; "
          f"language model {fig['float_lm_ms_per_image']:.1f} -> {fig['int8_lm_ms_per_image']:.1f}")
    if dataset is not None:
        fig["float"] = evaluate(float_model, ck.vocab, args, dataset)
        fig["int8"] = evaluate(int8_model, ck.vocab, args, dataset)
        dataset.close()
        print(f"mAP x100: float {100 * fig['float']['map']:.2f}, int8 {100 * fig['int8']['map']:.2f} "
              f"(difference {100 * (fig['int8']['map'] - fig['float']['map']):+.2f} points)")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
