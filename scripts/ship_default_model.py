"""Copy a trained checkpoint into the package as the embedded default model, with its model card.

    python scripts/ship_default_model.py runs/tiny-default-ft/last.pt runs/tiny-default-ft/test-metrics.json \
        ["scripts/train-default-model 80 10"] [--to PATH]

The third argument is the command that made the checkpoint, for the card (default: the recipe's defaults).
``--to``: where to write (default: the package's ``densecap_core/weights/default.pt``).

Nothing is lost by shipping: the model it replaces is first copied beside the new checkpoint
(``replaced-default.pt``), and a table compares the two models' test figures (from their cards), with a warning
naming every figure that fell. A run on a slower machine makes fewer iterations in the same minutes and can
score lower than the model it replaces (docs/default-model.md).

Weights are stored in float16 (half the size; loaded back as float32). The card records the data, seed, input
size, vocabulary, training command and time, and the test-split metrics. Test-time settings the evaluation
overrode (``--final-nms-thresh``, ``--num-proposals``, ``--union-proposals``, ``--union-triples``,
``--rpn-nms-thresh``, ``--beam-size``, ``--beam-length-alpha``) go into the shipped config, so the embedded model runs exactly as it was measured.
A checkpoint fine-tuned from another (``densecap train --init``) gets the stages that made it in its card
(``stages``: each one's command, data, iterations and minutes) and the sum of their minutes as ``train_minutes``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from densecap_core.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint

TRAINING_COMMAND = "scripts/train-default-model 80 10"
STAGE_DATA = {
    "synth12k-v2.h5": "densecap synth --num-images 12000 --image-size 320 --seed 2026 --val-fraction 0.0833 "
                      "--test-fraction 0.0833 --relation-choice random (10,000 train / 1,000 val / 1,000 test; "
                      "1-3 describable pairs stated at random, relation probability 0.85, group probability 0.5: "
                      "the sampler defaults of 2026-11-26); preprocess --image-size 320 --min-token-instances 1",
    "synth12k-v3.h5": "densecap synth --num-images 12000 --image-size 320 --seed 2026 --val-fraction 0.0833 "
                      "--test-fraction 0.0833 (10,000 train / 1,000 val / 1,000 test; the default sampler since "
                      "2026-11-27: every close describable pair stated); preprocess --image-size 320 "
                      "--vocab-from data/synth12k-v2.json",
}
STAGE_KEYS = ("command", "dataset", "iterations", "train_minutes", "device", "threads", "train_precision")


def stages_of(card: dict) -> list[dict]:
    """The training stages that made a checkpoint, first to last: its own, after those of the checkpoint it was
    fine-tuned from (``init_from``: a path or ``default``, read now, before anything is overwritten)."""
    own = {k: card[k] for k in STAGE_KEYS if k in card}
    if own.get("dataset") in STAGE_DATA:
        own["data"] = STAGE_DATA[own["dataset"]]
    if "stages" in card:  # a shipped card already lists them
        return list(card["stages"])
    if not card.get("init_from"):
        return [own]
    parent = load_checkpoint(card["init_from"]).card
    return stages_of(parent) + [own]


# Test-time settings `densecap evaluate` may override; the shipped config takes the values it was measured with.
TEST_TIME_FIELDS = ("rpn_nms_thresh", "final_nms_thresh", "num_proposals", "union_proposals", "union_triples",
                    "beam_size", "beam_length_alpha")


# The figures the comparison shows: (label, path into a card's test_metrics); all are fractions.
COMPARED = (("mAP", ("map",)), ("detection mAP", ("detmap",)), ("objects exact", ("exactness", "object")),
            ("groups exact", ("exactness", "group")), ("relations exact", ("exactness", "relation")))


def _figure(test_metrics: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        test_metrics = test_metrics.get(key) if isinstance(test_metrics, dict) else None
    return test_metrics if isinstance(test_metrics, (int, float)) else None


def compare(old: dict, new: dict, tolerance: float = 0.005) -> tuple[list[str], list[str]]:
    """Two cards' ``test_metrics`` side by side: (table lines, labels of the figures that fell by more than
    ``tolerance``). Figures a card lacks show as "-" and are not compared; when the cards name different test
    data the table says so (a file's name is not its content: the comparison stands, read with care)."""
    lines = [f"{'':18}{'replaced':>10}{'new':>10}{'change':>10}"]
    fell = []
    for label, path in COMPARED:
        a, b = _figure(old, path), _figure(new, path)
        cells = [f"{100 * v:.2f}" if v is not None else "-" for v in (a, b)]
        change = f"{100 * (b - a):+.2f}" if a is not None and b is not None else ""
        lines.append(f"{label:18}{cells[0]:>10}{cells[1]:>10}{change:>10}")
        if a is not None and b is not None and b < a - tolerance:
            fell.append(label)
    if old.get("split") != new.get("split"):  # the same data may sit in a file of another name
        lines.append(f"(the cards name different test data: {old.get('split', '?')} / {new.get('split', '?')})")
    return lines, fell


def keep_replaced(dest: Path, beside: Path) -> tuple[Path | None, dict]:
    """Copy the model about to be replaced at ``dest`` to ``beside/replaced-default.pt``; returns the copy
    (None when there was nothing to replace) and that model's test metrics (empty when its card has none or it
    does not load)."""
    if not dest.is_file():
        return None, {}
    copy = beside / "replaced-default.pt"
    shutil.copy2(dest, copy)
    try:
        old = load_checkpoint(dest).card.get("test_metrics", {})
    except Exception as exc:  # a broken file is still kept, and still replaced
        print(f"the model at {dest} does not load ({exc}); replacing it", file=sys.stderr)
        old = {}
    return copy, old


def main(checkpoint: str, test_metrics: str, training_command: str = TRAINING_COMMAND,
         dest: Path = DEFAULT_CHECKPOINT) -> int:
    dest = Path(dest)
    ck = load_checkpoint(checkpoint)
    measured = json.loads(Path(test_metrics).read_text())  # densecap evaluate --output: {results, opt}
    metrics, opt = measured["results"], measured.get("opt", {})
    config = ck.config.with_overrides(**{k: opt.get(k) for k in TEST_TIME_FIELDS})
    card = dict(ck.card)
    stages = stages_of(card)
    for key in ("command", "init_from"):  # the stages hold each one's command; "default" would name itself
        card.pop(key, None)
    card.update({
        "name": "densecap-live default (tiny, synthetic scenes)",
        "dataset": "; then ".join(s.get("data", s.get("dataset", "?")) for s in stages),
        "stages": stages,
        "iterations": sum(s.get("iterations", 0) for s in stages),
        "train_minutes": round(sum(s.get("train_minutes", 0) for s in stages), 1),
        "vocabulary": ck.vocab.to_list(),
        "training_command": training_command,
        "test_metrics": {
            "split": f"test ({metrics.get('num_images', 0):,} images of {Path(opt.get('data_h5', '?')).name})",
            "map": metrics["map"], "detmap": metrics["detmap"],
            **{k: getattr(config, k) for k in TEST_TIME_FIELDS},
            "exactness": {k: v.get("exact") for k, v in metrics.get("exactness", {}).items()},
        },
        "notes": "Trained from scratch on synthetic shapes: it describes coloured shapes, not photographs.",
    })
    copy, old = keep_replaced(dest, Path(checkpoint).parent)
    save_checkpoint(dest, ck.model, config, ck.vocab, card, half=True)
    size = dest.stat().st_size / 2**20
    print(f"wrote {dest} ({size:.1f} MiB): test mAP {100 * metrics['map']:.2f}, "
          f"detection mAP {100 * metrics['detmap']:.2f}")
    if copy is not None:
        lines, fell = compare(old, card["test_metrics"])
        print("\n".join(["the model it replaces, kept at " + str(copy) + ":"] + lines))
        if fell:
            print(f"WARNING: the new model scores lower than the one it replaced: {', '.join(fell)}. "
                  f"To put the old one back: cp {copy} {dest}", file=sys.stderr)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Ship a trained checkpoint as the embedded default model.")
    parser.add_argument("checkpoint")
    parser.add_argument("test_metrics", help="densecap evaluate --output of the checkpoint on the test split")
    parser.add_argument("training_command", nargs="?", default=TRAINING_COMMAND)
    parser.add_argument("--to", type=Path, default=DEFAULT_CHECKPOINT, help="where to write (default: %(default)s)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    sys.exit(main(args.checkpoint, args.test_metrics, args.training_command, args.to))
