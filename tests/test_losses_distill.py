import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spatial_distill.losses import distill

T = 2.0


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _problem(seed=0, n=24, d=8, v=50, k=6, temperature=T, teacher_scale=2.0):
    """Random student (hidden, w) and a teacher whose top-K log-probs come from its own logits."""
    r = np.random.default_rng(seed)
    hidden = r.normal(size=(n, d)).astype(np.float32)
    w = (0.6 * r.normal(size=(d, v))).astype(np.float32)
    teacher_lp = _np_log_softmax(teacher_scale * r.normal(size=(n, v)) / temperature)
    ids = np.argsort(-teacher_lp, axis=1)[:, :k].astype(np.int32)
    lp = np.take_along_axis(teacher_lp, ids, axis=1).astype(np.float32)
    targets = r.integers(0, v, size=n).astype(np.int32)
    mask = r.random(n) > 0.25
    return dict(hidden=hidden, w=w, ids=ids, lp=lp, targets=targets, mask=mask,
                teacher_lp=teacher_lp)


def _np_terms(p, temperature=T):
    """Per-token numpy (float64) KL for every tail mode and the CE."""
    z = p["hidden"].astype(np.float64) @ p["w"].astype(np.float64)
    ls_full = _np_log_softmax(z / temperature)
    ls = np.take_along_axis(ls_full, p["ids"], axis=1)
    lp = p["lp"].astype(np.float64)
    pt, ps = np.exp(lp), np.exp(ls)
    t_tail, s_tail = 1 - pt.sum(1), 1 - ps.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0·log 0 = 0 when K = V
        tail_term = np.where(t_tail > 0, t_tail * (np.log(t_tail) - np.log(s_tail)), 0.0)
    bucket = (pt * (lp - ls)).sum(1) + tail_term
    ignore = (pt * (lp - ls)).sum(1)
    ptr, psr = pt / pt.sum(1, keepdims=True), ps / ps.sum(1, keepdims=True)
    renorm = (ptr * (np.log(ptr) - np.log(psr))).sum(1)
    ls1 = _np_log_softmax(z)
    ce = -ls1[np.arange(len(z)), p["targets"]]
    smooth_uniform = -ls1.mean(1)
    return dict(bucket=bucket, ignore=ignore, renormalize=renorm, ce=ce, uniform=smooth_uniform,
                logits=z)


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


# Jitted so each test compiles once instead of dispatching the chunk loop op by op.
_kd_loss = jax.jit(distill.kd_loss, static_argnames=(
    "alpha", "temperature", "tail", "chunked", "chunk_size", "label_smoothing"))


def _loss(p, **kw):
    kw.setdefault("alpha", 0.7)
    kw.setdefault("temperature", T)
    return _kd_loss(jnp.asarray(p["hidden"]), jnp.asarray(p["w"]), jnp.asarray(p["ids"]),
                           jnp.asarray(p["lp"]), jnp.asarray(p["targets"]), jnp.asarray(p["mask"]),
                           **kw)


@pytest.mark.parametrize("tail", distill.TAILS)
@pytest.mark.parametrize("chunked", [True, False])
def test_kl_and_ce_match_numpy(tail, chunked):
    p = _problem(seed=1)
    ref = _np_terms(p)
    alpha = 0.7
    loss, m = _loss(p, alpha=alpha, tail=tail, chunked=chunked, chunk_size=16)
    mask = p["mask"].astype(np.float64)
    np.testing.assert_allclose(m["distill/kl"], _masked_mean(ref[tail], mask), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["distill/ce"], _masked_mean(ref["ce"], mask), rtol=1e-5)
    want = _masked_mean(alpha * T**2 * ref[tail] + (1 - alpha) * ref["ce"], mask)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["distill/teacher_topk_mass"],
                               _masked_mean(np.exp(p["lp"].astype(np.float64)).sum(1), mask),
                               rtol=1e-6)


def test_bucket_kl_with_all_ids_is_the_full_softmax_kl():
    p = _problem(seed=2, v=40, k=40)
    ref = _np_terms(p)
    z = ref["logits"]
    full = (np.exp(p["teacher_lp"]) * (p["teacher_lp"] - _np_log_softmax(z / T))).sum(1)
    for chunked in (True, False):
        _, m = _loss(p, tail="bucket", chunked=chunked, chunk_size=16)
        np.testing.assert_allclose(m["distill/kl"], _masked_mean(full, p["mask"]), rtol=1e-5,
                                   atol=1e-6)
    grads = jax.jit(jax.grad(lambda h: _loss(dict(p, hidden=h), tail="bucket")[0]))(
        jnp.asarray(p["hidden"]))
    assert np.isfinite(np.asarray(grads)).all()


