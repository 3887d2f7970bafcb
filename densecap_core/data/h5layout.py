"""The HDF5 file layout written by ``preprocess`` and read by ``h5dataset``: names, box convention, vocabulary.

Torch-free (numpy + json). The layout is the original DenseCap's (``docs/data.md`` has the table), so our
reader also reads files made by the original ``preprocess.py``; the differences are marked in the file's
attributes (``channel_order``: ours is ``RGB``, the original's was BGR and has no attribute).

Box convention. Annotations (``region_descriptions.json``) use 0-indexed, continuous pixel boxes
``x, y, width, height``: a box over a whole W x H image is ``0, 0, W, H``. The ``boxes`` dataset keeps the
original's integer ``xc, yc, w, h`` with 1-indexed centres ``xc = x + 1 + w // 2`` (the original computed
``x1 + floor(w/2)`` from a 1-indexed left edge ``x1``); ``to_xyxy`` undoes that exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FORMAT = "densecap-h5"
VERSION = 1
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def from_xywh0(boxes: np.ndarray) -> np.ndarray:
    """Integer 0-indexed ``[x, y, w, h]`` rows -> the file's int32 ``[xc, yc, w, h]`` (1-indexed centres)."""
    b = np.asarray(boxes, np.int64).reshape(-1, 4)
    out = np.empty_like(b)
    out[:, 0] = b[:, 0] + 1 + b[:, 2] // 2
    out[:, 1] = b[:, 1] + 1 + b[:, 3] // 2
    out[:, 2:] = b[:, 2:]
    return out.astype(np.int32)


def to_xywh0(boxes: np.ndarray) -> np.ndarray:
    """The file's ``[xc, yc, w, h]`` rows -> integer 0-indexed ``[x, y, w, h]`` (inverse of ``from_xywh0``)."""
    b = np.asarray(boxes, np.int64).reshape(-1, 4)
    out = np.empty_like(b)
    out[:, 0] = b[:, 0] - 1 - b[:, 2] // 2
    out[:, 1] = b[:, 1] - 1 - b[:, 3] // 2
    out[:, 2:] = b[:, 2:]
    return out


def to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """The file's ``[xc, yc, w, h]`` rows -> float32 ``[x1, y1, x2, y2]``, 0-indexed continuous pixels."""
    b = to_xywh0(boxes).astype(np.float32)
    b[:, 2] += b[:, 0]
    b[:, 3] += b[:, 1]
    return b


def write_vocab_json(path: str | Path, idx_to_token: list[str], filenames: list[str], info: dict) -> None:
    """The original's JSON (``token_to_idx``, ``idx_to_token``, ``filename_to_idx``, ``idx_to_filename``;
    indices 1-based, JSON keys strings) plus ``info`` (options and counts of the run)."""
    doc = {
        "token_to_idx": {t: i + 1 for i, t in enumerate(idx_to_token)},
        "idx_to_token": {str(i + 1): t for i, t in enumerate(idx_to_token)},
        "filename_to_idx": {f: i + 1 for i, f in enumerate(filenames)},
        "idx_to_filename": {str(i + 1): f for i, f in enumerate(filenames)},
        "info": info,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")


def read_idx_to_token(path: str | Path) -> list[str]:
    """The vocabulary of a preprocess JSON as a list (position ``i`` holds token id ``i + 1``): what
    ``densecap_core.vocab.Vocabulary(...)`` takes."""
    with open(path) as f:
        doc = json.load(f)
    table = doc["idx_to_token"]
    n = len(table)
    missing = [i for i in range(1, n + 1) if str(i) not in table]
    if missing:
        raise ValueError(f"{path}: idx_to_token is not 1..{n} (missing {missing[:5]}); is this a preprocess JSON?")
    return [table[str(i)] for i in range(1, n + 1)]
