"""lm_grid_context: self-attention layers over a region's RoI grid cells before the words read them, added to a
trained model by ``--init`` as the identity and trained from there."""

from __future__ import annotations

import pytest
import torch

from densecap_core.checkpoint import load_checkpoint, save_checkpoint
from densecap_core.config import get_config
from densecap_core.model import build_model
from densecap_core.model.language_model import CellContext
from densecap_core.vocab import Vocabulary

WORDS = ["a", "red", "circle", "two", "stars", "left", "of", "blue", "square"]


def _model(**overrides):
    torch.manual_seed(0)
    return build_model(get_config("tiny", image_size=160, **overrides), len(WORDS))


def _lm_inputs(model, regions: int = 5):
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    codes = torch.randn(regions, cfg.fc_dim, generator=g)
    grid = torch.randn(regions, cfg.feature_channels, cfg.roi_size, cfg.roi_size, generator=g)
    labels = torch.randint(1, len(WORDS) + 1, (regions, 6), generator=g)
    return codes, labels, grid


def test_context_layers_are_built_only_when_asked_and_need_the_grid_attention():
    assert len(_model().language_model.attention.context) == 0
    assert len(_model(lm_grid_context=2).language_model.attention.context) == 2
    with pytest.raises(ValueError, match="lm_grid_context"):
        get_config("tiny", lm_grid_context=-1)
    with pytest.raises(ValueError, match="needs lm_grid_attention"):
        get_config("tiny", lm_grid_attention=False, lm_grid_context=1)


def test_init_from_a_model_without_them_captions_exactly_as_that_model():
    trained = _model()
    for p in trained.parameters():  # weights unlike any fresh initialisation
        torch.nn.init.normal_(p, std=0.05)
    trained.eval()
    grown = _model(lm_grid_context=1)
    grown.load_init_state(trained.state_dict())
    grown.eval()
    codes, labels, grid = _lm_inputs(trained)
    with torch.no_grad():
        assert torch.equal(trained.language_model(codes, labels, grid), grown.language_model(codes, labels, grid))
        assert torch.equal(trained.language_model.greedy_decode(codes, grid),
                           grown.language_model.greedy_decode(codes, grid))


def test_init_still_refuses_weights_that_do_not_fit():
    trained = _model().state_dict()
    del trained["language_model.output.weight"]
    with pytest.raises(RuntimeError, match="language_model.output.weight"):
        _model(lm_grid_context=1).load_init_state(trained)


def test_a_cell_context_layer_mixes_cells_once_trained():
    torch.manual_seed(0)
    layer = CellContext(16, heads=4)
    x = torch.randn(3, 9, 16)
    assert torch.equal(layer(x), x)  # the identity at the start
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    target = x.mean(1, keepdim=True).expand_as(x)  # every cell should carry what the whole box holds
    for _ in range(3):
        loss = (layer(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = layer(x)
    assert not torch.equal(after, x)
    # a change in one cell now reaches the others: attention across cells, not a per-cell map
    y = x.clone()
    y[:, 0] = torch.randn(3, 16)  # not a constant shift: the layer norm would remove that
    assert not torch.allclose(layer(y)[:, 1:], after[:, 1:])
    with pytest.raises(ValueError, match="heads"):
        CellContext(10, heads=4)


def test_losses_train_the_context_layer(tmp_path):
    model = _model(lm_grid_context=1).train()
    images = torch.rand(1, 3, 160, 160)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0], [80.0, 80.0, 150.0, 140.0]]),
                "labels": torch.tensor([[1, 2, 3, 0], [4, 2, 5, 0]])}]
    model(images, targets)["total"].backward()
    layer = model.language_model.attention.context[0]
    assert layer.proj.weight.grad is not None and layer.proj.weight.grad.abs().sum() > 0
    # saved and loaded, the layer and its config field come back
    with torch.no_grad():
        layer.proj.weight.normal_(std=0.1)
    model.eval()
    path = tmp_path / "ctx.pt"
    save_checkpoint(path, model, model.config, Vocabulary(WORDS), {})
    loaded = load_checkpoint(path, map_location="cpu")
    assert loaded.config.lm_grid_context == 1
    codes, labels, grid = _lm_inputs(model)
    with torch.no_grad():
        assert torch.allclose(model.language_model(codes, labels, grid),
                              loaded.model.language_model(codes, labels, grid), atol=1e-6)
