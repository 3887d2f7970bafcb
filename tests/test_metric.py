"""The DenseCap mAP on small hand-computed cases (pure numpy; METEOR replaced by a table of fixed scores).

Each expected number below is worked out by hand in the comment beside it.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from densecap_core.evaluation.metric import (
    IOU_THRESHOLDS,
    METEOR_THRESHOLDS,
    DenseCapEvaluator,
    average_precision,
    box_iou,
    format_results,
    lua_recall_thresholds,
    merge_ground_truth_boxes,
)


class FixedMeteor:
    """Unit-test double for METEOR: each candidate caption has a fixed score; records what it was asked."""

    def __init__(self, table: dict[str, float]):
        self.table = table
        self.asked: list[tuple[str, list[str]]] = []

    def score(self, pairs):
        pairs = [(hyp, list(refs)) for hyp, refs in pairs]
        self.asked.extend(pairs)
        return [self.table[hyp] for hyp, _ in pairs]  # KeyError = the metric asked about an unexpected caption


GOOD = FixedMeteor({"good": 1.0, "bad": 0.0, "edge": 0.05})


def evaluate_one_image(scores, boxes, captions, gt_boxes, gt_captions, scorer=None, **kwargs):
    evaluator = DenseCapEvaluator(**kwargs)
    evaluator.add_result(scores, boxes, captions, gt_boxes, gt_captions)
    return evaluator.evaluate(scorer or FixedMeteor({"good": 1.0, "bad": 0.0, "edge": 0.05}))


def all_aps(results):
    return list(results["ap_breakdown"].values()) + list(results["det_breakdown"].values())


# -- boxes and merging -------------------------------------------------------------------------------------------

def test_iou_conventions():
    # continuous: overlap 5 x 10 = 50, union 100 + 100 - 50 = 150
    assert box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10]])[0, 0] == pytest.approx(1 / 3)
    # inclusive pixels (+1): overlap 6 x 11 = 66, union 121 + 121 - 66 = 176
    assert box_iou([[0, 0, 10, 10]], [[5, 0, 15, 10]], pixel_offset=1)[0, 0] == pytest.approx(66 / 176)
    # touching edges overlap in inclusive pixels (one shared column) but not in continuous coordinates
    assert box_iou([[0, 0, 10, 10]], [[10, 0, 20, 10]])[0, 0] == 0
    assert box_iou([[0, 0, 10, 10]], [[10, 0, 20, 10]], pixel_offset=1)[0, 0] > 0
    assert box_iou(np.zeros((0, 4)), [[0, 0, 1, 1]]).shape == (0, 1)


def test_merge_two_boxes_at_or_above_0_7_into_mean_box_with_both_captions():
    # IoU = 10 x 9 / (10 x 10) = 0.9 >= 0.7
    boxes, captions = merge_ground_truth_boxes([[0, 0, 10, 10], [0, 0, 10, 9]], ["a cat", "a small cat"])
    np.testing.assert_allclose(boxes, [[0, 0, 10, 9.5]])
    assert captions == [["a cat", "a small cat"]]


def test_boxes_below_0_7_stay_apart():
    # IoU = 10 x 6 / (10 x 10) = 0.6 < 0.7
    boxes, captions = merge_ground_truth_boxes([[0, 0, 10, 10], [0, 0, 10, 6]], ["a cat", "a dog"])
    np.testing.assert_allclose(boxes, [[0, 0, 10, 10], [0, 0, 10, 6]])
    assert captions == [["a cat"], ["a dog"]]


def test_merge_seeds_with_the_box_that_has_most_neighbours():
    # A-B and B-C overlap by 9/11 = 0.82, A-C by 8/12 = 0.67. B has three neighbours (itself, A, C), so its group
    # takes all three; merging in index order instead would give {A, B} and {C}.
    boxes, captions = merge_ground_truth_boxes([[0, 0, 10, 10], [1, 0, 11, 10], [2, 0, 12, 10]], ["a", "b", "c"])
    np.testing.assert_allclose(boxes, [[1, 0, 11, 10]])
    assert captions == [["a", "b", "c"]]


def test_merged_regions_count_once_in_npos_and_all_captions_become_references():
    scorer = FixedMeteor({"good": 1.0})
    results = evaluate_one_image([0.9], [[0, 0, 10, 9.5]], ["good"],
                                 [[0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60]], ["a cat", "a small cat", "x"],
                                 scorer=scorer)
    assert results["npos"] == 2
    assert scorer.asked == [("good", ["a cat", "a small cat"])]


# -- matching ----------------------------------------------------------------------------------------------------

def test_duplicate_detection_is_a_false_positive():
    # d1 (0.9) and d2 (0.8) both hit region 1, d3 (0.7) hits region 2: flags [TP, FP, TP], npos 2.
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1. Levels 0..50 -> 1 (51 of them), 51..100 -> 2/3 (50).
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    results = evaluate_one_image([0.9, 0.8, 0.7], [gt[0], gt[0], gt[1]], ["good"] * 3, gt, ["r1", "r2"])
    expected = float((51 + Fraction(2, 3) * 50) / 101)
    for ap in all_aps(results):
        assert ap == pytest.approx(expected)
    # Were the duplicate a true positive, every AP would be 1.
    assert results["map"] < 0.9


def test_detection_with_no_overlap_consumes_nothing():
    # d1 overlaps nothing; d2 hits the LAST region exactly. Flags [FP, TP], npos 2: precision 0, 1/2 at
    # recall 0, 1/2 -> levels 0..50 give 1/2 -> AP = 25.5 / 101.
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    scorer = FixedMeteor({"nothing": 0.9, "good": 1.0})
    results = evaluate_one_image([0.9, 0.8], [[50, 50, 60, 60], gt[1]], ["nothing", "good"], gt, ["r1", "r2"],
                                 scorer=scorer)
    for ap in all_aps(results):
        assert ap == pytest.approx(25.5 / 101)
    assert [hyp for hyp, _ in scorer.asked] == ["good"]  # no METEOR for a detection that cannot count


def test_lua_compat_reproduces_used_minus_one():
    # Same scene: in the original, d1's used[-1] takes the last region, so d2 is not ok and every AP is 0.
    gt = [[0, 0, 10, 10], [20, 20, 30, 30]]
    results = evaluate_one_image([0.9, 0.8], [[50, 50, 60, 60], gt[1]], ["good", "good"], gt, ["r1", "r2"],
                                 lua_compat=True)
    assert all(ap == 0 for ap in all_aps(results))


def test_region_is_consumed_by_a_low_iou_first_match_as_in_the_original():
    # Kept quirk: d1 (0.9) takes the region at IoU 25/175 = 0.14, below every threshold; the exact d2 comes later
    # and is not ok, so nothing is ever a true positive.
    gt = [[0, 0, 10, 10]]
    results = evaluate_one_image([0.9, 0.8], [[5, 5, 15, 15], [0, 0, 10, 10]], ["good", "good"], gt, ["r"])
    assert all(ap == 0 for ap in all_aps(results))


def test_detection_takes_its_best_iou_region_and_ties_in_score_keep_input_order():
    # The detection overlaps region 1 by 0.5 and region 2 by 0.8: it must take region 2.
    gt = [[0, 0, 10, 10], [2, 0, 12, 10]]  # IoU between them 8/12 < 0.7, so they stay apart
    scorer = FixedMeteor({"good": 1.0})
    evaluate_one_image([0.5], [[3, 0, 13, 10]], ["good"], gt, ["left", "right"], scorer=scorer)
    assert scorer.asked == [("good", ["right"])]


# -- METEOR thresholds -------------------------------------------------------------------------------------------

def test_meteor_threshold_is_strict():
    # One perfect box whose caption scores exactly 0.05: TP for METEOR > -1 and > 0, FP for > 0.05 and above.
    results = evaluate_one_image([0.9], [[0, 0, 10, 10]], ["edge"], [[0, 0, 10, 10]], ["r"])
    for iou in ("0.3", "0.5", "0.7"):
        assert results["det_breakdown"][f"ov{iou}"] == 1.0
        assert results["ap_breakdown"][f"ov{iou}_score0"] == 1.0
        assert results["ap_breakdown"][f"ov{iou}_score0.05"] == 0.0
        assert results["ap_breakdown"][f"ov{iou}_score0.1"] == 0.0
    assert results["map"] == pytest.approx(5 / 30)  # only the five METEOR > 0 cells are 1
    assert results["detmap"] == 1.0


def test_meteor_of_zero_counts_only_for_detection_ap():
    results = evaluate_one_image([0.9], [[0, 0, 10, 10]], ["bad"], [[0, 0, 10, 10]], ["r"])
    assert results["map"] == 0.0 and results["detmap"] == 1.0


def test_iou_threshold_is_inclusive():
    # IoU exactly 0.5 (10 x 5 inside 10 x 10): TP at 0.3..0.5, FP at 0.6 and 0.7.
    results = evaluate_one_image([0.9], [[0, 0, 10, 5]], ["good"], [[0, 0, 10, 10]], ["r"])
    assert [results["det_breakdown"][f"ov{t:g}"] for t in IOU_THRESHOLDS] == [1.0, 1.0, 1.0, 0.0, 0.0]


# -- whole-set cases ---------------------------------------------------------------------------------------------

def test_image_without_predictions_counts_its_regions():
    evaluator = DenseCapEvaluator()
    evaluator.add_result([0.9], [[0, 0, 10, 10]], ["good"], [[0, 0, 10, 10]], ["r"])
    evaluator.add_result([], np.zeros((0, 4)), [], [[0, 0, 10, 10]], ["r"])
    results = evaluator.evaluate(FixedMeteor({"good": 1.0}))
    assert results["npos"] == 2 and results["ndet"] == 1 and results["num_images"] == 2
    assert results["map"] == pytest.approx(51 / 101)  # recall reaches 1/2: levels 0..50 at precision 1


def test_no_predictions_at_all_gives_zero():
    evaluator = DenseCapEvaluator()
    evaluator.add_result([], [], [], [[0, 0, 10, 10], [20, 20, 30, 30]], ["a", "b"])
    results = evaluator.evaluate(FixedMeteor({}))
    assert results["npos"] == 2 and results["ndet"] == 0
    assert results["map"] == 0.0 and results["detmap"] == 0.0


def test_perfect_predictions_score_one():
    rng = np.random.default_rng(0)
    evaluator = DenseCapEvaluator()
    for _ in range(5):
        xy = rng.uniform(0, 500, size=(4, 2)) + np.arange(4)[:, None] * 600  # far apart: no merging
        gt = np.concatenate([xy, xy + rng.uniform(20, 100, size=(4, 2))], axis=1)
        evaluator.add_result(rng.uniform(size=4), gt, ["good"] * 4, gt, ["r"] * 4)
    results = evaluator.evaluate(FixedMeteor({"good": 1.0}))
    assert results["npos"] == 20 and results["ndet"] == 20
    assert results["map"] == 1.0 and results["detmap"] == 1.0


def test_detections_are_pooled_across_images_by_score():
    # Image 1: a false positive at 0.9. Image 2: a true positive at 0.95. Pooled ranking: TP, FP -> AP 1 (recall
    # reaches 1 at precision 1). Ranking per image in insertion order would give FP first and AP 0.5.
    evaluator = DenseCapEvaluator()
    evaluator.add_result([0.9], [[50, 50, 60, 60]], ["bad"], [], [])
    evaluator.add_result([0.95], [[0, 0, 10, 10]], ["good"], [[0, 0, 10, 10]], ["r"])
    assert evaluator.evaluate(FixedMeteor({"good": 1.0}))["detmap"] == 1.0


# -- average precision -------------------------------------------------------------------------------------------

def test_interpolated_ap_on_a_hand_computed_curve():
    # flags T F T F F T, npos 4: cumulative TP 1 1 2 2 2 3, precision 1 1/2 2/3 1/2 2/5 1/2,
    # recall 1/4 1/4 1/2 1/2 1/2 3/4. Interpolated precision: levels 0..25 -> 1 (26), 26..50 -> 2/3 (25),
    # 51..75 -> 1/2 (25), 76..100 -> 0 (25). AP = (26 + 50/3 + 25/2) / 101 = 331/606.
    ap = average_precision([1, 0, 1, 0, 0, 1], 4)
    assert ap == pytest.approx(331 / 606, abs=1e-12)


def test_recall_levels_are_exactly_101_without_float_drift():
    # Three TPs, npos 10: recall 0.1, 0.2, 0.3 at precision 1. Levels 0.00..0.30 are reached: 31 of 101.
    assert average_precision([1, 1, 1], 10) == pytest.approx(31 / 101, abs=1e-15)
    assert average_precision([1] * 7, 7) == 1.0


def test_lua_compat_keeps_the_original_drifting_grid():
    levels = lua_recall_thresholds()
    assert len(levels) == 100 and levels[30] > 0.3  # 0 .. 0.99, accumulated: 0.3000000000000001
    # The same curve: the drifted level "0.3" is not reached by recall 0.3, so 30 of 100 levels count.
    assert average_precision([1, 1, 1], 10, lua_compat=True) == pytest.approx(0.30)


def test_empty_or_no_ground_truth_gives_zero_ap():
    assert average_precision([], 3) == 0.0
    assert average_precision([0, 0], 0) == 0.0


# -- result shape ------------------------------------------------------------------------------------------------

def test_result_keys_follow_the_original_spelling():
    results = evaluate_one_image([0.9], [[0, 0, 10, 10]], ["good"], [[0, 0, 10, 10]], ["r"])
    assert len(results["ap_breakdown"]) == 30 and len(results["det_breakdown"]) == 5
    assert "ov0.5_score0.1" in results["ap_breakdown"] and "ov0.3_score0" in results["ap_breakdown"]
    assert "ov0.7" in results["det_breakdown"]
    assert len(METEOR_THRESHOLDS) == 7
    text = format_results(results)
    assert "mAP: 100.00" in text


def test_mismatched_lengths_are_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="must match"):
        DenseCapEvaluator().add_result([0.9, 0.8], [[0, 0, 1, 1]], ["a"], [], [])
    with pytest.raises(ValueError, match="x1, y1, x2, y2"):
        DenseCapEvaluator().add_result([0.9], [[0, 0, 1]], ["a"], [], [])


def test_the_metric_side_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, densecap_core.evaluation, densecap_core.evaluation.exactness; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
