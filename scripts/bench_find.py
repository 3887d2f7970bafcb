#!/usr/bin/env python
"""What the live "find" costs a worker: a batch captioned (``Captioner.caption``) against the same batch captioned
with a query scored for every region (``Captioner.match_each``, what a stream worker runs when a session has a
query), in the same process, alternating, on held-out synthetic scenes.

    .venv/bin/python scripts/bench_find.py                      # embedded model, 2 threads, batches of 1 and 8

Prints the median milliseconds of each over ``--repeats`` calls and their ratio, for ``--pairs`` pairs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from densecap_core.data.synth import SynthOptions, make_image
from densecap_core.inference import Captioner


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--query", default="a red circle")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    captioner = Captioner(args.checkpoint, device="cpu")
    n = max(args.batches)
    options = SynthOptions(num_images=n, seed=777, image_size=captioner.image_size)
    images = [Image.fromarray(make_image(i, options)[0]) for i in range(n)]
    for size in args.batches:
        batch, names = images[:size], [str(i) for i in range(size)]
        plain, find = [], []
        for _ in range(args.pairs):
            plain.append(median_ms(lambda: captioner.caption(batch, names), args.repeats))
            find.append(median_ms(lambda: captioner.match_each(batch, names, [args.query] * size), args.repeats))
        print(f"batch {size}: caption {' '.join(f'{v:.1f}' for v in plain)} ms; with find "
              f"{' '.join(f'{v:.1f}' for v in find)} ms; ratio {' '.join(f'{b / a:.3f}' for a, b in zip(plain, find))}")


if __name__ == "__main__":
    main()
