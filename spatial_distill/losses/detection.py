"""DETR-style 3D detection loss: Hungarian matching, focal class loss, L1 box and 1 − 3D GIoU.

Boxes are `(cx, cy, cz, dx, dy, dz, yaw)`: centre, full sizes along the box's own x/y/z axes, and
the rotation about the world z axis (up), in metres / radians (DESIGN.md §3). Sizes are assumed
positive (the head produces them through a positive activation); the overlap code clamps them at
1e-6 so a bad prediction cannot produce a negative area.

Pieces, each usable alone:
- `linear_sum_assignment(cost [n, m])`: exact minimum-cost assignment, jittable and vmappable: the
  shortest-augmenting-path method (Jonker–Volgenant / Crouse) with a Dijkstra search per row written
  with `lax.while_loop`, O(min(n,m)²·max(n,m)) with static shapes. Costs must be finite.
- `giou_3d(a [7], b [7])`: IoU and GIoU of two yawed boxes. The bird's-eye-view intersection is
  exact (Sutherland–Hodgman clipping of one rectangle by the other's four edges, at most 8
  vertices) times the vertical overlap. The enclosing box is an approximation of the smallest one:
  the smallest of three rectangles holding both boxes' BEV corners — axis-aligned in the world
  frame, in box a's frame and in box b's frame — times the joint vertical extent. Each candidate
  encloses both boxes, so GIoU ≤ IoU and GIoU ∈ [−1, 1] still hold; unlike the world-axis-aligned
  hull alone, identical yawed boxes get GIoU = 1. The true smallest rectangle can be aligned with
  a convex-hull edge joining the two boxes, which this misses.
- `detection_loss(...)`: per sample, the matching cost `class_weight·class_cost +
  l1_weight·L1 − giou_weight·GIoU` (no gradient), then
  `class_weight·focal + l1_weight·L1 + giou_weight·(1 − GIoU)` on the matched pairs.

Choices:
- Classification is a softmax over C + 1 classes, the last being "no object", which every query
  without a matched GT box must predict. Focal loss in softmax form: −α_t (1 − p_t)^γ log p_t with
  α_t = α for object targets and 1 − α for no-object targets (RetinaNet's positive/negative
  weights, α = 0.25, γ = 2).
- Yaw enters the L1 as the difference wrapped to [−π/2, π/2): a box turned by π is the same box,
  and nothing in a box's shape tells its heading.
- Every term is summed over the batch and divided by the number of real GT boxes in the batch
  (at least 1), DETR's normalisation: the loss is per GT box, whatever the padding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

CLASS_COSTS = ("prob", "focal")

# --------------------------------------------------------------------------------------------
# Hungarian assignment.


def _assign_rows(cost):
    """Column for each row of `cost [n, m]`, n ≤ m, minimising the total: `col_for_row [n]`."""
    n, m = cost.shape
    rows = jnp.arange(n)

    def augment_from(cur, state):
        u, v, col4row, row4col = state

        # Dijkstra over reduced costs from row `cur` until a free column is reached.
        def search_cond(s):
            return (s["sink"] < 0) & (s["steps"] < m)

        def search_step(s):
            i = s["i"]
            visited_rows = s["visited_rows"].at[i].set(True)
            r = s["min_val"] + cost[i] - u[i] - v
            better = ~s["visited_cols"] & (r < s["shortest"])
            path = jnp.where(better, i, s["path"])
            shortest = jnp.where(better, r, s["shortest"])
            open_cost = jnp.where(s["visited_cols"], jnp.inf, shortest)
            lowest = open_cost.min()
            ties = (open_cost == lowest) & ~s["visited_cols"]
            # Among equally short columns take a free one: it ends the search now.
            free_ties = ties & (row4col < 0)
            j = jnp.where(free_ties.any(), jnp.argmax(free_ties), jnp.argmax(ties))
            free = row4col[j] < 0
            return dict(i=jnp.where(free, i, row4col[j]), min_val=lowest,
                        sink=jnp.where(free, j, -1), steps=s["steps"] + 1, path=path,
                        shortest=shortest, visited_rows=visited_rows,
                        visited_cols=s["visited_cols"].at[j].set(True))

        s = jax.lax.while_loop(search_cond, search_step, dict(
            i=cur, min_val=jnp.zeros((), cost.dtype), sink=jnp.int32(-1), steps=jnp.int32(0),
            path=jnp.full((m,), -1, jnp.int32), shortest=jnp.full((m,), jnp.inf, cost.dtype),
            visited_rows=jnp.zeros((n,), bool), visited_cols=jnp.zeros((m,), bool)))

        # Dual update keeps every reduced cost ≥ 0 and tight on the assignment.
        min_val, shortest = s["min_val"], s["shortest"]
        others = s["visited_rows"] & (rows != cur)
        u = u + jnp.where(others, min_val - shortest[jnp.clip(col4row, 0, m - 1)], 0.0)
        u = u.at[cur].add(min_val)
        v = v - jnp.where(s["visited_cols"], min_val - shortest, 0.0)

        # Flip the alternating path ending at the sink.
        def flip_cond(a):
            return ~a[3]

        def flip_step(a):
            j, col4row, row4col, _ = a
            i = s["path"][j]
            row4col = row4col.at[j].set(i)
            nxt = col4row[i]
            return nxt, col4row.at[i].set(j), row4col, i == cur

        _, col4row, row4col, _ = jax.lax.while_loop(
            flip_cond, flip_step, (s["sink"], col4row, row4col, jnp.asarray(False)))
        return u, v, col4row, row4col

    init = (jnp.zeros((n,), cost.dtype), jnp.zeros((m,), cost.dtype),
            jnp.full((n,), -1, jnp.int32), jnp.full((m,), -1, jnp.int32))
    return jax.lax.fori_loop(0, n, augment_from, init)[2]


def linear_sum_assignment(cost: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Minimum-cost assignment of `cost [n, m]` (finite values), like scipy's.

    Returns `(rows, cols)`, each `[min(n, m)]` int32, rows ascending; `cost[rows, cols].sum()` is
    minimal. Jittable and vmappable over leading batch axes added by `jax.vmap`.
    """
    if cost.ndim != 2:
        raise ValueError(f"linear_sum_assignment: cost.shape = {cost.shape}: must be [n, m]; "
                         "use jax.vmap for a batch")
    n, m = cost.shape
    cost = cost.astype(jnp.promote_types(cost.dtype, jnp.float32))
    if n <= m:
        return jnp.arange(n, dtype=jnp.int32), _assign_rows(cost)
    row_for_col = _assign_rows(cost.T)
    order = jnp.argsort(row_for_col).astype(jnp.int32)
    return row_for_col[order], order


