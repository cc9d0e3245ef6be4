import jax
import numpy as np
import pytest

from spatial_distill.losses import depth


def _problem(seed=0, shape=(2, 3, 5, 6)):
    r = np.random.default_rng(seed)
    gt = r.uniform(0.5, 4.0, size=shape).astype(np.float32)
    gt[r.random(shape) < 0.3] = 0.0
    pred = (gt + r.normal(scale=0.3, size=shape)).astype(np.float32)
    conf = (1.0 + np.exp(r.normal(size=shape))).astype(np.float32)
    return pred, conf, gt


def _np_loss(pred, conf, gt, lam, grad_weight):
    """Loops over pixels and neighbour pairs, float64."""
    pred, conf, gt = (x.astype(np.float64) for x in (pred, conf, gt))
    B, S, H, W = pred.shape
    total, n = 0.0, 0
    gsum, npairs = 0.0, 0
    for b in range(B):
        for s in range(S):
            for i in range(H):
                for j in range(W):
                    if gt[b, s, i, j] <= 0:
                        continue
                    total += conf[b, s, i, j] * abs(pred[b, s, i, j] - gt[b, s, i, j]) \
                        - lam * np.log(conf[b, s, i, j])
                    n += 1
                    for di, dj in ((1, 0), (0, 1)):
                        i2, j2 = i + di, j + dj
                        if i2 >= H or j2 >= W or gt[b, s, i2, j2] <= 0:
                            continue
                        dp = pred[b, s, i2, j2] - pred[b, s, i, j]
                        dg = gt[b, s, i2, j2] - gt[b, s, i, j]
                        c = 0.5 * (conf[b, s, i, j] + conf[b, s, i2, j2])
                        gsum += c * abs(dp - dg)
                        npairs += 1
    return total / n + grad_weight * gsum / npairs


@pytest.mark.parametrize("lam,grad_weight", [(0.2, 1.0), (0.05, 0.5)])
def test_loss_matches_numpy_loop(lam, grad_weight):
    pred, conf, gt = _problem()
    loss, m = jax.jit(lambda p, c, g: depth.depth_loss(p, c, g, log_conf_weight=lam,
                                                       grad_weight=grad_weight))(pred, conf, gt)
    np.testing.assert_allclose(loss, _np_loss(pred, conf, gt, lam, grad_weight), rtol=1e-5)
    valid = gt > 0
    np.testing.assert_allclose(m["depth/l1"], np.abs(pred - gt)[valid].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["depth/conf"], conf[valid].mean(), rtol=1e-5)


def test_invalid_pixels_contribute_nothing():
    pred, conf, gt = _problem(seed=1)
    invalid = gt <= 0
    f = jax.jit(jax.value_and_grad(lambda p, c: depth.depth_loss(p, c, gt)[0], argnums=(0, 1)))
    loss, (gp, gc) = f(pred, conf)
    pred2 = np.where(invalid, 1e6, pred).astype(np.float32)
    conf2 = np.where(invalid, 1e-3, conf).astype(np.float32)  # even a bad conf there is ignored
    loss2, _ = f(pred2, conf2)
    np.testing.assert_allclose(loss, loss2, rtol=1e-6)
    assert np.abs(np.asarray(gp)[invalid]).max() == 0.0
    assert np.abs(np.asarray(gc)[invalid]).max() == 0.0
    assert np.abs(np.asarray(gp)[~invalid]).min() > 0.0


def test_non_finite_gt_is_invalid_and_empty_batch_is_zero():
    pred, conf, gt = _problem(seed=2)
    gt_nan = gt.copy()
    gt_nan[gt == 0] = np.nan
    a, _ = depth.depth_loss(pred, conf, gt)
    b, _ = depth.depth_loss(pred, conf, gt_nan)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    empty, m = depth.depth_loss(pred, conf, np.zeros_like(gt))
    assert float(empty) == 0.0 and float(m["depth/l1"]) == 0.0


def test_log_conf_optimum():
    # Per pixel, c·e − λ·log c is minimised at c = λ / e: the loss must be lower there than at
    # neighbouring confidences (gradient term off, constant error).
    gt = np.full((1, 1, 2, 2), 2.0, np.float32)
    pred = gt + 0.01
    lam = 0.2

    def loss(c):
        return float(depth.depth_loss(pred, np.full_like(gt, c), gt, log_conf_weight=lam,
                                      grad_weight=0.0)[0])

    best = lam / 0.01
    assert loss(best) < loss(best * 1.1) and loss(best) < loss(best / 1.1)
    np.testing.assert_allclose(loss(best), 0.01 * best - lam * np.log(best), rtol=1e-5)


def test_gradient_term_ignores_offsets_and_sees_edges():
    gt = np.broadcast_to(np.linspace(1.0, 3.0, 6, dtype=np.float32), (1, 1, 4, 6)).copy()
    conf = np.ones_like(gt)
    _, shifted = depth.depth_loss(gt + 0.5, conf, gt)
    assert float(shifted["depth/grad"]) < 1e-6 and float(shifted["depth/l1"]) == pytest.approx(0.5)
    flat = np.full_like(gt, 2.0)
    _, m = depth.depth_loss(flat, conf, gt)
    # GT slope 0.4 per column; the flat prediction misses it on the 4·5 horizontal pairs only.
    np.testing.assert_allclose(m["depth/grad"], 0.4 * 20 / (4 * 5 + 3 * 6), rtol=1e-5)


def test_depth_metrics_match_numpy():
    pred, _, gt = _problem(seed=3)
    pred = np.abs(pred) + 0.05
    m = depth.depth_metrics(pred, gt)
    v = gt > 0
    p, g = pred[v].astype(np.float64), gt[v].astype(np.float64)
    np.testing.assert_allclose(m["abs_rel"], np.mean(np.abs(p - g) / g), rtol=1e-5)
    np.testing.assert_allclose(m["rmse"], np.sqrt(np.mean((p - g) ** 2)), rtol=1e-5)
    d1 = np.mean(np.maximum(p / g, g / p) < 1.25)
    np.testing.assert_allclose(m["delta1"], d1, rtol=1e-6)
    assert 0.2 < d1 < 1.0
    neg = depth.depth_metrics(-np.ones_like(gt), gt)
    assert float(neg["delta1"]) == 0.0


def test_shape_errors_name_the_field():
    pred, conf, gt = _problem()
    with pytest.raises(ValueError, match="conf.shape"):
        depth.depth_loss(pred, conf[:, :1], gt)
    with pytest.raises(ValueError, match="pred.shape"):
        depth.depth_loss(pred[..., None], conf, gt)
