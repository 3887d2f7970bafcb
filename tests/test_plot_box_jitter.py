"""scripts/plot_box_jitter.py: reads `densecap evaluate --gt-boxes` outputs, orders and plots them, refuses others."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "plot_box_jitter.py"


def evaluate_output(path: Path, jitter: float, mean_iou: float | None, exact: float, gt_boxes: bool = True) -> str:
    results = {"map": exact, "detmap": exact,
               "exactness": {k: {"exact": exact, "detected": 1.0} for k in ("object", "group", "relation", "all")}}
    if jitter:
        results.update(gt_box_jitter=jitter, gt_box_mean_iou=mean_iou)
    path.write_text(json.dumps({"results": results, "opt": {"gt_boxes": gt_boxes, "box_jitter": jitter}}))
    return str(path)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_points_are_ordered_by_iou_saved_and_replotted(tmp_path):
    files = [evaluate_output(tmp_path / "b.json", 0.2, 0.67, 0.4), evaluate_output(tmp_path / "a.json", 0, None, 0.9)]
    summary = tmp_path / "summary.json"
    proc = run("--out", str(tmp_path / "p.png"), "--save-json", str(summary), "m=" + ",".join(files))
    assert proc.returncode == 0, proc.stderr
    points = json.loads(summary.read_text())["m"]
    assert [p["mean_iou"] for p in points] == [1.0, 0.67] and points[1]["group"] == 0.4
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert "90.0%" in proc.stdout and "40.0%" in proc.stdout
    again = run("--out", str(tmp_path / "q.png"), "--from-json", str(summary))
    assert again.returncode == 0 and (tmp_path / "q.png").is_file()


def test_a_result_without_gt_boxes_is_refused(tmp_path):
    detected = evaluate_output(tmp_path / "d.json", 0, None, 0.5, gt_boxes=False)
    proc = run("--out", str(tmp_path / "p.png"), "m=" + detected)
    assert proc.returncode != 0 and "--gt-boxes" in proc.stderr
    assert run("--out", str(tmp_path / "p.png")).returncode == 2  # no series at all
