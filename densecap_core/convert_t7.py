"""Convert the original DenseCap Torch7 checkpoint (``densecap-pretrained-vgg16.t7``) into our checkpoint format.

    densecap convert-t7 data/models/densecap/densecap-pretrained-vgg16.t7 densecap-vgg16.pt

Stages, one function each:

1. ``read_t7``: parse the file with ``torchfile``; tensor storages are views of one read-only memory map of the
   file, so the ~1.2 GB file (weights plus the ``gradWeight`` buffers the original left in it) is never copied
   into memory; only the weights we use are read.
2. ``find_parts``: locate ``model.nets.{conv_net1, conv_net2, localization_layer, recog_base, objectness_branch,
   box_reg_branch, language_model}``; if one is missing from ``nets``, look for it by structure (its class, an
   nngraph node annotated with its name, or its slot in ``model.net``).
3. ``extract``: read every tensor we need into an ``OriginalDenseCap`` record, checking each module's class and
   shape against the others (vocabulary size, widths, anchor count, LSTM sizes) and failing with a
   ``ConversionError`` that names the module and what was expected.
4. ``converted_config`` and ``load_weights``: the ``vgg16`` config adjusted to what the file says, and the
   tensors copied into a model of that config (LSTM gate blocks reordered, embedding rows shifted, test-time
   dropout scaling folded into the next layer where an old-style Dropout asks for it).
5. ``convert_t7``: all of the above plus ``save_checkpoint`` with a model card.

docs/convert-t7.md explains each mapping and decision.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

SOURCE_URL = "http://cs.stanford.edu/people/jcjohns/densecap/densecap-pretrained-vgg16.t7.zip"
#: The authors' number for the released model (VG test, 1000 proposals); not re-measured here.
CLAIMED_MAP = 5.70
VGG16_WIDTHS = (64, 128, 256, 512, 512)
#: conv (C) + ReLU (R) per VGG conv, pool (P) per block end; conv1_1 .. relu5_3, no pool5 (the original's layers 1-30).
VGG16_PATTERN = "CRCRP" "CRCRP" "CRCRCRP" "CRCRCRP" "CRCRCR"
VGG16_BLOCK_OF_CONV = (0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4)
PARTS = ("conv_net1", "conv_net2", "localization_layer", "recog_base", "objectness_branch", "box_reg_branch",
         "language_model")


class ConversionError(RuntimeError):
    """The input is not a convertible DenseCap checkpoint; the message names what is missing or unexpected."""


# --------------------------------------------------------------------------------------------------------------
# 1. Reading
# --------------------------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    b"torch.FloatStorage": np.float32, b"torch.DoubleStorage": np.float64, b"torch.LongStorage": np.int64,
    b"torch.IntStorage": np.int32, b"torch.ShortStorage": np.int16, b"torch.CharStorage": np.int8,
    b"torch.ByteStorage": np.uint8, b"torch.CudaStorage": np.float32, b"torch.CudaDoubleStorage": np.float64,
}


def _mapped_reader_class():
    """A ``torchfile.T7Reader`` whose storages are slices of a memory map instead of copies.

    torchfile looks storage readers up in its module-level ``type_handlers``; we wrap those entries once so that
    they map storages for our reader class and behave exactly as before for every other reader.
    """
    import torchfile

    class MappedT7Reader(torchfile.T7Reader):
        def __init__(self, fileobj, path: Path):
            super().__init__(fileobj)
            self.mapped = np.memmap(path, dtype=np.uint8, mode="r")

        def map_storage(self, dtype) -> np.ndarray:
            count = self.read_long()
            start = self.f.tell()
            nbytes = count * np.dtype(dtype).itemsize
            if count < 0 or start + nbytes > len(self.mapped):
                raise ConversionError(f"a tensor storage of {count} elements runs past the end of the file "
                                      f"({len(self.mapped)} bytes): the file is truncated")
            self.f.seek(nbytes, os.SEEK_CUR)
            return self.mapped[start:start + nbytes].view(dtype)

    for name, dtype in _STORAGE_DTYPES.items():
        previous = torchfile.type_handlers.get(name)
        if previous is None or getattr(previous, "densecap_mapped", False):
            continue

        def handler(reader, version, _dtype=dtype, _previous=previous):
            if isinstance(reader, MappedT7Reader):
                return reader.map_storage(_dtype)
            return _previous(reader, version)

        handler.densecap_mapped = True
        torchfile.type_handlers[name] = handler
    return MappedT7Reader


_READER_CLASS = None


def read_t7(path: str | os.PathLike) -> Any:
    """Parse a Torch7 binary file (``torch.save`` default format) with storages memory-mapped.

    Returns torchfile's objects: ``TorchObject`` for class instances, dicts/lists for tables, numpy arrays
    (read-only views of the file) for tensors, bytes for strings.
    """
    global _READER_CLASS
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} does not exist (download it with the original's "
                              f"scripts/download_pretrained_model.sh, or from {SOURCE_URL}, then unzip it)")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        raise ConversionError(f"{path} is a zip archive, not a Torch7 file: unzip it first (the download "
                              "densecap-pretrained-vgg16.t7.zip holds densecap-pretrained-vgg16.t7); if it is "
                              "already a densecap-live .pt checkpoint there is nothing to convert")
    tag = struct.unpack("<i", head[:4])[0] if len(head) >= 4 else None
    if tag not in (3, 4):  # a Lua table or a torch object, the only things torch.save writes at the top
        hint = (" It looks like text: files saved with torch.save(path, obj, 'ascii') are not supported; "
                "re-save in Lua with torch.save(path, torch.load(path, 'ascii')).") if head[:1].isdigit() else ""
        raise ConversionError(f"{path} is not a Torch7 binary file (it does not start with a serialised table "
                              f"or object).{hint}")
    if _READER_CLASS is None:
        _READER_CLASS = _mapped_reader_class()
    try:
        with open(path, "rb") as f:
            return _READER_CLASS(f, path).read_obj()
    except ConversionError:
        raise
    except Exception as exc:  # noqa: BLE001 - torchfile raises anything from struct.error to EOFError
        raise ConversionError(f"{path} could not be read as a Torch7 binary file ({exc.__class__.__name__}: "
                              f"{exc}); is the download complete? (the .t7 is about 1.2 GB)") from exc


# --------------------------------------------------------------------------------------------------------------
# Helpers over torchfile's objects
# --------------------------------------------------------------------------------------------------------------

def _is_object(obj) -> bool:
    """A torchfile ``TorchObject`` (a Torch class instance); its ``hashable_uniq_dict`` tables answer any
    attribute with None, so ``hasattr`` cannot tell them apart."""
    from torchfile import TorchObject

    return isinstance(obj, TorchObject)


def _table(obj) -> dict | None:
    if _is_object(obj):
        obj = obj._obj
    return obj if isinstance(obj, dict) else None


def _get(obj, key: str, default=None):
    """Field ``key`` of a torch object or Lua table (torchfile keeps string keys as bytes)."""
    t = _table(obj)
    if t is None:
        return default
    value = t.get(key.encode())
    if value is None:
        value = t.get(key)
    return default if value is None else value


def _text(value) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    return str(value)


def _class(obj) -> str:
    """Class name without the package prefix ("nn.Linear" -> "Linear", "DenseCapModel" stays); "" if none."""
    if not _is_object(obj):
        return ""
    name = _text(obj.torch_typename())
    for prefix in ("nn.", "cudnn.", "nngraph.", "graph."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _describe(obj) -> str:
    if obj is None:
        return "nothing"
    if isinstance(obj, np.ndarray):
        return f"a tensor of shape {list(obj.shape)}"
    name = _class(obj)
    return f"a {name}" if name else f"a {type(obj).__name__}"


def _children(module) -> list:
    mods = _get(module, "modules")
    return mods if isinstance(mods, list) else []


def _leaves(module) -> Iterator[Any]:
    """Non-container modules under ``module``, depth-first in ``modules`` order (Sequential/Concat/Parallel)."""
    kids = _children(module)
    if not kids and _class(module) not in ("Sequential", "ConcatTable", "ParallelTable"):
        yield module
        return
    for kid in kids:
        yield from _leaves(kid)


def _tensor(module, name: str, where: str, ndim: int | None = None) -> np.ndarray:
    value = _get(module, name)
    if not isinstance(value, np.ndarray) or value.size == 0:
        raise ConversionError(f"{where}: expected a tensor field {name!r}, found {_describe(value)}")
    if ndim is not None and value.ndim != ndim:
        raise ConversionError(f"{where}.{name}: expected a {ndim}-d tensor, found shape {list(value.shape)}")
    return value


def _number(module, name: str, default=None):
    value = _get(module, name, default)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _walk(root) -> Iterator[Any]:
    """Every object reachable from ``root`` once (tables, torch objects, nngraph nodes; cycles are fine)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, (np.ndarray, bytes, str, int, float, bool)) or obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        t = _table(obj)
        if t is not None:
            stack.extend(v for v in t.values())
            stack.extend(k for k in t.keys() if not isinstance(k, (bytes, str, int, float)))
        elif isinstance(obj, list):
            stack.extend(obj)


