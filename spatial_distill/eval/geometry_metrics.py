"""Depth and 3D detection metrics against ground truth.

Depth (per image over its valid pixels, gt > 0, then averaged over images, the Eigen et al.
convention): `abs_rel` = mean |p - g| / g, `rmse` = sqrt(mean (p - g)^2) in metres, `delta1` =
share with max(p/g, g/p) < 1.25. `depth/*` use the predictions as they are (metric);
`depth/*_median_scaled` first multiply each image's prediction by median(g) / median(p), the
usual protocol for scale-ambiguous predictors, so both readings are visible.

Detection: average precision of yawed 3D boxes `(cx, cy, cz, dx, dy, dz, yaw)` (yaw about z) at
3D IoU 0.25 and 0.5, ScanNet / VoteNet style: predictions of a class, over every scene, sorted by
score; each is a true positive when it overlaps an unmatched ground-truth box of its class and
scene by at least the threshold (the best such box), else a false positive; AP = area under the
all-point interpolated precision-recall curve. `det/ap25_<class>` per class, `det/map25` /
`det/map50` their mean over the classes that have ground truth, and `det/ap25` / `det/ap50` the
same matching pooled into one curve over all classes.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spatial_distill.losses.detection import giou_3d

_pairwise_iou = jax.jit(jax.vmap(jax.vmap(lambda a, b: giou_3d(a, b)[0], (None, 0)), (0, None)))


def iou_3d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """3D IoU of every pair: `a [n, 7]`, `b [m, 7]` -> `[n, m]` (exact BEV polygon overlap x
    height overlap)."""
    a, b = np.asarray(a, np.float32).reshape(-1, 7), np.asarray(b, np.float32).reshape(-1, 7)
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), np.float32)
    return np.asarray(_pairwise_iou(jnp.asarray(a), jnp.asarray(b)))


def depth_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """pred, gt `[N, H, W]` metres (gt 0 = invalid) -> `depth/*` and `depth/*_median_scaled`."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"depth_metrics: prediction {pred.shape} vs ground truth {gt.shape}")
    rows = collections.defaultdict(list)
    for p, g in zip(pred, gt):
        valid = g > 0
        if not valid.any():
            continue
        p, g = np.maximum(p[valid], 1e-6), g[valid]
        for suffix, q in (("", p), ("_median_scaled", p * np.median(g) / np.median(p))):
            rows[f"depth/abs_rel{suffix}"].append(np.mean(np.abs(q - g) / g))
            rows[f"depth/rmse{suffix}"].append(np.sqrt(np.mean((q - g) ** 2)))
            rows[f"depth/delta1{suffix}"].append(np.mean(np.maximum(q / g, g / q) < 1.25))
    if not rows:
        raise ValueError("depth_metrics: no image has a valid ground-truth pixel")
    return {k: float(np.mean(v)) for k, v in sorted(rows.items())}


def average_precision(scores: np.ndarray, tp: np.ndarray, num_gt: int) -> float:
    """All-point interpolated AP of detections with `scores` and true-positive flags `tp`."""
    if num_gt == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="stable")
    tp = np.asarray(tp, np.float64)[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    recall = ctp / num_gt
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]  # the precision envelope
    steps = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def _match(pred_boxes, pred_scores, gt_boxes, threshold: float) -> np.ndarray:
    """TP flags of one scene's predictions of one class (greedy by score, each GT once)."""
    tp = np.zeros(len(pred_boxes), bool)
    if not len(pred_boxes) or not len(gt_boxes):
        return tp
    iou = iou_3d(pred_boxes, gt_boxes)
    taken = np.zeros(len(gt_boxes), bool)
    for i in np.argsort(-np.asarray(pred_scores), kind="stable"):
        candidates = np.where(taken, -1.0, iou[i])
        j = int(np.argmax(candidates))
        if candidates[j] >= threshold:
            tp[i], taken[j] = True, True
    return tp


def detection_metrics(predictions: Sequence[dict], ground_truth: Sequence[dict],
                      class_names: Sequence[str] | None = None,
                      thresholds: Sequence[float] = (0.25, 0.5)) -> dict[str, float]:
    """Per scene: predictions `{"boxes" [n, 7], "scores" [n], "labels" [n]}`, ground truth
    `{"boxes" [m, 7], "labels" [m]}` (same frame). Returns the `det/*` keys above."""
    if len(predictions) != len(ground_truth):
        raise ValueError(f"detection_metrics: {len(predictions)} predicted scenes vs "
                         f"{len(ground_truth)} ground-truth scenes")
    classes = sorted({int(c) for g in ground_truth for c in np.asarray(g["labels"]).reshape(-1)})
    name = (lambda c: class_names[c]) if class_names is not None else str
    out: dict[str, float] = {}
    for t in thresholds:
        tag = f"{round(t * 100):d}"
        scores_all, tp_all, per_class = [], [], []
        for c in classes:
            scores, tp, num_gt = [], [], 0
            for pred, gt in zip(predictions, ground_truth):
                g = np.asarray(gt["boxes"]).reshape(-1, 7)[np.asarray(gt["labels"]).reshape(-1) == c]
                keep = np.asarray(pred["labels"]).reshape(-1) == c
                p = np.asarray(pred["boxes"]).reshape(-1, 7)[keep]
                s = np.asarray(pred["scores"]).reshape(-1)[keep]
                scores.append(s)
                tp.append(_match(p, s, g, t))
                num_gt += len(g)
            scores, tp = np.concatenate(scores), np.concatenate(tp)
            ap = average_precision(scores, tp, num_gt)
            out[f"det/ap{tag}_{name(c)}"] = ap
            per_class.append(ap)
            scores_all.append(scores)
            tp_all.append(tp)
        total_gt = sum(len(np.asarray(g["labels"]).reshape(-1)) for g in ground_truth)
        if classes:
            out[f"det/map{tag}"] = float(np.mean(per_class))
            out[f"det/ap{tag}"] = average_precision(np.concatenate(scores_all), np.concatenate(tp_all),
                                                    total_gt)
    return out


__all__ = ["average_precision", "depth_metrics", "detection_metrics", "iou_3d"]
