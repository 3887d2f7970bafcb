"""Copy a trained checkpoint into the package as the embedded default model, with its model card.

    python scripts/ship_default_model.py runs/tiny-default/last.pt runs/tiny-default/test-metrics.json

Weights are stored in float16 (half the size; loaded back as float32). The card records the data, seed, input
size, vocabulary, training command and time, and the test-split metrics. Test-time settings the evaluation
overrode (``--final-nms-thresh``, ``--num-proposals``, ``--union-proposals``, ``--union-triples``,
``--rpn-nms-thresh``) go into the shipped config, so the embedded model runs exactly as it was measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from densecap_core.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, save_checkpoint

TRAINING_COMMAND = "scripts/train-default-model 80"


# Test-time settings `densecap evaluate` may override; the shipped config takes the values it was measured with.
TEST_TIME_FIELDS = ("rpn_nms_thresh", "final_nms_thresh", "num_proposals", "union_proposals", "union_triples")


def main(checkpoint: str, test_metrics: str) -> int:
    ck = load_checkpoint(checkpoint)
    measured = json.loads(Path(test_metrics).read_text())  # densecap evaluate --output: {results, opt}
    metrics, opt = measured["results"], measured.get("opt", {})
    config = ck.config.with_overrides(**{k: opt.get(k) for k in TEST_TIME_FIELDS})
    card = dict(ck.card)
    card.update({
        "name": "densecap-live default (tiny, synthetic scenes)",
        "dataset": "densecap synth --num-images 12000 --image-size 320 --seed 2026 (10,000 train / 1,000 val / "
                   "1,000 test; --relation-choice random, the scene sampler defaults of 2026-11-26: relations in "
                   "reading order, relation probability 0.85, up to 3 relations drawn at random, group probability "
                   "0.5); preprocess --image-size 320 "
                   "--min-token-instances 1",
        "vocabulary": ck.vocab.to_list(),
        "training_command": TRAINING_COMMAND,
        "test_metrics": {
            "split": "test (1,000 images)",
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
    sys.exit(main(*sys.argv[1:3]))