# --------------------------------------------------------------------------------------------------------------
# 2. Finding the parts
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Located:
    """The checkpoint's model and its parts, with where each was found (for messages and the card)."""
    checkpoint: Any
    model: Any
    parts: dict[str, Any]
    found_at: dict[str, str]


def _model_of(root) -> Any:
    if _get(root, "nets") is not None:
        return root  # a bare torch.save(model)
    model = _get(root, "model")
    if model is None:
        keys = sorted(_text(k) for k in (_table(root) or {}).keys())
        raise ConversionError(f"the file holds {_describe(root)} with keys {keys[:12]}, not a DenseCap checkpoint "
                              "(expected a table with 'model', as the original train.lua saves)")
    if _get(model, "nets") is None:
        raise ConversionError(f"model: expected a DenseCapModel with a 'nets' table, found {_describe(model)}")
    return model


def _fallback(model, name: str) -> tuple[Any, str] | None:
    """Find part ``name`` by structure when ``model.nets`` lacks it."""
    by_class = {"localization_layer": "LocalizationLayer", "language_model": "LanguageModel"}
    found: list[tuple[Any, str]] = []
    if name in by_class:
        found = [(o, f"the only {by_class[name]} in the model") for o in _walk(model) if _class(o) == by_class[name]]
    elif name in ("recog_base", "objectness_branch", "box_reg_branch"):
        # nngraph nodes of the recognition gModule carry the names DenseCapModel annotated them with.
        for o in _walk(model):
            data = _get(o, "data") if _class(o) == "Node" else None
            if data is not None and _text(_get(_get(data, "annotations"), "name", b"")) == name \
                    and _get(data, "module") is not None:
                found.append((_get(data, "module"), f"the nngraph node annotated {name!r}"))
    elif name in ("conv_net1", "conv_net2"):
        top = _children(_get(model, "net"))
        if len(top) == 4:
            i = 0 if name == "conv_net1" else 1
            found = [(top[i], f"model.net.modules[{i + 1}]")]
    unique = {id(m): (m, w) for m, w in found}
    if len(unique) > 1:
        raise ConversionError(f"model.nets.{name} is missing and {len(unique)} candidates were found by structure; "
                              "cannot tell which one to convert")
    return next(iter(unique.values()), None)


