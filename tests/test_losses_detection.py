import math

import jax
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment as scipy_lsa

from spatial_distill.losses import detection as det

_solve = jax.jit(jax.vmap(det.linear_sum_assignment))
_giou = jax.jit(det.giou_3d)
_area = jax.jit(det.bev_intersection_area)
# Jitted once per configuration: op-by-op dispatch of the matcher's loops is slow.
_loss = jax.jit(det.detection_loss, static_argnames=(
    "class_weight", "l1_weight", "giou_weight", "class_cost", "focal_alpha", "focal_gamma"))
_match_cost = jax.jit(det.match_cost, static_argnames=(
    "class_weight", "l1_weight", "giou_weight", "class_cost", "focal_alpha", "focal_gamma"))
# The loss tests share shapes (`_sample`) and these options, so the loss compiles once.
OPTS = dict(class_weight=2.0, l1_weight=5.0, giou_weight=2.0, class_cost="focal")


@pytest.mark.parametrize("n,m", [(6, 6), (5, 11), (11, 5), (1, 4), (4, 1), (12, 12)])
@pytest.mark.parametrize("integer", [False, True])
def test_assignment_matches_scipy(n, m, integer):
    r = np.random.default_rng(n * 100 + m + integer)
    # Small integers make many ties (several optimal assignments); continuous costs a unique one.
    cost = (r.integers(0, 4, size=(40, n, m)) if integer else r.normal(size=(40, n, m)) * 3
            ).astype(np.float32)
    rows, cols = (np.asarray(x) for x in _solve(cost))
    k = min(n, m)
    for b in range(len(cost)):
        assert sorted(set(rows[b])) == list(rows[b]) and len(set(cols[b])) == k
        ref_r, ref_c = scipy_lsa(cost[b])
        np.testing.assert_allclose(cost[b][rows[b], cols[b]].sum(), cost[b][ref_r, ref_c].sum(),
                                   rtol=1e-5, atol=1e-4)
        if not integer:
            np.testing.assert_array_equal(rows[b], ref_r)
            np.testing.assert_array_equal(cols[b], ref_c)


def test_hungarian_match_ignores_padding_and_handles_few_queries():
    r = np.random.default_rng(0)
    for nq, g in ((8, 5), (3, 6)):
        cost = r.normal(size=(nq, g)).astype(np.float32)
        mask = np.array([True, False, True, True, False, True][:g])
        query = np.asarray(jax.jit(det.hungarian_match)(cost, mask))
        assert (query[~mask] == -1).all()
        real = np.flatnonzero(mask)
        q_rows, g_cols = scipy_lsa(cost[:, real])
        want = np.full(g, -1)
        want[real[g_cols]] = q_rows
        np.testing.assert_array_equal(query, want)
    nan_cost = np.full((4, 3), np.nan, np.float32)
    query = np.asarray(jax.jit(det.hungarian_match)(nan_cost, np.ones(3, bool)))
    assert sorted(query) == sorted(set(query)) and (query >= 0).all()


def _box(cx=0.0, cy=0.0, cz=0.0, dx=1.0, dy=1.0, dz=1.0, yaw=0.0):
    return np.array([cx, cy, cz, dx, dy, dz, yaw], np.float32)


def _np_aligned(a, b):
    """IoU and GIoU of axis-aligned boxes, float64 interval arithmetic."""
    lo_a, hi_a = a[:3] - a[3:6] / 2, a[:3] + a[3:6] / 2
    lo_b, hi_b = b[:3] - b[3:6] / 2, b[:3] + b[3:6] / 2
    inter = np.prod(np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None))
    union = np.prod(a[3:6]) + np.prod(b[3:6]) - inter
    hull = np.prod(np.maximum(hi_a, hi_b) - np.minimum(lo_a, lo_b))
    return inter / union, inter / union - (hull - union) / hull


def test_identical_and_disjoint_boxes():
    for box in (_box(), _box(1, 2, 3, 2.0, 0.5, 1.5, 0.7), _box(yaw=math.pi / 4)):
        iou, giou = _giou(box, box)
        np.testing.assert_allclose([iou, giou], [1.0, 1.0], atol=1e-6)
    iou, giou = _giou(_box(), _box(cx=3.0, yaw=0.3))
    assert float(iou) == 0.0 and float(giou) < 0.0
    iou, giou = _giou(_box(), _box(cz=5.0))  # overlap in BEV, apart vertically
    assert float(iou) == 0.0 and float(giou) < 0.0


def test_axis_aligned_boxes_match_numpy():
    r = np.random.default_rng(1)
    for _ in range(30):
        a = np.concatenate([r.normal(size=3), r.uniform(0.3, 2.0, 3), [0.0]]).astype(np.float32)
        b = np.concatenate([a[:3] + r.normal(scale=0.6, size=3), r.uniform(0.3, 2.0, 3), [0.0]]
                           ).astype(np.float32)
        np.testing.assert_allclose(_giou(a, b), _np_aligned(a.astype(np.float64), b), rtol=1e-4,
                                   atol=1e-6)


