"""Our Pallas flash-attention kernel (interpreted on CPU) against the XLA path: values and
gradients over odd lengths, all-masked rows, segment layouts, positions and GQA ratios."""

import os
import subprocess
import sys
import textwrap

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


@pytest.mark.parametrize("head_dim", [16, 32])
def test_small_head_dims_of_the_tiny_presets(head_dim):
    r, q, k, v = _inputs(head_dim, 2, 19, 19, 4, 2, head_dim)
    kw = dict(causal=True, **_layout(r, "padding", 2, 19, 19))
    np.testing.assert_allclose(np.asarray(attention(q, k, v, implementation="pallas:8x8", **kw)),
                               np.asarray(attention(q, k, v, **kw)), atol=1e-5)
    grads = [jax.grad(lambda q, impl=impl: attention(q, k, v, implementation=impl, **kw).sum())(q)
             for impl in ("xla", "pallas:8x8")]
    np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(grads[0]), atol=1e-5)


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
    np.testing.assert_allclose(np.asarray(attention(q, k, v, causal=True, implementation="pallas:16x16")),
                               np.asarray(attention(q, k, v, causal=True)), atol=1e-5)
    # head_dim 12 is not a kernel size: XLA answers, with one warning naming why.
    attention_lib._WARNED.clear()
    _, q8, k8, v8 = _inputs(4, 1, 5, 5, 2, 2, 12)
    out = attention(q8, k8, v8, implementation="pallas")
    out = attention(q8, k8, v8, implementation="pallas")
    np.testing.assert_allclose(np.asarray(out), np.asarray(attention(q8, k8, v8)), atol=1e-6)
    # cudnn on this CPU and splash with explicit causal positions: XLA, each named once.
    attention(q, k, v, implementation="cudnn")
    pos = jnp.arange(10)[None]
    attention(q, k, v, causal=True, q_positions=pos, kv_positions=jnp.arange(12)[None], implementation="splash")
    msgs = [str(w.message) for w in recwarn if "does not cover" in str(w.message)]
    assert msgs == ["attention: pallas does not cover head_dim 12 (the kernel takes multiples of 8 up to 256); "
                    "using XLA attention",
                    "attention: cudnn does not cover the cpu backend (cudnn needs a GPU); using XLA attention",
                    "attention: splash does not cover causal attention by explicit positions (its causal mask "
                    "is static); using XLA attention"]
    # fallback_reason names the same reasons up front, each time (the warnings come once).
    assert attention_lib.fallback_reason(q8, k8, implementation="pallas") == (
        "head_dim 12 (the kernel takes multiples of 8 up to 256)")
    assert attention_lib.fallback_reason(q, k, implementation="cudnn") == "the cpu backend (cudnn needs a GPU)"
    assert attention_lib.fallback_reason(q, k, causal=True, q_positions=pos, implementation="splash") == (
        "causal attention by explicit positions (its causal mask is static)")
    assert attention_lib.fallback_reason(q, k, mask=jnp.ones((1, 1, 10, 12), bool),
                                         implementation="pallas") == "an explicit boolean mask"
    assert attention_lib.fallback_reason(q, k, implementation="pallas") is None
    assert attention_lib.fallback_reason(q8, k8, implementation="xla") is None
    # Triton on a GPU gets smaller blocks by default (shared memory); elsewhere 128 x 128.
    assert attention_lib.default_blocks("pallas", "gpu") == (64, 64)
    assert attention_lib.default_blocks("pallas", "tpu") == attention_lib.default_blocks("pallas", "cpu") == (128, 128)
    assert attention_lib.default_blocks("splash", "gpu") == (128, 128)
    assert attention_lib.resolve("auto", "cpu") == "xla"
    assert attention_lib.resolve("auto", "tpu") == "pallas"
    assert attention_lib.resolve("auto", "gpu") == "cudnn"
    assert attention(q, k, v, implementation="auto").shape == q.shape  # CPU: XLA


@pytest.mark.parametrize("spec,want", [("xla", ("xla", (128, 128))), ("pallas:256x64", ("pallas", (256, 64))),
                                       ("splash:128x256", ("splash", (128, 256))), ("auto:128x128", ("auto", (128, 128)))])
def test_implementation_specs(spec, want):
    assert attention_lib.parse(spec) == want


@pytest.mark.parametrize("spec,match", [("flash3", "'flash3' is not available"), ("pallas:12x16", "multiples of 8"),
                                        ("splash:64x128", "multiples of 128"), ("xla:128x128", "apply to pallas"),
                                        ("pallas:128", "is not available")])
def test_bad_implementation_specs_are_named(spec, match):
    _, q, k, v = _inputs(3, 1, 4, 4, 2, 2, 64)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, implementation=spec)


# Splash (JAX's TPU kernel, interpreted here): blocks are 128 wide, so lengths get padded.
SPLASH_CASES = [  # B, Lq, Lk, H, Hk, D, layout, causal
    (1, 37, 53, 4, 2, 64, "padding", True),
    (2, 16, 16, 4, 4, 64, "plain", True),
    (1, 9, 130, 4, 1, 128, "packed", False),
    (2, 1, 21, 4, 2, 64, "plain", True),
]


