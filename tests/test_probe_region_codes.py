"""scripts/probe_region_codes.py: what it collects for each truth box, and that its probe measures separability."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from densecap_core.checkpoint import load_checkpoint, make_random_checkpoint
from densecap_core.evaluation.exactness import load_regions_meta

from conftest import synth_h5

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe_script():
    spec = importlib.util.spec_from_file_location("probe_region_codes", ROOT / "scripts" / "probe_region_codes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collect_reads_every_object_and_relation_box_with_its_labels(probe_script, tmp_path):
    data = synth_h5(tmp_path, 6, 5)
    meta = load_regions_meta(data["meta"])
    model = load_checkpoint(make_random_checkpoint(tmp_path / "r.pt", "tiny", seed=1)).model.eval()
    got = probe_script.collect(model, str(data["h5"]), meta, "train", 6)
    regions = [r for im in meta.values() for r in im["regions"] if r["kind"] in ("object", "relation")]
    cfg = model.config
    assert got["roi"].shape == (len(regions), cfg.feature_channels * cfg.roi_size ** 2)
    assert got["code"].shape == (len(regions), cfg.fc_dim)
    assert int(got["relation"].sum()) == sum(r["kind"] == "relation" for r in regions) > 0
    objects = got["labels"][~got["relation"]]
    assert (objects[:, 2:] == -1).all() and (objects[:, :2] >= 0).all()
    assert (got["labels"][got["relation"]] >= 0).all()


def test_probe_separates_what_is_separable_and_not_what_is_not(probe_script):
    torch.manual_seed(0)
    readable = torch.randint(0, 3, (600,))
    x = torch.randn(600, 20)
    x[:, :3] += 5 * torch.nn.functional.one_hot(readable, 3)   # the class shows in the input
    noise = torch.randint(0, 3, (600,))                        # unrelated to it
    assert probe_script.probe(x[:400], readable[:400], x[400:], readable[400:], 3, epochs=200) > 0.9
    assert probe_script.probe(x[:400], noise[:400], x[400:], noise[400:], 3, epochs=200) < 0.55