def test_rotated_square_over_square_is_the_octagon():
    a, b = _box(), _box(yaw=math.pi / 4)
    octagon = 2 * math.sqrt(2) - 2
    np.testing.assert_allclose(_area(a, b), octagon, rtol=1e-6)
    np.testing.assert_allclose(_area(b, a), octagon, rtol=1e-6)
    iou, giou = _giou(a, b)
    np.testing.assert_allclose(iou, octagon / (2 - octagon), rtol=1e-6)
    # Enclosing rectangle: the rotated square's BEV hull is √2 × √2 in every candidate frame.
    np.testing.assert_allclose(giou, iou - (2.0 - (2 - octagon)) / 2.0, rtol=1e-5)
    # A yaw of a half turn is the same box.
    np.testing.assert_allclose(_area(a, _box(yaw=math.pi)), 1.0, rtol=1e-6)


def test_yawed_overlap_matches_monte_carlo():
    r = np.random.default_rng(2)
    pts = r.uniform(-2.5, 2.5, size=(400_000, 2))

    def inside(box, p):
        c, s = math.cos(box[6]), math.sin(box[6])
        local = (p - box[:2]) @ np.array([[c, -s], [s, c]])
        return (np.abs(local[:, 0]) <= box[3] / 2) & (np.abs(local[:, 1]) <= box[4] / 2)

    for _ in range(6):
        a = np.array([*r.normal(scale=0.3, size=2), 0, *r.uniform(0.8, 2.0, 2), 1, r.uniform(-3, 3)])
        b = np.array([*r.normal(scale=0.3, size=2), 0, *r.uniform(0.8, 2.0, 2), 1, r.uniform(-3, 3)])
        est = 25.0 * np.mean(inside(a, pts) & inside(b, pts))
        # Binomial standard error of the estimate is below 0.02 here; allow 4 of them.
        np.testing.assert_allclose(_area(a.astype(np.float32), b.astype(np.float32)), est,
                                   atol=0.08)
        np.testing.assert_allclose(_area(a.astype(np.float32), b.astype(np.float32)),
                                   _area(b.astype(np.float32), a.astype(np.float32)), atol=1e-5)


def test_box_l1_wraps_yaw_by_half_turns():
    a = _box(yaw=0.1)
    np.testing.assert_allclose(det.box_l1(a, _box(yaw=0.1 + math.pi)), 0.0, atol=1e-6)
    np.testing.assert_allclose(det.box_l1(a, _box(cx=0.5, dz=2.0, yaw=-0.2)), 0.5 + 1.0 + 0.3,
                               rtol=1e-6)


def _sample(seed, B=2, nq=7, g=4, C=3):
    r = np.random.default_rng(seed)
    gt = np.concatenate([r.normal(size=(B, g, 3)), r.uniform(0.5, 2, (B, g, 3)),
                         r.uniform(-1, 1, (B, g, 1))], -1).astype(np.float32)
    labels = r.integers(0, C, size=(B, g)).astype(np.int32)
    mask = np.ones((B, g), bool)
    mask[0, -1] = False
    mask[1, 1] = False
    logits = r.normal(size=(B, nq, C + 1)).astype(np.float32)
    boxes = np.concatenate([r.normal(size=(B, nq, 3)), r.uniform(0.5, 2, (B, nq, 3)),
                            r.uniform(-1, 1, (B, nq, 1))], -1).astype(np.float32)
    return logits, boxes, gt, labels, mask


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("class_cost", det.CLASS_COSTS)
def test_match_cost_matches_numpy(class_cost):
    logits, boxes, gt, labels, _ = _sample(8)
    w = dict(OPTS, class_cost=class_cost)
    cost = np.asarray(_match_cost(logits[0], boxes[0], gt[0], labels[0], **w))
    p = np.exp(_np_log_softmax(logits[0].astype(np.float64)))[:, labels[0]]  # [Nq, G]
    if class_cost == "prob":
        cls = -p
    else:
        cls = 0.25 * (1 - p) ** 2 * -np.log(p) - 0.75 * p**2 * -np.log(1 - p)
    l1 = np.array([[float(det.box_l1(bq, bg)) for bg in gt[0]] for bq in boxes[0]])
    giou = np.array([[float(_giou(bq, bg)[1]) for bg in gt[0]] for bq in boxes[0]])
    np.testing.assert_allclose(cost, 2 * cls + 5 * l1 - 2 * giou, rtol=1e-5, atol=1e-5)


