"""Caption exactness against the synthetic generator's structured truth (its own grammar and synonyms)."""

from __future__ import annotations

import pytest

from densecap_core.evaluation.exactness import CaptionExactness, judge_caption, region_box_xyxy

RED_CIRCLE = {"kind": "object", "shape": "circle", "colour": "red", "size": "small", "texture": "striped",
              "box": [10, 10, 20, 20]}
BLUE_SQUARE = {"kind": "object", "shape": "square", "colour": "blue", "size": "large", "texture": "solid",
               "box": [60, 10, 30, 30]}
RELATION = {"kind": "relation", "relation": "left of", "box": [10, 10, 80, 30],
            "subject": {k: RED_CIRCLE[k] for k in ("shape", "colour", "size", "texture")},
            "object": {k: BLUE_SQUARE[k] for k in ("shape", "colour", "size", "texture")}}
GROUP = {"kind": "group", "shape": "triangle", "colour": "yellow", "count": 3, "box": [0, 50, 60, 40]}


@pytest.mark.parametrize("caption, expected", [
    ("a striped red circle", (True, True)),
    ("a small red disc with stripes", (True, True)),  # synonyms from the grammar's tables
    ("a red circle", (True, False)),  # true, but the visible texture is not named
    ("a dotted red circle", (False, False)),  # a false texture
    ("a large striped red circle", (False, False)),  # a false size
    ("a striped blue circle", (False, False)),
    ("a striped red square", (False, False)),
    ("three red circles", (False, False)),  # wrong kind
    ("", (False, False)),
])
def test_object_captions(caption, expected):
    assert judge_caption(caption, RED_CIRCLE) == expected


def test_solid_objects_need_no_texture_word():
    assert judge_caption("a big blue box", BLUE_SQUARE) == (True, True)


@pytest.mark.parametrize("caption, ok", [
    ("a red circle left of a blue square", True),
    ("a red circle to the left of a big blue box", True),
    ("a blue square right of a red circle", True),  # the same statement the other way round
    ("a red circle right of a blue square", False),
    ("a red circle next to a blue square", False),
    ("a red circle left of a green square", False),
    ("a red circle", False),
])
def test_relation_captions(caption, ok):
    assert judge_caption(caption, RELATION) == (ok, ok)


@pytest.mark.parametrize("caption, ok", [
    ("three yellow triangles", True),
    ("a group of three yellow triangles", True),
    ("two yellow triangles", False),
    ("three yellow stars", False),
    ("a yellow triangle", False),
])
def test_group_captions(caption, ok):
    assert judge_caption(caption, GROUP) == (ok, ok)


def test_best_scoring_detection_at_iou_half_answers_and_misses_count_against():
    box = region_box_xyxy(RED_CIRCLE)  # [10, 10, 30, 30]
    ex = CaptionExactness()
    ex.add_image(
        [RED_CIRCLE, BLUE_SQUARE, GROUP],
        scores=[0.99, 0.9, 0.5],
        boxes=[[20, 20, 40, 40],  # highest score but IoU 100/700 with the circle: not an answer
               box,  # the answer: a wrong caption
               [11, 10, 31, 30]],  # IoU 0.9 but a lower score
        captions=["a striped red circle", "a blue circle", "a striped red circle"])
    s = ex.summary()
    assert s["object"]["regions"] == 2 and s["object"]["detected"] == 0.5  # the square was missed
    assert s["object"]["exact"] == 0.0 and s["group"]["detected"] == 0.0
    assert s["all"]["regions"] == 3
    assert ex.examples[0]["caption"] == "a blue circle"
    assert s["object"]["answered_as"] == {"object": 1.0, "group": 0.0, "relation": 0.0, "other": 0.0}


def test_report_says_which_kind_of_phrase_answered_each_kind_of_region():
    from densecap_core.evaluation.exactness import format_exactness

    ex = CaptionExactness()
    group_box = region_box_xyxy(GROUP)
    for caption in ("three yellow triangles", "a yellow triangle left of a yellow triangle", "a yellow triangle",
                    "zzz"):
        ex.add_image([GROUP], [1.0], [group_box], [caption])
    s = ex.summary()
    assert s["group"]["exact"] == 0.25
    assert s["group"]["answered_as"] == {"object": 0.25, "group": 0.25, "relation": 0.25, "other": 0.25}
    assert s["all"]["answered_as"] == s["group"]["answered_as"]
    report = format_exactness(s)
    assert "answered with a phrase of kind: object 25.0%, group 25.0%, relation 25.0%, other 25.0%" in report


