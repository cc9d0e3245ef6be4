import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from spatial_distill.losses import weighting

LOSSES = {"text": 2.5, "depth": 0.8, "det": 4.0}
FORMS = {"text": "classification", "depth": "regression", "det": "regression"}


def test_kendall_matches_numpy_for_both_forms():
    s = {"text": 0.3, "depth": -1.2, "det": 0.7}
    total, m = weighting.kendall(LOSSES, s, forms=FORMS, s_min=-5.0, s_max=5.0)
    want = (np.exp(-0.3) * 2.5 + 0.15) + (0.5 * np.exp(1.2) * 0.8 - 0.6) + (
        0.5 * np.exp(-0.7) * 4.0 + 0.35)
    np.testing.assert_allclose(total, want, rtol=1e-6)
    np.testing.assert_allclose(m["weights/text"], np.exp(-0.3), rtol=1e-6)
    np.testing.assert_allclose(m["weights/depth"], 0.5 * np.exp(1.2), rtol=1e-6)
    assert set(m) == {"weights/text", "weights/depth", "weights/det"}


def test_kendall_gradient_and_optimum():
    # d/ds [0.5·e^{−s}·L + 0.5·s] = 0.5·(1 − e^{−s}·L) → optimum s = log L (regression),
    # and for the classification form e^{−s}·L + 0.5·s → s = log(2L).
    def total(s):
        return weighting.kendall({"depth": 0.8, "text": 2.5}, {"depth": s[0], "text": s[1]},
                                 forms=FORMS, s_min=-5.0, s_max=5.0)[0]

    s = jnp.array([0.2, -0.4])
    g = jax.grad(total)(s)
    np.testing.assert_allclose(g, [0.5 * (1 - np.exp(-0.2) * 0.8), 0.5 - np.exp(0.4) * 2.5],
                               rtol=1e-6)
    g_opt = jax.grad(total)(jnp.array([np.log(0.8), np.log(5.0)], jnp.float32))
    np.testing.assert_allclose(g_opt, [0.0, 0.0], atol=1e-6)
    # Gradient w.r.t. the task loss is the weight.
    gl = jax.grad(lambda L: weighting.kendall({"depth": L}, {"depth": 0.2}, forms=FORMS,
                                              s_min=-5.0, s_max=5.0)[0])(1.0)
    np.testing.assert_allclose(gl, 0.5 * np.exp(-0.2), rtol=1e-6)


def test_clamp_value_and_gradient_direction():
    def total(s, loss):
        return weighting.kendall({"depth": loss}, {"depth": s}, forms=FORMS, s_min=-2.0,
                                 s_max=2.0)[0]

    # Above s_max: value as at s_max.
    np.testing.assert_allclose(total(3.0, 0.1), 0.5 * np.exp(-2.0) * 0.1 + 1.0, rtol=1e-6)
    # Loss 0.1: the optimum s = log 0.1 is inside; at s = 3 the gradient points back inside and
    # passes.
    assert float(jax.grad(total)(3.0, 0.1)) > 0
    # Loss huge: optimum s = log 1e4 > s_max; the gradient at s = 3 pushes further out: blocked.
    assert float(jax.grad(total)(3.0, 1e4)) == 0.0
    # Below s_min, symmetric: loss tiny wants s lower (blocked), loss large wants it up (passes).
    assert float(jax.grad(total)(-3.0, 1e-4)) == 0.0
    assert float(jax.grad(total)(-3.0, 5.0)) < 0
    # Inside the range the gradient is the plain one.
    np.testing.assert_allclose(jax.grad(total)(0.5, 1.0), 0.5 * (1 - np.exp(-0.5)), rtol=1e-6)


def test_kendall_module_trains_towards_log_loss():
    model = weighting.KendallWeights({"depth": "regression", "text": "classification"},
                                     s_min=-4.0, s_max=4.0)
    assert model.tasks == ("depth", "text")
    assert model.log_vars.get_metadata()["out_sharding"] == (None,)
    opt = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    losses = {"depth": jnp.float32(0.8), "text": jnp.float32(2.5)}

    @nnx.jit
    def step(model, opt):
        (loss, m), g = nnx.value_and_grad(lambda mdl: mdl(losses), has_aux=True)(model)
        opt.update(model, g)
        return m

    for _ in range(200):
        m = step(model, opt)
    np.testing.assert_allclose(model.log_vars[...], [np.log(0.8), np.log(5.0)], atol=1e-3)
    np.testing.assert_allclose(m["weights/depth"], 0.5 / 0.8, rtol=1e-2)


def test_static_weights():
    total, m = weighting.static(LOSSES, {"text": 1.0, "depth": 0.15, "det": 0.35, "unused": 3.0})
    np.testing.assert_allclose(total, 2.5 + 0.15 * 0.8 + 0.35 * 4.0, rtol=1e-6)
    np.testing.assert_allclose(m["weights/det"], 0.35)
    with pytest.raises(ValueError, match=r"\['det'\].*weights"):
        weighting.static(LOSSES, {"text": 1.0, "depth": 1.0})


def test_dwa_matches_numpy_over_steps():
    tasks = sorted(LOSSES)
    state = weighting.dwa_init(tasks)
    history = [{"text": 3.0, "depth": 1.0, "det": 5.0}, {"text": 2.4, "depth": 0.9, "det": 5.5},
               {"text": 2.0, "depth": 0.45, "det": 5.0}, {"text": 1.9, "depth": 0.4, "det": 4.0}]
    step = jax.jit(lambda losses, st: weighting.dwa(losses, st, temperature=2.0))
    seen = []
    for t, losses in enumerate(history):
        total, m, state = step({k: jnp.float32(v) for k, v in losses.items()}, state)
        seen.append(m)
        if t < 2:
            want = {k: 1.0 for k in tasks}
        else:
            r = np.array([history[t - 1][k] / history[t - 2][k] for k in tasks])
            e = np.exp(r / 2.0)
            want = dict(zip(tasks, 3 * e / e.sum()))
        for k in tasks:
            np.testing.assert_allclose(m[f"weights/{k}"], want[k], rtol=1e-6)
        np.testing.assert_allclose(total, sum(want[k] * losses[k] for k in tasks), rtol=1e-6)
    assert int(state.count) == 4
    # At t = 2 det's loss had risen (5 → 5.5): largest weight; text fell most (3 → 2.4): smallest.
    w2 = {k: float(seen[2][f"weights/{k}"]) for k in tasks}
    assert w2["det"] > w2["depth"] > w2["text"]


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="forms"):
        weighting.kendall(LOSSES, {"text": 0.0, "depth": 0.0, "det": 0.0},
                          forms={"text": "classification"}, s_min=-1.0, s_max=1.0)
    with pytest.raises(ValueError, match="must be one of"):
        weighting.kendall({"depth": 1.0}, {"depth": 0.0}, forms={"depth": "gaussian"},
                          s_min=-1.0, s_max=1.0)
    with pytest.raises(ValueError, match="s_min"):
        weighting.kendall({"depth": 1.0}, {"depth": 0.0}, forms=FORMS, s_min=1.0, s_max=-1.0)
    with pytest.raises(ValueError, match="DWA state"):
        weighting.dwa({"seg": 1.0}, weighting.dwa_init(["depth"]))
