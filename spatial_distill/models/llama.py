"""Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU) in Flax NNX, loadable from HF checkpoints.

One decoder serves the student LM and the teacher's Llama-2-7B (DESIGN.md §4). Its API is split
so that callers with non-text prefixes (vision and latent tokens) can enter between the steps:

    x = model.embed(tokens)                                   # [B, L] -> [B, L, D]
    h, cache = model.hidden(x, positions=pos, segment_ids=seg)  # [B, L, D] after final norm
    logits = model.logits(h)                                  # [B, L, V] float32
    kernel = model.lm_head_kernel()                           # [D, V], for chunked-vocab losses

Attention is causal by *position* (key j visible to query i iff pos_j <= pos_i) and restricted to
equal segment ids; segment id 0 marks padding and empty cache slots. Layers are either a Python
loop over `Block`s or one `nnx.scan` over stacked parameters (leading logical axis `layers`);
both compute the same function, and `to_hf_state_dict` / `from_hf` move weights between them.

HF conventions followed: q/k/v/o and MLP weights are torch `[out, in]`; RoPE uses the
"rotate_half" layout (dimension i pairs with i + head_dim/2); RMSNorm normalises in float32,
casts back, then scales.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_distill.kernels import attention as attention_lib
from spatial_distill.models.state_dict import (
    CheckpointMismatchError,
    StateDict,
    load_tensors,
    read_config,
)
from spatial_distill.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_BLD = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1 frequency-dependent RoPE rescaling (HF `rope_type="llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Decoder hyper-parameters. Field names follow HF where they exist (`num_layers` is HF's
    `num_hidden_layers`, `num_heads` its `num_attention_heads`)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: plain multi-head attention (= num_heads)
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    scan_layers: bool = True  # one nnx.scan over stacked layer params (fast compile) vs a loop
    remat_policy: str = "none"  # a key of REMAT_POLICIES
    dtype: Any = jnp.float32  # compute dtype of activations
    param_dtype: Any = jnp.float32  # storage dtype of parameters
    attention_impl: str = "xla"  # see spatial_distill.kernels.attention.IMPLEMENTATIONS

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if self.num_kv_heads is None:
            set_("num_kv_heads", self.num_heads)
        if self.head_dim is None and self.num_heads > 0:
            set_("head_dim", self.hidden_size // self.num_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LlamaConfig.num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}; grouped-query attention needs it")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even for RoPE")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(f"LlamaConfig: rope_theta={self.rope_theta} and rms_norm_eps="
                             f"{self.rms_norm_eps} must be positive")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"LlamaConfig.remat_policy={self.remat_policy!r} is unknown; choose "
                             f"one of {sorted(REMAT_POLICIES)}")
        try:
            attention_lib.parse(self.attention_impl)
        except ValueError as e:
            raise ValueError(f"LlamaConfig.attention_impl={self.attention_impl!r}: {e}") from None
        for name in ("dtype", "param_dtype"):
            dt = jnp.dtype(getattr(self, name))
            if not jnp.issubdtype(dt, jnp.floating):
                raise ValueError(f"LlamaConfig.{name}={dt} must be a floating dtype")
            set_(name, dt)

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> LlamaConfig:
        """From a `transformers.LlamaConfig`, its dict, or a config.json path (v4 or v5 layout;
        LLaVA's `llava_llama` too). `overrides` set the fields HF does not have (scan_layers,
        remat_policy, dtype, ...). Features this decoder does not compute are refused by name."""
        d, where = read_config(hf_config, "hf config")

        def refuse(field, value, fix):
            raise ValueError(f"{where}: {field}={value!r} is not supported by this Llama port; {fix}")

        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{where}: missing {missing}; is this a Llama config.json?")
        model_type = d.get("model_type", "llama")
        if model_type not in ("llama", "llava_llama"):
            refuse("model_type", model_type, "only Llama-architecture checkpoints can be loaded")
        if d.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", d["hidden_act"], "the MLP is SwiGLU with silu")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag, False):
                refuse(flag, d[flag], "projections here have no bias")
        if d.get("attention_dropout", 0.0):
            refuse("attention_dropout", d["attention_dropout"], "set it to 0.0 (no attention dropout)")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings")
            missing = [k for k in keys if k not in rope]
            if missing:
                refuse("rope_scaling", rope, f"llama3 scaling needs {missing}")
            scaling = Llama3RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                                        float(rope["high_freq_factor"]),
                                        int(rope["original_max_position_embeddings"]))
        elif rope_type != "default":
            refuse("rope type", rope_type, "only 'default' and 'llama3' RoPE are implemented")
        heads = d["num_attention_heads"]
        fields = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim"), rope_theta=float(theta),
            rope_scaling=scaling, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )
        fields.update(overrides)
        return cls(**fields)


class KVCache(NamedTuple):
    """Decoding state. k/v: `[layers, batch, max_len, kv_heads, head_dim]` when layers are
    scanned, else a tuple of per-layer `[batch, max_len, kv_heads, head_dim]`. segment_ids and
    positions `[batch, max_len]` int32 describe each slot (segment 0 = empty or padding);
    lengths `[batch]` int32 counts the real (segment != 0) tokens written per row."""

    k: Any
    v: Any
    segment_ids: jax.Array
    positions: jax.Array
    lengths: jax.Array


class _AttnContext(NamedTuple):
    cos: jax.Array  # [batch, len, head_dim], compute dtype
    sin: jax.Array
    q_positions: jax.Array  # [batch, len]
    q_segment_ids: jax.Array | None
    kv_positions: jax.Array  # [batch, kv_len]
    kv_segment_ids: jax.Array | None
    cache_index: jax.Array | None  # int32 scalar: first cache slot written by this call


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """`[head_dim // 2]` float32 inverse frequencies theta^(-2i/head_dim), llama3-rescaled."""
    d = config.head_dim
    inv = 1.0 / config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    s = config.rope_scaling
    if s is not None:
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        wavelen = 2 * math.pi / inv
        low_wl = s.original_max_position_embeddings / s.low_freq_factor
        high_wl = s.original_max_position_embeddings / s.high_freq_factor
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * inv / s.factor + smooth * inv
        inv = np.where(wavelen > low_wl, inv / s.factor, np.where(wavelen < high_wl, inv, blended))
    return inv.astype(np.float32)


def rope_tables(positions: jax.Array, config: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[batch, len, head_dim]` in the compute dtype (angles in float32, as HF)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(config))
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(config.dtype), jnp.sin(angles).astype(config.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `[batch, len, heads, head_dim]` rotated in the rotate_half layout."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * scale.astype(x.dtype)


def _param(rngs, names, shape, dtype, init=nnx.initializers.normal(0.02)):
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


class Block(nnx.Module):
    """Pre-norm decoder layer: x + Attn(RMSNorm(x)), then h + SwiGLU(RMSNorm(h))."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        D, H, K, hd, F = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                          c.intermediate_size)
        ones, pd = nnx.initializers.ones, c.param_dtype
        self.attn_norm = _param(rngs, ("norm",), (D,), pd, ones)
        self.q = _param(rngs, ("embed", "heads", "head_dim"), (D, H, hd), pd)
        self.k = _param(rngs, ("embed", "kv_heads", "head_dim"), (D, K, hd), pd)
        self.v = _param(rngs, ("embed", "kv_heads", "head_dim"), (D, K, hd), pd)
        self.o = _param(rngs, ("heads", "head_dim", "embed"), (H, hd, D), pd)
        self.mlp_norm = _param(rngs, ("norm",), (D,), pd, ones)
        self.gate = _param(rngs, ("embed", "mlp"), (D, F), pd)
        self.up = _param(rngs, ("embed", "mlp"), (D, F), pd)
        self.down = _param(rngs, ("mlp", "embed"), (F, D), pd)

    def __call__(self, x: jax.Array, ctx: _AttnContext, kv):
        """x `[B, L, D]`; kv None or this layer's cache (k, v). Returns (x, new kv)."""
        c, dt = self.config, x.dtype
        h = rms_norm(x, self.attn_norm[...], c.rms_norm_eps)
        q = jnp.einsum("bld,dhk->blhk", h, self.q[...].astype(dt))
        k = jnp.einsum("bld,dhk->blhk", h, self.k[...].astype(dt))
        v = jnp.einsum("bld,dhk->blhk", h, self.v[...].astype(dt))
        q = constrain(apply_rope(q, ctx.cos, ctx.sin),
                      ("activation_batch", "activation_length", "activation_heads", None))
        k = apply_rope(k, ctx.cos, ctx.sin)
        if kv is not None:
            start = (0, ctx.cache_index, 0, 0)
            kv = (jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start),
                  jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start))
            k, v = kv[0].astype(dt), kv[1].astype(dt)
        kv_names = ("activation_batch", "activation_length", "activation_kv_heads", None)
        k, v = constrain(k, kv_names), constrain(v, kv_names)
        a = attention_lib.attention(
            q, k, v, causal=True, q_segment_ids=ctx.q_segment_ids,
            kv_segment_ids=ctx.kv_segment_ids, q_positions=ctx.q_positions,
            kv_positions=ctx.kv_positions, implementation=c.attention_impl)
        x = constrain(x + jnp.einsum("blhk,hkd->bld", a, self.o[...].astype(dt)), _BLD)
        h = rms_norm(x, self.mlp_norm[...], c.rms_norm_eps)
        gate = jnp.einsum("bld,df->blf", h, self.gate[...].astype(dt))
        up = jnp.einsum("bld,df->blf", h, self.up[...].astype(dt))
        m = constrain(jax.nn.silu(gate) * up,
                      ("activation_batch", "activation_length", "activation_mlp"))
        x = x + jnp.einsum("blf,fd->bld", m, self.down[...].astype(dt))
        return constrain(x, _BLD), kv


