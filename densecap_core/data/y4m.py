"""YUV4MPEG2 clips: the format Chromium's fake webcam reads (``--use-file-for-fake-video-capture``).

A file is one header line ``YUV4MPEG2 W<w> H<h> F<num>:<den> Ip A1:1 C420jpeg`` and then, per frame,
``FRAME\\n`` followed by the planar I420 bytes: Y (w*h), then U and V (w/2 * h/2 each). Width and height must
be even. Colours are converted with BT.601 in *limited* range (Y 16-235, Cb/Cr 16-240), what browsers assume
for camera video; chroma is the mean of each 2x2 block (the centred siting that ``C420jpeg`` names).
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

_TO_YCBCR = np.array([[0.256788, 0.504129, 0.097906],
                      [-0.148223, -0.290993, 0.439216],
                      [0.439216, -0.367788, -0.071427]], np.float32)
_OFFSET = np.array([16.0, 128.0, 128.0], np.float32)


def check_size(width: int, height: int) -> None:
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"Y4M (I420) frames need even, positive sizes; got {width}x{height}: pick even numbers")


def header(width: int, height: int, fps: int) -> bytes:
    check_size(width, height)
    return f"YUV4MPEG2 W{width} H{height} F{int(fps)}:1 Ip A1:1 C420jpeg\n".encode("ascii")


def rgb_to_i420(rgb: np.ndarray) -> bytes:
    """One H x W x 3 uint8 RGB frame as planar I420 bytes (Y, then U = Cb, then V = Cr)."""
    h, w = rgb.shape[:2]
    check_size(w, h)
    ycc = rgb.astype(np.float32) @ _TO_YCBCR.T + _OFFSET
    y = np.clip(ycc[..., 0] + 0.5, 0, 255).astype(np.uint8)
    chroma = ycc[..., 1:].reshape(h // 2, 2, w // 2, 2, 2).mean(axis=(1, 3))
    uv = np.clip(chroma + 0.5, 0, 255).astype(np.uint8)
    return y.tobytes() + uv[..., 0].tobytes() + uv[..., 1].tobytes()


def i420_to_rgb(data: bytes, width: int, height: int) -> np.ndarray:
    """Inverse of ``rgb_to_i420`` (chroma upsampled by repetition); H x W x 3 uint8."""
    n = width * height
    y = np.frombuffer(data, np.uint8, n).reshape(height, width).astype(np.float32)
    u = np.frombuffer(data, np.uint8, n // 4, n).reshape(height // 2, width // 2).astype(np.float32)
    v = np.frombuffer(data, np.uint8, n // 4, n + n // 4).reshape(height // 2, width // 2).astype(np.float32)
    u = u.repeat(2, 0).repeat(2, 1) - 128.0
    v = v.repeat(2, 0).repeat(2, 1) - 128.0
    yy = 1.164383 * (y - 16.0)
    rgb = np.stack([yy + 1.596027 * v, yy - 0.391762 * u - 0.812968 * v, yy + 2.017232 * u], axis=-1)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


class Y4MWriter:
    """Write RGB frames to a Y4M file: ``with Y4MWriter(path, w, h, fps) as out: out.write(frame)``."""

    def __init__(self, path: str | Path, width: int, height: int, fps: int = 10):
        self.width, self.height = width, height
        self.frames = 0
        head = header(width, height, fps)
        self._file: BinaryIO = open(path, "wb")
        self._file.write(head)

    def write(self, rgb: np.ndarray) -> None:
        if rgb.shape != (self.height, self.width, 3):
            raise ValueError(f"frame is {rgb.shape}, this clip is {self.height}x{self.width}x3")
        self._file.write(b"FRAME\n")
        self._file.write(rgb_to_i420(rgb))
        self.frames += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Y4MWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_header(path: str | Path) -> dict:
    """The header fields of a Y4M file: ``width, height, fps`` (float), ``params`` (all tokens), ``offset``."""
    with open(path, "rb") as f:
        line = f.readline()
    if not line.startswith(b"YUV4MPEG2 ") or not line.endswith(b"\n"):
        raise ValueError(f"{path}: not a YUV4MPEG2 file")
    params = {tok[:1]: tok[1:] for tok in line[10:-1].decode("ascii").split()}
    num, den = params["F"].split(":")
    return {"width": int(params["W"]), "height": int(params["H"]), "fps": int(num) / int(den),
            "params": params, "offset": len(line)}


def read_frames(path: str | Path) -> Iterator[np.ndarray]:
    """Yield each frame of an I420 Y4M file as H x W x 3 uint8 RGB (checks every FRAME marker)."""
    head = read_header(path)
    w, h = head["width"], head["height"]
    size = w * h * 3 // 2
    with open(path, "rb") as f:
        f.seek(head["offset"])
        while True:
            marker = f.readline()
            if not marker:
                return
            if not marker.startswith(b"FRAME"):
                raise ValueError(f"{path}: expected a FRAME marker at byte {f.tell() - len(marker)}")
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: truncated frame ({len(data)} of {size} bytes)")
            yield i420_to_rgb(data, w, h)
