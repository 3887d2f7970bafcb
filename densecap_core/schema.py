"""The result schema: one place that says what a captioned region is.

Used by the model output (``Captioner``), the websocket messages, the REST API, ``results.json`` and the
viewer. Torch-free.

Coordinate frame: a box is ``[x, y, w, h]`` in pixels of the image *as submitted* (after EXIF
rotation), with ``(x, y)`` the top-left corner, 0-indexed, continuous coordinates: a box covering the
whole of a 640x480 image is ``[0, 0, 640, 480]``. (The original DenseCap wrote 1-indexed boxes in the
coordinates of the image resized to 720 px; see ``docs/formats.md``.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass(frozen=True)
class Region:
    """One detected region: a box in pixels of the submitted image, its caption and its score."""

    box: tuple[float, float, float, float]  # x, y, w, h
    caption: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"box": [round(float(v), 2) for v in self.box], "caption": self.caption,
                "score": round(float(self.score), 4)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Region":
        x, y, w, h = (float(v) for v in d["box"])
        return cls(box=(x, y, w, h), caption=str(d["caption"]), score=float(d["score"]))


@dataclass
class ImageResult:
    """All regions of one image, sorted by descending score.

    ``width``/``height`` are the size of the image as submitted; ``name`` identifies it (file name, job
    item or frame); ``error`` is set instead of regions when the image could not be processed.
    """

    name: str
    width: int
    height: int
    regions: list[Region] = field(default_factory=list)
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: live "find" (a session's query): ``{"query", "best": region dict + "log_prob"}`` or ``{"query", "error"}``
    find: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def top(self, k: int) -> list[Region]:
        return self.regions[:k]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "width": self.width, "height": self.height,
                             "regions": [r.to_dict() for r in self.regions]}
        if self.error is not None:
            d["error"] = self.error
        if self.timings:
            d["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        if self.find is not None:
            d["find"] = self.find
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageResult":
        return cls(name=str(d["name"]), width=int(d["width"]), height=int(d["height"]),
                   regions=[Region.from_dict(r) for r in d.get("regions", [])],
                   error=d.get("error"), timings=dict(d.get("timings", {})), find=d.get("find"))

    def to_viewer_record(self, img_name: str | None = None, scale: float = 1.0) -> dict[str, Any]:
        """One entry of the original ``results.json`` (``img_name, boxes, scores, captions``).

        ``scale`` maps boxes into the frame of the image saved beside results.json (the viewer draws
        at the saved image's natural size).
        """
        return {
            "img_name": img_name or self.name,
            "boxes": [[round(v * scale, 2) for v in r.box] for r in self.regions],
            "scores": [round(r.score, 4) for r in self.regions],
            "captions": [r.caption for r in self.regions],
        }


def viewer_document(records: Iterable[dict[str, Any]], opt: dict[str, Any]) -> dict[str, Any]:
    """The whole ``results.json`` of the original viewer format: ``{"results": [...], "opt": {...}}``."""
    return {"results": list(records), "opt": dict(opt)}
