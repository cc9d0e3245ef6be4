"""Shared ViT layers: 2D RoPE against upstream at real sizes, Block against an independent numpy
reference of the spec, official key mapping, bf16 residual stream, logical axis names."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from spatial_distill.models.state_dict import CheckpointMismatchError, StateDict, load_tensors
from spatial_distill.models.vit_layers import Block, rope_2d, rope_inv_freq

FIXTURES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "vggt"


@pytest.mark.parametrize("hw", ["518x518", "392x518"])
def test_rope_matches_upstream_at_head_dim_64(hw):
    f = np.load(FIXTURES / "units" / "rope_reference.npz")
    q = f[f"rope_q_in_{hw}"].transpose(0, 2, 1, 3)  # [1, heads, N, D] -> [1, N, heads, D]
    pos = f[f"rope_positions_{hw}"][None].astype(np.int32)
    out = np.asarray(rope_2d(jnp.asarray(q), jnp.asarray(pos), 100.0)).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(out, f[f"rope_q_out_{hw}"], atol=1e-5, rtol=0)


def test_rope_tables_match_upstream():
    f = np.load(FIXTURES / "units" / "rope_reference.npz")
    # The angles are float32 products p * f, as upstream computes them: the same rounded values.
    ang = np.arange(38, dtype=np.float32)[:, None] * rope_inv_freq(32, 100.0)
    ang = np.concatenate([ang, ang], axis=-1)
    # cos/sin of a float32 angle is not pinned to the last bit: CPU math libraries (XLA's own
    # vectorised kernels differ between AVX2 and AVX-512 machines, and from torch's) reduce an
    # argument of up to 37 rad with an error of the order of the argument's own float32 spacing
    # (3.8e-6 at 37), which the angle already carries from its rounding. So each entry may differ
    # from upstream's by a couple of float32 spacings of its angle (1.6 measured on an AVX-512
    # box, 2026-12-03), plus one of the result.
    tol = 2 * np.spacing(np.abs(ang)) + np.spacing(np.float32(1))
    for fn, key in ((jnp.cos, "rope_cos_table_dim32_len38"), (jnp.sin, "rope_sin_table_dim32_len38")):
        err = np.abs(np.asarray(fn(jnp.asarray(ang)), np.float64) - f[key])
        assert (err <= tol).all(), f"{key}: error {err.max():.3g} above the float32 bound {tol.max():.3g}"
    # The bound is tight enough to catch a wrong table: the first frequency's neighbour row is off.
    assert np.abs(np.cos(ang[1:]) - f["rope_cos_table_dim32_len38"][:-1]).max() > 100 * tol.max()


def test_rope_rotates_rows_then_columns():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 2, 16)), jnp.float32)
    pos = jnp.asarray([[[0, 0], [2, 0], [0, 5]]], jnp.int32)
    out = np.asarray(rope_2d(x, pos, 100.0))
    np.testing.assert_array_equal(out[0, 0], np.asarray(x)[0, 0])  # position (0, 0): identity
    np.testing.assert_array_equal(out[0, 1, :, 8:], np.asarray(x)[0, 1, :, 8:])  # col 0: 2nd half fixed
    assert np.abs(out[0, 1, :, :8] - np.asarray(x)[0, 1, :, :8]).max() > 1e-2
    np.testing.assert_array_equal(out[0, 2, :, :8], np.asarray(x)[0, 2, :, :8])  # row 0: 1st half fixed
    # Rotations preserve the norm of each rotated pair.
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(np.asarray(x), axis=-1), rtol=1e-6)


# -- independent float64 numpy reference of spec §3 --------------------------------------------

def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _rope_np(x, pos, freq):  # x [B, N, H, D]
    d = x.shape[-1] // 2
    inv = freq ** (-np.arange(0, d, 2) / d)
    outs = []
    for axis, part in enumerate((x[..., :d], x[..., d:])):
        ang = pos[..., axis][..., None] * inv
        ang = np.concatenate([ang, ang], -1)[:, :, None, :]
        rot = np.concatenate([-part[..., d // 2:], part[..., :d // 2]], -1)
        outs.append(part * np.cos(ang) + rot * np.sin(ang))
    return np.concatenate(outs, -1)


def _block_np(sd, p, x, pos, heads, eps=1e-5):
    b, n, c = x.shape
    hd = c // heads
    h = _ln(x, sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], eps)
    qkv = (h @ sd[f"{p}.attn.qkv.weight"].T + sd[f"{p}.attn.qkv.bias"]).reshape(b, n, 3, heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = _rope_np(_ln(q, sd[f"{p}.attn.q_norm.weight"], sd[f"{p}.attn.q_norm.bias"], eps), pos, 100.0)
    k = _rope_np(_ln(k, sd[f"{p}.attn.k_norm.weight"], sd[f"{p}.attn.k_norm.bias"], eps), pos, 100.0)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, c)
    x = x + sd[f"{p}.ls1.gamma"] * (o @ sd[f"{p}.attn.proj.weight"].T + sd[f"{p}.attn.proj.bias"])
    h = _ln(x, sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], eps)
    h = h @ sd[f"{p}.mlp.fc1.weight"].T + sd[f"{p}.mlp.fc1.bias"]
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    h = h @ sd[f"{p}.mlp.fc2.weight"].T + sd[f"{p}.mlp.fc2.bias"]
    return x + sd[f"{p}.ls2.gamma"] * h


PREFIX = "aggregator.frame_blocks.1"


@pytest.fixture(scope="module")
def block_sd():
    tensors, _ = load_tensors(FIXTURES / "tiny" / "state_dict.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(PREFIX + ".")}


def _tiny_block(dtype=jnp.float32, **kw):
    args = dict(qk_norm=True, init_values=0.01, rope_freq=100.0)
    args.update(kw)
    return Block(64, 4, 4.0, dtype=dtype, rngs=nnx.Rngs(0), **args)


def _loaded_block(block_sd, dtype=jnp.float32):
    blk = _tiny_block(dtype)
    sd = StateDict(block_sd)
    blk.load_torch(sd, PREFIX)
    sd.finish()
    return blk


@nnx.jit
def _apply(block, x, pos):
    return block(x, pos)


def _inputs():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 9, 64))
    pos = np.concatenate([np.zeros((1, 2)), np.stack(np.meshgrid(np.arange(2), np.arange(4), indexing="ij"), -1).reshape(8, 2) + 1])
    return x, np.broadcast_to(pos, (2, 9, 2)).astype(np.int32)


def test_block_matches_numpy_reference(block_sd):
    blk = _loaded_block(block_sd)
    x, pos = _inputs()
    want = _block_np({k: v.astype(np.float64) for k, v in block_sd.items()}, PREFIX, x, pos, heads=4)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(_apply(blk, jnp.asarray(x, jnp.float32), jnp.asarray(pos)))
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_block_export_round_trip_is_exact_and_ordered(block_sd):
    out = _loaded_block(block_sd).export_torch(PREFIX)
    manifest = json.loads((FIXTURES / "vggt_1b_manifest.json").read_text())["state_dict"]
    official = [k[len("aggregator.frame_blocks.0."):] for k in manifest
                if k.startswith("aggregator.frame_blocks.0.")]
    assert [k[len(PREFIX) + 1:] for k in out] == official  # upstream module order
    assert out.keys() == block_sd.keys()
    for k, v in block_sd.items():
        assert out[k].dtype == v.dtype and np.array_equal(out[k], v), k


def test_block_load_reports_every_bad_key(block_sd):
    bad = dict(block_sd)
    del bad[f"{PREFIX}.ls2.gamma"]
    bad[f"{PREFIX}.attn.q_norm.weight"] = np.zeros(17, np.float32)
    bad[f"{PREFIX}.attn.extra"] = np.zeros(3, np.float32)
    sd = StateDict(bad, "bad.safetensors")
    _tiny_block().load_torch(sd, PREFIX)
    with pytest.raises(CheckpointMismatchError) as e:
        sd.finish()
    for key in ("ls2.gamma", "attn.q_norm.weight", "attn.extra"):
        assert f"{PREFIX}.{key}" in str(e.value)


def test_block_without_layerscale_or_qk_norm_has_no_such_keys():
    keys = set(Block(32, 2, init_values=None, rngs=nnx.Rngs(0)).export_torch("b"))
    assert not any("ls1" in k or "ls2" in k or "q_norm" in k for k in keys)
    assert len(keys) == 12  # norm1 (2), qkv (2), proj (2), norm2 (2), fc1 (2), fc2 (2)


def test_bf16_block_keeps_float32_residual_and_stays_close(block_sd):
    x, pos = _inputs()
    xs, ps = jnp.asarray(x, jnp.float32), jnp.asarray(pos)
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(_apply(_loaded_block(block_sd), xs, ps))
    got = _apply(_loaded_block(block_sd, jnp.bfloat16), xs, ps)
    assert got.dtype == jnp.float32
    # bf16 keeps 8 mantissa bits (~4e-3 relative per rounding); measured max |err| / max |ref|
    # = 2.4e-3 for this block.
    err = np.abs(np.asarray(got) - ref).max() / np.abs(ref).max()
    assert err < 1e-2, err


def test_every_parameter_has_logical_names():
    blk = _tiny_block()
    for path, var in nnx.to_flat_state(nnx.state(blk, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == var.get_value().ndim, (path, names)
