"""``densecap train --init`` from a model without ``box_geometry`` into a config with it: the geometry layer starts
at zero, so the grown model detects and captions exactly as the one it was loaded from, and training moves it."""

from __future__ import annotations

import pytest
import torch

from densecap_core.config import get_config
from densecap_core.model import build_model


def _model(**overrides):
    torch.manual_seed(0)
    return build_model(get_config("tiny", image_size=160, num_proposals=20, lm_grid_attention=True, **overrides), 9)


def test_init_without_the_geometry_detects_and_captions_as_the_model_it_came_from():
    trained = _model()
    for p in trained.parameters():  # weights unlike any fresh initialisation
        torch.nn.init.normal_(p, std=0.05)
    grown = _model(box_geometry=True)
    assert grown.recognition.geometry.weight.abs().sum() > 0  # a fresh layer is random: the load must zero it
    grown.load_init_state(trained.state_dict())
    trained.eval()
    grown.eval()
    images = torch.rand(2, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before, after = trained(images), grown(images)
    for a, b in zip(before, after):
        assert len(a["boxes"]) > 0
        for key in ("boxes", "scores", "tokens"):
            assert torch.equal(a[key], b[key]), key


def test_training_moves_the_zeroed_geometry_layer():
    grown = _model(box_geometry=True)
    grown.load_init_state(_model().state_dict())
    grown.train()
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0], [80.0, 80.0, 150.0, 140.0]]),
                "labels": torch.tensor([[1, 2, 3, 0], [4, 2, 5, 0]])}]
    grown(torch.rand(1, 3, 160, 160), targets)["total"].backward()
    assert grown.recognition.geometry.weight.grad.abs().sum() > 0


def test_init_still_refuses_a_geometry_layer_the_config_lacks():
    with pytest.raises(RuntimeError, match="recognition.geometry"):
        _model().load_init_state(_model(box_geometry=True).state_dict())
