"""Pre-norm ViT layers shared by the VGGT aggregator, its DINOv2 patch embed and the camera head.

Spec: `shared/reference/vggt.md` §2-§4. Layouts are channels-last: tokens `[batch, length, dim]`,
per-head tensors `[batch, length, heads, head_dim]` (the layout of `kernels.attention`).

Precision: `dtype` is the compute dtype of the matmuls. LayerNorm statistics, QK-norm, RoPE and
the residual stream run in `promote(dtype, float32)`, which is what PyTorch autocast does for the
official model (LayerNorm and residual adds stay float32 under bf16 autocast; spec pitfall 9).

`load_torch` / `export_torch` map the official PyTorch key names (`norm1`, `attn.qkv`,
`attn.q_norm`, `attn.k_norm`, `attn.proj`, `ls1.gamma`, `norm2`, `mlp.fc1`, `mlp.fc2`,
`ls2.gamma`) to and from these modules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_distill.kernels.attention import attention
from spatial_distill.models.state_dict import StateDict

_ones = nnx.initializers.ones
_zeros = nnx.initializers.zeros


def stat_dtype(dtype) -> jnp.dtype:
    """Dtype of norms and the residual stream: at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def _fan_in_init(in_axis=0, out_axis=-1):
    return nnx.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis
    )


