"""Training: the losses of the original, Adam, checkpoints, resume, periodic validation mAP, logs and plots.

    densecap train --data-h5 data/synth.h5 --data-json data/synth.json --config tiny --out runs/tiny

Phases, linear: build (data, model, optimiser) -> maybe resume -> loop (batch, losses, step, log, validate,
checkpoint) -> final validation + checkpoint. Everything that decides the result is seeded.

Files in ``--out``: ``last.pt`` (model checkpoint, project format), ``best.pt`` (best validation mAP),
``train_state.pt`` (optimiser, iteration, RNG: what ``--resume`` needs), ``metrics.jsonl`` (one line per log
step and per validation), ``curves.png`` (loss and mAP curves).
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import save_checkpoint
from .config import ModelConfig
from .model import DenseCapModel, build_model
from .vocab import Vocabulary


@dataclass
class TrainOptions:
    out: Path
    iterations: int = 20000
    time_budget_min: float | None = None   # stop (and validate/save) when this many minutes have passed
    batch_size: int = 4
    lr: float = 1e-3                       # from-scratch light models; the original fine-tuned VGG at 1e-5
    weight_decay: float = 1e-6             # the original's L2 on gradients
    warmup: int = 300
    grad_clip: float = 10.0
    val_every: int = 2000
    val_images: int = 200
    log_every: int = 25
    seed: int = 123
    device: str = "cpu"
    box_jitter: float = 0.0                # extra caption-head RoIs: GT boxes jittered by this fraction (0 = off)
    preload: bool = False                  # read the whole training split into memory (on the device) first
    channels_last: bool = True             # CPU: NHWC weights and images, where oneDNN's convolutions are
                                           # faster (docs/model.md has the figures); same arithmetic
    flush_denormal: bool = True            # CPU: treat subnormal floats as 0 while training (1.18x late in a run,
                                           # when tiny gradients and Adam moments slow every op that meets them)
    precision: str = "fp32"                # "bf16": the step under bfloat16 autocast (weights, optimizer and losses
                                           # stay float32); "auto": bf16 on a CPU with native bfloat16 kernels,
                                           # fp32 elsewhere. fp32 made the shipped model (docs/default-model.md)
    late_overrides: dict[str, Any] = field(default_factory=dict)  # config fields of the training step (extra
                                           # RoIs, sampling, loss weights) switched to these values once the run
                                           # is ``late_from`` of the way through its schedule
    late_from: float = 0.7                 # fraction of the schedule (iterations or time budget, as lr_at)
    captioner_only: bool = False           # train the language model alone on truth boxes and their copies
                                           # (DenseCapModel.caption_losses), the rest of the network frozen and
                                           # in eval mode: a short stage after a full run (docs/model.md)
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resize_sample(image: torch.Tensor, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize a uint8 3 x H x W image so its long side is ``size``, scaling its xyxy boxes alike."""
    h, w = image.shape[1:]
    scale = size / max(h, w)
    if abs(scale - 1) < 1e-6:
        return image, boxes
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)[0]
    return out.round().clamp(0, 255).to(torch.uint8), boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h])


def schedule_progress(it: int, opts: TrainOptions, elapsed_min: float = 0.0) -> float:
    """How far (0-1) a run is through its schedule after warm-up: over ``opts.iterations`` or, when a time budget
    is set and runs out first, over that time."""
    progress = min(1.0, max(0, it - opts.warmup) / max(1, opts.iterations - opts.warmup))
    if opts.time_budget_min:
        progress = max(progress, min(1.0, elapsed_min / opts.time_budget_min))
    return progress


