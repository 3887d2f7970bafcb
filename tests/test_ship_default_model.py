"""scripts/ship_default_model.py: shipping a model keeps the one it replaces and says which figures fell."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from densecap_core.checkpoint import load_checkpoint, make_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _ship_module():
    spec = importlib.util.spec_from_file_location("ship_default_model", ROOT / "scripts" / "ship_default_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _evaluation(path: Path, m: float, groups: float) -> Path:
    """A test-metrics file shaped as ``densecap evaluate --output`` writes it."""
    results = {"map": m, "detmap": m + 0.1, "num_images": 1000,
               "exactness": {"object": {"exact": 0.88}, "group": {"exact": groups}, "relation": {"exact": 0.26}}}
    opt = {"data_h5": "data/synth12k-v3.h5", "split": "test", "final_nms_thresh": 0.4, "num_proposals": 100,
           "union_proposals": 10, "rpn_nms_thresh": 0.7, "union_triples": 0, "beam_size": 3,
           "beam_length_alpha": 2.0}
    path.write_text(json.dumps({"results": results, "opt": opt}))
    return path


def test_shipping_keeps_the_replaced_model_and_warns_of_what_fell(tmp_path, capsys):
    ship = _ship_module()
    dest = tmp_path / "weights" / "default.pt"
    first = make_random_checkpoint(tmp_path / "a" / "last.pt", seed=1)
    assert ship.main(str(first), str(_evaluation(tmp_path / "a.json", 0.74, 0.31)), "first", dest) == 0
    out = capsys.readouterr()
    assert not (tmp_path / "a" / "replaced-default.pt").exists()  # nothing was there to replace
    shipped_bytes = dest.read_bytes()

    second = make_random_checkpoint(tmp_path / "b" / "last.pt", seed=2)
    assert ship.main(str(second), str(_evaluation(tmp_path / "b.json", 0.75, 0.22)), "second", dest) == 0
    out = capsys.readouterr()
    kept = tmp_path / "b" / "replaced-default.pt"
    assert kept.read_bytes() == shipped_bytes  # the replaced model, byte for byte
    card = load_checkpoint(dest).card
    assert card["training_command"] == "second" and abs(card["test_metrics"]["map"] - 0.75) < 1e-9
    shipped = load_checkpoint(dest)  # the decoding it was measured with ships in its config
    assert (shipped.config.beam_size, shipped.config.beam_length_alpha, shipped.model.beam_size) == (3, 2.0, 3)
    rows = {line[:18].strip(): line[18:].split() for line in out.out.splitlines() if line[:18].strip()}
    assert rows["mAP"] == ["74.00", "75.00", "+1.00"]
    assert rows["groups exact"] == ["31.00", "22.00", "-9.00"]
    fell = re.search(r"WARNING: .* replaced: (.*?)\. To put", out.err)
    assert fell and fell.group(1) == "groups exact"  # mAP rose: only the groups are named
    assert str(kept) in out.err  # how to put it back


def test_comparison_of_cards_with_missing_figures_and_other_data():
    ship = _ship_module()
    lines, fell = ship.compare({"split": "test (1,000 images of a.h5)", "map": 0.7},
                               {"split": "test (1,000 images of b.h5)", "map": 0.69, "detmap": 0.8})
    assert fell == ["mAP"]
    assert any(line.startswith("detection mAP") and line.split()[-1] == "80.00" for line in lines)
    assert "different test data" in lines[-1]
    _, fell = ship.compare({"map": 0.7}, {"map": 0.698})  # within the tolerance: not a fall
    assert fell == []
