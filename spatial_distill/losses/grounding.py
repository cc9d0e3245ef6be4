"""Grounding loss: the answer position must know which objects the question names, and where.

From a yes/no (or teacher-distribution) signal alone a decoder trained from scratch never learns
to bring "the red box"'s geometry to the position that answers: the loss gives almost no
gradient towards the geometry until that routing works (docs/learning.md). This loss supervises
the routing directly. The grounding head reads the hidden state that predicts the first answer
token and predicts, for the question's subject and reference object (`referred [B, Q, 2]`, −1
where a question names fewer), their attributes in camera 0's frame (`geometry.ATTRIBUTES`:
centre, log size, cos/sin 2ψ), class and colour.

    loss = mean over referred objects of  L1(attributes) + CE(class) + L1(colour)

`relation_loss` adds the signed margin of the relation the question asks (size, left/right, in
front/behind), which the yes/no signal alone does not teach the student to read.
Colour targets are the objects' mean observed colours (`objects.observed_colours`), counted only
for objects some pixel sees. Metrics: `ground/centre_err_m` (Euclidean, metres),
`ground/class_acc`, `ground/colour_l1`, `ground/referred` (objects per batch).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from spatial_distill import geometry


def grounding_loss(pred: jax.Array, referred: jax.Array, question_mask: jax.Array,
                   attributes: jax.Array, colours: jax.Array, seen: jax.Array, labels: jax.Array):
    """Loss and metrics (module doc).

    pred `[B, Q, 2, A + C + 3]` (A = 8 attributes, C classes), referred `[B, Q, 2]` int object
    ids (−1 none), question_mask `[B, Q]`, attributes `[B, N, A]`, colours `[B, N, 3]`,
    seen `[B, N]` bool, labels `[B, N]` class ids.
    """
    a = geometry.NUM_ATTRIBUTES
    c = pred.shape[-1] - a - 3
    if c < 1 or referred.shape != pred.shape[:3] or referred.shape[-1] != 2:
        raise ValueError(f"grounding_loss: pred {pred.shape} must be [B, Q, 2, {a} + classes + 3] "
                         f"and referred {referred.shape} [B, Q, 2]")
    b, q, _ = referred.shape
    mask = (referred >= 0) & question_mask[..., None].astype(bool)
    idx = jnp.maximum(referred, 0).reshape(b, q * 2)

    def at_referred(x):  # [B, N, ...] -> [B, Q, 2, ...]
        picked = jnp.take_along_axis(x, idx.reshape(b, q * 2, *([1] * (x.ndim - 2))), axis=1)
        return picked.reshape(b, q, 2, *x.shape[2:])

    attr_t = at_referred(attributes.astype(jnp.float32))
    colour_t = at_referred(colours.astype(jnp.float32))
    colour_mask = mask & at_referred(seen.astype(bool))
    class_t = jnp.clip(at_referred(labels.astype(jnp.int32)), 0, c - 1)
    pred = pred.astype(jnp.float32)
    n = jnp.maximum(mask.sum(), 1).astype(jnp.float32)

    def mean(x, m=mask):
        return jnp.where(m, x, 0.0).sum() / n

    attr_l1 = mean(jnp.abs(pred[..., :a] - attr_t).sum(-1))
    class_ce = mean(optax.softmax_cross_entropy_with_integer_labels(pred[..., a:a + c], class_t))
    colour_l1 = mean(jnp.abs(pred[..., a + c:] - colour_t).sum(-1), colour_mask)
    metrics = {
        "ground/attributes_l1": attr_l1, "ground/class_ce": class_ce, "ground/colour_l1": colour_l1,
        "ground/centre_err_m": mean(jnp.linalg.norm(pred[..., :3] - attr_t[..., :3] + 1e-12, axis=-1)),
        "ground/class_acc": mean((jnp.argmax(pred[..., a:a + c], -1) == class_t).astype(jnp.float32)),
        "ground/referred": mask.sum().astype(jnp.float32),
    }
    return attr_l1 + class_ce + colour_l1, jax.tree.map(jax.lax.stop_gradient, metrics)


# Relation readout: the axis a relation word compares along, in `geometry.ATTRIBUTES` terms;
# `surface` from the world boxes (`surface_gap`).
RELATION_AXES = ("size", "x", "z", "gap", "surface")


def surface_gap(s: jax.Array, r: jax.Array) -> jax.Array:
    """Separating-axis gap of world boxes `[..., 7]` (cx, cy, cz, dx, dy, dz, yaw about the
    vertical z): the largest separation along the vertical and the four footprint edge normals.

    For boxes whose vertical axes are parallel these five axes decide separation (every edge
    cross product is one of them), so the result is > 0 exactly when the boxes are apart: a lower
    bound of their distance, equal to it when the nearest features face each other along one
    axis (a box resting on another: 0), and minus the smallest penetration when they overlap.
    `gap` (centre distance less mean half extents) is blind to yaw and shape: it decides "near"
    wrongly on 5% of the synthetic questions and "touching" on a third (docs/learning.md).
    """
    s, r = s.astype(jnp.float32), r.astype(jnp.float32)
    d = r[..., :3] - s[..., :3]
    best = jnp.abs(d[..., 2]) - 0.5 * (s[..., 5] + r[..., 5])
    for angle in (s[..., 6], s[..., 6] + 0.5 * jnp.pi, r[..., 6], r[..., 6] + 0.5 * jnp.pi):
        n = jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)
        apart = jnp.abs(jnp.sum(d[..., :2] * n, -1)) - _half_extent(s, n) - _half_extent(r, n)
        best = jnp.maximum(best, apart)
    return best


def _half_extent(box: jax.Array, n: jax.Array) -> jax.Array:
    """Half the footprint of world boxes `[..., 7]` along horizontal unit vectors `n [..., 2]`."""
    c, s = jnp.cos(box[..., 6]), jnp.sin(box[..., 6])
    along_x = jnp.abs(c * n[..., 0] + s * n[..., 1])
    along_y = jnp.abs(-s * n[..., 0] + c * n[..., 1])
    return 0.5 * (box[..., 3] * along_x + box[..., 4] * along_y)


def resolve_relations(tokenizer, relations: dict, vocab_size: int) -> tuple[tuple[tuple[int, ...], str, float, float], ...]:
    """`{word: "+size" | "-x" | "gap<0.15" | "surface<0.01*50" | "off" ...}` -> `((token_ids,
    axis, sign, offset), ...)`: a question containing the word's tokens asks whether `sign *
    difference + offset > 0`, the difference of subject and reference along `axis`
    (`relation_margins`); `gap<t` / `surface<t` ask whether the two objects' rough /
    separating-axis gap is below `t` metres. An optional `*k` multiplies the margin by `k`, so a
    threshold of centimetres still gives targets that reach the readout's clip (±1) instead of
    sitting within 0.01 of zero. `off`: the word has no target."""
    out = []
    for word, spec in relations.items():
        if spec == "off":
            continue
        ids = tokenizer.encode(word)
        body, star, times = spec.partition("*")
        scale = _finite(times) if star else 1.0
        axis, below, threshold = body.partition("<")
        if below and axis in ("gap", "surface"):  # the gap below `offset`: -gap + offset > 0
            sign, offset = -1.0, _finite(threshold)
        else:
            sign, axis = {"+": 1.0, "-": -1.0}.get(body[:1]), body[1:]
            offset = 0.0 if axis in RELATION_AXES[:3] else None
        if sign is None or offset is None or scale is None or scale <= 0:
            raise ValueError(f"config.loss.relations[{word!r}] = {spec!r}: use '+' or '-' then one of "
                             f"{RELATION_AXES[:3]} (e.g. '+size'), 'gap<metres' or 'surface<metres', "
                             f"optionally '*k' (k > 0), or 'off'")
        if not ids or not all(0 <= i < vocab_size for i in ids):
            raise ValueError(f"config.loss.relations: {word!r} encodes to {list(ids)}, not tokens of "
                             f"the decoder's vocabulary [0, {vocab_size})")
        out.append((tuple(int(i) for i in ids), axis, sign * scale, offset * scale))
    return tuple(out)


def _finite(text: str) -> float | None:
    """`text` as a finite float, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _contains(ids: jax.Array, tokens: tuple[int, ...]) -> jax.Array:
    """`[..., L]` ids -> `[...]` whether `tokens` occur there consecutively."""
    n, length = len(tokens), ids.shape[-1]
    if n > length:
        return jnp.zeros(ids.shape[:-1], bool)
    at = jnp.ones(ids.shape[:-1] + (length - n + 1,), bool)
    for i, t in enumerate(tokens):
        at = at & (ids[..., i:length - n + 1 + i] == t)
    return jnp.any(at, axis=-1)


def relation_margins(prompt_ids: jax.Array, referred: jax.Array, attributes: jax.Array,
                     relations, boxes: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The signed margin that decides each question, and where one exists.

    prompt_ids `[B, Q, Lp]`, referred `[B, Q, 2]`, attributes `[B, N, A]` (camera 0's frame),
    boxes `[B, N, 7]` (world; read by `surface` only).
    A question whose prompt holds a relation word compares subject `s` and reference `r`:
    `size`: log box volume s - r (sum of log sizes); `x`: x_r - x_s (s left of r: > 0);
    `z`: z_r - z_s (s in front of r: > 0); `gap`: the distance of the centres less each box's
    mean half extent (a rough surface gap, blind to yaw); `surface`: `surface_gap` of the two
    world boxes; times the word's sign, plus its offset.
    Returns margins `[B, Q]`
    and validity `[B, Q]` (a relation word and two referred objects).
    """
    b, q, _ = referred.shape
    idx = jnp.maximum(referred, 0).reshape(b, q * 2, 1)

    def pairs(x):  # [B, N, F] -> subject, reference [B, Q, F]
        both = jnp.take_along_axis(x.astype(jnp.float32), idx, axis=1).reshape(b, q, 2, -1)
        return both[:, :, 0], both[:, :, 1]

    s, r = pairs(attributes)
    half = lambda o: 0.5 * jnp.exp(o[..., 3:6]).mean(-1)
    along = {"size": s[..., 3:6].sum(-1) - r[..., 3:6].sum(-1), "x": r[..., 0] - s[..., 0],
             "z": r[..., 2] - s[..., 2],
             "gap": jnp.linalg.norm(s[..., :3] - r[..., :3] + 1e-12, axis=-1) - half(s) - half(r)}
    if any(axis == "surface" for _, axis, _, _ in relations):
        if boxes is None:
            raise ValueError("a 'surface<metres' relation needs the world boxes: pass boxes [B, N, 7]")
        along["surface"] = surface_gap(*pairs(boxes))
    margin = jnp.zeros((b, q), jnp.float32)
    found = jnp.zeros((b, q), bool)
    for tokens, axis, sign, offset in relations:
        here = _contains(prompt_ids, tokens) & ~found
        margin = jnp.where(here, sign * along[axis] + offset, margin)
        found = found | here
    return margin, found & (referred[..., 1] >= 0)


def relation_loss(pred: jax.Array, prompt_ids: jax.Array, referred: jax.Array,
                  question_mask: jax.Array, attributes: jax.Array, relations, clip: float = 1.0,
                  boxes: jax.Array | None = None):
    """The answer position regresses the relation's signed margin (`relation_margins`, clipped to
    ±`clip`): a dense target that cannot be met without reading *which* relation is asked.

    From yes/no alone the student answers "Is the A bigger than the B?" as "... smaller ...": the
    answer is the relation word times the geometry, and a binary signal gives little gradient to
    the product (docs/learning.md). pred `[B, Q]`. Returns (MSE, metrics).
    """
    margin, valid = relation_margins(prompt_ids, referred, attributes, relations, boxes)
    valid = valid & question_mask.astype(bool)
    n = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    pred = pred.astype(jnp.float32)
    mse = jnp.where(valid, jnp.square(pred - jnp.clip(margin, -clip, clip)), 0.0).sum() / n
    agree = jnp.where(valid, (pred > 0) == (margin > 0), False).sum() / n
    return mse, {"ground/relation_sign_acc": jax.lax.stop_gradient(agree),
                 "ground/relations": valid.sum().astype(jnp.float32)}
