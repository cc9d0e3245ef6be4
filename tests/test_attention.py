import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spatial_distill.kernels.attention import attention


def _ref(q, k, v, visible):
    """Direct numpy softmax attention; visible [B, H, Lq, Lk] bool."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    h, hk = q.shape[2], k.shape[2]
    k = np.repeat(k, h // hk, axis=2)
    v = np.repeat(v, h // hk, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    s = np.where(visible, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.exp(s - m)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.fixture
def qkv():
    r = np.random.default_rng(0)
    return (r.normal(size=(2, 5, 4, 8)).astype(np.float32), r.normal(size=(2, 7, 2, 8)).astype(np.float32),
            r.normal(size=(2, 7, 2, 8)).astype(np.float32))


def test_bidirectional_gqa(qkv):
    q, k, v = qkv
    out = attention(q, k, v)
    np.testing.assert_allclose(out, _ref(q, k, v, np.ones((2, 4, 5, 7), bool)), atol=1e-5)


def test_causal_right_aligned(qkv):
    q, k, v = qkv
    vis = np.arange(7)[None, :] <= (np.arange(5)[:, None] + 2)
    out = attention(q, k, v, causal=True)
    np.testing.assert_allclose(out, _ref(q, k, v, np.broadcast_to(vis, (2, 4, 5, 7))), atol=1e-5)


def test_segments_and_padding_rows(qkv):
    q, k, v = qkv
    qs = np.array([[0, 0, 1, 1, 9], [0, 0, 0, 0, 0]])
    ks = np.array([[0, 0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1]])
    vis = qs[:, None, :, None] == ks[:, None, None, :]
    vis = np.broadcast_to(vis, (2, 4, 5, 7))
    out = np.asarray(attention(q, k, v, q_segment_ids=qs, kv_segment_ids=ks))
    np.testing.assert_allclose(out, _ref(q, k, v, vis), atol=1e-5)
    assert np.all(out[0, 4] == 0)  # a query with no visible key outputs zeros, not NaN


def test_bf16_close_and_jit_grad(qkv):
    q, k, v = qkv
    out = attention(*(jnp.asarray(a, jnp.bfloat16) for a in qkv), causal=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), attention(q, k, v, causal=True), atol=3e-2)
    g = jax.jit(jax.grad(lambda q: attention(q, k, v, causal=True).sum()))(q)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0


def test_bad_shapes_and_impl(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="not a multiple of 3 kv heads"):
        attention(q, np.zeros((2, 7, 3, 8)), np.zeros((2, 7, 3, 8)))
    with pytest.raises(ValueError, match="'pallas_tpu' is not available"):
        attention(q, k, v, implementation="pallas_tpu")
