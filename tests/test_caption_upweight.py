"""caption_upweight_words / caption_upweight: the caption loss of regions whose truth caption holds a named word
counts more (a training-step weight, e.g. the group phrases' count words on the synthetic scenes)."""

from __future__ import annotations

import pytest
import torch

from densecap_core.config import get_config
from densecap_core.model import build_model


def _model(**overrides):
    torch.manual_seed(0)
    model = build_model(get_config("tiny", image_size=160, **overrides), 6)
    model.use_vocabulary({"a": 1, "red": 2, "circle": 3, "two": 4, "stars": 5, "pair": 6})
    return model


def test_regions_naming_a_listed_word_weigh_more():
    model = _model(caption_upweight_words="two, pair", caption_upweight=3.0)
    labels = torch.tensor([[1, 2, 3, 0], [4, 2, 5, 0], [1, 6, 0, 0]])
    assert model.caption_weights(labels).tolist() == [1.0, 3.0, 3.0]
    assert _model().caption_weights(labels) is None  # the default weights nothing


def test_weighted_loss_is_each_regions_loss_times_its_weight():
    lm = _model().language_model
    labels = torch.tensor([[1, 2, 3, 0], [4, 2, 5, 0]])
    logits = torch.randn(2, labels.shape[1] + 2, lm.vocab_size + 1)
    each = [lm.loss(logits[i:i + 1], labels[i:i + 1]) for i in range(2)]
    weighted = lm.loss(logits, labels, torch.tensor([1.0, 3.0]))
    assert torch.allclose(weighted, (each[0] + 3 * each[1]) / 2)
    assert torch.allclose(lm.loss(logits, labels, torch.ones(2)), lm.loss(logits, labels))


def test_a_word_the_vocabulary_lacks_is_refused():
    with pytest.raises(ValueError, match="zebra not in the vocabulary"):
        _model(caption_upweight_words="two,zebra", caption_upweight=2.0)


def test_training_losses_use_the_weights():
    """The same step with the weight on scores a larger caption loss when the batch has a listed word."""
    images = torch.rand(1, 3, 160, 160)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 60.0], [80.0, 80.0, 150.0, 140.0]]),
                "labels": torch.tensor([[1, 2, 3, 0], [4, 2, 5, 0]])}]
    plain, weighted = _model(), _model(caption_upweight_words="two", caption_upweight=5.0)
    weighted.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    a = plain.train()(images, targets)["captioning"]
    torch.manual_seed(1)
    b = weighted.train()(images, targets)["captioning"]
    assert b > a * 1.5
    torch.manual_seed(1)  # the captioner-only step too
    assert weighted.caption_losses(images, targets)["captioning"] > plain.caption_losses(images, targets)["captioning"]
