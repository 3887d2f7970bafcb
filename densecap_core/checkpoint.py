"""Checkpoints: one file holding config, vocabulary, weights and a model card.

Format (a plain dict, loadable with ``torch.load(..., weights_only=True)``)::

    {"format": "densecap-live/1", "config": {...ModelConfig...}, "vocab": [token, ...],
     "card": {"dataset": ..., "image_size": ..., "metrics": {...}, ...}, "state_dict": {name: tensor}}

The embedded default model ships inside the package as ``densecap_core/weights/default.pt``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, get_config
from .model import DenseCapModel, build_model
from .vocab import Vocabulary

FORMAT = "densecap-live/1"
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "default.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or not in our format; the message says what to do."""


@dataclass
class Checkpoint:
    model: DenseCapModel
    config: ModelConfig
    vocab: Vocabulary
    card: dict[str, Any]


def default_checkpoint_path() -> Path | None:
    """The embedded default model, or None when this install has none."""
    return DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_file() else None


def save_checkpoint(path: str | os.PathLike, model: DenseCapModel, config: ModelConfig, vocab: Vocabulary,
                    card: dict[str, Any] | None = None, half: bool = False) -> Path:
    """Write atomically (temp file + rename), so an interrupted save never leaves a broken file.

    ``half=True`` stores floating-point weights as float16 (half the size; loaded back as float32).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Contiguous (NCHW) copies: a model trained channels-last stores the same layout as any other.
    state = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).cpu()
             .clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
    blob = {"format": FORMAT, "config": config.to_dict(), "vocab": vocab.to_list(), "card": dict(card or {}),
            "state_dict": state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(blob, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is meant to be shared (images, other users)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | os.PathLike | None = None, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint (None or ``"default"``: the embedded model). Returns the model in eval mode, float32."""
    if path is None or str(path) == "default":
        path = default_checkpoint_path()
        if path is None:
            raise CheckpointError(
                "no checkpoint given and this install has no embedded default model "
                f"({DEFAULT_CHECKPOINT}); pass --checkpoint PATH (train one with `densecap train`, or convert "
                "the original with `densecap convert-t7`)")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not our format"
        raise CheckpointError(f"{path} is not a readable densecap-live checkpoint ({exc.__class__.__name__}: {exc}); "
                              "Torch7 .t7 files must first be converted with `densecap convert-t7`") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a densecap-live checkpoint (format {blob.get('format') if isinstance(blob, dict) else type(blob).__name__!r}, want {FORMAT!r})")
    config = ModelConfig.from_dict(blob["config"])
    vocab = Vocabulary.from_list(blob["vocab"])
    with torch.device("meta"):  # no random initialisation: every tensor comes from the file (seconds for vgg16)
        model = build_model(config, len(vocab))
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match config {config.name!r}: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    return Checkpoint(model=model, config=config, vocab=vocab, card=blob.get("card", {}))


RANDOM_WORDS = ("a", "the", "red", "blue", "green", "small", "large", "circle", "square", "star", "man",
                "dog", "tree", "sky", "on", "of", "with", "white", "black", "window")


def make_random_checkpoint(path: str | os.PathLike, config: str | ModelConfig = "tiny", seed: int = 0,
                           vocab: list[str] | None = None, **overrides) -> Path:
    """A small randomly initialised model, for tests: its captions are random words, its boxes meaningless."""
    cfg = get_config(config, **overrides) if isinstance(config, str) else config
    torch.manual_seed(seed)
    voc = Vocabulary(list(vocab or RANDOM_WORDS))
    model = build_model(cfg, len(voc))
    with torch.no_grad():  # make the untrained objectness scores differ so there is something to rank
        model.recognition.objectness.weight.normal_(0, 0.5)
    return save_checkpoint(path, model, cfg, voc, {"dataset": "none (random initialisation, for tests)",
                                                   "seed": seed, "random": True})
