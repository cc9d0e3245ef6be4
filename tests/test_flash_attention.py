"""Our Pallas flash-attention kernel (interpreted on CPU) against the XLA path: values and
gradients over odd lengths, all-masked rows, segment layouts, positions and GQA ratios."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spatial_distill.kernels import attention as attention_lib
from spatial_distill.kernels.attention import attention
from spatial_distill.kernels.flash_attention import flash_attention


def _inputs(seed, B, Lq, Lk, H, Hk, D, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(B, Lq, H, D)), dtype)
    k = jnp.asarray(r.normal(size=(B, Lk, Hk, D)), dtype)
    v = jnp.asarray(r.normal(size=(B, Lk, Hk, D)), dtype)
    return r, q, k, v


def _layout(r, name, B, Lq, Lk):
    """Segment ids and positions of one test layout (None: the defaults)."""
    if name == "plain":
        return {}
    if name == "padding":  # right padding as segment 0 after real tokens of segment 1
        qn, kn = r.integers(1, Lq + 1, B), r.integers(1, Lk + 1, B)
        return {"q_segment_ids": jnp.asarray(np.arange(Lq)[None] < qn[:, None], jnp.int32),
                "kv_segment_ids": jnp.asarray(np.arange(Lk)[None] < kn[:, None], jnp.int32)}
    if name == "packed":  # several questions packed per row, sorted segments
        qs = np.sort(r.integers(1, 4, (B, Lq)), axis=1)
        ks = np.sort(r.integers(1, 4, (B, Lk)), axis=1)
        return {"q_segment_ids": jnp.asarray(qs, jnp.int32), "kv_segment_ids": jnp.asarray(ks, jnp.int32)}
    if name == "scrambled":  # arbitrary ids and positions, one query row with no visible key
        qs = r.integers(0, 3, (B, Lq))
        qs[0, -1] = 9
        return {"q_segment_ids": jnp.asarray(qs, jnp.int32),
                "kv_segment_ids": jnp.asarray(r.integers(0, 3, (B, Lk)), jnp.int32),
                "q_positions": jnp.asarray(r.integers(0, 50, (B, Lq)), jnp.int32),
                "kv_positions": jnp.asarray(r.integers(0, 50, (B, Lk)), jnp.int32)}
    raise ValueError(name)


CASES = [  # B, Lq, Lk, H, Hk, D, block
    (1, 37, 53, 4, 2, 64, 16),   # odd lengths, GQA 2
    (2, 16, 16, 4, 4, 64, 8),    # MHA, exact blocks
    (1, 9, 130, 8, 1, 128, 32),  # multi-query, head_dim 128, keys over several blocks
    (2, 1, 21, 4, 2, 64, 16),    # one query (a decode step)
]


@pytest.mark.parametrize("case", CASES)
# Each layout once causal, once not, across the cases (interpreted kernels cost seconds each).
@pytest.mark.parametrize("layout,causal", [("plain", False), ("plain", True), ("padding", True),
                                           ("packed", False), ("scrambled", True)])
def test_values_and_gradients_match_xla_float32(case, layout, causal):
    B, Lq, Lk, H, Hk, D, block = case
    r, q, k, v = _inputs(hash((case, layout, causal)) % 2**31, B, Lq, Lk, H, Hk, D)
    kw = dict(causal=causal, **_layout(r, layout, B, Lq, Lk))
    want = attention(q, k, v, **kw)
    got = flash_attention(q, k, v, block_q=block, block_k=block, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    w = jnp.asarray(r.normal(size=want.shape), jnp.float32)
    grads = [jax.grad(lambda q, k, v, f=f: (f(q, k, v) * w).sum(), (0, 1, 2))(q, k, v) for f in (
        lambda q, k, v: attention(q, k, v, **kw),
        lambda q, k, v: flash_attention(q, k, v, block_q=block, block_k=block, **kw))]
    for name, a, b in zip("qkv", *grads):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_all_masked_rows_give_zeros_and_no_nan():
    _, q, k, v = _inputs(1, 1, 8, 8, 2, 2, 64)
    seg_q = jnp.full((1, 8), 3, jnp.int32)
    seg_k = jnp.zeros((1, 8), jnp.int32)
    out = flash_attention(q, k, v, q_segment_ids=seg_q, kv_segment_ids=seg_k, block_q=8, block_k=8)
    assert not np.asarray(out).any()
    g = jax.grad(lambda q: flash_attention(q, k, v, q_segment_ids=seg_q, kv_segment_ids=seg_k).sum())(q)
    assert np.isfinite(np.asarray(g)).all() and not np.asarray(g).any()


def test_bfloat16_inputs_accumulate_in_float32():
    r, q, k, v = _inputs(2, 2, 45, 60, 4, 2, 64, jnp.bfloat16)
    kw = dict(causal=True)
    want = attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), **kw)
    got = flash_attention(q, k, v, block_q=16, block_k=16, **kw)
    assert got.dtype == jnp.bfloat16
    # bf16 inputs and output: |error| within a few bf16 ulps of the float32 result.
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=2e-2, rtol=2e-2)
    g = jax.grad(lambda q: flash_attention(q, k, v, block_q=16, block_k=16, **kw).astype(jnp.float32).sum())(q)
    gw = jax.grad(lambda q: attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                      v.astype(jnp.float32), **kw).sum())(q)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(gw), atol=5e-2, rtol=5e-2)


def test_dispatch_and_named_fallback(recwarn):
    _, q, k, v = _inputs(3, 1, 10, 12, 4, 2, 64)
    np.testing.assert_allclose(np.asarray(attention(q, k, v, causal=True, implementation="pallas")),
                               np.asarray(attention(q, k, v, causal=True)), atol=1e-5)
    # head_dim 8 is not a kernel size: XLA answers, with one warning naming why.
    attention_lib._WARNED.clear()
    _, q8, k8, v8 = _inputs(4, 1, 5, 5, 2, 2, 8)
    out = attention(q8, k8, v8, implementation="pallas")
    out = attention(q8, k8, v8, implementation="pallas")
    np.testing.assert_allclose(np.asarray(out), np.asarray(attention(q8, k8, v8)), atol=1e-6)
    msgs = [str(w.message) for w in recwarn if "Pallas kernel does not cover" in str(w.message)]
    assert msgs == ["attention: the Pallas kernel does not cover head_dim 8 (the kernel has (64, 128)); "
                    "using XLA attention"]
    assert attention(q, k, v, implementation="auto").shape == q.shape  # CPU: XLA
    with pytest.raises(ValueError, match="'flash3' is not available"):
        attention(q, k, v, implementation="flash3")


@pytest.mark.parametrize("head_dim,heads,kv_heads,dtype", [(128, 4, 4, jnp.bfloat16), (64, 8, 2, jnp.float32)])
def test_lowers_through_mosaic_for_tpu(head_dim, heads, kv_heads, dtype):
    """With libtpu installed (the `[tpu]` extra; no TPU needed), the kernel's forward and backward
    compile for a v5e chip: Mosaic accepts the block shapes, layouts and loops."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    device = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[0]
    place = jax.sharding.SingleDeviceSharding(device)
    q = jax.ShapeDtypeStruct((1, 384, heads, head_dim), dtype, sharding=place)
    kv = jax.ShapeDtypeStruct((1, 384, kv_heads, head_dim), dtype, sharding=place)
    seg = jax.ShapeDtypeStruct((1, 384), jnp.int32, sharding=place)

    def f(q, k, v, s):
        return flash_attention(q, k, v, causal=True, q_segment_ids=s, kv_segment_ids=s, interpret=False)

    fwd = jax.jit(f).lower(q, kv, kv, seg).compile()
    assert fwd.memory_analysis().temp_size_in_bytes > 0
    loss = lambda q, k, v, s: f(q, k, v, s).astype(jnp.float32).sum()  # noqa: E731
    jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, kv, kv, seg).compile()
