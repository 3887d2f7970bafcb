"""A minimal writer of Torch7's binary serialisation (``torch.save`` with the default "binary" format), for tests.

It writes what ``torch.save`` writes on a 64-bit little-endian machine, so files it makes can be read by
``torchfile`` (and by Lua Torch). Python values map to Lua values as follows:

- ``None`` -> nil, ``bool`` -> boolean, ``int``/``float`` -> number (a double), ``str``/``bytes`` -> string;
- ``dict`` -> table; ``list``/``tuple`` -> table with keys 1..n;
- ``numpy.ndarray`` -> ``torch.FloatTensor`` / ``DoubleTensor`` / ``LongTensor`` / ``IntTensor`` / ``ByteTensor``
  by dtype, with its own storage (``T7Tensor`` writes a column-major layout, to exercise strides);
- ``T7Object(typename, fields)`` -> an instance of a Torch class such as ``nn.Linear`` or ``DenseCapModel``.

Objects that appear twice (the same Python object) are written once and referenced by index afterwards, as
Torch does, so shared modules and cycles (nngraph nodes pointing at each other) round-trip.

Format per value: int32 type tag (0 nil, 1 number, 2 string, 3 table, 4 torch object, 5 boolean); a number is a
float64; a string is int32 length + bytes; tables and torch objects carry an int32 reference index, then (first
time only) a table's int32 entry count and key/value pairs, or an object's version string "V 1", class name
and class-specific payload. A tensor's payload is int32 ndim, int64 sizes[ndim], int64 strides[ndim], int64
1-based storage offset, then its storage object (int64 element count + raw little-endian data).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

NIL, NUMBER, STRING, TABLE, TORCH, BOOLEAN = 0, 1, 2, 3, 4, 5
_TENSOR_CLASSES = {np.dtype(np.float32): "Float", np.dtype(np.float64): "Double", np.dtype(np.int64): "Long",
                   np.dtype(np.int32): "Int", np.dtype(np.uint8): "Byte"}


@dataclass(eq=False)
class T7Object:
    """An instance of Torch class ``typename`` whose fields (a Lua table) are ``fields``."""
    typename: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class T7Tensor:
    """A tensor written with column-major strides (same values as ``array``, different storage layout)."""
    array: np.ndarray


class T7Writer:
    def __init__(self, f: BinaryIO):
        self.f = f
        self.index: dict[int, int] = {}
        self.keep: list[Any] = []  # keep objects alive so their id() stays unique while writing

    def _int(self, v: int) -> None:
        self.f.write(struct.pack("<i", v))

    def _long(self, v: int) -> None:
        self.f.write(struct.pack("<q", v))

    def _string(self, s: str | bytes) -> None:
        b = s.encode("utf-8") if isinstance(s, str) else s
        self._int(len(b))
        self.f.write(b)

    def _reference(self, obj: Any) -> bool:
        """Write the reference index; True when the object was written before (nothing more to write)."""
        if id(obj) in self.index:
            self._int(self.index[id(obj)])
            return True
        self.index[id(obj)] = len(self.index) + 1
        self.keep.append(obj)
        self._int(self.index[id(obj)])
        return False

    def write(self, obj: Any) -> None:
        if obj is None:
            self._int(NIL)
        elif isinstance(obj, bool):
            self._int(BOOLEAN)
            self._int(1 if obj else 0)
        elif isinstance(obj, (int, float, np.integer, np.floating)):
            self._int(NUMBER)
            self.f.write(struct.pack("<d", float(obj)))
        elif isinstance(obj, (str, bytes)):
            self._int(STRING)
            self._string(obj)
        elif isinstance(obj, (np.ndarray, T7Tensor)):
            self._int(TORCH)
            if not self._reference(obj):
                self._tensor(obj)
        elif isinstance(obj, T7Object):
            self._int(TORCH)
            if not self._reference(obj):
                self._string("V 1")
                self._string(obj.typename)
                self.write(obj.fields)
        elif isinstance(obj, (dict, list, tuple)):
            self._int(TABLE)
            if not self._reference(obj):
                items = obj.items() if isinstance(obj, dict) else enumerate(obj, start=1)
                items = list(items)
                self._int(len(items))
                for k, v in items:
                    self.write(k)
                    self.write(v)
        else:
            raise TypeError(f"cannot write {type(obj).__name__} to a Torch7 file")

    def _tensor(self, obj: np.ndarray | T7Tensor) -> None:
        column_major = isinstance(obj, T7Tensor)
        array = np.asarray(obj.array if column_major else obj)
        kind = _TENSOR_CLASSES.get(array.dtype)
        if kind is None:
            raise TypeError(f"no Torch tensor type for dtype {array.dtype}")
        self._string("V 1")
        self._string(f"torch.{kind}Tensor")
        if array.size == 0:  # Torch writes an empty tensor as 0 dimensions and no storage
            self._int(0)
            self._long(1)
            self._int(NIL)
            return
        self._int(array.ndim)
        if column_major:
            data = array.flatten(order="F")
            strides = np.cumprod((1,) + array.shape[:-1]).tolist()
        else:
            data = array.flatten(order="C")
            strides = (np.cumprod((1,) + array.shape[::-1][:-1])[::-1]).tolist()
        for s in array.shape:
            self._long(int(s))
        for s in strides:
            self._long(int(s))
        self._long(1)
        # the storage is its own torch object
        self._int(TORCH)
        self._reference(data)
        self._string("V 1")
        self._string(f"torch.{kind}Storage")
        self._long(data.size)
        self.f.write(data.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


def write_t7(path, obj: Any) -> None:
    """Serialise ``obj`` to ``path`` as ``torch.save(path, obj)`` would."""
    with open(path, "wb") as f:
        T7Writer(f).write(obj)
