"""Evaluation metrics on hand-built cases with known answers."""

import math

import numpy as np
import pytest

from spatial_distill.eval import geometry_metrics as gm
from spatial_distill.eval import paper_mode
from spatial_distill.eval.text_metrics import text_metrics


def test_paper_mode_is_keyword_agreement_with_substring_matching():
    rows = [
        ("proximity", "no", "no"),  # neither names a keyword: agree, though nothing was said
        ("proximity", "yes, it is close", "no"),  # disagree
        ("contact", "it contains a ball", "no"),  # "on" inside "contains": disagree
        ("contact", "it is on the table", "yes, touching"),  # agree
        ("size", "bigger", "the box is small"),  # agree
        ("orientation", "yes", "it is to the left"),  # disagree
        ("describe", "three", "four"),  # counting has no keywords: not scored
    ]
    m = paper_mode.agreement(rows)
    assert m == {"paper_mode/contact_acc": 0.5, "paper_mode/orientation_acc": 0.0,
                 "paper_mode/proximity_acc": 0.5, "paper_mode/size_acc": 1.0,
                 "paper_mode/overall_acc": 3 / 6}
    assert paper_mode.agreement([("describe", "a", "b")]) == {}


def test_text_metrics_against_hand_values():
    m = text_metrics(["a b c"], ["a b c d"])
    # BLEU-1: unigram precision 1, brevity penalty exp(1 - 4/3).
    assert m["text/bleu1"] == pytest.approx(math.exp(1 - 4 / 3), rel=1e-6)
    # ROUGE-1: precision 3/3, recall 3/4, F1 6/7.
    assert m["text/rouge1_precision"] == 1.0 and m["text/rouge1_recall"] == 0.75
    assert m["text/rouge1"] == pytest.approx(6 / 7)
    assert m["text/rouge2"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert m["text/student_len"] == 3 and m["text/teacher_len"] == 4
    same = text_metrics(["the cat sat down"], ["the cat sat down"])
    assert same["text/bleu4"] == pytest.approx(1.0) and same["text/rougeL"] == 1.0
    # METEOR of an exact 4-token match: F = 1, one chunk, penalty 0.5 * (1/4)^3.
    assert same["text/meteor"] == pytest.approx(1 - 0.5 / 64)
    assert same["text/meteor_wordnet"] in (0.0, 1.0)
    # Stems match without WordNet ("sitting"/"sits" -> "sit" under Porter).
    assert text_metrics(["cats sitting"], ["cat sits"])["text/meteor"] > 0.4
    with pytest.raises(ValueError, match="2 student answers vs 1"):
        text_metrics(["a", "b"], ["a"])
    assert text_metrics([], []) == {}


def test_depth_metrics_raw_and_median_scaled():
    gt = np.array([[[1.0, 2.0], [4.0, 0.0]]])  # one invalid pixel
    pred = 2 * gt + np.array([[[0, 0], [0, 7.0]]])  # garbage where gt is invalid
    m = gm.depth_metrics(pred, gt)
    assert m["depth/abs_rel"] == pytest.approx(1.0)
    assert m["depth/rmse"] == pytest.approx(math.sqrt((1 + 4 + 16) / 3))
    assert m["depth/delta1"] == 0.0
    assert m["depth/abs_rel_median_scaled"] == pytest.approx(0.0, abs=1e-12)
    assert m["depth/delta1_median_scaled"] == 1.0
    # Images are averaged, not pixels: a second image with abs_rel 0.
    m2 = gm.depth_metrics(np.stack([pred[0], gt[0]]), np.stack([gt[0], gt[0]]))
    assert m2["depth/abs_rel"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no image has a valid"):
        gm.depth_metrics(np.ones((1, 2, 2)), np.zeros((1, 2, 2)))


def test_iou_of_yawed_boxes():
    cube = [0, 0, 0, 1, 1, 1, 0]
    assert gm.iou_3d([cube], [[0.5, 0, 0, 1, 1, 1, 0]])[0, 0] == pytest.approx(1 / 3, abs=1e-6)
    assert gm.iou_3d([cube], [[0, 0, 0, 1, 1, 1, np.pi / 2]])[0, 0] == pytest.approx(1.0, abs=1e-6)
    # A unit square against itself turned 45 degrees: an octagon of area 2(sqrt2 - 1).
    octagon = 2 * (math.sqrt(2) - 1)
    assert gm.iou_3d([cube], [[0, 0, 0, 1, 1, 1, np.pi / 4]])[0, 0] == pytest.approx(
        octagon / (2 - octagon), abs=1e-5)
    assert gm.iou_3d([cube], [[0, 0, 0.5, 1, 1, 1, 0]])[0, 0] == pytest.approx(1 / 3, abs=1e-6)
    assert gm.iou_3d([cube], [[5, 0, 0, 1, 1, 1, 0]])[0, 0] == 0.0


def test_average_precision_by_hand():
    # 2 GT; detections by score: TP, FP, TP -> P = 1, .5, .667 at R = .5, .5, 1.
    assert gm.average_precision([0.9, 0.8, 0.7], [1, 0, 1], 2) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert gm.average_precision([0.9], [1], 1) == 1.0
    assert gm.average_precision([0.9, 0.5], [0, 0], 3) == 0.0
    assert math.isnan(gm.average_precision([], [], 0))


def test_detection_metrics_per_class_and_pooled():
    gt = [{"boxes": [[0, 0, 0, 1, 1, 1, 0], [3, 0, 0, 1, 1, 1, 0]], "labels": [0, 1]},
          {"boxes": [[0, 0, 0, 2, 2, 2, 0]], "labels": [0]}]
    pred = [{"boxes": [[0.1, 0, 0, 1, 1, 1, 0],      # class 0, IoU 0.82: TP at both thresholds
                       [0.55, 0, 0, 1, 1, 1, 0],     # class 0 duplicate, IoU 0.29: FP (GT taken)
                       [3.55, 0, 0, 1, 1, 1, 0]],    # class 1, IoU 0.29: TP at .25, FP at .5
             "scores": [0.9, 0.8, 0.7], "labels": [0, 0, 1]},
            {"boxes": [[0, 0, 0, 2, 2, 2, 0.0]], "scores": [0.6], "labels": [1]}]  # wrong class
    m = gm.detection_metrics(pred, gt, class_names=["box", "ball"])
    # class 0: 2 GT, detections TP (.9), FP (.8) -> AP = 0.5; class 1: 1 GT, TP -> 1.0 at .25.
    assert m["det/ap25_box"] == pytest.approx(0.5) and m["det/ap25_ball"] == pytest.approx(1.0)
    assert m["det/map25"] == pytest.approx(0.75)
    assert m["det/ap50_ball"] == 0.0 and m["det/map50"] == pytest.approx(0.25)
    # Pooled over classes at .25: scores .9 TP, .8 FP, .7 TP, .6 FP over 3 GT.
    assert m["det/ap25"] == pytest.approx(gm.average_precision([.9, .8, .7, .6], [1, 0, 1, 0], 3))
    with pytest.raises(ValueError, match="1 predicted scenes vs 2"):
        gm.detection_metrics(pred[:1], gt)
