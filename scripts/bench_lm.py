#!/usr/bin/env python3
"""Time the language model with and without grid attention (``lm_grid_attention``), in one process.

    .venv/bin/python scripts/bench_lm.py [--regions 300] [--threads 2] [--repeat 10]

Prints milliseconds per training pass (forward + backward over ``--regions`` captions of 8 words, the shape of a
default-model training batch) and per greedy decode of 30 regions (about what one image keeps), for the default
model's sizes (code 512, embedding 128, LSTM 256, 76 words), and the attention/code-only ratios.
"""

from __future__ import annotations

import argparse
import time

import torch

from densecap_core.model.language_model import LanguageModel


def per_call_ms(fn, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regions", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab, p = 76, args.regions
    codes = torch.randn(p, 512)
    grid = torch.randn(p, 128, 7, 7)
    labels = torch.randint(1, vocab + 1, (p, 15))
    labels[:, 8:] = 0
    rows = {}
    for name, channels in (("code only", 0), ("grid attention", 128)):
        lm = LanguageModel(vocab, 512, 128, 256, 15, image_every_step=True, grid_channels=channels)
        g = grid if channels else None

        def train_pass():
            lm.zero_grad()
            lm.loss(lm(codes, labels, g), labels).backward()

        lm.eval()
        decode = per_call_ms(lambda: lm.greedy_decode(codes[:30], None if g is None else g[:30]), args.repeat)
        lm.train()
        rows[name] = (per_call_ms(train_pass, args.repeat), decode)
        print(f"{name:15s} train pass {rows[name][0]:7.1f} ms   decode 30 regions {rows[name][1]:6.2f} ms")
    (t0, d0), (t1, d1) = rows["code only"], rows["grid attention"]
    print(f"ratio attention / code only: train {t1 / t0:.2f}x, decode {d1 / d0:.2f}x "
          f"({args.threads} threads, {p} regions)")


if __name__ == "__main__":
    main()
