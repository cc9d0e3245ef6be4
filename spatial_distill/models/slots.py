"""Object slots: the patches of every view grouped into at most k objects, one token each.

A decoder trained from scratch learns to bind "the red box" to its object far faster when each
object is one token than when it is spread over many patch tokens among background ones
(docs/learning.md: the readout probe's binding slows with 64 tokens and stalls in the student's
`objects64` path). The object head already says, per patch, how likely it sees an object and
that object's class, colour and centre in camera 0's frame, so patches are grouped greedily, as
non-maximum suppression does with detections:

  repeat k times: the ungrouped patch with the highest objectness seeds a slot; every ungrouped
  patch whose predicted centre lies within `radius` metres of the seed's, whose colour lies
  within `colour_scale` (Euclidean, RGB in [0, 1]) and whose class agrees joins it.

A slot is the objectness-weighted mean of its patches' inputs (aggregator features and object
fields); slots whose seed has objectness below `min_objectness` are empty (all zeros). The
grouping itself is a discrete choice and passes no gradient; the means pass it to the fields.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group(objectness: jax.Array, centres: jax.Array, colours: jax.Array, classes: jax.Array,
          k: int, *, radius: float, colour_scale: float, min_objectness: float) -> jax.Array:
    """Slot membership weights `[B, k, P]` (rows sum to 1, or 0 for an empty slot).

    objectness `[B, P]` probabilities, centres `[B, P, 3]` metres, colours `[B, P, 3]` in
    [0, 1], classes `[B, P, C]` probabilities, for the P patches of all views.
    """
    objectness, centres, colours, classes = jax.lax.stop_gradient((objectness, centres, colours, classes))
    label = jnp.argmax(classes, -1)
    free = jnp.ones_like(objectness, bool)
    rows = []
    for _ in range(k):
        seed = jnp.argmax(jnp.where(free, objectness, -1.0), axis=-1)  # [B]

        def at_seed(x):
            return jnp.take_along_axis(x, seed.reshape(-1, *([1] * (x.ndim - 1))), axis=1)

        valid = (at_seed(objectness) >= min_objectness) & at_seed(free)  # [B, 1]
        near = jnp.sum((centres - at_seed(centres)) ** 2, -1) <= radius ** 2
        alike = jnp.sum((colours - at_seed(colours)) ** 2, -1) <= colour_scale ** 2
        member = free & valid & near & alike & (label == at_seed(label))
        # The seed always belongs to its own slot, whatever its centre/colour rounding says.
        member = member | (valid & (jnp.arange(objectness.shape[1]) == seed[:, None]))
        w = jnp.where(member, objectness, 0.0)
        rows.append(w / jnp.maximum(w.sum(-1, keepdims=True), 1e-12))
        free = free & ~member
    return jnp.stack(rows, 1)