def lr_at(it: int, opts: TrainOptions, elapsed_min: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 5% of the base rate over the schedule (``schedule_progress``), so a
    time-bounded run still ends on a small learning rate."""
    if it < opts.warmup:
        return opts.lr * (it + 1) / opts.warmup
    progress = schedule_progress(it, opts, elapsed_min)
    return opts.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict] = []
        if path.is_file():
            self.rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self, png: Path) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        train = [r for r in self.rows if r.get("kind") == "train"]
        val = [r for r in self.rows if r.get("kind") == "val"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        if train:
            its = [r["iter"] for r in train]
            for key in ("total", "captioning", "mid_objectness", "end_objectness", "end_box_reg", "mid_box_reg",
                        "count"):
                if all(key in r["losses"] for r in train):  # a captioner-only stage logs its caption loss only
                    axes[0].plot(its, [r["losses"][key] for r in train], label=key, lw=1)
            axes[0].set_yscale("log")
            axes[0].set_xlabel("iteration")
            axes[0].set_title("training losses (weighted)")
            axes[0].legend(fontsize=7)
        if val:
            its = [r["iter"] for r in val]
            axes[1].plot(its, [100 * r["map"] for r in val], "o-", label="mAP")
            axes[1].plot(its, [100 * r["detmap"] for r in val], "s--", label="detection mAP")
            axes[1].set_xlabel("iteration")
            axes[1].set_title("validation (x100)")
            axes[1].legend()
        for r in self.rows:  # where --late-set switched the training step
            if r.get("kind") == "late":
                for ax in axes:
                    ax.axvline(r["iter"], color="grey", ls=":", lw=1)
                axes[0].annotate("late-set", (r["iter"], 1), xycoords=("data", "axes fraction"), fontsize=7,
                                 ha="right", va="top", rotation=90, color="grey")
        fig.tight_layout()
        fig.savefig(png, dpi=90)
        plt.close(fig)


def preload_samples(dataset, size: int, device: torch.device, progress: bool = True) -> list:
    """Every sample of ``dataset``, resized to ``size`` and moved to ``device`` once (a 10,000-image split at 320 px
    is ~3 GB of uint8): on a GPU the per-iteration HDF5 reads and copies otherwise dominate a light model's step."""
    from tqdm import tqdm

    out = []
    for i in tqdm(range(len(dataset)), desc="preload", unit="img", disable=not progress, dynamic_ncols=True):
        image, target = dataset[i]
        image, boxes = resize_sample(image, target["boxes"].float(), size)
        out.append((image.to(device), {"boxes": boxes.to(device), "labels": target["labels"].long().to(device)}))
    return out


def make_batch(model: DenseCapModel, samples: list, size: int, device: torch.device):
    images, targets = [], []
    for image, target in samples:
        image, boxes = resize_sample(image, target["boxes"].float(), size)
        images.append(image.to(device))
        targets.append({"boxes": boxes.to(device), "labels": target["labels"].long().to(device)})
    batch, sizes = model.prepare_batch(images)
    return batch, targets, sizes


PRECISIONS = ("auto", "fp32", "bf16")


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype a training step runs under: bfloat16 for "bf16", and for "auto" on a CPU whose oneDNN
    has native bfloat16 kernels (AVX512-BF16 or AMX: 1.5-1.7x a step on our 2-core EPYC, docs/model.md); float32
    otherwise (a CPU without them would emulate bfloat16 slower than float32; CUDA keeps TF32, as measured)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


@contextmanager
def flushed_denormals(enabled: bool = True):
    """Treat subnormal floats (below 1.2e-38 in float32) as 0 on the CPU inside the block. The switch is
    process-wide and has no getter, so on leaving it is put back to torch's default (off)."""
    active = enabled and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if active:
            torch.set_flush_denormal(False)


def train(config: ModelConfig, vocab: Vocabulary, train_set, opts: TrainOptions,
          validate: Callable[[DenseCapModel, int], dict] | None = None, resume: bool = False,
          card: dict | None = None, progress: bool = True, init_state: dict | None = None) -> dict:
    """Train ``config`` on ``train_set`` (a sequence of (uint8 image, target) samples). Returns the last metrics.

    ``init_state``: a state dict to start from (fine-tuning) instead of random weights; a resumed run's own
    state replaces it."""
    from tqdm import tqdm

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(opts.device)
    seed_everything(opts.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if opts.preload:
        train_set = preload_samples(train_set, config.image_size, device, progress)
    late_config = config.with_training_step(**opts.late_overrides) if opts.late_overrides else None
    if late_config is not None:
        card = dict(card or {}, late_overrides=opts.late_overrides, late_from=opts.late_from)
    model = build_model(config, len(vocab))
    model.use_vocabulary(vocab.token_to_idx)  # caption_upweight_words (a word it lacks stops the run here)
    if late_config is not None:
        model.upweighted_ids(late_config)
    if init_state is not None:
        model.load_init_state(init_state)
    model = model.to(device)
    channels_last = opts.channels_last and device.type == "cpu"  # measured on CPUs only
    step_dtype = training_dtype(opts.precision, device)
    card = dict(card or {}, train_precision="bf16" if step_dtype == torch.bfloat16 else "fp32")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if opts.captioner_only:
        card = dict(card, captioner_only=True)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("language_model."))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=opts.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=opts.weight_decay,
                                 fused=device.type == "cuda")
    start_it, best_map, elapsed_before = 0, -1.0, 0.0
    state_path = out / "train_state.pt"
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume: {state_path} does not exist (nothing to resume in {out})")
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_it, best_map, elapsed_before = state["iter"], state["best_map"], state.get("elapsed_s", 0.0)
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
    log = MetricsLog(out / "metrics.jsonl")
    order_rng = np.random.default_rng(opts.seed)
    n = len(train_set)
    epoch_order = order_rng.permutation(n)
    for _ in range(start_it * opts.batch_size // max(n, 1)):
        epoch_order = order_rng.permutation(n)
    t_start = time.monotonic() - elapsed_before

    def train_mode() -> None:
        model.train()
        if opts.captioner_only:  # frozen parts keep their batch-norm statistics
            for part in (model.backbone, model.localization, model.recognition):
                part.eval()

    def save(it: int, metrics: dict | None) -> None:
        model.eval()
        info = dict(card, iterations=it, train_minutes=round((time.monotonic() - t_start) / 60, 1))
        if metrics:
            info["val_metrics"] = metrics
        save_checkpoint(out / "last.pt", model, config, vocab, info)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter": it,
                    "best_map": best_map, "elapsed_s": time.monotonic() - t_start,
                    "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                    "python_rng": random.getstate()}, state_path)
        train_mode()

    def run_validation(it: int) -> dict | None:
        nonlocal best_map
        if validate is None:
            return None
        model.eval()
        metrics = validate(model, it)
        train_mode()
        log.append({"kind": "val", "iter": it, **metrics})
        if metrics.get("map", -1) > best_map:
            best_map = metrics["map"]
            save_checkpoint(out / "best.pt", model.eval(), config, vocab, dict(card, iterations=it, val_metrics=metrics))
            train_mode()
        return metrics

    with flushed_denormals(opts.flush_denormal and device.type == "cpu"):
        train_mode()
        it = start_it
        bar = tqdm(total=opts.iterations, initial=start_it, desc="train", unit="it", disable=not progress,
                   dynamic_ncols=True)
        running: dict[str, float] = {}
        metrics = None
        while it < opts.iterations:
            if opts.time_budget_min is not None and (time.monotonic() - t_start) / 60 >= opts.time_budget_min:
                break
            pos = (it * opts.batch_size) % n
            idx = [int(epoch_order[(pos + j) % n]) for j in range(opts.batch_size)]
            if pos + opts.batch_size >= n:
                epoch_order = order_rng.permutation(n)
            batch, targets, sizes = make_batch(model, [train_set[i] for i in idx], config.image_size, device)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            elapsed_min = (time.monotonic() - t_start) / 60
            lr = lr_at(it, opts, elapsed_min)
            if late_config is not None and model.config is not late_config \
                    and schedule_progress(it, opts, elapsed_min) >= opts.late_from:
                model.switch_training_config(late_config)
                log.append({"kind": "late", "iter": it, "overrides": opts.late_overrides,
                            "elapsed_min": round(elapsed_min, 2)})
                bar.write(f"[late @ {it}] training with {opts.late_overrides} from here on")
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=step_dtype, enabled=step_dtype != torch.float32):
                losses = model.caption_losses(batch, targets, sizes) if opts.captioner_only \
                    else model(batch, targets, sizes)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            if opts.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
            optimizer.step()
            it += 1
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + float(v.detach())
            if it % opts.log_every == 0 or it == opts.iterations:
                count = opts.log_every if it % opts.log_every == 0 else (it % opts.log_every)
                avg = {k: v / count for k, v in running.items()}
                running = {}
                if not math.isfinite(avg["total"]):
                    raise FloatingPointError(f"loss became {avg['total']} at iteration {it}; lower --lr")
                log.append({"kind": "train", "iter": it, "lr": lr, "losses": avg,
                            "elapsed_min": round((time.monotonic() - t_start) / 60, 2)})
                bar.set_postfix(loss=f"{avg['total']:.3f}", cap=f"{avg['captioning']:.3f}")
            bar.update(1)
            if opts.val_every and it % opts.val_every == 0 and it < opts.iterations:
                metrics = run_validation(it)
                save(it, metrics)
                log.plot(out / "curves.png")
        bar.close()
        metrics = run_validation(it)
        save(it, metrics)
        log.plot(out / "curves.png")
        return {"iterations": it, "minutes": (time.monotonic() - t_start) / 60, "val": metrics, "best_map": best_map}