@pytest.mark.parametrize("case", SPLASH_CASES)
def test_splash_matches_xla_values_and_gradients(case):
    B, Lq, Lk, H, Hk, D, layout, causal = case
    r, q, k, v = _inputs(hash(case) % 2**31, B, Lq, Lk, H, Hk, D)
    kw = dict(causal=causal, **_layout(r, layout, B, Lq, Lk))
    want = attention(q, k, v, **kw)
    got = attention(q, k, v, implementation="splash:128x128", **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    w = jnp.asarray(r.normal(size=want.shape), jnp.float32)
    grads = [jax.grad(lambda q, k, v, impl=impl: (attention(q, k, v, implementation=impl, **kw) * w).sum(),
                      (0, 1, 2))(q, k, v) for impl in ("xla", "splash:128x128")]
    for name, a, b in zip("qkv", *grads):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_splash_zeroes_rows_that_see_nothing():
    _, q, k, v = _inputs(5, 1, 8, 8, 2, 2, 64)
    seg_q = jnp.asarray([[0, 0, 0, 0, 7, 7, 0, 0]], jnp.int32)
    out = attention(q, k, v, q_segment_ids=seg_q, kv_segment_ids=jnp.zeros((1, 8), jnp.int32),
                    implementation="splash")
    want = attention(q, k, v, q_segment_ids=seg_q, kv_segment_ids=jnp.zeros((1, 8), jnp.int32))
    assert not np.asarray(out[0, 4:6]).any()
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("layout,causal,lq", [("plain", True, 12), ("plain", True, 7), ("padding", True, 12),
                                              ("scrambled", True, 12), ("packed", False, 9)])
def test_jax_nn_arguments_reproduce_the_reference(layout, causal, lq):
    """The cudnn path's argument construction (masks, right-aligned causality, zeroed rows) run
    through jax.nn's xla implementation, which takes the same arguments."""
    r, q, k, v = _inputs(6, 2, lq, 12, 4, 2, 64)
    kw = dict(causal=causal, **_layout(r, layout, 2, lq, 12))
    got = attention_lib.jax_nn_attention(q, k, v, implementation="xla", **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(attention(q, k, v, **kw)), atol=1e-5)


def test_kernels_run_per_shard_under_a_mesh():
    """Under `axis_rules` (4 CPU devices: data 2 x tensor 2) each kernel runs inside shard_map,
    so every device attends over its own batch rows and heads only, and agrees with XLA."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from spatial_distill import sharding
        from spatial_distill.kernels.attention import attention
        mesh = sharding.make_mesh((2, 1, 2))
        r = np.random.default_rng(7)
        q = jnp.asarray(r.normal(size=(4, 20, 4, 64)), jnp.float32)
        k, v = (jnp.asarray(r.normal(size=(4, 20, 2, 64)), jnp.float32) for _ in range(2))
        seg = jnp.asarray(np.arange(20)[None] < r.integers(1, 21, 4)[:, None], jnp.int32)
        kw = dict(causal=True, q_segment_ids=seg, kv_segment_ids=seg)
        want = attention(q, k, v, **kw)
        for impl in ("pallas:16x16", "splash"):
            with sharding.axis_rules(mesh):
                f = jax.jit(lambda q, k, v: attention(q, k, v, implementation=impl, **kw))
                text = f.lower(q, k, v).as_text()
                got = f(q, k, v)
            assert "manual" in text, impl  # shard_map's manual partitioning, not a gathered custom call
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, err_msg=impl)
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("head_dim,heads,kv_heads,dtype", [(128, 4, 4, jnp.bfloat16), (64, 8, 2, jnp.float32)])
@pytest.mark.parametrize("kernel", [flash_attention, attention_lib.splash_attention], ids=["pallas", "splash"])
def test_lowers_through_mosaic_for_tpu(head_dim, heads, kv_heads, dtype, kernel):
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
        return kernel(q, k, v, causal=True, q_segment_ids=s, kv_segment_ids=s, interpret=False)

    fwd = jax.jit(f).lower(q, kv, kv, seg).compile()
    assert fwd.memory_analysis().temp_size_in_bytes > 0
    loss = lambda q, k, v, s: f(q, k, v, s).astype(jnp.float32).sum()  # noqa: E731
    jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, kv, kv, seg).compile()


def test_backward_fits_vmem_at_vggt_global_attention_length():
    """VGGT-1B global attention over 8 views (10,992 tokens, 16 heads of 64, bf16): the dk/dv
    kernel keeps the whole query side in VMEM, so its per-position vectors ride as rows (8x
    padding), not columns (128x, 27 MB of the 16 MB scoped VMEM before the fix)."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    device = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[0]
    x = jax.ShapeDtypeStruct((1, 10992, 16, 64), jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(device))
    loss = lambda q, k, v: flash_attention(q, k, v, interpret=False).astype(jnp.float32).sum()  # noqa: E731
    jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x).compile()
