"""Copy a trained checkpoint into the package as the embedded default model, with its model card.

    python scripts/ship_default_model.py runs/tiny-default-ft/last.pt runs/tiny-default-ft/test-metrics.json \
        ["scripts/train-default-model 80 10"]

The third argument is the command that made the checkpoint, for the card (default: the recipe's defaults).

Weights are stored in float16 (half the size; loaded back as float32). The card records the data, seed, input
size, vocabulary, training command and time, and the test-split metrics. Test-time settings the evaluation
overrode (``--final-nms-thresh``, ``--num-proposals``, ``--union-proposals``, ``--union-triples``,
``--rpn-nms-thresh``) go into the shipped config, so the embedded model runs exactly as it was measured.
A checkpoint fine-tuned from another (``densecap train --init``) gets the stages that made it in its card
(``stages``: each one's command, data, iterations and minutes) and the sum of their minutes as ``train_minutes``.
"""

from __future__ import annotations

import json
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
TEST_TIME_FIELDS = ("rpn_nms_thresh", "final_nms_thresh", "num_proposals", "union_proposals", "union_triples")


def main(checkpoint: str, test_metrics: str, training_command: str = TRAINING_COMMAND) -> int:
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
            "split": f"test (1,000 images of {Path(measured.get('opt', {}).get('data_h5', '?')).name})",
            "map": metrics["map"], "detmap": metrics["detmap"],
            **{k: getattr(config, k) for k in TEST_TIME_FIELDS},
            "exactness": {k: v.get("exact") for k, v in metrics.get("exactness", {}).items()},
        },
        "notes": "Trained from scratch on synthetic shapes: it describes coloured shapes, not photographs.",
    })
    save_checkpoint(DEFAULT_CHECKPOINT, ck.model, config, ck.vocab, card, half=True)
    size = DEFAULT_CHECKPOINT.stat().st_size / 2**20
    print(f"wrote {DEFAULT_CHECKPOINT} ({size:.1f} MiB): test mAP {100 * metrics['map']:.2f}, "
          f"detection mAP {100 * metrics['detmap']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