def layer_norm(dim, eps, dtype, param_dtype, rngs, *, affine=True) -> nnx.LayerNorm:
    """LayerNorm with logical names, computed in `stat_dtype(dtype)` with two-pass variance."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        dtype=stat_dtype(dtype),
        param_dtype=param_dtype,
        use_bias=affine,
        use_scale=affine,
        # E[x^2]-E[x]^2 loses digits against PyTorch's variance; the two-pass form matches it.
        use_fast_variance=False,
        scale_init=nnx.with_partitioning(_ones, ("norm",)),
        bias_init=nnx.with_partitioning(_zeros, ("norm",)),
        rngs=rngs,
    )


def dense(din, dout, names, *, bias=True, dtype, param_dtype, rngs) -> nnx.Linear:
    """`nnx.Linear` whose kernel `[din, dout]` carries logical `names`."""
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(_fan_in_init(), names),
        bias_init=nnx.with_partitioning(_zeros, (names[1],)),
        rngs=rngs,
    )


def _export_linear(m: nnx.Linear, prefix: str) -> dict[str, np.ndarray]:
    out = {f"{prefix}.weight": np.asarray(m.kernel.get_value()).T}
    if m.bias is not None:
        out[f"{prefix}.bias"] = np.asarray(m.bias.get_value())
    return out


def export_layernorm(m: nnx.LayerNorm, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    if m.scale is not None:
        out[f"{prefix}.weight"] = np.asarray(m.scale.get_value())
    if m.bias is not None:
        out[f"{prefix}.bias"] = np.asarray(m.bias.get_value())
    return out


def rope_inv_freq(half_dim: int, freq: float) -> np.ndarray:
    """`[half_dim // 2]` float32 frequencies `freq^(-2k/half_dim)`, rounded as upstream (float32)."""
    exps = np.arange(0, half_dim, 2, dtype=np.float32) / np.float32(half_dim)
    return (np.float32(1.0) / (np.float32(freq) ** exps)).astype(np.float32)


def rope_2d(x: jax.Array, pos: jax.Array, freq: float) -> jax.Array:
    """2D rotary embedding (spec §3). x `[B, N, heads, D]`, pos `[B, N, 2]` int (row, col).

    The first D/2 channels rotate with the row, the last D/2 with the column, each in the
    non-interleaved rotate-half form. Angles are float32 (as upstream, also in a float64 run);
    cos/sin and the rotation run in `promote(x.dtype, float32)`. Returns x's dtype.
    """
    head_dim = x.shape[-1]
    if head_dim % 4:
        raise ValueError(f"rope_2d: head_dim {head_dim} must be a multiple of 4 (two rotate-half axes)")
    if pos.shape != (*x.shape[:2], 2):
        raise ValueError(f"rope_2d: pos {pos.shape} must be [batch, length, 2] for x {x.shape}")
    half = head_dim // 2
    inv = jnp.asarray(rope_inv_freq(half, freq))
    cdt = stat_dtype(x.dtype)
    xc = x.astype(cdt)

    def rotate(xa, p):
        ang = p.astype(jnp.float32)[..., None] * inv  # [B, N, half/2]
        ang = jnp.concatenate([ang, ang], axis=-1).astype(cdt)[:, :, None, :]
        x1, x2 = jnp.split(xa, 2, axis=-1)
        return xa * jnp.cos(ang) + jnp.concatenate([-x2, x1], axis=-1) * jnp.sin(ang)

    out = jnp.concatenate([rotate(xc[..., :half], pos[..., 0]), rotate(xc[..., half:], pos[..., 1])], -1)
    return out.astype(x.dtype)


class Mlp(nnx.Module):
    """fc1 -> exact (erf) GELU -> fc2. `[..., in] -> [..., out]`."""

    def __init__(self, in_features, hidden_features, out_features=None, *, bias=True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        out_features = in_features if out_features is None else out_features
        kw = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = dense(in_features, hidden_features, ("embed", "mlp"), **kw)
        self.fc2 = dense(hidden_features, out_features, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))

    def load_torch(self, sd: StateDict, prefix: str) -> None:
        sd.linear(self.fc1, f"{prefix}.fc1")
        sd.linear(self.fc2, f"{prefix}.fc2")

    def export_torch(self, prefix: str) -> dict[str, np.ndarray]:
        return {**_export_linear(self.fc1, f"{prefix}.fc1"), **_export_linear(self.fc2, f"{prefix}.fc2")}


class Attention(nnx.Module):
    """Multi-head self-attention with optional QK-norm and 2D RoPE. `[B, N, C] -> [B, N, C]`.

    Parameters are stored per head (qkv kernel `[C, 3, heads, head_dim]`, proj kernel
    `[heads, head_dim, C]`) so tensor parallelism can shard the heads axis directly.
    """

    def __init__(self, dim, num_heads, *, qkv_bias=True, proj_bias=True, qk_norm=False,
                 norm_eps=1e-5, rope_freq: float | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention_impl: str = "xla", rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.rope_freq, self.dtype, self.attention_impl = rope_freq, dtype, attention_impl
        hd = self.head_dim
        qkv_init = _fan_in_init(in_axis=0, out_axis=(1, 2, 3))
        self.qkv_kernel = nnx.Param(nnx.with_partitioning(qkv_init, ("embed", None, "heads", "head_dim"))(
            rngs.params(), (dim, 3, num_heads, hd), param_dtype))
        self.qkv_bias = nnx.Param(nnx.with_partitioning(_zeros, (None, "heads", "head_dim"))(
            rngs.params(), (3, num_heads, hd), param_dtype)) if qkv_bias else None
        proj_init = _fan_in_init(in_axis=(0, 1), out_axis=2)
        self.proj_kernel = nnx.Param(nnx.with_partitioning(proj_init, ("heads", "head_dim", "embed"))(
            rngs.params(), (num_heads, hd, dim), param_dtype))
        self.proj_bias = nnx.Param(nnx.with_partitioning(_zeros, ("embed",))(
            rngs.params(), (dim,), param_dtype)) if proj_bias else None
        if qk_norm:
            self.q_norm = layer_norm(hd, norm_eps, dtype, param_dtype, rngs)
            self.k_norm = layer_norm(hd, norm_eps, dtype, param_dtype, rngs)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x, pos=None):
        dt = self.dtype
        qkv = jnp.einsum("bnc,cthd->bnthd", x.astype(dt), self.qkv_kernel.get_value().astype(dt))
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias.get_value().astype(dt)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_freq is not None and pos is not None:
            q, k = rope_2d(q, pos, self.rope_freq), rope_2d(k, pos, self.rope_freq)
        o = attention(q.astype(dt), k.astype(dt), v, scale=self.head_dim**-0.5,
                      implementation=self.attention_impl)
        out = jnp.einsum("bnhd,hdc->bnc", o, self.proj_kernel.get_value().astype(dt))
        if self.proj_bias is not None:
            out = out + self.proj_bias.get_value().astype(dt)
        return out

    def load_torch(self, sd: StateDict, prefix: str) -> None:
        c, h, hd = self.dim, self.num_heads, self.head_dim
        sd.assign(self.qkv_kernel, f"{prefix}.qkv.weight", lambda w: w.T.reshape(c, 3, h, hd))
        if self.qkv_bias is not None:
            sd.assign(self.qkv_bias, f"{prefix}.qkv.bias", lambda b: b.reshape(3, h, hd))
        sd.assign(self.proj_kernel, f"{prefix}.proj.weight", lambda w: w.T.reshape(h, hd, c))
        if self.proj_bias is not None:
            sd.assign(self.proj_bias, f"{prefix}.proj.bias")
        if self.q_norm is not None:
            sd.layernorm(self.q_norm, f"{prefix}.q_norm")
            sd.layernorm(self.k_norm, f"{prefix}.k_norm")

    def export_torch(self, prefix: str) -> dict[str, np.ndarray]:
        c = self.dim
        out = {f"{prefix}.qkv.weight": np.asarray(self.qkv_kernel.get_value()).reshape(c, 3 * c).T}
        if self.qkv_bias is not None:
            out[f"{prefix}.qkv.bias"] = np.asarray(self.qkv_bias.get_value()).reshape(3 * c)
        if self.q_norm is not None:
            out.update(export_layernorm(self.q_norm, f"{prefix}.q_norm"))
            out.update(export_layernorm(self.k_norm, f"{prefix}.k_norm"))
        out[f"{prefix}.proj.weight"] = np.asarray(self.proj_kernel.get_value()).reshape(c, c).T
        if self.proj_bias is not None:
            out[f"{prefix}.proj.bias"] = np.asarray(self.proj_bias.get_value())
        return out


class LayerScale(nnx.Module):
    """Per-channel residual-branch scale (`gamma` `[dim]`)."""

    def __init__(self, dim, init_values: float, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.constant(init_values)
        self.gamma = nnx.Param(nnx.with_partitioning(init, ("norm",))(rngs.params(), (dim,), param_dtype))

    def __call__(self, x):
        return x * self.gamma.get_value().astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm transformer block: x += ls1*attn(norm1(x), pos); x += ls2*mlp(norm2(x)).

    x `[B, N, C]`, pos `[B, N, 2]` int or None. Returns `[B, N, C]` in `stat_dtype(dtype)`
    (float32 for bf16 compute: the residual stream is never rounded to bf16).
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, *, qkv_bias=True, proj_bias=True,
                 ffn_bias=True, qk_norm=False, init_values: float | None = None,
                 norm_eps=1e-5, rope_freq: float | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention_impl: str = "xla", rngs: nnx.Rngs):
        self.dtype = dtype
        self.norm1 = layer_norm(dim, norm_eps, dtype, param_dtype, rngs)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                              qk_norm=qk_norm, norm_eps=norm_eps, rope_freq=rope_freq,
                              dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                              rngs=rngs)
        self.norm2 = layer_norm(dim, norm_eps, dtype, param_dtype, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
        if init_values is None:
            self.ls1 = self.ls2 = None
        else:
            self.ls1 = LayerScale(dim, init_values, param_dtype=param_dtype, rngs=rngs)
            self.ls2 = LayerScale(dim, init_values, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, pos=None):
        sdt = stat_dtype(self.dtype)
        x = x.astype(sdt)
        h = self.attn(self.norm1(x).astype(self.dtype), pos).astype(sdt)
        x = x + (self.ls1(h) if self.ls1 is not None else h)
        h = self.mlp(self.norm2(x).astype(self.dtype)).astype(sdt)
        return x + (self.ls2(h) if self.ls2 is not None else h)

    def load_torch(self, sd: StateDict, prefix: str) -> None:
        sd.layernorm(self.norm1, f"{prefix}.norm1")
        self.attn.load_torch(sd, f"{prefix}.attn")
        if self.ls1 is not None:
            sd.assign(self.ls1.gamma, f"{prefix}.ls1.gamma")
        sd.layernorm(self.norm2, f"{prefix}.norm2")
        self.mlp.load_torch(sd, f"{prefix}.mlp")
        if self.ls2 is not None:
            sd.assign(self.ls2.gamma, f"{prefix}.ls2.gamma")

    def export_torch(self, prefix: str) -> dict[str, np.ndarray]:
        out = export_layernorm(self.norm1, f"{prefix}.norm1")
        out.update(self.attn.export_torch(f"{prefix}.attn"))
        if self.ls1 is not None:
            out[f"{prefix}.ls1.gamma"] = np.asarray(self.ls1.gamma.get_value())
        out.update(export_layernorm(self.norm2, f"{prefix}.norm2"))
        out.update(self.mlp.export_torch(f"{prefix}.mlp"))
        if self.ls2 is not None:
            out[f"{prefix}.ls2.gamma"] = np.asarray(self.ls2.gamma.get_value())
        return out
