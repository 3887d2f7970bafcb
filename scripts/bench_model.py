#!/usr/bin/env python
"""Model speed sweeps behind docs/benchmarks.md: JSON rows and PNG plots (``densecap benchmark`` underneath).

    nice -n 10 .venv/bin/python scripts/bench_model.py --out docs/img                       # CPU, every suite
    nice -n 10 .venv/bin/python scripts/bench_model.py --suites batch --device cuda --half --channels-last \\
        --configs vgg16,resnet18,mobilenet --batches 1,2,4,8,16 --out gpu-results                 # a GPU host

Suites (each a sweep of ``densecap_core.commands.benchmark.benchmark_config``, random weights, 4:3 images):

- ``batch``:  ms per image and images/s against batch size, per config  -> ``model_batch.png``
- ``knobs``:  one change at a time from the tiny config's defaults: threads 1/2, input size, pre-NMS top-k,
  vocabulary size, int8 language model                                    -> ``model_knobs.png``
- ``flops``:  FLOPs per stage of every config at its input size, the device's measured matmul rate and the
  floor FLOPs / rate beside the measured time                             (JSON and table only)

Everything lands in ``--out`` as ``model_<suite>.json`` (+ PNG). Run it on an otherwise idle machine: with
fewer free cores than ``--threads``, OpenMP threads wait on each other and times grow tenfold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def rows_for(specs: list[dict], args) -> list[dict]:
    import torch

    from densecap_core.commands.benchmark import benchmark_config, matmul_rate

    device = torch.device(args.device)
    rows, rates = [], {}
    for spec in specs:
        spec = dict(spec)
        threads = spec.pop("threads", args.threads)
        torch.set_num_threads(threads)
        name = spec.pop("config")
        label = spec.pop("label", "")
        rate = None
        if spec.pop("floor", False):
            key = (threads, args.half)
            if key not in rates:
                rates[key] = matmul_rate(device, torch.float16 if args.half else torch.float32)
            rate = rates[key]
        t0 = time.perf_counter()
        row = benchmark_config(name, spec.pop("repeat", args.repeat), spec.pop("batch", 1), device,
                               half=args.half, channels_last=args.channels_last, rate=rate, **spec)
        row["label"] = label
        row["loadavg_1m"] = round(os.getloadavg()[0], 2)
        rows.append(row)
        print(f"{label or name:>24}: {row.get('ms_per_image', '-')} ms/img, {row.get('images_per_s', '-')} img/s, "
              f"{row.get('gflops_per_image', '-')} GFLOPs, floor {row.get('floor_ms_per_image', '-')} ms "
              f"({time.perf_counter() - t0:.0f} s, load {row['loadavg_1m']})", flush=True)
    return rows


def suite_batch(args) -> list[dict]:
    return [{"config": c, "batch": b, "label": f"{c} b{b}"} for c in args.configs.split(",") for b in _ints(args.batches)]


def suite_knobs(args) -> list[dict]:
    base = {"config": "tiny"}
    specs = [dict(base, label="tiny defaults (2 threads)", threads=2),
             dict(base, label="1 thread", threads=1)]
    specs += [dict(base, image_size=s, label=f"input {s} px") for s in (240, 480, 640)]
    specs += [dict(base, pre_nms_top_k=k, label=f"top-k {k or 'all'}") for k in (0, 300, 2000)]
    specs += [dict(base, vocab_size=v, label=f"vocab {v}") for v in (100, 10000)]
    specs += [dict(base, vocab_size=v, quantize="int8-lm", label=f"vocab {v} int8 LM") for v in (1000, 10000)]
    specs += [{"config": "mobilenet", "label": "mobilenet defaults"},
              {"config": "mobilenet", "quantize": "int8-lm", "label": "mobilenet int8 LM"}]
    return specs


def suite_flops(args) -> list[dict]:
    # vgg16 on a CPU takes seconds per pass: one timed run is enough against its floor.
    return [{"config": c, "flops": True, "floor": True, "label": f"{c} flops",
             "repeat": 1 if c == "vgg16" and args.device == "cpu" else args.repeat} for c in args.configs.split(",")]


def plot_batch(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for cfg in dict.fromkeys(r["config"] for r in rows):
        pts = [r for r in rows if r["config"] == cfg]
        b = [r["batch"] for r in pts]
        ax1.plot(b, [r["ms_per_image"] for r in pts], "o-", label=f"{cfg} ({pts[0]['input']})")
        ax2.plot(b, [r["images_per_s"] for r in pts], "o-", label=cfg)
    from matplotlib.ticker import FuncFormatter
    ticks = sorted({r["batch"] for r in rows})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("batch size (images per forward pass)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.set_ylabel("ms per image")
    ax2.set_ylabel("images/s")
    r0 = rows[0]
    where = r0.get("gpu") or f"CPU, {r0['threads']} threads"
    fig.suptitle(f"Model speed against batch size: {where}" + (", fp16" if r0["half"] else "") +
                 (", channels-last" if r0["channels_last"] else "") + ", random weights", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_knobs(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from densecap_core.commands.benchmark import STAGES

    fig, ax = plt.subplots(figsize=(10, 5))
    labels = [r["label"] for r in rows]
    left = [0.0] * len(rows)
    for stage in STAGES:
        vals = [r["stage_ms"][stage] for r in rows]
        ax.barh(labels, vals, left=left, label=stage)
        left = [a + b for a, b in zip(left, vals)]
    for i, r in enumerate(rows):
        ax.text(left[i], i, f" {r['ms_per_image']:.1f} ms", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per image (CPU), split by stage")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"One change at a time from the tiny config (320 px, top-k 600, vocab 1000, "
                 f"{rows[-1]['threads']} threads unless named)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suites", default="batch,knobs,flops")
    p.add_argument("--configs", default="tiny,mobilenet,resnet18", help="configs of the batch and flops suites")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--half", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--out", default="docs/img", help="folder for model_<suite>.json and .png")
    p.add_argument("--replot", action="store_true", help="do not measure: redraw the PNGs from the JSON in --out")
    args = p.parse_args(argv)
    if args.replot:
        out = Path(args.out)
        plot_batch(json.loads((out / "model_batch.json").read_text())["rows"], out / "model_batch.png")
        plot_knobs(json.loads((out / "model_knobs.json").read_text())["rows"], out / "model_knobs.png")
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "scripts/bench_model.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for suite in args.suites.split(","):
        specs = {"batch": suite_batch, "knobs": suite_knobs, "flops": suite_flops}[suite](args)
        print(f"--- {suite}: {len(specs)} rows, load average {os.getloadavg()[0]:.2f}", flush=True)
        rows = rows_for(specs, args)
        (out / f"model_{suite}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
        if suite == "batch":
            plot_batch(rows, out / "model_batch.png")
        elif suite == "knobs":
            plot_knobs(rows, out / "model_knobs.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
