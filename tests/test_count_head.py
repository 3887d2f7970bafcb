"""count_head: a training-only head on the region code that predicts the count a region's truth caption states
("two", "a pair of", "three" ...), so the code learns how many alike things a box holds (group phrases)."""

from __future__ import annotations

import pytest
import torch

from densecap_core.config import get_config
from densecap_core.model import build_model

VOCAB = {"a": 1, "red": 2, "circle": 3, "two": 4, "stars": 5, "pair": 6, "of": 7, "three": 8, "four": 9}


def _model(**overrides):
    torch.manual_seed(0)
    model = build_model(get_config("tiny", image_size=160, **overrides), len(VOCAB))
    model.use_vocabulary(VOCAB)
    return model


def test_count_targets_read_the_count_word_of_each_caption():
    model = _model(count_head=3)
    labels = torch.tensor([
        [1, 2, 3, 0],  # a red circle: one
        [4, 2, 5, 0],  # two red stars
        [1, 6, 7, 5],  # a pair of stars: two
        [8, 2, 5, 0],  # three red stars
        [9, 5, 0, 0],  # four stars: over the head's 3, counted as 3
        [0, 0, 0, 0],  # an empty caption: one
    ])
    assert model.count_targets(labels).tolist() == [0, 1, 1, 2, 2, 0]


def test_the_head_exists_only_when_configured_and_rejects_one_class():
    assert _model().count_head is None
    assert _model(count_head=4).count_head.out_features == 4
    with pytest.raises(ValueError, match="count_head=1"):
        get_config("tiny", count_head=1)


def test_training_losses_include_the_count_loss_and_train_the_head():
    images = torch.rand(1, 3, 160, 160)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0], [80.0, 80.0, 150.0, 140.0]]),
                "labels": torch.tensor([[1, 2, 3, 0], [8, 2, 5, 0]])}]
    model = _model(count_head=4, count_loss_weight=2.0).train()
    losses = model(images, targets)
    assert "count" in losses and losses["count"].item() > 0
    parts = sum(v for k, v in losses.items() if k != "total")
    assert torch.allclose(losses["total"], parts)
    losses["total"].backward()
    assert model.count_head.weight.grad is not None and model.count_head.weight.grad.abs().sum() > 0
    # the weight scales it: the same step at weight 1 gives half
    half = _model(count_head=4, count_loss_weight=1.0).train()
    half.load_state_dict(model.state_dict())
    torch.manual_seed(3)
    a = half(images, targets)["count"]
    torch.manual_seed(3)
    b = model(images, targets)["count"]
    assert torch.allclose(b, 2 * a)
    assert "count" not in _model().train()(images, targets)


def test_init_weights_without_the_head_load_and_misfits_are_refused():
    plain = _model()
    with_head = _model(count_head=4)
    fresh = with_head.count_head.weight.detach().clone()
    with_head.load_init_state(plain.state_dict())
    assert torch.equal(with_head.count_head.weight, fresh)  # the new head keeps its own start
    assert torch.equal(with_head.recognition.fc7.weight, plain.recognition.fc7.weight)
    with pytest.raises(RuntimeError):
        _model(fc_dim=256).load_init_state(plain.state_dict())
    state = dict(plain.state_dict())
    del state["recognition.fc7.weight"]
    with pytest.raises(RuntimeError, match="recognition.fc7.weight"):
        _model(count_head=4).load_init_state(state)