def test_loss_matches_a_numpy_reference_with_scipy_matching():
    logits, boxes, gt, labels, mask = _sample(3)
    loss, m = _loss(logits, boxes, gt, labels, mask, **OPTS)
    B, nq, c1 = logits.shape
    alpha, gamma = 0.25, 2.0
    focal = l1 = giou_l = 0.0
    for b in range(B):
        real = np.flatnonzero(mask[b])
        cost = np.asarray(_match_cost(logits[b], boxes[b], gt[b], labels[b], **OPTS),
                          np.float64)[:, real]
        q, k = scipy_lsa(cost)
        target = np.full(nq, c1 - 1)
        target[q] = labels[b][real][k]
        lp = _np_log_softmax(logits[b].astype(np.float64))[np.arange(nq), target]
        a_t = np.where(target < c1 - 1, alpha, 1 - alpha)
        focal += (a_t * (1 - np.exp(lp)) ** gamma * -lp).sum()
        for qi, ki in zip(q, k):
            pb, gb = boxes[b, qi].astype(np.float64), gt[b, real[ki]].astype(np.float64)
            dyaw = (pb[6] - gb[6] + math.pi / 2) % math.pi - math.pi / 2
            l1 += np.abs(pb[:6] - gb[:6]).sum() + abs(dyaw)
            giou_l += 1 - float(_giou(pb.astype(np.float32), gb.astype(np.float32))[1])
    n = mask.sum()
    np.testing.assert_allclose(loss, (2 * focal + 5 * l1 + 2 * giou_l) / n, rtol=1e-5)
    np.testing.assert_allclose(m["det/class"], focal / n, rtol=1e-5)
    np.testing.assert_allclose(m["det/l1"], l1 / n, rtol=1e-5)
    assert float(m["det/num_gt"]) == n


def test_perfect_prediction_recovers_the_permutation():
    _, _, gt, labels, mask = _sample(4)
    B, g = labels.shape
    nq, c1 = 7, 4
    perm = np.array([[4, 0, 6, 2], [1, 3, 0, 5]])
    boxes = np.tile(np.array([5.0, 5, 5, 1, 1, 1, 0], np.float32), (B, nq, 1))
    logits = np.full((B, nq, c1), -8.0, np.float32)
    logits[..., -1] = 8.0
    for b in range(B):
        for k in range(g):
            if mask[b, k]:
                boxes[b, perm[b, k]] = gt[b, k]
                logits[b, perm[b, k]] = -8.0
                logits[b, perm[b, k], labels[b, k]] = 8.0
    loss, m = _loss(logits, boxes, gt, labels, mask, **OPTS)
    assert float(m["det/l1"]) < 1e-6 and abs(float(m["det/giou"]) - 1) < 1e-5
    assert float(m["det/class"]) < 1e-9 and float(loss) < 1e-4
    # Moving one matched box raises the loss: the matching really pairs each GT with its query.
    boxes[0, perm[0, 0], 0] += 0.5
    loss2, _ = _loss(logits, boxes, gt, labels, mask, **OPTS)
    assert float(loss2) > float(loss) + 0.5


def test_more_gt_than_queries_and_gradients():
    logits, boxes, gt, labels, mask = _sample(5, nq=3, g=6)
    f = jax.jit(jax.value_and_grad(lambda lg, bx: det.detection_loss(lg, bx, gt, labels, mask)[0],
                                   argnums=(0, 1)))
    loss, (g_logits, g_boxes) = f(logits, boxes)
    assert np.isfinite(float(loss))
    for grad in (g_logits, g_boxes):
        grad = np.asarray(grad)
        assert np.isfinite(grad).all() and np.abs(grad).max() > 0
    eps = 1e-3
    e = np.zeros_like(boxes)
    e[0, 1, 3] = eps
    fd = (float(f(logits, boxes + e)[0]) - float(f(logits, boxes - e)[0])) / (2 * eps)
    np.testing.assert_allclose(g_boxes[0, 1, 3], fd, rtol=2e-2, atol=2e-3)


def test_no_gt_gives_pure_no_object_loss():
    logits, boxes, gt, labels, _ = _sample(6)
    loss, m = _loss(logits, boxes, gt, labels, np.zeros(labels.shape, bool), **OPTS)
    lp = _np_log_softmax(logits.astype(np.float64))[..., -1]
    want = 2.0 * (0.75 * (1 - np.exp(lp)) ** 2 * -lp).sum()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert float(m["det/num_gt"]) == 0.0


def test_bad_shapes_name_the_field():
    logits, boxes, gt, labels, mask = _sample(7)
    with pytest.raises(ValueError, match="boxes.shape"):
        det.detection_loss(logits, boxes[..., :6], gt, labels, mask)
    with pytest.raises(ValueError, match="gt_mask"):
        det.detection_loss(logits, boxes, gt, labels, mask[:, :2])
    with pytest.raises(ValueError, match="class_cost"):
        det.detection_loss(logits, boxes, gt, labels, mask, class_cost="ce")