def test_scale_maps_original_boxes_into_the_model_frame():
    ex = CaptionExactness()
    ex.add_image([RED_CIRCLE], [1.0], [[20, 20, 60, 60]], ["a striped red circle"], scale=2.0)
    assert ex.summary()["object"]["exact"] == 1.0


def test_the_generators_own_phrases_are_all_true():
    from densecap_core.data import synth

    ex = CaptionExactness()
    for index in range(12):
        _, record = synth.make_image(index, synth.SynthOptions(num_images=12))
        regions = record["regions"]
        ex.add_image(regions, [1.0] * len(regions), [region_box_xyxy(r) for r in regions],
                     [r["phrase"] for r in regions])
    s = ex.summary()
    assert s["object"]["regions"] > 20 and s["relation"]["regions"] + s["group"]["regions"] > 0
    # Overlapping regions may answer each other's (IoU >= 0.5), so allow a little slack, but not much.
    assert s["all"]["true"] > 0.9
    assert s["relation"]["exact"] == s["relation"]["true"] and s["group"]["exact"] == s["group"]["true"]


def test_pick_by_iou_lets_each_region_answer_with_its_own_box():
    # An object box (score 0.9) overlaps the relation's union box at IoU 0.5; the relation's own box scores 0.8.
    relation = dict(RELATION, box=[10, 10, 40, 20])  # x1y1x2y2 [10, 10, 50, 30]
    boxes = [[10, 10, 30, 30], [10, 10, 50, 30]]  # IoU with the union box: 400/800 = 0.5, and 1
    captions = ["a striped red circle", "a red circle left of a blue square"]
    by_score, by_iou = CaptionExactness(), CaptionExactness(pick="iou")
    for ex in (by_score, by_iou):
        ex.add_image([relation], [0.9, 0.8], boxes, captions)
    assert by_score.summary()["relation"]["exact"] == 0.0
    assert by_iou.summary()["relation"]["exact"] == 1.0
    with pytest.raises(ValueError, match="pick"):
        CaptionExactness(pick="best")


@pytest.mark.parametrize("region, caption, wrong", [
    (RED_CIRCLE, "a striped red circle", []),
    (RED_CIRCLE, "a red circle", ["texture"]),  # a visible texture not named
    (RED_CIRCLE, "a large striped red hexagon", ["shape", "size"]),
    (RED_CIRCLE, "a dotted blue circle", ["colour", "texture"]),
    (BLUE_SQUARE, "a big blue box", []),  # solid: no texture word needed
    (GROUP, "two yellow triangles", ["count"]),
    (GROUP, "a group of three yellow stars", ["shape"]),
    (RELATION, "a blue square right of a red circle", []),  # the other way round is the same statement
    (RELATION, "a red circle right of a blue square", ["relation"]),
    (RELATION, "a red circle left of a blue star", ["object"]),
    (RELATION, "a blue square left of a red circle", ["relation"]),  # read either way: one part wrong
    (RELATION, "a green circle above a blue star", ["relation", "subject", "object"]),
    (GROUP, "a yellow triangle left of a yellow triangle", None),  # another kind of phrase
])
def test_caption_errors_name_the_wrong_parts(region, caption, wrong):
    from densecap_core.data import grammar

    parsed = grammar.parse_caption(caption)
    assert parsed is not None
    assert grammar.caption_errors(parsed, region) == wrong


def test_report_says_which_parts_of_the_answers_in_kind_were_wrong():
    from densecap_core.evaluation.exactness import format_exactness

    ex = CaptionExactness()
    box = region_box_xyxy(RED_CIRCLE)
    for caption in ("a striped red circle", "a striped red hexagon", "a striped blue hexagon", "a red circle",
                    "three red circles"):  # the last is a group phrase: not counted in wrong_parts
        ex.add_image([RED_CIRCLE], [1.0], [box], [caption])
    s = ex.summary()["object"]
    assert s["wrong_parts"] == {"colour": 0.25, "shape": 0.5, "texture": 0.25}
    assert ex.summary()["all"]["wrong_parts"] == {}
    report = format_exactness(ex.summary())
    assert "of those answered in kind, wrong: shape 50.0%, colour 25.0%, texture 25.0%" in report