def find_parts(root) -> Located:
    model = _model_of(root)
    cnn = _text(_get(_get(model, "opt"), "cnn_name", b"vgg-16"))
    if cnn != "vgg-16":
        raise ConversionError(f"model.opt.cnn_name is {cnn!r}; only the original VGG-16 DenseCap can be converted")
    nets = _get(model, "nets")
    parts, found_at = {}, {}
    for name in PARTS:
        module = _get(nets, name)
        where = f"model.nets.{name}"
        if module is None:
            hit = _fallback(model, name)
            if hit is None:
                raise ConversionError(f"{where} is missing (the file has model.nets."
                                      f"{{{', '.join(sorted(_text(k) for k in _table(nets)))}}}) and nothing in "
                                      "the model matches it by structure: is this a DenseCap checkpoint?")
            module, where = hit
        parts[name] = module
        found_at[name] = where
    return Located(checkpoint=root, model=model, parts=parts, found_at=found_at)


# --------------------------------------------------------------------------------------------------------------
# 3. Extracting tensors, with checks
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Linear:
    weight: np.ndarray  # out x in
    bias: np.ndarray    # out


@dataclass
class OriginalDenseCap:
    """Everything the conversion needs, as numpy views of the file plus the numbers that shape our model."""
    convs: list[Linear]            # 13 VGG convs, weight out x in x 3 x 3
    vgg_widths: tuple[int, ...]
    ceil_pooling: bool
    stride: int
    field_centers: tuple[float, float, float, float]
    rpn_conv: Linear
    rpn_box: Linear
    rpn_score: Linear
    anchors: tuple[tuple[float, float], ...]
    roi_size: int
    fc6: Linear
    fc7: Linear
    objectness: Linear
    box_reg: Linear
    image_encoder: Linear
    lookup_table: np.ndarray       # (V + 2) x W
    lstm_weight: np.ndarray        # (W + H) x 4H, torch-rnn gate order i, f, o, g
    lstm_bias: np.ndarray          # 4H
    output: Linear                 # (V + 1) x H
    vocab: list[str]
    seq_length: int
    final_nms_thresh: float
    # test-time output scale of each dropout (1 - p for an old-style "v1" Dropout, else 1), folded into the
    # layer that reads its output
    dropout_scales: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def _linear(module, where: str, out_dim: int | None = None, in_dim: int | None = None) -> Linear:
    if _class(module) != "Linear":
        raise ConversionError(f"{where}: expected an nn.Linear, found {_describe(module)}")
    w = _tensor(module, "weight", where, ndim=2)
    b = _tensor(module, "bias", where, ndim=1)
    if b.shape[0] != w.shape[0]:
        raise ConversionError(f"{where}: weight {list(w.shape)} and bias {list(b.shape)} disagree")
    if (out_dim is not None and w.shape[0] != out_dim) or (in_dim is not None and w.shape[1] != in_dim):
        want = f"{out_dim if out_dim is not None else 'any'} x {in_dim if in_dim is not None else 'any'}"
        raise ConversionError(f"{where}: expected an nn.Linear with weight {want} (out x in), "
                              f"found {list(w.shape)}")
    return Linear(w, b)


