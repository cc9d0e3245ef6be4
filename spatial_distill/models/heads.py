"""The student's 3D detection head: DETR-style queries cross-attending to VGGT patch tokens.

Each of `num_queries` learned queries runs through `num_layers` pre-norm decoder layers
(self-attention among queries, cross-attention to the patch tokens of every view, MLP) and is
read out as class logits (the last class is "no object") and a 3D box
`(cx, cy, cz, dx, dy, dz, yaw)`. Box sizes are positive by construction (softplus) and yaw comes
from an `atan2` of two outputs so it is continuous in the parameters. The frame of the boxes is
whatever the targets use (the training stage puts them in the first camera's gravity-aligned
frame, the only frame the images determine).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_distill.kernels.attention import attention
from spatial_distill.models.state_dict import StateDict
from spatial_distill.models.vit_layers import export_layernorm
from spatial_distill.sharding import constrain


@dataclasses.dataclass(frozen=True)
class DetHeadConfig:
    num_queries: int = 32  # upper bound on objects per scene
    num_classes: int = 3  # real classes; index num_classes is "no object"
    dim: int = 256
    num_layers: int = 3
    num_heads: int = 8
    mlp_ratio: float = 4.0
    attention: str = "xla"  # kernels.attention implementation

    def __post_init__(self):
        for f in ("num_queries", "num_classes", "dim", "num_layers", "num_heads"):
            if getattr(self, f) < 1:
                raise ValueError(f"DetHeadConfig.{f} = {getattr(self, f)} must be >= 1")
        if self.dim % self.num_heads:
            raise ValueError(f"DetHeadConfig.dim = {self.dim} is not a multiple of num_heads = {self.num_heads}")


def _dense(din, dout, names, rngs, use_bias=True):
    return nnx.Linear(din, dout, use_bias=use_bias, rngs=rngs,
                      kernel_init=nnx.with_partitioning(nnx.initializers.xavier_uniform(), names),
                      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)))


def _norm(dim, rngs):
    return nnx.LayerNorm(dim, rngs=rngs,
                         scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)))


def _export_linear(m: nnx.Linear, key: str) -> dict[str, np.ndarray]:
    return {f"{key}.weight": np.asarray(m.kernel.get_value()).T, f"{key}.bias": np.asarray(m.bias.get_value())}


class _MultiHeadAttention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, *, attention_impl: str = "xla", rngs: nnx.Rngs):
        self.num_heads, self.attention_impl = num_heads, attention_impl
        self.q = _dense(dim, dim, ("embed", "heads"), rngs)
        self.k = _dense(dim, dim, ("embed", "heads"), rngs)
        self.v = _dense(dim, dim, ("embed", "heads"), rngs)
        self.o = _dense(dim, dim, ("heads", "embed"), rngs)

    def __call__(self, x, context, context_mask=None):
        """x [B, Nq, D], context [B, N, D], context_mask [B, N] bool -> [B, Nq, D]."""
        b, n, d = x.shape
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.num_heads, d // self.num_heads)
        # The key-padding mask as segment ids (queries 1, padded keys 0), which the kernels take.
        seg = None if context_mask is None else context_mask.astype(jnp.int32)
        out = attention(split(self.q(x)), split(self.k(context)), split(self.v(context)),
                        q_segment_ids=None if seg is None else jnp.ones((b, n), jnp.int32),
                        kv_segment_ids=seg, implementation=self.attention_impl)
        return self.o(out.reshape(b, n, d))

    def load_torch(self, sd: StateDict, prefix: str) -> None:
        for name in ("q", "k", "v", "o"):
            sd.linear(getattr(self, name), f"{prefix}.{name}")

    def export_torch(self, prefix: str) -> dict[str, np.ndarray]:
        out = {}
        for name in ("q", "k", "v", "o"):
            out.update(_export_linear(getattr(self, name), f"{prefix}.{name}"))
        return out


class _DecoderLayer(nnx.Module):
    def __init__(self, cfg: DetHeadConfig, *, rngs: nnx.Rngs):
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.norm_self, self.norm_cross, self.norm_mlp = (_norm(cfg.dim, rngs) for _ in range(3))
        self.self_attn = _MultiHeadAttention(cfg.dim, cfg.num_heads, attention_impl=cfg.attention, rngs=rngs)
        self.cross_attn = _MultiHeadAttention(cfg.dim, cfg.num_heads, attention_impl=cfg.attention, rngs=rngs)
        self.fc1 = _dense(cfg.dim, hidden, ("embed", "mlp"), rngs)
        self.fc2 = _dense(hidden, cfg.dim, ("mlp", "embed"), rngs)

    def __call__(self, q, memory, memory_mask):
        h = self.norm_self(q)
        q = q + self.self_attn(h, h)
        q = q + self.cross_attn(self.norm_cross(q), memory, memory_mask)
        return q + self.fc2(jax.nn.gelu(self.fc1(self.norm_mlp(q)), approximate=False))

    def load_torch(self, sd: StateDict, prefix: str) -> None:
        for name in ("norm_self", "norm_cross", "norm_mlp"):
            sd.layernorm(getattr(self, name), f"{prefix}.{name}")
        self.self_attn.load_torch(sd, f"{prefix}.self_attn")
        self.cross_attn.load_torch(sd, f"{prefix}.cross_attn")
        for name in ("fc1", "fc2"):
            sd.linear(getattr(self, name), f"{prefix}.{name}")

    def export_torch(self, prefix: str) -> dict[str, np.ndarray]:
        out = {}
        for name in ("norm_self", "norm_cross", "norm_mlp"):
            out.update(export_layernorm(getattr(self, name), f"{prefix}.{name}"))
        out.update(self.self_attn.export_torch(f"{prefix}.self_attn"))
        out.update(self.cross_attn.export_torch(f"{prefix}.cross_attn"))
        for name in ("fc1", "fc2"):
            out.update(_export_linear(getattr(self, name), f"{prefix}.{name}"))
        return out


class DetectionHead(nnx.Module):
    """Class logits and 3D boxes from patch tokens."""

    def __init__(self, cfg: DetHeadConfig, token_dim: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.input_proj = _dense(token_dim, cfg.dim, ("embed", "mlp"), rngs)
        self.input_norm = _norm(cfg.dim, rngs)
        self.queries = nnx.Param(
            nnx.with_partitioning(nnx.initializers.normal(1.0), (None, "embed"))(
                rngs.params(), (cfg.num_queries, cfg.dim)))
        self.layers = nnx.List([_DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.out_norm = _norm(cfg.dim, rngs)
        self.class_out = _dense(cfg.dim, cfg.num_classes + 1, ("embed", None), rngs)
        self.box_hidden = _dense(cfg.dim, cfg.dim, ("embed", "mlp"), rngs)
        # 3 centre + 3 log-size + (sin, cos) of yaw.
        self.box_out = _dense(cfg.dim, 8, ("mlp", None), rngs)

    def __call__(self, tokens: jax.Array, token_mask: jax.Array | None = None, *,
                 return_hidden: bool = False):
        """tokens [B, N, token_dim] (all views' patch tokens), token_mask [B, N] bool.

        Returns (logits [B, Nq, num_classes + 1], boxes [B, Nq, 7]) in float32.
        """
        tokens = constrain(tokens, ("activation_batch", "activation_length", "activation_embed"))
        memory = self.input_norm(self.input_proj(tokens.astype(jnp.float32)))
        q = jnp.broadcast_to(self.queries[...], (tokens.shape[0],) + self.queries.shape)
        for layer in self.layers:
            q = layer(q, memory, token_mask)
        q = self.out_norm(q)
        logits = self.class_out(q)
        raw = self.box_out(jax.nn.gelu(self.box_hidden(q), approximate=False))
        centre = raw[..., 0:3]
        size = jax.nn.softplus(raw[..., 3:6]) + 1e-3
        yaw = jnp.arctan2(raw[..., 6], raw[..., 7] + 1.0)  # +1: yaw starts near 0, not at the atan2 branch cut
        boxes = jnp.concatenate([centre, size, yaw[..., None]], axis=-1)
        return (logits, boxes, q) if return_hidden else (logits, boxes)

    # -- checkpoints (torch layout: `export/torch_heads.DetectionHead`'s state dict) -------------
    def load_torch(self, sd: StateDict, prefix: str) -> None:
        sd.linear(self.input_proj, f"{prefix}.input_proj")
        sd.layernorm(self.input_norm, f"{prefix}.input_norm")
        sd.assign(self.queries, f"{prefix}.queries.weight")  # a torch nn.Embedding
        for i, layer in enumerate(self.layers):
            layer.load_torch(sd, f"{prefix}.layers.{i}")
        sd.layernorm(self.out_norm, f"{prefix}.out_norm")
        for name in ("class_out", "box_hidden", "box_out"):
            sd.linear(getattr(self, name), f"{prefix}.{name}")

    def export_torch(self, prefix: str) -> dict[str, np.ndarray]:
        out = _export_linear(self.input_proj, f"{prefix}.input_proj")
        out.update(export_layernorm(self.input_norm, f"{prefix}.input_norm"))
        out[f"{prefix}.queries.weight"] = np.asarray(self.queries.get_value())
        for i, layer in enumerate(self.layers):
            out.update(layer.export_torch(f"{prefix}.layers.{i}"))
        out.update(export_layernorm(self.out_norm, f"{prefix}.out_norm"))
        for name in ("class_out", "box_hidden", "box_out"):
            out.update(_export_linear(getattr(self, name), f"{prefix}.{name}"))
        return out
