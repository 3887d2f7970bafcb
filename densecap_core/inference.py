"""``Captioner``: load a checkpoint once, caption images (paths, bytes or PIL images of any mode).

Results are ``ImageResult`` objects whose boxes are ``[x, y, w, h]`` in pixels of each image *as given* (after
EXIF rotation), not of the resized image the network saw, sorted by descending score.

Device ``"auto"`` picks CUDA when present (with float16 autocast there) and the CPU otherwise.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .checkpoint import Checkpoint, load_checkpoint
from .config import check_decoding
from .imageio import DEFAULT_MAX_PIXELS, ImageError, ImageInput, decode_image
from .schema import ImageResult, Region


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return dev


def resize_long_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so the longer side is ``size`` (bilinear; small images are upscaled too, as the original)."""
    w, h = image.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image if new == (w, h) else image.resize(new, Image.BILINEAR)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 3 x H x W tensor."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class Captioner:
    def __init__(self, checkpoint: str | None = None, *, device: str = "auto", image_size: int | None = None,
                 rpn_nms_thresh: float | None = None, final_nms_thresh: float | None = None,
                 num_proposals: int | None = None, union_proposals: int | None = None,
                 beam_size: int | None = None, beam_length_alpha: float | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = 8, half: bool | None = None,
                 quantize: str = "none", _loaded: Checkpoint | None = None):
        check_decoding(beam_size, beam_length_alpha)  # refused before the model is loaded
        self.device = resolve_device(device)
        ckpt = _loaded or load_checkpoint(checkpoint, map_location="cpu")
        self.checkpoint_path = str(checkpoint) if checkpoint else "(embedded default)"
        self.config, self.vocab, self.card = ckpt.config, ckpt.vocab, ckpt.card
        self.model = ckpt.model.to(self.device).eval()
        if rpn_nms_thresh is not None:
            self.model.rpn_nms_thresh = rpn_nms_thresh
        if final_nms_thresh is not None:
            self.model.final_nms_thresh = final_nms_thresh
        if num_proposals is not None:
            self.model.num_proposals = num_proposals
        if union_proposals is not None:
            self.model.union_proposals = union_proposals
        if beam_size is not None:
            self.model.beam_size = beam_size
        if beam_length_alpha is not None:
            self.model.beam_length_alpha = beam_length_alpha
        self.image_size = int(image_size or self.config.image_size)
        self.max_pixels = max_pixels
        self.batch_size = max(1, int(batch_size))
        self.half = (self.device.type == "cuda") if half is None else bool(half)
        # Opt-in: "int8-lm" quantises the language model dynamically (CPU only; docs/benchmarks.md has the
        # measured speed and mAP). Boxes and scores are unchanged; captions may differ in rare words.
        from .model.quantize import apply_quantize
        apply_quantize(self.model, quantize, self.device)
        self.quantize = quantize

    @classmethod
    def from_checkpoint_object(cls, ckpt: Checkpoint, **kwargs) -> "Captioner":
        return cls(None, _loaded=ckpt, **kwargs)

    @property
    def settings(self) -> dict:
        """The inference settings in effect (what results.json's ``opt`` records)."""
        return {"checkpoint": self.checkpoint_path, "config": self.config.name, "image_size": self.image_size,
                "rpn_nms_thresh": self.model.rpn_nms_thresh, "final_nms_thresh": self.model.final_nms_thresh,
                "num_proposals": self.model.num_proposals,
                "union_proposals": self.model.union_proposals, "beam_size": self.model.beam_size,
                "beam_length_alpha": self.model.beam_length_alpha, "device": str(self.device),
                **({"quantize": self.quantize} if self.quantize != "none" else {})}

    def caption(self, images: ImageInput | Sequence[ImageInput], names: Sequence[str] | None = None,
                on_error: str = "raise") -> list[ImageResult]:
        """Caption a batch. ``on_error="record"`` turns an unreadable image into an ``ImageResult`` with
        ``error`` set (the others still run); ``"raise"`` raises the ``ImageError`` (or ``FileNotFoundError``)."""
        if isinstance(images, (str, bytes, bytearray, Image.Image)) or not isinstance(images, Iterable):
            images = [images]
        images = list(images)
        names = list(names) if names is not None else [
            str(im) if isinstance(im, (str,)) or hasattr(im, "__fspath__") else f"image{i}" for i, im in enumerate(images)]
        results: list[ImageResult | None] = [None] * len(images)
        decoded: list[tuple[int, Image.Image, float]] = []
        for i, (im, name) in enumerate(zip(images, names)):
            t0 = time.perf_counter()
            try:
                pil = decode_image(im, max_pixels=self.max_pixels, name=name)
            except (ImageError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
                if on_error == "raise":
                    raise
                results[i] = ImageResult(name=name, width=0, height=0, error=str(exc))
                continue
            decoded.append((i, pil, (time.perf_counter() - t0) * 1000))
        for start in range(0, len(decoded), self.batch_size):
            chunk = decoded[start:start + self.batch_size]
            for (i, _, decode_ms), res in zip(chunk, self._run([p for _, p, _ in chunk], [names[i] for i, _, _ in chunk])):
                res.timings["decode_ms"] = decode_ms
                results[i] = res
        return results  # type: ignore[return-value]

    def warm_up(self) -> float:
        """Run one full batch of the largest input the model takes (``batch_size`` blank squares of side
        ``image_size``) and return its seconds. A serving process calls it before it takes work, so lazily built
        kernels are ready and the allocator reaches its working size at start: without it a CPU worker's RSS
        climbed ~120 MiB over its first ~40 s under load, with it the RSS is flat from the start
        (docs/reliability.md, *Load*)."""
        t0 = time.perf_counter()
        blank = Image.new("RGB", (self.image_size, self.image_size), (127, 127, 127))
        self._run([blank] * self.batch_size, [f"warm-up{i}" for i in range(self.batch_size)])
        return time.perf_counter() - t0

    def caption_one(self, image: ImageInput, name: str | None = None) -> ImageResult:
        return self.caption([image], [name] if name else None)[0]

    @torch.inference_mode()
    def _forward(self, pils: list[Image.Image], with_codes: bool = False) -> tuple[list, list[dict], float]:
        """One forward pass: (each image's (h, w) as the model saw it, the model's outputs, model ms per image)."""
        t0 = time.perf_counter()
        resized = [resize_long_side(p, self.image_size) for p in pils]
        tensors = [to_tensor(r).to(self.device) for r in resized]
        batch, sizes = self.model.prepare_batch(tensors)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.half and self.device.type == "cuda" else nullcontext()
        with autocast:
            outputs = self.model(batch, image_sizes=sizes, with_codes=with_codes)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return sizes, outputs, (time.perf_counter() - t0) * 1000 / len(pils)

    def _regions(self, pil: Image.Image, size: tuple[int, int], out: dict) -> list[Region]:
        """One image's detections as Regions in the model's order (descending score), boxes [x, y, w, h] in
        pixels of ``pil`` (``size`` is the (h, w) the model saw)."""
        h, w = size
        sx, sy = pil.width / w, pil.height / h
        boxes = out["boxes"].float().cpu()
        boxes = torch.stack((boxes[:, 0] * sx, boxes[:, 1] * sy, (boxes[:, 2] - boxes[:, 0]) * sx,
                             (boxes[:, 3] - boxes[:, 1]) * sy), 1).tolist()
        scores = out["scores"].float().cpu().tolist()
        captions = [self.vocab.decode(t) for t in out["tokens"].cpu().tolist()]
        return [Region(box=tuple(b), caption=c, score=s) for b, c, s in zip(boxes, captions, scores)]

    def _run(self, pils: list[Image.Image], names: list[str]) -> list[ImageResult]:
        sizes, outputs, model_ms = self._forward(pils)
        results = []
        for pil, size, out, name in zip(pils, sizes, outputs, names):
            regions = sorted(self._regions(pil, size, out), key=lambda r: -r.score)
            results.append(ImageResult(name=name, width=pil.width, height=pil.height, regions=regions,
                                       timings={"model_ms": model_ms}))
        return results

    def _detections(self, pils: Sequence[Image.Image], names: Sequence[str]) -> Iterator[tuple[ImageResult, dict]]:
        """Each image's result (regions in the model's order, descending score) with the model's output for it,
        ``codes`` (and ``grids`` when the language model reads them) included. One pass per ``batch_size``."""
        for start in range(0, len(pils), self.batch_size):
            chunk = list(pils[start:start + self.batch_size])
            sizes, outputs, model_ms = self._forward(chunk, with_codes=True)
            for pil, size, o, name in zip(chunk, sizes, outputs, names[start:start + self.batch_size]):
                yield ImageResult(name=name, width=pil.width, height=pil.height, regions=self._regions(pil, size, o),
                                  timings={"model_ms": model_ms}), o

    def region_codes(self, pils: Sequence[Image.Image], names: Sequence[str]) -> list[tuple[ImageResult, np.ndarray]]:
        """Caption decoded images and return with each result the region code of every region (K x D float32,
        row i for ``result.regions[i]``, in descending score): what ``densecap extract-features`` writes (the
        original's ``extract_features.lua``)."""
        return [(result, o["codes"].float().cpu().numpy()) for result, o in self._detections(pils, names)]

    def encode_query(self, query: str) -> torch.Tensor:
        """A phrase as the language model's labels (1 x T word ids); ValueError naming any word the model does
        not know (it could only be read as ``<UNK>``, which would match every unknown word alike)."""
        from .vocab import tokenize

        words = tokenize(query)
        if not words:
            raise ValueError("the query has no words")
        unknown = sorted({w for w in words if w not in self.vocab.token_to_idx})
        if unknown:
            raise ValueError(f"the model's vocabulary ({len(self.vocab)} words) has no {', '.join(map(repr, unknown))}; "
                             "use words its captions use")
        limit = self.model.language_model.max_length
        if len(words) > limit:
            raise ValueError(f"the query has {len(words)} words; the model's captions have at most {limit}")
        return torch.tensor([self.vocab.encode(words, max_len=limit)], device=self.device)

    def match(self, pils: Sequence[Image.Image], names: Sequence[str], query: str
              ) -> list[tuple[ImageResult, np.ndarray]]:
        """Each image's result with ``log p(query | region)`` of every region (K float32, row i for
        ``result.regions[i]``): the paper's open-world detection, whose best regions are where the model would
        most readily say the query (``densecap search``). ValueError for a query the model cannot read."""
        self.encode_query(query)
        return [(result, scores) for result, scores, _ in self.match_each(pils, names, [query] * len(pils))]

    @torch.inference_mode()
    def match_each(self, pils: Sequence[Image.Image], names: Sequence[str], queries: Sequence[str | None]
                   ) -> list[tuple[ImageResult, np.ndarray | None, str | None]]:
        """``match`` with a query per image (None: caption only, as ``caption``), in one batched pass: each
        image's result, its regions' log p of its query (None without one), and why its query could not be
        read (None when it could). The live stream's "find" (a query per session)."""
        lm = self.model.language_model
        labels: dict[str, torch.Tensor | str] = {}
        for q in set(queries) - {None}:
            try:
                labels[q] = self.encode_query(q)
            except ValueError as exc:
                labels[q] = str(exc)
        out = []
        for (result, o), query in zip(self._detections(pils, names), queries):
            lab = labels.get(query) if query is not None else None
            if lab is None or isinstance(lab, str):
                out.append((result, None, lab))
                continue
            codes, grids = o["codes"].float(), o.get("grids")
            scores = lm.log_likelihood(codes, lab.expand(len(codes), -1), None if grids is None else grids.float())
            out.append((result, scores.float().cpu().numpy(), None))
        return out