def _conv(module, where: str, kernel: int, in_dim: int | None = None) -> Linear:
    """A stride-1 "same" convolution with square ``kernel``; weight returned as out x in x k x k."""
    if _class(module) not in ("SpatialConvolution", "SpatialConvolutionMM"):
        raise ConversionError(f"{where}: expected an nn.SpatialConvolution, found {_describe(module)}")
    geometry = {k: _number(module, k) for k in ("kW", "kH", "dW", "dH", "padW", "padH")}
    want = {"kW": kernel, "kH": kernel, "dW": 1, "dH": 1, "padW": kernel // 2, "padH": kernel // 2}
    if any(geometry[k] is not None and geometry[k] != v for k, v in want.items()):
        raise ConversionError(f"{where}: expected a {kernel}x{kernel} convolution with stride 1 and padding "
                              f"{kernel // 2}, found {geometry}")
    if _number(module, "groups", 1) != 1:
        raise ConversionError(f"{where}: grouped convolutions are not supported")
    w = _get(module, "weight")
    b = _tensor(module, "bias", where, ndim=1)
    n_out = b.shape[0]
    n_in = _number(module, "nInputPlane") or (w.size // (n_out * kernel * kernel) if isinstance(w, np.ndarray) else 0)
    if not isinstance(w, np.ndarray) or w.size != n_out * n_in * kernel * kernel:
        raise ConversionError(f"{where}: expected weight {n_out} x {n_in} x {kernel} x {kernel}, found {_describe(w)}")
    w = w.reshape(n_out, n_in, kernel, kernel)  # SpatialConvolutionMM may store it 2-d
    if in_dim is not None and n_in != in_dim:
        raise ConversionError(f"{where}: expected {in_dim} input channels, found weight {list(w.shape)}")
    return Linear(w, b)


def _dropout_scale(module, where: str, notes: list[str]) -> float:
    """Test-time output scale of a Torch Dropout: old "v1" dropout multiplies by (1 - p) at test time."""
    p = float(_number(module, "p", 0.5))
    if _get(module, "stochastic_inference", False) is True:
        raise ConversionError(f"{where}: a Dropout with stochastic_inference=true samples at test time; "
                              "its outputs cannot be reproduced deterministically")
    if _get(module, "v2", False) is True:
        return 1.0
    notes.append(f"{where}: old-style Dropout (v1, p={p}) scales its test-time output by {1 - p}; folded into "
                 "the next layer's weights")
    return 1.0 - p


def _vgg(conv_net1, conv_net2, found_at: dict[str, str], notes: list[str]):
    layers = [(found_at["conv_net1"], i, m) for i, m in enumerate(_leaves(conv_net1))] + \
             [(found_at["conv_net2"], i, m) for i, m in enumerate(_leaves(conv_net2))]
    kinds = []
    for where, i, m in layers:
        c = _class(m)
        kinds.append("C" if c in ("SpatialConvolution", "SpatialConvolutionMM") else "R" if c == "ReLU"
                     else "P" if c == "SpatialMaxPooling" else "?")
        if kinds[-1] == "?":
            raise ConversionError(f"{where}.modules[{i + 1}]: expected a VGG-16 layer (convolution, ReLU or max "
                                  f"pooling), found {_describe(m)}")
    if "".join(kinds) != VGG16_PATTERN:
        raise ConversionError(f"{found_at['conv_net1']} + {found_at['conv_net2']}: expected VGG-16 conv1_1 .. "
                              f"relu5_3 ({VGG16_PATTERN}: C conv, R ReLU, P pool), found {''.join(kinds)}")
    convs, ceil_modes, in_dim = [], [], 3
    for (where, i, m), kind in zip(layers, kinds):
        if kind == "C":
            conv = _conv(m, f"{where}.modules[{i + 1}] (conv{len(convs)})", 3, in_dim)
            convs.append(conv)
            in_dim = conv.weight.shape[0]
        elif kind == "P":
            geometry = [_number(m, k) for k in ("kW", "kH", "dW", "dH")]
            pads = [_number(m, k, 0) for k in ("padW", "padH")]
            if geometry != [2, 2, 2, 2] or pads != [0, 0]:
                raise ConversionError(f"{where}.modules[{i + 1}]: expected 2x2 max pooling with stride 2 and no "
                                      f"padding, found kW,kH,dW,dH={geometry} pad={pads}")
            ceil_modes.append(bool(_get(m, "ceil_mode", False)))
    widths = []
    for block in range(5):
        ws = {c.weight.shape[0] for c, b in zip(convs, VGG16_BLOCK_OF_CONV) if b == block}
        if len(ws) != 1:
            raise ConversionError(f"VGG block {block + 1}: its convolutions have different widths {sorted(ws)}")
        widths.append(ws.pop())
    if len(set(ceil_modes)) != 1:
        raise ConversionError(f"the VGG pools mix ceil and floor modes ({ceil_modes}); cannot size the feature map")
    if tuple(widths) != VGG16_WIDTHS:
        notes.append(f"VGG block widths {tuple(widths)} differ from VGG-16's {VGG16_WIDTHS} (a test file?)")
    return convs, tuple(widths), ceil_modes[0], 2 ** len(ceil_modes)


def _rpn(loc, where: str, in_dim: int):
    rpn = _get(_get(loc, "nets"), "rpn")
    if rpn is None:
        raise ConversionError(f"{where}.nets.rpn is missing: expected the RPN nn.Sequential")
    leaves = list(_leaves(rpn))
    makers = [m for m in leaves if _class(m) == "MakeAnchors"]
    if len(makers) != 1:
        raise ConversionError(f"{where}.nets.rpn: expected one nn.MakeAnchors, found {len(makers)}")
    raw = _tensor(makers[0], "anchors", f"{where}.nets.rpn MakeAnchors", ndim=2)
    if raw.shape[0] != 2:
        raise ConversionError(f"{where}.nets.rpn MakeAnchors.anchors: expected 2 x k (widths; heights), "
                              f"found {list(raw.shape)}")
    anchors = tuple((float(w), float(h)) for w, h in np.asarray(raw, dtype=np.float64).T)
    k = len(anchors)
    centers = tuple(_number(makers[0], n) for n in ("x0", "y0", "sx", "sy"))
    if None in centers:
        centers = tuple(_get(_get(loc, "opt"), "field_centers") or (None,) * 4)
    if len(centers) != 4 or None in centers:
        raise ConversionError(f"{where}: no receptive-field centres (MakeAnchors x0, y0, sx, sy or "
                              "opt.field_centers)")
    convs = [m for m in leaves if _class(m) in ("SpatialConvolution", "SpatialConvolutionMM")]
    if len(convs) != 3:
        raise ConversionError(f"{where}.nets.rpn: expected 3 convolutions (3x3 hidden, 1x1 box, 1x1 score), "
                              f"found {len(convs)}")
    hidden = _conv(convs[0], f"{where}.nets.rpn conv (3x3)", 3, in_dim)
    width = hidden.weight.shape[0]
    heads = [_conv(c, f"{where}.nets.rpn conv (1x1)", 1, width) for c in convs[1:]]
    box = [h for h in heads if h.weight.shape[0] == 4 * k]
    score = [h for h in heads if h.weight.shape[0] == 2 * k]
    if len(box) != 1 or len(score) != 1:
        raise ConversionError(f"{where}.nets.rpn: with {k} anchors expected 1x1 convs with {4 * k} (box) and "
                              f"{2 * k} (score) outputs, found {[h.weight.shape[0] for h in heads]}")
    return hidden, box[0], score[0], anchors, tuple(float(c) for c in centers)


def _recognition(base, where: str, feature_channels: int, notes: list[str], scales: dict[str, float]):
    leaves = list(_leaves(base))
    linears = [i for i, m in enumerate(leaves) if _class(m) == "Linear"]
    if len(linears) != 2:
        raise ConversionError(f"{where}: expected fc6 and fc7 (two nn.Linear), found {len(linears)} Linear in "
                              f"{[_class(m) for m in leaves]}")
    for i, m in enumerate(leaves):
        if _class(m) not in ("View", "Reshape", "Linear", "ReLU", "Dropout"):
            raise ConversionError(f"{where}.modules[{i + 1}]: expected View, Linear, ReLU or Dropout, "
                                  f"found {_describe(m)}")
    for name, start, end in (("fc6", linears[0], linears[1]), ("fc7", linears[1], len(leaves))):
        if [_class(m) for m in leaves[start + 1:start + 2]] != ["ReLU"]:
            raise ConversionError(f"{where}: expected a ReLU after {name}, found "
                                  f"{_describe(leaves[start + 1] if start + 1 < len(leaves) else None)}")
        dropouts = [m for m in leaves[start + 1:end] if _class(m) == "Dropout"]
        scales[name] = math.prod((_dropout_scale(d, f"{where} dropout after {name}", notes) for d in dropouts),
                                 start=1.0)
    fc6 = _linear(leaves[linears[0]], f"{where} fc6")
    cells = fc6.weight.shape[1] / feature_channels
    roi_size = int(round(math.sqrt(cells)))
    if roi_size * roi_size * feature_channels != fc6.weight.shape[1]:
        raise ConversionError(f"{where} fc6: expected {feature_channels} x s x s inputs (conv5_3 channels times "
                              f"a square RoI grid), found {fc6.weight.shape[1]}")
    fc_dim = fc6.weight.shape[0]
    fc7 = _linear(leaves[linears[1]], f"{where} fc7", fc_dim, fc_dim)
    return fc6, fc7, roi_size


def _vocabulary(located: Located, lm) -> list[str]:
    candidates = (("model.nets.language_model.idx_to_token", _get(lm, "idx_to_token")),
                  ("model.opt.idx_to_token", _get(_get(located.model, "opt"), "idx_to_token")),
                  ("opt.idx_to_token", _get(_get(located.checkpoint, "opt"), "idx_to_token")))
    for where, table in candidates:
        if table is None:
            continue
        if isinstance(table, list):
            return [_text(t) for t in table]
        if isinstance(table, dict):
            by_index = {}
            for k, v in table.items():
                try:
                    by_index[int(_text(k))] = _text(v)
                except ValueError:
                    raise ConversionError(f"{where}: expected integer keys, found {_text(k)!r}") from None
            if sorted(by_index) != list(range(1, len(by_index) + 1)):
                missing = sorted(set(range(1, len(by_index) + 1)) - set(by_index))[:5]
                raise ConversionError(f"{where}: expected tokens 1..{len(by_index)}, missing {missing}")
            return [by_index[i] for i in range(1, len(by_index) + 1)]
        raise ConversionError(f"{where}: expected a table of tokens, found {_describe(table)}")
    raise ConversionError("no vocabulary: none of model.nets.language_model.idx_to_token, model.opt.idx_to_token, "
                          "opt.idx_to_token is present")


def _language_model(located: Located, fc_dim: int, notes: list[str], scales: dict[str, float]):
    lm, where = located.parts["language_model"], located.found_at["language_model"]
    enc = [m for m in _leaves(_get(lm, "image_encoder")) if _class(m) == "Linear"]
    if len(enc) != 1:
        raise ConversionError(f"{where}.image_encoder: expected one nn.Linear ({fc_dim} -> W), found {len(enc)}")
    image_encoder = _linear(enc[0], f"{where}.image_encoder", in_dim=fc_dim)
    embed_dim = image_encoder.weight.shape[0]
    lookup = _get(lm, "lookup_table")
    if _class(lookup) != "LookupTable":
        raise ConversionError(f"{where}.lookup_table: expected an nn.LookupTable, found {_describe(lookup)}")
    table = _tensor(lookup, "weight", f"{where}.lookup_table", ndim=2)
    rnn = _get(lm, "rnn")
    leaves = list(_leaves(rnn))
    lstms = [m for m in leaves if _class(m) == "LSTM"]
    if len(lstms) != 1:
        raise ConversionError(f"{where}.rnn: expected one torch-rnn nn.LSTM (our language model has one layer), "
                              f"found {len(lstms)} in {[_class(m) for m in leaves]}")
    weight = _get(lstms[0], "weight")
    bias = _get(lstms[0], "bias")
    if not (isinstance(weight, np.ndarray) and isinstance(bias, np.ndarray) and weight.ndim == 2 and bias.ndim == 1
            and bias.shape[0] % 4 == 0 and weight.shape == (embed_dim + bias.shape[0] // 4, bias.shape[0])):
        raise ConversionError(f"{where}.rnn: expected an LSTM with weight (W+H) x 4H and bias 4H for input size "
                              f"W={embed_dim}, found weight {_describe(weight)} and bias {_describe(bias)}")
    hidden = bias.shape[0] // 4
    for name, want in (("input_dim", embed_dim), ("hidden_dim", hidden)):
        got = _number(lstms[0], name)
        if got is not None and got != want:
            raise ConversionError(f"{where}.rnn LSTM.{name} is {got} but its weights imply {want}")
    outs = [i for i, m in enumerate(leaves) if _class(m) == "Linear"]
    if len(outs) != 1:
        raise ConversionError(f"{where}.rnn: expected one output nn.Linear (H -> V+1), found {len(outs)}")
    lstm_at = leaves.index(lstms[0])
    drops = [m for m in leaves[lstm_at:outs[0]] if _class(m) == "Dropout"]
    scales["lstm"] = math.prod((_dropout_scale(d, f"{where}.rnn dropout", notes) for d in drops), start=1.0)
    vocab = _vocabulary(located, lm)
    v = len(vocab)
    output = _linear(leaves[outs[0]], f"{where}.rnn output", v + 1, hidden)
    if table.shape != (v + 2, embed_dim):
        raise ConversionError(f"{where}.lookup_table: expected weight (V+2) x W = {v + 2} x {embed_dim} for a "
                              f"vocabulary of {v} words, found {list(table.shape)}")
    declared = _number(lm, "vocab_size")
    if declared is not None and declared != v:
        raise ConversionError(f"{where}.vocab_size is {declared} but idx_to_token has {v} tokens")
    for name, want in (("START_TOKEN", v + 1), ("END_TOKEN", v + 1), ("NULL_TOKEN", v + 2)):
        got = _number(lm, name)
        if got is not None and got != want:
            raise ConversionError(f"{where}.{name} is {got}; our token scheme needs {want} (V+1 START/END, V+2 NULL)")
    seq_length = int(_number(lm, "seq_length") or _number(_get(located.model, "opt"), "seq_length") or 15)
    return image_encoder, table, weight, bias, output, vocab, seq_length


def extract(located: Located) -> OriginalDenseCap:
    """Read and cross-check every tensor the conversion needs."""
    parts, found_at, notes, scales = located.parts, located.found_at, [], {}
    convs, widths, ceil, stride = _vgg(parts["conv_net1"], parts["conv_net2"], found_at, notes)
    channels = widths[-1]
    hidden, box, score, anchors, centers = _rpn(parts["localization_layer"], found_at["localization_layer"], channels)
    x0, y0, sx, sy = centers
    # Our anchors sit at stride * (j + 0.5) in 0-indexed continuous pixels = 1-indexed stride * j + stride/2 + 0.5.
    if (sx, sy) != (stride, stride) or (x0, y0) != (stride / 2 + 0.5, stride / 2 + 0.5):
        raise ConversionError(f"receptive-field centres x0,y0,sx,sy = {centers}; our model places anchors at "
                              f"{stride / 2 + 0.5} + {stride} j (1-indexed) for a stride-{stride} trunk, so these "
                              "anchors cannot be reproduced")
    fc6, fc7, roi_size = _recognition(parts["recog_base"], found_at["recog_base"], channels, notes, scales)
    fc_dim = fc6.weight.shape[0]
    objectness = _linear(parts["objectness_branch"], found_at["objectness_branch"], 1, fc_dim)
    box_reg = _linear(parts["box_reg_branch"], found_at["box_reg_branch"], 4, fc_dim)
    image_encoder, table, lstm_w, lstm_b, output, vocab, seq_length = _language_model(located, fc_dim, notes, scales)
    model_opt = _get(located.model, "opt")
    for name, want in (("output_height", roi_size), ("output_width", roi_size), ("input_dim", channels)):
        got = _number(model_opt, name)
        if got is not None and got != want:
            raise ConversionError(f"model.opt.{name} is {got} but the weights imply {want}")
    final_nms = float(_number(model_opt, "final_nms_thresh", 0.3))
    if ceil:
        notes.append("VGG pools use ceil mode (loadcaffe's Caffe-compatible pooling): RoI sampling uses "
                     "roi_mapping='original_ceil' (feature map ceil(size/16))")
    return OriginalDenseCap(
        convs=convs, vgg_widths=widths, ceil_pooling=ceil, stride=stride, field_centers=centers,
        rpn_conv=hidden, rpn_box=box, rpn_score=score, anchors=anchors, roi_size=roi_size, fc6=fc6, fc7=fc7,
        objectness=objectness, box_reg=box_reg, image_encoder=image_encoder, lookup_table=table,
        lstm_weight=lstm_w, lstm_bias=lstm_b, output=output, vocab=vocab, seq_length=seq_length,
        final_nms_thresh=final_nms, dropout_scales=scales, notes=notes)


# --------------------------------------------------------------------------------------------------------------
# 4. Our config and weights
# --------------------------------------------------------------------------------------------------------------

def converted_config(orig: OriginalDenseCap):
    """The ``vgg16`` config (preprocessing, 0.7 / 0.3 / 1000 test settings) sized as the file says."""
    from .config import get_config

    return get_config(
        "vgg16",
        vgg_widths=None if orig.vgg_widths == VGG16_WIDTHS else orig.vgg_widths,
        feature_channels=orig.vgg_widths[-1], stride=orig.stride, anchors=orig.anchors,
        rpn_channels=orig.rpn_conv.weight.shape[0], roi_size=orig.roi_size,
        roi_mapping="original_ceil" if orig.ceil_pooling else "original",
        fc_dim=orig.fc6.weight.shape[0], embed_dim=orig.image_encoder.weight.shape[0],
        hidden_dim=orig.lstm_bias.shape[0] // 4, max_caption_length=orig.seq_length,
        final_nms_thresh=orig.final_nms_thresh)


def torch_rnn_gates_to_pytorch(m: np.ndarray, axis: int = -1) -> np.ndarray:
    """Reorder the 4 gate blocks along ``axis`` from torch-rnn's (i, f, o, g) to PyTorch's (i, f, g, o)."""
    i, f, o, g = np.split(m, 4, axis=axis)
    return np.concatenate((i, f, g, o), axis=axis)


def _scaled(weight: np.ndarray, scale: float) -> np.ndarray:
    return weight if scale == 1.0 else weight * np.float32(scale)


def weight_mapping(model, orig: OriginalDenseCap) -> Iterator[tuple[str, Callable[[], np.ndarray], str]]:
    """(our state_dict key, a function giving the converted array, where it comes from) for every tensor.

    Arrays are produced lazily, one at a time, so at most one converted tensor exists beside the model.
    Dropout scales (1 for the usual "v2" Dropout): the one after fc6 scales fc7's input; the one after fc7
    scales the region codes read by objectness, box regression and the image encoder; the one inside the
    language model's rnn scales the output layer's input.
    """
    s6, s7, s_lm = (orig.dropout_scales.get(k, 1.0) for k in ("fc6", "fc7", "lstm"))
    trunk_convs = [i for i, m in enumerate(model.backbone.trunk) if type(m).__name__ == "Conv2d"]
    for n, (i, conv) in enumerate(zip(trunk_convs, orig.convs)):
        yield f"backbone.trunk.{i}.weight", lambda c=conv: c.weight, f"VGG conv {n + 1} weight"
        yield f"backbone.trunk.{i}.bias", lambda c=conv: c.bias, f"VGG conv {n + 1} bias"
    for ours, lin, scale, label in (("localization.head.conv", orig.rpn_conv, 1.0, "RPN 3x3 conv"),
                                    ("localization.head.box", orig.rpn_box, 1.0, "RPN box conv"),
                                    ("localization.head.score", orig.rpn_score, 1.0, "RPN score conv"),
                                    ("recognition.fc6", orig.fc6, 1.0, "fc6"),
                                    ("recognition.fc7", orig.fc7, s6, "fc7"),
                                    ("recognition.objectness", orig.objectness, s7, "objectness_branch"),
                                    ("recognition.box_reg", orig.box_reg, s7, "box_reg_branch"),
                                    ("language_model.image_encoder.0", orig.image_encoder, s7, "image_encoder Linear"),
                                    ("language_model.output", orig.output, s_lm, "output Linear")):
        yield f"{ours}.weight", lambda l=lin, s=scale: _scaled(l.weight, s), f"{label} weight"
        yield f"{ours}.bias", lambda l=lin: l.bias, f"{label} bias"

    def embedding() -> np.ndarray:
        # Ours is indexed by token id (row 0 unused); the LookupTable's 1-indexed row t is token t.
        table = orig.lookup_table
        out = np.zeros((table.shape[0] + 1, table.shape[1]), dtype=np.float32)
        out[1:] = table
        return out

    w = orig.image_encoder.weight.shape[0]  # LSTM input size W; weight rows [:W] act on x, [W:] on h
    yield "language_model.embedding.weight", embedding, "LookupTable weight"
    yield "language_model.lstm.weight_ih_l0", lambda: torch_rnn_gates_to_pytorch(orig.lstm_weight[:w]).T, \
        "LSTM weight[:W]"
    yield "language_model.lstm.weight_hh_l0", lambda: torch_rnn_gates_to_pytorch(orig.lstm_weight[w:]).T, \
        "LSTM weight[W:]"
    yield "language_model.lstm.bias_ih_l0", lambda: torch_rnn_gates_to_pytorch(orig.lstm_bias), "LSTM bias"
    yield "language_model.lstm.bias_hh_l0", lambda: np.zeros(orig.lstm_bias.shape, np.float32), \
        "(zero: torch-rnn has one bias)"


def load_weights(model, orig: OriginalDenseCap, progress: bool = False) -> None:
    """Copy every converted tensor into ``model`` (built from ``converted_config``); all its tensors must be set."""
    import torch
    from tqdm import tqdm

    state = model.state_dict()
    mapping = list(weight_mapping(model, orig))
    assigned = set()
    with torch.no_grad():
        for key, make, source in tqdm(mapping, desc="copying weights", unit="tensor", disable=not progress):
            if key not in state:
                raise ConversionError(f"internal: our model has no tensor {key} (for {source})")
            array = np.array(make(), dtype=np.float32, order="C")  # an aligned copy: file views may be unaligned
            if tuple(array.shape) != tuple(state[key].shape):
                raise ConversionError(f"{source}: shape {list(array.shape)} does not fit our {key} "
                                      f"{list(state[key].shape)}")
            state[key].copy_(torch.from_numpy(array))
            assigned.add(key)
    left = [k for k in state if k not in assigned]
    if left:
        raise ConversionError(f"internal: the file has nothing for our tensors {left[:6]}; the model changed "
                              "since this converter was written")


# --------------------------------------------------------------------------------------------------------------
# 5. The whole conversion
# --------------------------------------------------------------------------------------------------------------

def _plain(value, depth: int = 0):
    """JSON-like copy of a Lua value for the model card; tensors and long tables (the vocabulary) are left out."""
    if isinstance(value, bytes):
        return _text(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, list) and len(value) <= 16 and depth < 2:
        items = [_plain(v, depth + 1) for v in value]
        return items if all(i is not None for i in items) else None
    if isinstance(value, dict) and len(value) <= 64 and depth < 2:
        out = {_text(k): _plain(v, depth + 1) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not None}
    return None


def _sha256(path: Path, progress: bool) -> str:
    from tqdm import tqdm

    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="sha256",
                                     disable=not progress) as bar:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def model_card(located: Located, orig: OriginalDenseCap, config, source: Path, sha256: str) -> dict[str, Any]:
    # The vocabulary travels as the checkpoint's vocab; everything else scalar from both opt tables is kept.
    opt = {k: v for k, v in (_plain(_get(located.checkpoint, "opt")) or {}).items() if k != "idx_to_token"}
    model_opt = {k: v for k, v in (_plain(_get(located.model, "opt")) or {}).items() if k != "idx_to_token"}
    it = _get(located.checkpoint, "iter")
    return {
        "dataset": "Visual Genome v1.0, DenseCap splits (trained by the original authors)",
        "converted_from": "Torch7",
        "note": "converted from Torch7 by `densecap convert-t7`; weights are the original's, unchanged except "
                "for layout (LSTM gate order, embedding row offset" + (", folded dropout scaling" if any(
                    s != 1.0 for s in orig.dropout_scales.values()) else "") + ")",
        "source": {"file": source.name, "bytes": source.stat().st_size, "sha256": sha256,
                   "project": "https://github.com/jcjohnson/densecap", "url": SOURCE_URL},
        "iter": it if isinstance(it, int) else None,
        "image_size": config.image_size,
        "claimed_metrics": {"mAP_vg_test": CLAIMED_MAP,
                            "about": "claimed by the original authors for this file (VG test, 1000 proposals); "
                                     "not re-measured here"},
        "original_opt": opt,
        "original_model_opt": model_opt,
        "conversion": {"found_at": located.found_at, "notes": orig.notes, "ceil_pooling": orig.ceil_pooling,
                       "dropout_scales": orig.dropout_scales, "vocab_size": orig.vocab_size},
    }


@dataclass
class ConversionResult:
    path: Path
    config: Any
    vocab_size: int
    card: dict[str, Any]


def convert_t7(source: str | os.PathLike, destination: str | os.PathLike, *, force: bool = False,
               half: bool = False, progress: bool = True, log: Callable[[str], None] = lambda s: None
               ) -> ConversionResult:
    """Convert ``source`` (.t7) into our checkpoint at ``destination``; raises ``ConversionError``.

    Memory: the file is memory-mapped (its pages are cache, not copies), so the peak is about two copies of the
    weights: the model, and ``save_checkpoint``'s copy while it writes.
    """
    import torch

    from .checkpoint import save_checkpoint
    from .model import build_model
    from .vocab import Vocabulary

    source, destination = Path(source), Path(destination)
    if destination.exists() and not force:
        raise ConversionError(f"{destination} already exists; pass --force to overwrite it")
    if destination.exists() and source.exists() and destination.resolve() == source.resolve():
        raise ConversionError("the output path is the input file; choose another output path")
    log(f"reading {source}")
    root = read_t7(source)
    located = find_parts(root)
    orig = extract(located)
    for note in orig.notes:
        log(f"note: {note}")
    config = converted_config(orig)
    try:
        vocab = Vocabulary(orig.vocab)
    except ValueError as exc:
        raise ConversionError(f"idx_to_token: {exc}") from None
    log(f"vocabulary {len(vocab)} words, caption length {config.max_caption_length}, {config.num_anchors} anchors, "
        f"VGG widths {orig.vgg_widths}, RPN {config.rpn_channels}, fc {config.fc_dim}, LSTM "
        f"{config.embed_dim}->{config.hidden_dim}")
    # Build without initialising (meta tensors, then uninitialised storage): load_weights sets every tensor.
    with torch.device("meta"):
        model = build_model(config, len(vocab))
    model = model.to_empty(device="cpu").eval()
    load_weights(model, orig, progress=progress)
    card = model_card(located, orig, config, source, _sha256(source, progress))
    del root, located, orig
    log(f"writing {destination}")
    save_checkpoint(destination, model, config, vocab, card, half=half)
    return ConversionResult(path=destination, config=config, vocab_size=len(vocab), card=card)
