"""``densecap search``: find the regions that fit a phrase, in one image or a folder (the paper's open-world
detection and region retrieval, section 4.3: its language model scores the query given each region).

    densecap search --query "a red circle" --input-image scene.jpg                 # where is it?
    densecap search --query "a red circle" --input-dir photos/ --top 20 --output-dir hits/

Every detected region of every input is scored by ``log p(query | region)``, the language model's probability
of saying exactly the query for that region (its words, then END); the best ``--top`` regions over all inputs
(at most ``--per-image`` from any one image) are printed best first, with each region's own caption. A query
word the model never says is refused (exit 2) with the word named: it could only be read as ``<UNK>``. The
figures for the embedded model are in docs/model.md (*Search*).

Exit status: 0 every input was searched, 1 some inputs could not be read (reported and skipped), 2 usage error.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from densecap_core.commands.caption import (UsageError, _load_captioner, _positive_int, add_input_arguments,
                                            add_model_arguments, batches, list_inputs, run_on_inputs,
                                            save_image_atomic)
from densecap_core.schema import ImageResult, Region


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Exit status: 0 all searched, 1 some inputs unreadable (reported, skipped), 2 usage error."
    parser.add_argument("--query", required=True, metavar="TEXT", help="the phrase to look for, in the model's words")
    add_input_arguments(parser, "search")
    add_model_arguments(parser)
    parser.add_argument("--max-images", type=_positive_int, default=None, metavar="N",
                        help="at most this many inputs (default: all)")
    out = parser.add_argument_group("output")
    out.add_argument("--top", type=_positive_int, default=10, metavar="N", help="regions listed, best first (10)")
    out.add_argument("--per-image", type=_positive_int, default=3, metavar="N",
                     help="at most this many of them from one image (3)")
    out.add_argument("--json", action="store_true", help="print the matches as one JSON document on stdout")
    out.add_argument("--output-dir", type=Path, default=None, metavar="DIR",
                     help="write each image that has a match with its matches drawn in (rank and log p)")


@dataclass(order=True)
class Match:
    log_prob: float
    image: str
    box: tuple[float, float, float, float]
    caption: str  # what the model itself says for the region
    score: float  # the region's detection score

    def to_dict(self, rank: int) -> dict:
        return {"rank": rank, "image": self.image, "log_prob": round(self.log_prob, 4),
                "box": [round(v, 2) for v in self.box], "caption": self.caption, "score": round(self.score, 4)}


def best_of_image(result: ImageResult, log_probs, per_image: int) -> list[Match]:
    """The ``per_image`` regions of one image that fit the query best."""
    order = sorted(range(len(result.regions)), key=lambda k: -float(log_probs[k]))[:per_image]
    return [Match(float(log_probs[k]), result.name, tuple(result.regions[k].box), result.regions[k].caption,
                  result.regions[k].score) for k in order]


def draw_matches(matches: list[Match], ranks: list[int], path: Path, args: argparse.Namespace) -> None:
    from densecap_core.commands.caption import DRAW_REFERENCE_SIDE
    from densecap_core.imageio import decode_image
    from densecap_core.render import draw_regions

    pil = decode_image(path, name=str(path))
    factor = max(1.0, max(pil.size) / DRAW_REFERENCE_SIDE)
    regions = [Region(m.box, f"#{rank} {m.log_prob:.1f}", m.score) for m, rank in zip(matches, ranks)]
    drawn = draw_regions(pil, regions, num_to_draw=len(regions), box_width=max(1, round(2 * factor)),
                         text_size=2 * factor)
    save_image_atomic(drawn, args.output_dir, path.name)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from densecap_core.settings import Settings

    settings = Settings.from_env()
    try:
        inputs = list_inputs(args)
        if args.output_dir is not None and args.output_dir.resolve() in {p.resolve().parent for p in inputs}:
            raise UsageError(f"--output-dir {args.output_dir} is the folder of the input images and would "
                             "overwrite them; choose another folder")
        captioner = _load_captioner(args, settings)
        try:
            captioner.encode_query(args.query)
        except ValueError as exc:
            raise UsageError(f"--query {args.query!r}: {exc}") from exc
    except UsageError as exc:
        print(f"densecap search: {exc}", file=sys.stderr)
        return 2
    best: list[Match] = []  # a min-heap of the top matches so far
    failed, started = 0, time.perf_counter()
    with tqdm(total=len(inputs), unit="image", file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
        for batch in batches(inputs, captioner.batch_size):
            scored = run_on_inputs(batch, settings.max_image_pixels,
                                   lambda images, names: captioner.match(images, names, args.query))
            for result, log_probs in scored:
                if log_probs is None:
                    failed += 1
                    tqdm.write(f"densecap search: skipped {result.error}", file=sys.stderr)
                    continue
                for match in best_of_image(result, log_probs, args.per_image):
                    (heapq.heappush if len(best) < args.top else heapq.heappushpop)(best, match)
            bar.update(len(batch))
    ranked = sorted(best, reverse=True)
    if args.json:
        json.dump({"query": args.query, "matches": [m.to_dict(i + 1) for i, m in enumerate(ranked)],
                   "opt": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           **captioner.settings}}, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"best regions for {args.query!r} (log p of the query given the region; the model's own caption):")
        for i, m in enumerate(ranked, 1):
            box = ", ".join(f"{v:.0f}" for v in m.box)
            print(f"{i:4d}  {m.log_prob:8.2f}  {m.image}  [{box}]  {m.caption!r}")
    if args.output_dir is not None:
        by_image: dict[str, list[int]] = {}
        for i, m in enumerate(ranked):
            by_image.setdefault(m.image, []).append(i)
        for image, rows in by_image.items():
            draw_matches([ranked[i] for i in rows], [i + 1 for i in rows], Path(image), args)
    print(f"densecap search: {len(inputs) - failed} of {len(inputs)} images searched in "
          f"{time.perf_counter() - started:.2f} s" + (f"; {failed} skipped (see above)" if failed else "")
          + (f"; drawn matches in {args.output_dir}" if args.output_dir else ""), file=sys.stderr)
    return 1 if failed else 0