def _block_with(c: LlamaConfig, values: dict) -> Block:
    """A Block holding `values` (its pure-dict state), without drawing its own initialisation."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Block(c, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)


class Llama(nnx.Module):
    """Token embedding, `num_layers` Blocks, final RMSNorm, LM head (tied or not)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        pd = c.param_dtype
        self.embedding = _param(rngs, ("vocab", "embed"), (c.vocab_size, c.hidden_size), pd)

        @nnx.split_rngs(splits=c.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make(r):
            return Block(c, rngs=r)

        if c.scan_layers:
            self.layers = make(rngs)
        else:  # the scanned layout's draws, one Block per layer: a seed gives the same decoder either way
            stacked = nnx.state(make(rngs)).to_pure_dict()
            self.layers = nnx.List([_block_with(c, jax.tree.map(lambda x, i=i: x[i], stacked))
                                    for i in range(c.num_layers)])
        self.final_norm = _param(rngs, ("norm",), (c.hidden_size,), pd, nnx.initializers.ones)
        self.lm_head = (None if c.tie_word_embeddings else
                        _param(rngs, ("embed", "vocab"), (c.hidden_size, c.vocab_size), pd))

    # -- public API ------------------------------------------------------------------------
    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens `[B, L]` int -> `[B, L, D]` in the compute dtype."""
        if not isinstance(tokens, jax.core.Tracer):
            t = np.asarray(tokens)
            if t.size and (t.min() < 0 or t.max() >= self.config.vocab_size):
                raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); got min "
                                 f"{t.min()} max {t.max()} (vocab_size={self.config.vocab_size})")
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(self.config.dtype)
        return constrain(x, _BLD)

    def hidden(self, embeds: jax.Array, *, positions: jax.Array,
               segment_ids: jax.Array | None = None, cache: KVCache | None = None,
               cache_index: jax.Array | int | None = None) -> tuple[jax.Array, KVCache | None]:
        """Causal decoder stack. embeds `[B, L, D]`, positions `[B, L]` int (RoPE angle and
        causal order per row), segment_ids `[B, L]` int or None (0 = padding). With a cache,
        this call's keys/values are written at slots `[cache_index, cache_index + L)` and the
        queries attend to every cached slot. Returns (`[B, L, D]` after the final norm, cache)."""
        c = self.config
        B, L, D = embeds.shape
        if D != c.hidden_size:
            raise ValueError(f"embeds width {D} != hidden_size {c.hidden_size}")
        if positions.shape != (B, L):
            raise ValueError(f"positions shape {positions.shape} != embeds' [batch, len] {(B, L)}")
        span = L if cache is None else cache.segment_ids.shape[1]
        if span > c.max_position_embeddings:
            raise ValueError(f"sequence length {span} exceeds max_position_embeddings "
                             f"{c.max_position_embeddings}; shorten the input or the cache")
        if not isinstance(positions, jax.core.Tracer) and L:
            top = int(np.max(np.asarray(positions)))
            if top >= c.max_position_embeddings:
                raise ValueError(f"position {top} >= max_position_embeddings "
                                 f"{c.max_position_embeddings}")
        positions = positions.astype(jnp.int32)
        cos, sin = rope_tables(positions, c)
        if cache is None:
            ctx = _AttnContext(cos, sin, positions, segment_ids, positions, segment_ids, None)
            kv = None
        else:
            if cache_index is None:
                raise ValueError("hidden(): a cache needs cache_index (first slot to write)")
            if not isinstance(cache_index, jax.core.Tracer) and int(cache_index) + L > span:
                raise ValueError(f"cache of {span} slots cannot take {L} tokens at index "
                                 f"{int(cache_index)}; allocate a longer cache")
            index = jnp.asarray(cache_index, jnp.int32)
            seg = (jnp.ones((B, L), jnp.int32) if segment_ids is None
                   else segment_ids.astype(jnp.int32))
            kv_seg = jax.lax.dynamic_update_slice(cache.segment_ids, seg, (0, index))
            kv_pos = jax.lax.dynamic_update_slice(cache.positions, positions, (0, index))
            ctx = _AttnContext(cos, sin, positions, seg, kv_pos, kv_seg, index)
            kv = (cache.k, cache.v)
        x, kv = self._layers(embeds.astype(c.dtype), ctx, kv)
        x = rms_norm(x, self.final_norm[...], c.rms_norm_eps)
        if cache is not None:
            cache = KVCache(kv[0], kv[1], ctx.kv_segment_ids, ctx.kv_positions,
                            cache.lengths + (ctx.q_segment_ids != 0).sum(1).astype(jnp.int32))
        return constrain(x, _BLD), cache

    def lm_head_kernel(self) -> jax.Array:
        """`[D, V]` output projection (the transposed embedding when tied)."""
        return self.embedding[...].T if self.config.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden `[B, L, D]` -> logits `[B, L, V]` float32 (accumulated in float32)."""
        kernel = self.lm_head_kernel().astype(hidden.dtype)
        out = jnp.einsum("bld,dv->blv", hidden, kernel, preferred_element_type=jnp.float32)
        return constrain(out, ("activation_batch", "activation_length", "activation_vocab"))

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens `[B, L]` -> logits `[B, L, V]` float32; positions default to 0..L-1."""
        B, L = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        h, _ = self.hidden(self.embed(tokens), positions=positions, segment_ids=segment_ids)
        return self.logits(h)

    # -- layers ----------------------------------------------------------------------------
    def _layers(self, x, ctx: _AttnContext, kv):
        c = self.config
        policy = REMAT_POLICIES[c.remat_policy]

        def layer(block, x, ctx, kv):
            return block(x, ctx, kv)

        if c.remat_policy != "none":
            # Inside scan the loop boundary already stops CSE from undoing the remat.
            layer = nnx.remat(layer, policy=policy, prevent_cse=not c.scan_layers)
        if c.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0, None, 0), out_axes=(nnx.Carry, 0),
                      transform_metadata={nnx.PARTITION_NAME: "layers"})
            def body(x, block, ctx, kv):
                return layer(block, x, ctx, kv)

            return body(x, self.layers, ctx, kv)
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            x, kv_i = layer(block, x, ctx, None if kv is None else (kv[0][i], kv[1][i]))
            if kv_i is not None:
                new_k.append(kv_i[0])
                new_v.append(kv_i[1])
        return x, (None if kv is None else (tuple(new_k), tuple(new_v)))


# -- HF checkpoints ------------------------------------------------------------------------
# Block attribute -> (HF key suffix under model.layers.{i}., number of leading *input* axes of
# our kernel; 0 = a norm vector copied as is). A torch Linear `[out, in]` becomes
# `w.T.reshape(our_shape)`; the inverse flattens the input axes and transposes back.
_LAYER_KEYS = {
    "attn_norm": ("input_layernorm.weight", 0),
    "q": ("self_attn.q_proj.weight", 1),
    "k": ("self_attn.k_proj.weight", 1),
    "v": ("self_attn.v_proj.weight", 1),
    "o": ("self_attn.o_proj.weight", 2),
    "mlp_norm": ("post_attention_layernorm.weight", 0),
    "gate": ("mlp.gate_proj.weight", 1),
    "up": ("mlp.up_proj.weight", 1),
    "down": ("mlp.down_proj.weight", 1),
}


def hf_key_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF `LlamaForCausalLM` key this decoder reads, with its torch shape. Lets a caller
    holding a larger checkpoint (LLaVA's vision tower, projector) pick the decoder's share."""
    c = config
    D, H, K, hd, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    layer = {"input_layernorm.weight": (D,), "self_attn.q_proj.weight": (H * hd, D),
             "self_attn.k_proj.weight": (K * hd, D), "self_attn.v_proj.weight": (K * hd, D),
             "self_attn.o_proj.weight": (D, H * hd), "post_attention_layernorm.weight": (D,),
             "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D),
             "mlp.down_proj.weight": (D, F)}
    out = {"model.embed_tokens.weight": (c.vocab_size, D)}
    for i in range(c.num_layers):
        out.update({f"model.layers.{i}.{k}": shape for k, shape in layer.items()})
    out["model.norm.weight"] = (D,)
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (c.vocab_size, D)
    return out


def _to_ours(w: np.ndarray, n_in: int, shape) -> np.ndarray:
    return w if n_in == 0 else w.T.reshape(shape)


def _to_hf(x: np.ndarray, n_in: int) -> np.ndarray:
    return x if n_in == 0 else x.reshape(math.prod(x.shape[:n_in]), -1).T


def read_hf_weights(src) -> tuple[dict[str, np.ndarray], str]:
    """Tensors of a HF checkpoint: a directory's *.safetensors (else pytorch_model*.bin, read
    with weights_only=True), a single file, or a state dict."""
    if isinstance(src, Mapping) or not os.path.isdir(os.fspath(src)):
        return load_tensors(src)
    path = os.fspath(src)
    if any(f.endswith(".safetensors") for f in os.listdir(path)):
        return load_tensors(path)
    bins = sorted(f for f in os.listdir(path) if f.startswith("pytorch_model") and f.endswith(".bin"))
    if not bins:
        raise FileNotFoundError(f"{path} holds neither *.safetensors nor pytorch_model*.bin weights")
    tensors: dict[str, np.ndarray] = {}
    for f in bins:
        part, _ = load_tensors(os.path.join(path, f))
        tensors.update(part)
    return tensors, path


def from_hf(state_dict_or_dir, hf_config=None, dtype=jnp.float32, *, param_dtype=None,
            **config_overrides) -> Llama:
    """A `Llama` holding the weights of a HF `LlamaForCausalLM`.

    Args:
      state_dict_or_dir: a state dict (torch tensors or numpy) or a local directory with
        config.json and *.safetensors (or pytorch_model*.bin, read with weights_only=True).
      hf_config: transformers config / dict / config.json path; required for a state dict.
      dtype: compute dtype; parameters are stored in `param_dtype` (default: `dtype`).
      config_overrides: other LlamaConfig fields (scan_layers, remat_policy, attention_impl).
    Raises CheckpointMismatchError naming every missing, unexpected and mis-shaped key.
    """
    if hf_config is None:
        if isinstance(state_dict_or_dir, Mapping):
            raise ValueError("from_hf: a bare state dict needs hf_config (its config.json)")
        hf_config = os.path.join(os.fspath(state_dict_or_dir), "config.json")
    config = LlamaConfig.from_hf(hf_config, dtype=dtype,
                                 param_dtype=dtype if param_dtype is None else param_dtype,
                                 **config_overrides)
    tensors, source = read_hf_weights(state_dict_or_dir)
    sd = StateDict(tensors, source)
    # Built abstractly: shapes only, so a 7B load never materialises a random init first.
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    load_weights(model, sd)
    ignore = [k for k in tensors if k.endswith("rotary_emb.inv_freq")]
    if config.tie_word_embeddings:
        ignore.append("lm_head.weight")  # torch state dicts repeat the shared tensor
    sd.finish(ignore_unused=ignore, what=f"Llama {_describe(config)}")
    return model


def load_weights(model: Llama, sd: StateDict) -> None:
    """Fills `model` (abstract or not) from the HF keys of `sd` (which records every key read,
    missing or mis-shaped; the caller's `sd.finish()` reports them). Callers holding a larger
    checkpoint (LLaVA's towers) load the decoder's share this way and report once."""
    config = model.config
    np_dtype = np.dtype(config.param_dtype)

    def fill(variable: nnx.Variable, value: np.ndarray | None):
        if value is not None:
            variable.set_value(jnp.asarray(value, dtype=config.param_dtype))

    fill(model.embedding, sd.get("model.embed_tokens.weight",
                                 (config.vocab_size, config.hidden_size)))
    fill(model.final_norm, sd.get("model.norm.weight", (config.hidden_size,)))
    if not config.tie_word_embeddings:
        w = sd.get("lm_head.weight", (config.vocab_size, config.hidden_size))
        fill(model.lm_head, None if w is None else w.T)
    L = config.num_layers
    for name, (suffix, n_in) in _LAYER_KEYS.items():
        if config.scan_layers:
            var = getattr(model.layers, name)
            shape = var.get_value().shape[1:]
            stacked, complete = np.empty((L, *shape), np_dtype), True
            for i in range(L):
                w = _get_layer(sd, f"model.layers.{i}.{suffix}", n_in, shape)
                if w is None:
                    complete = False
                else:
                    stacked[i] = w
            fill(var, stacked if complete else None)
        else:
            for i in range(L):
                var = getattr(model.layers[i], name)
                fill(var, _get_layer(sd, f"model.layers.{i}.{suffix}", n_in,
                                     var.get_value().shape))


def _get_layer(sd: StateDict, key: str, n_in: int, shape) -> np.ndarray | None:
    hf_shape = shape if n_in == 0 else (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    w = sd.get(key, hf_shape)
    return None if w is None else _to_ours(w, n_in, shape)


def _describe(c: LlamaConfig) -> str:
    return (f"(vocab {c.vocab_size}, hidden {c.hidden_size}, {c.num_layers} layers, "
            f"{c.num_heads}/{c.num_kv_heads} heads x {c.head_dim}, mlp {c.intermediate_size})")


def to_hf_state_dict(model: Llama, dtype=None) -> dict[str, np.ndarray]:
    """The inverse of `from_hf`: HF `LlamaForCausalLM` key names and torch layouts, as numpy
    (in the parameter dtype unless `dtype` is given). Tied models also get `lm_head.weight`
    (a copy of the embedding), as torch's `state_dict()` lists it."""
    c = model.config
    cast = (lambda a: np.asarray(a)) if dtype is None else (lambda a: np.asarray(a).astype(dtype))
    out = {"model.embed_tokens.weight": cast(model.embedding[...])}
    if c.scan_layers:  # one device->host copy per stacked parameter, not one per layer
        stacked = {name: np.asarray(getattr(model.layers, name)[...]) for name in _LAYER_KEYS}
    for i in range(c.num_layers):
        for name, (suffix, n_in) in _LAYER_KEYS.items():
            if c.scan_layers:
                value = stacked[name][i]
            else:
                value = np.asarray(getattr(model.layers[i], name)[...])
            out[f"model.layers.{i}.{suffix}"] = cast(_to_hf(value, n_in))
    out["model.norm.weight"] = cast(model.final_norm[...])
    out["lm_head.weight"] = cast(np.asarray(model.lm_head_kernel()).T)
    return out


__all__ = ["Block", "CheckpointMismatchError", "KVCache", "Llama", "Llama3RopeScaling",
           "LlamaConfig", "REMAT_POLICIES", "apply_rope", "from_hf", "hf_key_shapes", "load_weights",
           "read_hf_weights", "rms_norm",
           "rope_inv_freq", "rope_tables", "to_hf_state_dict"]