def hungarian_match(cost: jax.Array, gt_mask: jax.Array) -> jax.Array:
    """Query matched to each GT box: `[Nmax]` int32, −1 for padded or unmatched GT.

    `cost [Nq, Nmax]` (rows queries); padded GT columns (`gt_mask` False) get one constant cost
    above every real one, so they never take a query a real box could have; non-finite costs (a
    NaN prediction) count as the worst real cost rather than stalling the search.
    """
    nq, g = cost.shape
    cost = jax.lax.stop_gradient(cost).astype(jnp.float32)
    real = gt_mask[None, :] & jnp.isfinite(cost)
    hi = jnp.max(jnp.where(real, cost, -jnp.inf))
    hi = jnp.where(jnp.isfinite(hi), hi, 0.0)
    cost = jnp.where(jnp.isfinite(cost), cost, hi + 1.0)
    cost = jnp.where(gt_mask[None, :], cost, hi + 2.0)
    if nq >= g:
        query = _assign_rows(cost.T)
    else:
        gt_for_query = _assign_rows(cost)
        query = jnp.full((g,), -1, jnp.int32).at[gt_for_query].set(jnp.arange(nq, dtype=jnp.int32))
    return jnp.where(gt_mask, query, -1)


# --------------------------------------------------------------------------------------------
# 3D IoU / GIoU of yawed boxes.


def _cross(a, b):
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def bev_corners(box: jax.Array) -> jax.Array:
    """`[4, 2]` BEV corners of `box [7]`, counter-clockwise."""
    half = jnp.maximum(box[3:5], 1e-6) / 2
    local = jnp.stack([half * jnp.array(s) for s in ((1, 1), (-1, 1), (-1, -1), (1, -1))])
    c, s = jnp.cos(box[6]), jnp.sin(box[6])
    rot = jnp.array([[c, -s], [s, c]])
    return local @ rot.T + box[:2]


def _clip(poly, count, a, b):
    """Keeps the part of convex `poly [8, 2]` (first `count` vertices) left of the line a→b."""
    idx = jnp.arange(8)
    q = poly[jnp.where(idx + 1 < count, idx + 1, 0)]
    edge = b - a
    dp, dq = _cross(edge, poly - a), _cross(edge, q - a)
    live = idx < count
    keep = live & (dp >= 0)
    crosses = live & ((dp >= 0) != (dq >= 0))
    denom = jnp.where(crosses, dp - dq, 1.0)
    x = poly + (q - poly) * (dp / denom)[:, None]
    points = jnp.stack([poly, x], axis=1).reshape(16, 2)
    valid = jnp.stack([keep, crosses], axis=1).reshape(16)
    slot = jnp.where(valid, jnp.cumsum(valid) - 1, 8)
    out = jnp.zeros((9, 2), poly.dtype).at[slot].set(points, mode="drop")[:8]
    return out, jnp.minimum(valid.sum(), 8)