def test_label_smoothing_matches_numpy():
    p = _problem(seed=3)
    ref = _np_terms(p)
    eps = 0.1
    for chunked in (True, False):
        loss, _ = _loss(p, alpha=0.0, label_smoothing=eps, chunked=chunked, chunk_size=7)
        want = _masked_mean((1 - eps) * ref["ce"] + eps * ref["uniform"], p["mask"])
        np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_alpha_zero_is_pure_ce_and_one_is_pure_kd():
    p = _problem(seed=4)
    loss0, m0 = _loss(p, alpha=0.0)
    np.testing.assert_allclose(loss0, m0["distill/ce"], rtol=1e-6)
    loss1, m1 = _loss(p, alpha=1.0)
    np.testing.assert_allclose(loss1, T**2 * m1["distill/kl"], rtol=1e-6)
    assert abs(float(loss1) - float(loss0)) > 1e-3


def test_masked_tokens_contribute_nothing():
    p = _problem(seed=5)
    loss, _ = _loss(p)
    q = dict(p)
    off = ~p["mask"]
    r = np.random.default_rng(9)
    q["hidden"] = np.where(off[:, None], 100 * r.normal(size=p["hidden"].shape), p["hidden"]
                           ).astype(np.float32)
    q["targets"] = np.where(off, (p["targets"] + 3) % 50, p["targets"]).astype(np.int32)
    q["lp"] = np.where(off[:, None], p["lp"] - 1.0, p["lp"]).astype(np.float32)
    loss2, _ = _loss(q)
    np.testing.assert_allclose(loss, loss2, rtol=1e-6)
    g = jax.jit(jax.grad(lambda h: _loss(dict(p, hidden=h))[0]))(jnp.asarray(p["hidden"]))
    assert np.abs(np.asarray(g)[off]).max() == 0.0
    assert np.abs(np.asarray(g)[p["mask"]]).max() > 0.0


# "ignore" differs from "bucket" only after the vocabulary statistics (checked against numpy
# above); these two exercise both cotangent patterns of the custom VJP (KL with and without lse).
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_chunked_and_full_agree_in_value_and_gradient(tail):
    # Leading shape [B, Q, La] and a vocabulary that is not a multiple of the chunk.
    p = _problem(seed=6, n=2 * 3 * 4, d=12, v=203, k=9)
    shaped = {key: (val.reshape(2, 3, 4, *val.shape[1:]) if key != "w" and key != "teacher_lp"
                    else val) for key, val in p.items()}

    def f(h, w, chunked):
        return _loss(dict(shaped, hidden=h, w=w), tail=tail, chunked=chunked, chunk_size=32,
                     label_smoothing=0.05)

    args = (jnp.asarray(shaped["hidden"]), jnp.asarray(p["w"]))
    (l_c, m_c), g_c = jax.jit(jax.value_and_grad(lambda h, w: f(h, w, True), (0, 1),
                                                 has_aux=True))(*args)
    (l_f, m_f), g_f = jax.jit(jax.value_and_grad(lambda h, w: f(h, w, False), (0, 1),
                                                 has_aux=True))(*args)
    np.testing.assert_allclose(l_c, l_f, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_c, g_f):
        assert np.abs(np.asarray(b)).max() > 1e-3
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key in m_f:
        np.testing.assert_allclose(m_c[key], m_f[key], rtol=1e-6, atol=1e-7)


def test_gradient_matches_finite_differences():
    p = _problem(seed=7, n=6, d=4, v=30, k=4)
    h0 = jnp.asarray(p["hidden"], jnp.float32)

    @jax.jit
    def f(h):
        return _loss(dict(p, hidden=h), chunk_size=8, label_smoothing=0.1)[0]

    g = np.asarray(jax.jit(jax.grad(f))(h0))
    eps = 1e-2
    for idx in [(0, 0), (2, 3), (5, 1)]:
        if not p["mask"][idx[0]]:
            continue
        e = np.zeros(h0.shape, np.float32)
        e[idx] = eps
        fd = (float(f(h0 + e)) - float(f(h0 - e))) / (2 * eps)
        np.testing.assert_allclose(g[idx], fd, rtol=2e-2, atol=1e-4)


