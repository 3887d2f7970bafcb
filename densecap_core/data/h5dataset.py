"""The torch ``Dataset`` over a preprocessed HDF5 file (``densecap preprocess``), and its collate function.

``DenseCapH5Dataset(h5_path, "train")[i]`` is ``(image, target)``:

- ``image``: uint8 tensor 3 x H x W, RGB, cropped to the image's real (resized) size, no padding;
- ``target``: ``{"boxes": float32 [N, 4] x1y1x2y2 in that image's pixels (0-indexed, continuous),
  "labels": int64 [N, L] token ids 0-padded (L = 15 by default), "image_id": int64 scalar (the source
  dataset's id; -1 when the file has none), "index": int64 scalar (row in the file)}``.

The file is opened lazily, once per process (each DataLoader worker opens its own handle; an h5py handle
must not cross a fork). Small per-image tables are read once at construction. Files written by the
original DenseCap ``preprocess.py`` (BGR, no ``channel_order`` attribute) read the same way: channels are
flipped to RGB.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from densecap_core.data import h5layout


class DenseCapH5Dataset(Dataset):
    """One split of a preprocessed DenseCap HDF5 file.

    ``cache_images``: keep up to this many decoded images per process in memory (LRU); 0 disables. Useful
    when a small synthetic set is read for many epochs.
    """

    def __init__(self, h5_path: str | Path, split: str = "train", *, cache_images: int = 0):
        if split not in h5layout.SPLIT_CODES:
            raise ValueError(f"split must be one of {list(h5layout.SPLIT_CODES)}, not {split!r}")
        self.h5_path = str(h5_path)
        self.split = split
        self.cache_images = int(cache_images)
        if not Path(self.h5_path).is_file():
            raise FileNotFoundError(f"{self.h5_path}: no such HDF5 file; make one with `densecap preprocess`")
        with h5py.File(self.h5_path, "r") as f:
            codes = np.asarray(f["split"][:]).astype(np.int64)
            self.indices = np.flatnonzero(codes == h5layout.SPLIT_CODES[split])
            self.heights = np.asarray(f["image_heights"][:], np.int64)
            self.widths = np.asarray(f["image_widths"][:], np.int64)
            self.first_box = np.asarray(f["img_to_first_box"][:], np.int64) - 1  # 0-based, inclusive
            self.last_box = np.asarray(f["img_to_last_box"][:], np.int64)  # 0-based, exclusive
            self.image_ids = (np.asarray(f["image_ids"][:], np.int64) if "image_ids" in f
                              else np.full(len(codes), -1, np.int64))
            self.bgr = str(f.attrs.get("channel_order", "BGR")) == "BGR"
            self.label_length = int(f["labels"].shape[1])
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.indices)

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            # A handle inherited through fork is unsafe: open our own (and drop the inherited cache).
            self._file = h5py.File(self.h5_path, "r")
            self._pid = os.getpid()
            self._cache.clear()
        return self._file

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"], state["_pid"], state["_cache"] = None, None, OrderedDict()
        return state

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def _image(self, row: int) -> np.ndarray:
        if row in self._cache:
            self._cache.move_to_end(row)
            return self._cache[row]
        h, w = int(self.heights[row]), int(self.widths[row])
        pixels = self._h5()["images"][row, :, :h, :w]
        if self.bgr:
            pixels = pixels[::-1]
        pixels = np.ascontiguousarray(pixels)
        if self.cache_images > 0:
            self._cache[row] = pixels
            if len(self._cache) > self.cache_images:
                self._cache.popitem(last=False)
        return pixels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        row = int(self.indices[i])
        f = self._h5()
        image = torch.from_numpy(self._image(row).copy())
        lo, hi = int(self.first_box[row]), int(self.last_box[row])
        boxes = h5layout.to_xyxy(f["boxes"][lo:hi])
        labels = np.asarray(f["labels"][lo:hi], np.int64)
        target = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                  "image_id": torch.tensor(int(self.image_ids[row])), "index": torch.tensor(row)}
        return image, target


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Keep images of different sizes as a list (the model's ``preprocess`` batches them)."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)