def bev_intersection_area(a: jax.Array, b: jax.Array) -> jax.Array:
    """Exact BEV overlap area of boxes `a [7]`, `b [7]`."""
    ca, cb = bev_corners(a), bev_corners(b)
    poly = jnp.zeros((8, 2), ca.dtype).at[:4].set(ca)
    edges = jnp.stack([cb, jnp.roll(cb, -1, axis=0)], axis=1)  # [4, 2 ends, 2]

    def clip_by(carry, edge):
        return _clip(*carry, edge[0], edge[1]), None

    # A scan rather than four unrolled clips keeps the compiled program small: this runs for
    # every (query, GT) pair of the matching cost.
    (poly, count), _ = jax.lax.scan(clip_by, (poly, jnp.int32(4)), edges)
    idx = jnp.arange(8)
    nxt = poly[jnp.where(idx + 1 < count, idx + 1, 0)]
    area = 0.5 * jnp.where(idx < count, _cross(poly, nxt), 0.0).sum()
    return jnp.where(count >= 3, jnp.abs(area), 0.0)


def _z_range(box):
    half = jnp.maximum(box[5], 1e-6) / 2
    return box[2] - half, box[2] + half


def _enclosing_bev_area(ca, cb, angles):
    pts = jnp.concatenate([ca, cb])
    best = jnp.inf
    for t in angles:
        c, s = jnp.cos(t), jnp.sin(t)
        u = pts @ jnp.stack([c, s])
        w = pts @ jnp.stack([-s, c])
        best = jnp.minimum(best, (u.max() - u.min()) * (w.max() - w.min()))
    return best


