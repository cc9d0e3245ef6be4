"""Depth: VGGT-style confidence-weighted L1 + gradient loss against GT depth, and depth metrics.

    loss = mean_valid( c·|d − d*| − λ·log c ) + grad_weight · mean_pairs( c̄·|∇d − ∇d*| )

- valid pixels: GT depth finite and > 0 (0 marks missing depth in the canonical Sample).
- `c` is the predicted confidence, > 1 by construction (`1 + exp(·)` in the DPT head). VGGT's
  paper writes the log term's weight as α; here it is `log_conf_weight` (λ, default 0.2). With
  c ≥ 1 the per-pixel optimum is c = max(1, λ / |d − d*|): the head learns to raise confidence
  only where its error is below λ metres, which is what the confidence map is read as.
- gradient term: finite differences along H and along W of the error `d − d*` (equal to
  ∇d − ∇d*), counted only where both neighbours are valid, weighted like VGGT's by the confidence
  (`c̄`, the mean of the two neighbours' confidences) so that both terms share one uncertainty.
- both means are pooled over the whole batch (every valid pixel / pair weighs the same), and an
  image without any valid pixel contributes nothing instead of a NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(pred, conf, gt):
    if pred.ndim != 4:
        raise ValueError(f"depth: pred.shape = {pred.shape}: must be [batch, views, H, W] "
                         "(squeeze the trailing channel of the DPT output)")
    for name, x in (("conf", conf), ("gt", gt)):
        if x is not None and x.shape != pred.shape:
            raise ValueError(f"depth: {name}.shape = {x.shape}: must equal pred.shape {pred.shape}")


def valid_mask(gt: jax.Array) -> jax.Array:
    """`[B, S, H, W]` bool: GT depth present (finite and > 0)."""
    return jnp.isfinite(gt) & (gt > 0)


def depth_loss(pred: jax.Array, conf: jax.Array, gt: jax.Array, *,
               log_conf_weight: float = 0.2, grad_weight: float = 1.0):
    """Confidence-weighted L1 + gradient loss (module docstring).

    Args:
      pred: `[batch, views, H, W]` predicted depth (metres).
      conf: `[batch, views, H, W]` confidence, > 1.
      gt: `[batch, views, H, W]` GT depth, 0 (or non-finite) where missing.
      log_conf_weight: λ of the −λ·log c term.
      grad_weight: weight of the gradient term.

    Returns:
      (loss scalar fp32, metrics: depth/l1 (unweighted mean |d − d*|), depth/grad (unweighted mean
      gradient error), depth/conf (mean confidence) — all over valid pixels / pairs).
    """
    _check(pred, conf, gt)
    valid = valid_mask(gt)
    pred = pred.astype(jnp.float32)
    conf = conf.astype(jnp.float32)
    err = jnp.where(valid, pred - jnp.where(valid, gt, 0.0).astype(jnp.float32), 0.0)
    # Confidence at invalid pixels can be anything (even garbage): keep it out of log().
    conf = jnp.where(valid, conf, 1.0)
    n_valid = valid.sum()
    denom = jnp.maximum(n_valid, 1).astype(jnp.float32)
    abs_err = jnp.abs(err)
    conf_term = jnp.where(valid, conf * abs_err - log_conf_weight * jnp.log(conf), 0.0).sum() / denom

    grad_sum, grad_plain, n_pairs = 0.0, 0.0, 0
    for axis in (2, 3):
        pair = _neighbours(valid, axis, jnp.logical_and)
        diff = jnp.abs(_neighbours(err, axis, lambda a, b: b - a))
        c_pair = _neighbours(conf, axis, lambda a, b: 0.5 * (a + b))
        grad_sum = grad_sum + jnp.where(pair, c_pair * diff, 0.0).sum()
        grad_plain = grad_plain + jnp.where(pair, diff, 0.0).sum()
        n_pairs = n_pairs + pair.sum()
    pair_denom = jnp.maximum(n_pairs, 1).astype(jnp.float32)
    loss = conf_term + grad_weight * grad_sum / pair_denom
    metrics = {
        "depth/l1": abs_err.sum() / denom,
        "depth/grad": grad_plain / pair_denom,
        "depth/conf": jnp.where(valid, conf, 0.0).sum() / denom,
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def _neighbours(x, axis, fn):
    """fn(x[i], x[i+1]) along `axis`."""
    n = x.shape[axis]
    return fn(jax.lax.slice_in_dim(x, 0, n - 1, axis=axis), jax.lax.slice_in_dim(x, 1, n, axis=axis))


def depth_metrics(pred: jax.Array, gt: jax.Array) -> dict[str, jax.Array]:
    """abs_rel, rmse and delta1 (max(d/d*, d*/d) < 1.25), pooled over valid pixels of the batch.

    `pred`, `gt`: `[batch, views, H, W]`. Predictions ≤ 0 count as a failed δ1 and enter abs_rel
    and rmse as they are. No valid pixel: every metric is NaN (nothing was measured).
    """
    _check(pred, None, gt)
    valid = valid_mask(gt)
    g = jnp.where(valid, gt, 1.0).astype(jnp.float32)
    p = pred.astype(jnp.float32)
    n = valid.sum().astype(jnp.float32)
    abs_rel = jnp.where(valid, jnp.abs(p - g) / g, 0.0).sum() / n
    rmse = jnp.sqrt(jnp.where(valid, (p - g) ** 2, 0.0).sum() / n)
    p_pos = jnp.where(p > 0, p, 1.0)
    ratio = jnp.maximum(p_pos / g, g / p_pos)
    delta1 = jnp.where(valid & (p > 0) & (ratio < 1.25), 1.0, 0.0).sum() / n
    return {"abs_rel": abs_rel, "rmse": rmse, "delta1": delta1}