def test_token_accuracy_uses_the_running_argmax():
    p = _problem(seed=8, v=70)
    z = p["hidden"] @ p["w"]
    targets = np.argmax(z, axis=1).astype(np.int32)
    targets[::3] = (targets[::3] + 1) % 70
    p["targets"] = targets
    want = _masked_mean((np.argmax(z, 1) == targets).astype(np.float64), p["mask"])
    assert 0.3 < want < 0.9
    for chunked in (True, False):
        _, m = _loss(p, chunked=chunked, chunk_size=16)
        np.testing.assert_allclose(m["distill/token_accuracy"], want, rtol=1e-6)


def test_student_tail_near_zero_stays_finite():
    # The student puts almost all its mass on the teacher ids while the teacher keeps a tail.
    p = _problem(seed=10, n=8, d=4, v=20, k=3)
    w = np.zeros_like(p["w"])
    w[0, p["ids"][0]] = 60.0
    h = np.zeros_like(p["hidden"])
    h[:, 0] = 1.0
    p = dict(p, w=w, hidden=h, ids=np.tile(p["ids"][:1], (8, 1)))
    (loss, m), g = jax.jit(jax.value_and_grad(lambda hh: _loss(dict(p, hidden=hh), tail="bucket"),
                                              has_aux=True))(jnp.asarray(h))
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(g)).all()
    # Teacher tail > 0.1 against a floored student tail of 1e-6: the tail term dominates.
    assert float(m["distill/kl"]) > 0.1 * np.log(0.1 / 1e-6) - 0.5


def test_chunked_path_never_forms_the_full_logits():
    n, d, v, k = 512, 64, 32000, 32
    specs = (jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
             jax.ShapeDtypeStruct((n, k), jnp.int32), jax.ShapeDtypeStruct((n, k), jnp.float16),
             jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.bool_))

    def temp_bytes(chunked):
        def step(h, w, ids, lp, t, mask):
            return jax.value_and_grad(lambda h, w: distill.kd_loss(
                h, w, ids, lp, t, mask, alpha=0.7, temperature=T, chunked=chunked,
                chunk_size=2048)[0], (0, 1))(h, w)
        return jax.jit(step).lower(*specs).compile().memory_analysis().temp_size_in_bytes

    full_logits = n * v * 4
    assert temp_bytes(True) < full_logits / 4
    assert temp_bytes(False) >= full_logits


def test_bad_inputs_name_the_field():
    p = _problem(seed=11)
    with pytest.raises(ValueError, match="w.shape"):
        distill.kd_loss(jnp.asarray(p["hidden"]), jnp.asarray(p["w"]).T, jnp.asarray(p["ids"]),
                        jnp.asarray(p["lp"]), jnp.asarray(p["targets"]), jnp.asarray(p["mask"]),
                        alpha=0.5, temperature=1.0)
    with pytest.raises(ValueError, match="topk_logprobs.shape"):
        _loss(dict(p, lp=p["lp"][:, :2]))
    with pytest.raises(ValueError, match="mask.shape"):
        _loss(dict(p, mask=p["mask"][:3]))
    with pytest.raises(ValueError, match="tail"):
        _loss(p, tail="drop")
    with pytest.raises(ValueError, match="alpha"):
        _loss(p, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        _loss(p, temperature=0.0)


def test_bfloat16_inputs_keep_fp32_statistics():
    p = _problem(seed=12, n=16, d=8, v=90, k=5)
    h16, w16 = jnp.asarray(p["hidden"], jnp.bfloat16), jnp.asarray(p["w"], jnp.bfloat16)

    def f(h, w):
        return _loss(dict(p, hidden=h, w=w), chunk_size=32)[0]

    step = jax.jit(jax.value_and_grad(f, (0, 1)))
    loss16, (gh16, gw16) = step(h16, w16)
    # The same bf16-rounded numbers in fp32: logits agree (products of bf16 are exact in fp32),
    # gradients differ by the bf16 rounding of the logit cotangent (~2^-8 relative).
    loss32, (gh32, gw32) = step(h16.astype(jnp.float32), w16.astype(jnp.float32))
    assert gh16.dtype == jnp.bfloat16 and gw16.dtype == jnp.bfloat16
    np.testing.assert_allclose(loss16, loss32, rtol=1e-5)
    for a, b in ((gh16, gh32), (gw16, gw32)):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2e-2,
                                   atol=2e-2 * float(jnp.abs(b).max()))