def giou_3d(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(IoU, GIoU) of boxes `a [7]`, `b [7]` (module docstring for the enclosing box)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    za0, za1 = _z_range(a)
    zb0, zb1 = _z_range(b)
    inter = bev_intersection_area(a, b) * jnp.maximum(jnp.minimum(za1, zb1) - jnp.maximum(za0, zb0),
                                                      0.0)
    vol_a = jnp.prod(jnp.maximum(a[3:6], 1e-6))
    vol_b = jnp.prod(jnp.maximum(b[3:6], 1e-6))
    union = vol_a + vol_b - inter
    enclose = _enclosing_bev_area(bev_corners(a), bev_corners(b), (0.0, a[6], b[6])) * (
        jnp.maximum(za1, zb1) - jnp.minimum(za0, zb0))
    iou = inter / union
    return iou, iou - (enclose - union) / enclose


def pairwise_giou_3d(a: jax.Array, b: jax.Array) -> jax.Array:
    """GIoU of every pair: `a [n, 7]`, `b [m, 7]` → `[n, m]`."""
    return jax.vmap(jax.vmap(lambda x, y: giou_3d(x, y)[1], (None, 0)), (0, None))(a, b)


# --------------------------------------------------------------------------------------------
# The loss.


def _wrap_half_turn(angle):
    return angle - math.pi * jnp.round(angle / math.pi)


def box_l1(pred: jax.Array, gt: jax.Array) -> jax.Array:
    """Σ of |Δ| over centre and size plus |Δyaw| wrapped to half a turn; broadcasts `[..., 7]`."""
    return jnp.abs(pred[..., :6] - gt[..., :6]).sum(-1) + jnp.abs(
        _wrap_half_turn(pred[..., 6] - gt[..., 6]))


def _focal_terms(log_p, alpha, gamma):
    """Positive and negative focal costs of a probability given as its log."""
    p = jnp.exp(log_p)
    pos = alpha * (1 - p) ** gamma * -log_p
    neg = (1 - alpha) * p**gamma * -jnp.log1p(-jnp.minimum(p, 1 - 1e-6))
    return pos, neg


def match_cost(logits, boxes, gt_boxes, gt_labels, *, class_weight, l1_weight, giou_weight,
               class_cost="focal", focal_alpha=0.25, focal_gamma=2.0):
    """Matching cost `[Nq, Nmax]` of one sample (logits `[Nq, C+1]`, boxes `[Nq, 7]`)."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, gt_labels]  # [Nq, G]
    if class_cost == "prob":
        cls = -jnp.exp(log_p)
    else:
        pos, neg = _focal_terms(log_p, focal_alpha, focal_gamma)
        cls = pos - neg
    l1 = box_l1(boxes[:, None, :], gt_boxes[None, :, :])
    return class_weight * cls + l1_weight * l1 - giou_weight * pairwise_giou_3d(boxes, gt_boxes)


def detection_loss(logits, boxes, gt_boxes, gt_labels, gt_mask, *, class_weight: float = 2.0,
                   l1_weight: float = 5.0, giou_weight: float = 2.0, class_cost: str = "focal",
                   focal_alpha: float = 0.25, focal_gamma: float = 2.0):
    """Hungarian-matched 3D detection loss (module docstring).

    Args:
      logits: `[B, Nq, C+1]`, the last class is "no object".
      boxes: `[B, Nq, 7]` predicted boxes.
      gt_boxes: `[B, Nmax, 7]` GT boxes, padded.
      gt_labels: `[B, Nmax]` int in [0, C).
      gt_mask: `[B, Nmax]` bool, True for real boxes.
      class_weight, l1_weight, giou_weight: weights of the three terms, in the matching cost and
        in the loss alike (Deformable-DETR's 2 / 5 / 2).
      class_cost: "focal" (focal-style, matches the loss) or "prob" (−p, DETR).

    Returns:
      (loss scalar, metrics: det/class, det/l1, det/giou_loss (per GT box), det/giou (mean GIoU
      of matched pairs), det/num_gt).
    """
    B, nq, c1 = logits.shape
    if boxes.shape != (B, nq, 7):
        raise ValueError(f"detection_loss: boxes.shape = {boxes.shape}: must be {(B, nq, 7)} "
                         "(batch, queries, cx cy cz dx dy dz yaw) to match logits")
    g = gt_boxes.shape[1]
    if gt_boxes.shape != (B, g, 7) or gt_labels.shape != (B, g) or gt_mask.shape != (B, g):
        raise ValueError(f"detection_loss: gt_boxes {gt_boxes.shape}, gt_labels {gt_labels.shape}, "
                         f"gt_mask {gt_mask.shape}: must be [B, Nmax, 7], [B, Nmax], [B, Nmax] "
                         f"with B = {B}")
    if c1 < 2:
        raise ValueError(f"detection_loss: logits.shape[-1] = {c1}: needs at least one class plus "
                         "the no-object class")
    if class_cost not in CLASS_COSTS:
        raise ValueError(f"detection_loss: class_cost = {class_cost!r}: must be one of {CLASS_COSTS}")
    gt_labels = jnp.clip(gt_labels.astype(jnp.int32), 0, c1 - 2)
    gt_mask = gt_mask.astype(bool)

    cost = jax.vmap(lambda lg, bx, gb, gl: match_cost(
        lg, bx, gb, gl, class_weight=class_weight, l1_weight=l1_weight, giou_weight=giou_weight,
        class_cost=class_cost, focal_alpha=focal_alpha, focal_gamma=focal_gamma))(
        jax.lax.stop_gradient(logits), jax.lax.stop_gradient(boxes), gt_boxes, gt_labels)
    query = jax.vmap(hungarian_match)(cost, gt_mask)  # [B, Nmax]
    matched = query >= 0
    safe_query = jnp.where(matched, query, 0)

    batch = jnp.arange(B)[:, None]
    target = jnp.full((B, nq), c1 - 1, jnp.int32)
    target = target.at[batch, jnp.where(matched, query, nq)].set(gt_labels, mode="drop")
    log_p = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1),
                                target[..., None], -1)[..., 0]
    is_object = target < c1 - 1
    alpha_t = jnp.where(is_object, focal_alpha, 1 - focal_alpha)
    focal = (alpha_t * (1 - jnp.exp(log_p)) ** focal_gamma * -log_p).sum()

    pred = jnp.take_along_axis(boxes.astype(jnp.float32), safe_query[..., None], axis=1)
    gt = gt_boxes.astype(jnp.float32)
    l1 = jnp.where(matched, box_l1(pred, gt), 0.0).sum()
    giou = jax.vmap(jax.vmap(lambda a, b: giou_3d(a, b)[1]))(pred, gt)
    giou_loss = jnp.where(matched, 1 - giou, 0.0).sum()

    n_gt = gt_mask.sum().astype(jnp.float32)
    num_gt = jnp.maximum(n_gt, 1.0)
    loss = (class_weight * focal + l1_weight * l1 + giou_weight * giou_loss) / num_gt
    metrics = {"det/class": focal / num_gt, "det/l1": l1 / num_gt,
               "det/giou_loss": giou_loss / num_gt,
               "det/giou": jnp.where(matched, giou, 0.0).sum() / jnp.maximum(matched.sum(), 1),
               "det/num_gt": n_gt}
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
