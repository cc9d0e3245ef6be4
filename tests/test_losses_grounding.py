"""The grounding loss against a numpy computation of the same formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spatial_distill.losses.grounding import grounding_loss


def numpy_grounding(pred, referred, qmask, attrs, colours, seen, labels):
    total_attr = total_ce = total_col = 0.0
    n = 0
    for b, q, r in np.ndindex(*referred.shape):
        j = referred[b, q, r]
        if j < 0 or not qmask[b, q]:
            continue
        n += 1
        p = pred[b, q, r]
        total_attr += np.abs(p[:8] - attrs[b, j]).sum()
        logits = p[8:11]
        lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
        total_ce += lse - logits[labels[b, j]]
        if seen[b, j]:
            total_col += np.abs(p[11:] - colours[b, j]).sum()
    return (total_attr + total_ce + total_col) / n, n


def test_matches_numpy_and_masks_missing_referents():
    rng = np.random.default_rng(0)
    b, q, n = 2, 3, 4
    pred = rng.normal(size=(b, q, 2, 14)).astype(np.float32)
    referred = np.array([[[0, 2], [1, -1], [3, 0]], [[2, 1], [-1, -1], [0, 3]]], np.int32)
    qmask = np.array([[True, True, False], [True, True, True]])
    attrs = rng.normal(size=(b, n, 8)).astype(np.float32)
    colours = rng.uniform(size=(b, n, 3)).astype(np.float32)
    seen = np.array([[True, True, False, True], [True, False, True, True]])
    labels = rng.integers(0, 3, (b, n)).astype(np.int32)
    loss, m = grounding_loss(*(jnp.asarray(x) for x in (pred, referred, qmask, attrs, colours, seen, labels)))
    want, count = numpy_grounding(pred, referred, qmask, attrs, colours, seen, labels)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(m["ground/referred"]) == count == 7
    # Perfect predictions (and confident classes) leave ~0 loss and exact centres.
    perfect = np.zeros_like(pred)
    for bb, qq, r in np.ndindex(*referred.shape):
        j = max(referred[bb, qq, r], 0)
        perfect[bb, qq, r, :8] = attrs[bb, j]
        perfect[bb, qq, r, 8 + labels[bb, j]] = 50.0
        perfect[bb, qq, r, 11:] = colours[bb, j]
    loss, m = grounding_loss(*(jnp.asarray(x) for x in (perfect, referred, qmask, attrs, colours, seen, labels)))
    assert float(loss) < 1e-5
    assert float(m["ground/centre_err_m"]) < 1e-5 and float(m["ground/class_acc"]) == 1.0


def test_gradient_reaches_only_referred_predictions():
    rng = np.random.default_rng(1)
    pred = jnp.asarray(rng.normal(size=(1, 2, 2, 14)), jnp.float32)
    referred = jnp.asarray([[[1, -1], [0, 1]]], jnp.int32)
    args = (referred, jnp.asarray([[True, False]]), jnp.asarray(rng.normal(size=(1, 2, 8)), jnp.float32),
            jnp.zeros((1, 2, 3)), jnp.ones((1, 2), bool), jnp.zeros((1, 2), jnp.int32))
    g = np.asarray(jax.grad(lambda p: grounding_loss(p, *args)[0])(pred))
    assert np.abs(g[0, 0, 0]).sum() > 0
    np.testing.assert_array_equal(g[0, 0, 1], 0)  # no reference object
    np.testing.assert_array_equal(g[0, 1], 0)  # padding question


def test_shape_errors_are_named():
    with pytest.raises(ValueError, match="must be"):
        grounding_loss(jnp.zeros((1, 2, 2, 10)), jnp.zeros((1, 2, 2), jnp.int32), jnp.ones((1, 2), bool),
                       jnp.zeros((1, 3, 8)), jnp.zeros((1, 3, 3)), jnp.ones((1, 3), bool),
                       jnp.zeros((1, 3), jnp.int32))
