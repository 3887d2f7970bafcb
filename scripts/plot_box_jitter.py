"""Plot what localisation error costs a captioner: caption exactness against the IoU of the boxes it was given.

Each point is one `densecap evaluate --gt-boxes [--box-jitter S] --regions-meta ... --output FILE` run:

    for s in 0 0.1 0.2 0.3; do
        densecap evaluate --gt-boxes --box-jitter $s --data-h5 data/synth12k-v2.h5 --split val \\
            --regions-meta data/synth12k-v2/regions_meta.json --output runs/jitter/shipped-$s.json
    done
    python scripts/plot_box_jitter.py --out docs/img/box-jitter.png --save-json docs/img/box_jitter.json \\
        shipped=runs/jitter/shipped-0.json,runs/jitter/shipped-0.1.json,...  loose=...

or, from a summary written before: ``python scripts/plot_box_jitter.py --out X.png --from-json docs/img/box_jitter.json``.
Prints the table it plots. x: the mean IoU of the given boxes with the truth (1 without --box-jitter);
y: regions named exactly, as a share of all regions of the kind (a box moved below IoU 0.5 counts as missed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KINDS = ("object", "group", "relation")


def point(path: str) -> dict:
    doc = json.loads(Path(path).read_text())
    results = doc["results"]
    if not doc.get("opt", {}).get("gt_boxes") or "exactness" not in results:
        raise SystemExit(f"{path}: not a `densecap evaluate --gt-boxes --regions-meta ...` result")
    return {"jitter": results.get("gt_box_jitter", 0.0), "mean_iou": results.get("gt_box_mean_iou") or 1.0,
            "map": results["map"], **{k: results["exactness"][k]["exact"] for k in KINDS}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("series", nargs="*", metavar="LABEL=JSON,JSON,...", help="one line per model")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--save-json", help="also write the points as a small JSON summary")
    p.add_argument("--from-json", help="plot a summary written by --save-json instead of evaluate outputs")
    args = p.parse_args(argv)
    if args.from_json:
        series = json.loads(Path(args.from_json).read_text())
    else:
        if not args.series:
            p.error("give LABEL=JSON,... series or --from-json")
        series = {}
        for item in args.series:
            label, _, files = item.partition("=")
            if not files:
                p.error(f"{item!r} is not LABEL=JSON,JSON,...")
            series[label] = sorted((point(f) for f in files.split(",")), key=lambda q: -q["mean_iou"])
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(series, indent=1) + "\n")

    print(f"{'model':<12} {'jitter':>6} {'mean IoU':>8} {'mAP':>6} " + " ".join(f"{k:>9}" for k in KINDS))
    for label, points in series.items():
        for q in points:
            print(f"{label:<12} {q['jitter']:>6g} {q['mean_iou']:>8.3f} {100 * q['map']:>6.2f} "
                  + " ".join(f"{100 * q[k]:>8.1f}%" for k in KINDS))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KINDS), figsize=(12, 3.6), sharey=True)
    for ax, kind in zip(axes, KINDS):
        for label, points in series.items():
            ax.plot([q["mean_iou"] for q in points], [100 * q[kind] for q in points], marker="o", label=label)
        ax.set_title(f"{kind} regions named exactly")
        ax.set_xlabel("mean IoU of the given boxes with the truth")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% of regions")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
