"""VGGT (Wang et al. 2025) in Flax NNX: aggregator, top-level model, official loader/exporter.

Spec: `shared/reference/vggt.md` (prose port of facebookresearch/vggt @ 44b3afbd); fixtures in
`shared/fixtures/vggt/`. The track head is not ported.

Layouts. `VGGT.__call__` takes the upstream layout `[batch, frames, 3, H, W]` (or
`[frames, 3, H, W]`), RGB in [0, 1], and returns upstream names and shapes. Everything inside is
channels-last: `Aggregator.__call__` takes `[batch, frames, H, W, 3]` and returns per-layer tokens
`[batch, frames, P, 2*embed_dim]` with P = 1 camera + R register + h*w patch tokens (row-major).

Precision. `VGGTConfig.dtype` is the aggregator's compute dtype; norms, RoPE and the residual
stream stay in at least float32 (as under PyTorch autocast), so the aggregator always returns
float32 (or float64) tokens. The heads run in `promote(param_dtype, float32)`: float32 unless the
parameters are float64 (x64 checks).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_distill.models.camera_head import CameraHead, CameraHeadConfig
from spatial_distill.models.dpt import DPTConfig, DPTHead
from spatial_distill.models.state_dict import StateDict, load_tensors
from spatial_distill.models.vit_layers import Block, export_layernorm, layer_norm, stat_dtype
from spatial_distill.sharding import constrain

# ImageNet statistics; upstream holds them as float32 buffers that are absent from checkpoints.
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)
# Concrete inputs may exceed [0, 1] by this much (resampling overshoot) before we refuse them.
RANGE_TOLERANCE = 1e-3
_ACT = ("activation_batch", "activation_length", "activation_embed")


def _from_dict(cls, d: Mapping, where: str, ignore: Sequence[str] = ()):
    """Builds dataclass `cls` from `d`; unknown keys are an error that names them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names - set(ignore))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known fields are {sorted(names)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
    return cls(**kw)


@dataclasses.dataclass(frozen=True)
class PatchEmbedConfig:
    """The DINOv2 ViT that embeds patches (config.json `aggregator_patch_embed_vit`)."""

    cls: str = "DinoVisionTransformer"  # descriptive: the upstream class
    img_size: int = 518  # pos-embed grid = img_size // patch_size per side (+1 cls row)
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ffn_bias: bool = True
    proj_bias: bool = True
    drop_path_rate: float = 0.0  # must be 0: the port is deterministic
    ffn_layer: str = "mlp"  # only the GELU MLP is ported
    act_layer: str = "GELU(exact)"  # descriptive
    norm: str = "LayerNorm(eps=1e-6)"  # descriptive; eps 1e-6 is used
    num_register_tokens: int = 4
    interpolate_antialias: bool = True  # must be True (VGGT's DINO)
    interpolate_offset: float = 0.0  # must be 0.0 (explicit output size)
    block_chunks: int = 0  # upstream FSDP grouping; no effect on the math
    init_values: float | None = 1.0  # LayerScale init; None = no LayerScale
    qk_norm: bool = False
    attn: str = "plain SDPA"  # descriptive

    def __post_init__(self):
        bad = []
        if self.in_chans != 3:
            bad.append(f"in_chans={self.in_chans} (RGB only: 3)")
        if self.drop_path_rate != 0.0:
            bad.append(f"drop_path_rate={self.drop_path_rate} (stochastic depth is not ported: 0.0)")
        if self.ffn_layer != "mlp":
            bad.append(f"ffn_layer={self.ffn_layer!r} (only 'mlp' is ported)")
        if not self.interpolate_antialias or self.interpolate_offset != 0.0:
            bad.append("interpolate_antialias/offset (VGGT uses True / 0.0)")
        if bad:
            raise ValueError("aggregator_patch_embed_vit: unsupported " + "; ".join(bad))


@dataclasses.dataclass(frozen=True)
class AggregatorConfig:
    """Alternating-attention aggregator (config.json `aggregator`)."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24  # frame/global block pairs
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    patch_embed: str = "dinov2_vitl14_reg"  # descriptive; the ViT is `PatchEmbedConfig`
    aa_order: tuple[str, ...] = ("frame", "global")
    aa_block_size: int = 1
    qk_norm: bool = True
    rope_freq: float | None = 100.0  # None = no RoPE
    init_values: float | None = 0.01
    block_fn: str = "Block"  # descriptive

    def __post_init__(self):
        if tuple(self.aa_order) != ("frame", "global") or self.aa_block_size != 1:
            raise ValueError(f"aggregator: aa_order={self.aa_order}, aa_block_size="
                             f"{self.aa_block_size} unsupported; VGGT uses ['frame', 'global'], 1")

    @property
    def patch_start_idx(self) -> int:
        return 1 + self.num_register_tokens


# config.json fields that describe how the fixture was made, not the architecture.
_JSON_METADATA = ("upstream_repo", "upstream_commit", "torch_version", "numpy_version", "device",
                  "note", "reinit", "cases", "num_params", "num_keys", "split_params",
                  "float32_vs_float64_error", "forward_defaults")


@dataclasses.dataclass(frozen=True)
class VGGTConfig:
    """Architecture (the fixture config.json schema) plus how this port runs it.

    Defaults are VGGT-1B (`vggt_1b()`). The track head is not ported; `from_json` skips it.
    """

    aggregator: AggregatorConfig = AggregatorConfig()
    aggregator_patch_embed_vit: PatchEmbedConfig = PatchEmbedConfig()
    camera_head: CameraHeadConfig = CameraHeadConfig()
    depth_head: DPTConfig = DPTConfig(output_dim=2, activation="exp", conf_activation="expp1")
    point_head: DPTConfig = DPTConfig(output_dim=4, activation="inv_log", conf_activation="expp1")
    enable_camera: bool = True
    enable_depth: bool = True
    enable_point: bool = True
    keep_layers: tuple[int, ...] | None = None  # aggregator layers to return; None = all
    remat: bool = False  # rematerialise every block in the backward pass
    dtype: str = "float32"  # aggregator compute dtype (heads are float32)
    param_dtype: str = "float32"
    attention: str = "xla"  # kernels.attention implementation of every block

    def __post_init__(self):
        for f in ("dtype", "param_dtype"):
            object.__setattr__(self, f, jnp.dtype(getattr(self, f)).name)
        a, v = self.aggregator, self.aggregator_patch_embed_vit
        pairs = [("embed_dim", a.embed_dim, v.embed_dim), ("patch_size", a.patch_size, v.patch_size),
                 ("img_size", a.img_size, v.img_size)]
        bad = [f"{n}: aggregator {x} vs aggregator_patch_embed_vit {y}" for n, x, y in pairs if x != y]
        if bad:
            raise ValueError("VGGTConfig: the patch embed must match the aggregator: " + "; ".join(bad))
        if self.keep_layers is not None:
            keep = tuple(int(i) for i in self.keep_layers)
            out = [i for i in keep if not 0 <= i < a.depth]
            if out:
                raise ValueError(f"keep_layers {out} outside the aggregator's 0..{a.depth - 1}")
            object.__setattr__(self, "keep_layers", keep)
            needed = self.layers_needed_by_heads()
            if not needed <= set(keep):
                raise ValueError(f"keep_layers {keep} lacks layers {sorted(needed - set(keep))} "
                                 "that the enabled heads read; add them or disable those heads")

    def layers_needed_by_heads(self) -> set[int]:
        need = set()
        if self.enable_camera:
            need.add(self.aggregator.depth - 1)
        for on, head in ((self.enable_depth, self.depth_head), (self.enable_point, self.point_head)):
            if on:
                need.update(head.intermediate_layer_idx)
        return need

    @classmethod
    def vggt_1b(cls, **overrides) -> VGGTConfig:
        """The official `VGGT()` defaults (1.19B without the track head)."""
        return cls(**overrides)

    @classmethod
    def from_json(cls, d: Mapping | str | os.PathLike, **overrides) -> VGGTConfig:
        """Reads the fixture `config.json` schema (a dict or a path).

        Fixture metadata fields (`_JSON_METADATA`) and `track_head` (not ported) are ignored;
        `patch_start_idx` is checked; any other unknown field is an error naming it. The
        fixture's top-level `dtype` (the reference run's dtype) becomes the compute dtype; this
        port's own fields (`enable_*`, `keep_layers`, `remat`, `param_dtype`) may appear too.
        `overrides` replace fields after reading.
        """
        if not isinstance(d, Mapping):
            with open(d) as fh:
                d = json.load(fh)
        own = {f.name for f in dataclasses.fields(cls)}
        known = own | set(_JSON_METADATA) | {"track_head", "patch_start_idx"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"VGGT config: unknown field(s) {unknown}; known: {sorted(known)}")
        kw = {}
        for name, sub in (("aggregator", AggregatorConfig),
                          ("aggregator_patch_embed_vit", PatchEmbedConfig)):
            if name in d:
                kw[name] = _from_dict(sub, d[name], f"VGGT config field {name!r}")
        if "camera_head" in d:
            kw["camera_head"] = CameraHeadConfig.from_json(d["camera_head"])
        for name in ("depth_head", "point_head"):
            if name in d:
                kw[name] = DPTConfig.from_json(d[name])
        for name in own - set(kw) - {"aggregator", "aggregator_patch_embed_vit", "camera_head",
                                      "depth_head", "point_head"}:
            if name in d:
                kw[name] = tuple(d[name]) if isinstance(d[name], list) else d[name]
        kw.update(overrides)
        cfg = cls(**kw)
        if "patch_start_idx" in d and d["patch_start_idx"] != cfg.aggregator.patch_start_idx:
            raise ValueError(f"VGGT config: patch_start_idx {d['patch_start_idx']} disagrees with "
                             f"1 + num_register_tokens = {cfg.aggregator.patch_start_idx}")
        return cfg


def _param(rngs, init, shape, names, dtype):
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


def _np(v: nnx.Variable) -> np.ndarray:
    return np.asarray(v.get_value())


class DinoPatchEmbed(nnx.Module):
    """DINOv2 ViT with registers. `[N, H, W, 3]` normalized images -> `[N, h*w, C]` normed patch tokens."""

    def __init__(self, cfg: PatchEmbedConfig, *, dtype, param_dtype, attention_impl: str = "xla",
                 rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        c, p, g = cfg.embed_dim, cfg.patch_size, cfg.img_size // cfg.patch_size
        self.grid = g
        tok = nnx.initializers.normal(0.02)
        self.cls_token = _param(rngs, tok, (1, 1, c), (None, None, "embed"), param_dtype)
        self.pos_embed = _param(rngs, tok, (1, 1 + g * g, c), (None, None, "embed"), param_dtype)
        self.register_tokens = _param(rngs, tok, (1, cfg.num_register_tokens, c),
                                      (None, None, "embed"), param_dtype)
        # Used only by DINOv2's masked pre-training; kept so the checkpoint round-trips.
        self.mask_token = _param(rngs, nnx.initializers.zeros, (1, c), (None, "embed"), param_dtype)
        conv_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                      in_axis=(0, 1, 2), out_axis=3)
        self.proj_kernel = _param(rngs, conv_init, (p, p, 3, c), (None, None, "conv_in", "embed"),
                                  param_dtype)
        self.proj_bias = _param(rngs, nnx.initializers.zeros, (c,), ("embed",), param_dtype)
        self.blocks = nnx.List([
            Block(c, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias,
                  ffn_bias=cfg.ffn_bias, qk_norm=cfg.qk_norm, init_values=cfg.init_values or None,
                  norm_eps=1e-6, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                  rngs=rngs)
            for _ in range(cfg.depth)])
        self.norm = layer_norm(c, 1e-6, dtype, param_dtype, rngs)

    def pos_embed_for(self, h: int, w: int) -> jax.Array:
        """`[1, 1+h*w, C]` table for an h x w patch grid (spec §2: antialiased bicubic in float32)."""
        table = self.pos_embed.get_value()
        if h == w == self.grid:
            return table
        c = table.shape[-1]
        t32 = table.astype(jnp.float32)
        grid = t32[:, 1:].reshape(1, self.grid, self.grid, c)
        grid = jax.image.resize(grid, (1, h, w, c), method="cubic", antialias=True)
        return jnp.concatenate([t32[:, :1], grid.reshape(1, h * w, c)], axis=1).astype(table.dtype)

    def __call__(self, x, block_fn):
        n, hh, ww, _ = x.shape
        p, c = self.cfg.patch_size, self.cfg.embed_dim
        h, w = hh // p, ww // p
        sdt = stat_dtype(self.dtype)
        patches = x.astype(self.dtype).reshape(n, h, p, w, p, 3)
        t = jnp.einsum("nhiwjc,ijco->nhwo", patches, self.proj_kernel.get_value().astype(self.dtype))
        t = (t + self.proj_bias.get_value().astype(self.dtype)).reshape(n, h * w, c).astype(sdt)
        cls = jnp.broadcast_to(self.cls_token.get_value().astype(sdt), (n, 1, c))
        t = jnp.concatenate([cls, t], axis=1) + self.pos_embed_for(h, w).astype(sdt)
        reg = jnp.broadcast_to(self.register_tokens.get_value().astype(sdt),
                               (n, self.cfg.num_register_tokens, c))
        t = jnp.concatenate([t[:, :1], reg, t[:, 1:]], axis=1)
        for blk in self.blocks:
            t = constrain(block_fn(blk, t, None), _ACT)
        return self.norm(t)[:, 1 + self.cfg.num_register_tokens:]

    def load_torch(self, sd: StateDict, prefix: str) -> None:
        for name in ("cls_token", "pos_embed", "register_tokens", "mask_token"):
            sd.assign(getattr(self, name), f"{prefix}.{name}")
        sd.assign(self.proj_kernel, f"{prefix}.patch_embed.proj.weight", lambda w: w.transpose(2, 3, 1, 0))
        sd.assign(self.proj_bias, f"{prefix}.patch_embed.proj.bias")
        for i, blk in enumerate(self.blocks):
            blk.load_torch(sd, f"{prefix}.blocks.{i}")
        sd.layernorm(self.norm, f"{prefix}.norm")

    def export_torch(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}.{n}": _np(getattr(self, n))
               for n in ("cls_token", "pos_embed", "register_tokens", "mask_token")}
        out[f"{prefix}.patch_embed.proj.weight"] = _np(self.proj_kernel).transpose(3, 2, 0, 1)
        out[f"{prefix}.patch_embed.proj.bias"] = _np(self.proj_bias)
        for i, blk in enumerate(self.blocks):
            out.update(blk.export_torch(f"{prefix}.blocks.{i}"))
        out.update(export_layernorm(self.norm, f"{prefix}.norm"))
        return out


def rope_positions(h: int, w: int, num_special: int) -> np.ndarray:
    """`[num_special + h*w, 2]` int32 (row, col): 0 for special tokens, patch (r, c) -> (r+1, c+1)."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    patch = np.stack([rows.ravel(), cols.ravel()], axis=-1) + 1
    return np.concatenate([np.zeros((num_special, 2), np.int64), patch]).astype(np.int32)


def _call_block(block, x, pos):
    return block(x, pos)


class Aggregator(nnx.Module):
    """Patch embed + alternating frame/global attention.

    `__call__(images [B, S, H, W, 3] in [0, 1], keep_layers=None)` returns
    `(layers, patch_start_idx)`: `layers[i]` is `[B, S, P, 2C]` (frame block i output ‖ global
    block i output) for kept layers and None for the others, so heads index it by layer id.
    """

    def __init__(self, cfg: AggregatorConfig, vit: PatchEmbedConfig, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat=False, attention_impl: str = "xla", rngs: nnx.Rngs):
        self.cfg, self.dtype, self.remat = cfg, dtype, remat
        c, r = cfg.embed_dim, cfg.num_register_tokens
        self.patch_embed = DinoPatchEmbed(vit, dtype=dtype, param_dtype=param_dtype,
                                          attention_impl=attention_impl, rngs=rngs)
        tok = nnx.initializers.normal(1e-6)
        # Slot 0 serves frame 0 of every sequence (it defines the world frame), slot 1 the rest.
        self.camera_token = _param(rngs, tok, (1, 2, 1, c), (None, None, None, "embed"), param_dtype)
        self.register_token = _param(rngs, tok, (1, 2, r, c), (None, None, None, "embed"), param_dtype)

        def block():
            return Block(c, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                         proj_bias=cfg.proj_bias, ffn_bias=cfg.ffn_bias, qk_norm=cfg.qk_norm,
                         init_values=cfg.init_values, norm_eps=1e-5, rope_freq=cfg.rope_freq,
                         dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                         rngs=rngs)

        self.frame_blocks = nnx.List([block() for _ in range(cfg.depth)])
        self.global_blocks = nnx.List([block() for _ in range(cfg.depth)])

    def _special(self, token: nnx.Param, b: int, s: int, dt) -> jax.Array:
        t = token.get_value().astype(dt)  # [1, 2, n, C]
        t = jnp.concatenate([t[:, :1], jnp.broadcast_to(t[:, 1:], (1, s - 1, *t.shape[2:]))], axis=1)
        return jnp.broadcast_to(t, (b, *t.shape[1:]))

    def embed(self, images) -> jax.Array:
        """images `[B, S, H, W, 3]` in [0, 1] -> tokens entering frame block 0, `[B, S, P, C]`."""
        b, s, hh, ww, ch = images.shape
        p, c = self.cfg.patch_size, self.cfg.embed_dim
        if ch != 3 or hh % p or ww % p:
            raise ValueError(f"Aggregator images {images.shape}: expected [B, S, H, W, 3] "
                             f"(channels-last) with H and W multiples of {p}")
        sdt = stat_dtype(self.dtype)
        x = images.astype(sdt).reshape(b * s, hh, ww, 3)
        x = (x - _MEAN.astype(sdt)) / _STD.astype(sdt)
        patches = self.patch_embed(x, self._block_fn()).reshape(b, s, (hh // p) * (ww // p), c)
        return jnp.concatenate([self._special(self.camera_token, b, s, sdt),
                                self._special(self.register_token, b, s, sdt), patches], axis=2)

    def positions(self, b: int, s: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """RoPE positions for frame attention `[B*S, P, 2]` and global attention `[B, S*P, 2]`."""
        pos = rope_positions(h, w, self.cfg.patch_start_idx)
        n = pos.shape[0]
        return (np.broadcast_to(pos, (b * s, n, 2)),
                np.broadcast_to(np.tile(pos, (s, 1)), (b, s * n, 2)))

    def _block_fn(self):
        return nnx.remat(_call_block) if self.remat else _call_block

    def __call__(self, images, keep_layers: Sequence[int] | None = None):
        cfg = self.cfg
        b, s, hh, ww, _ = images.shape
        c, depth = cfg.embed_dim, cfg.depth
        if keep_layers is not None and any(not -depth <= i < depth for i in keep_layers):
            raise ValueError(f"keep_layers {tuple(keep_layers)} outside the aggregator's {depth} layers")
        keep = set(range(depth)) if keep_layers is None else {i % depth for i in keep_layers}
        block_fn = self._block_fn()
        tokens = self.embed(images)
        n = tokens.shape[2]
        pos_frame, pos_global = map(jnp.asarray, self.positions(b, s, hh // cfg.patch_size,
                                                                 ww // cfg.patch_size))
        layers: list[jax.Array | None] = []
        x = tokens.reshape(b * s, n, c)
        for i in range(depth):
            x = constrain(block_fn(self.frame_blocks[i], x, pos_frame), _ACT)
            frame_out = x.reshape(b, s, n, c)
            x = constrain(block_fn(self.global_blocks[i], x.reshape(b, s * n, c), pos_global), _ACT)
            global_out = x.reshape(b, s, n, c)
            x = x.reshape(b * s, n, c)
            layers.append(jnp.concatenate([frame_out, global_out], axis=-1) if i in keep else None)
        return layers, cfg.patch_start_idx

    def load_torch(self, sd: StateDict, prefix: str) -> None:
        sd.assign(self.camera_token, f"{prefix}.camera_token")
        sd.assign(self.register_token, f"{prefix}.register_token")
        self.patch_embed.load_torch(sd, f"{prefix}.patch_embed")
        for kind in ("frame_blocks", "global_blocks"):
            for i, blk in enumerate(getattr(self, kind)):
                blk.load_torch(sd, f"{prefix}.{kind}.{i}")

    def export_torch(self, prefix: str) -> dict[str, np.ndarray]:
        out = {f"{prefix}.camera_token": _np(self.camera_token),
               f"{prefix}.register_token": _np(self.register_token)}
        out.update(self.patch_embed.export_torch(f"{prefix}.patch_embed"))
        for kind in ("frame_blocks", "global_blocks"):
            for i, blk in enumerate(getattr(self, kind)):
                out.update(blk.export_torch(f"{prefix}.{kind}.{i}"))
        return out


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_images(images, patch_size: int = 14) -> None:
    """Validates an upstream-layout image batch `[B, S, 3, H, W]` / `[S, 3, H, W]`.

    Shape errors always; the [0, 1] range only for concrete arrays (under `jax.jit` the values are
    unknown at trace time, so the check is skipped there), with `RANGE_TOLERANCE` slack.
    """
    shape = tuple(images.shape)
    if len(shape) not in (4, 5):
        raise ValueError(f"VGGT images: expected [B, S, 3, H, W] or [S, 3, H, W], got shape {shape}")
    ch, hh, ww = shape[-3:]
    if ch != 3:
        raise ValueError(f"VGGT images: channel axis (-3) has {ch} entries, need 3 (RGB, "
                         f"channels-first [.., 3, H, W]); got shape {shape}")
    if hh % patch_size or ww % patch_size:
        raise ValueError(f"VGGT images: H={hh}, W={ww} must be multiples of the patch size "
                         f"{patch_size}; resize or crop (e.g. width 518, height round(h*518/w/14)*14)")
    if not _is_tracer(images):
        lo, hi = float(jnp.min(images)), float(jnp.max(images))
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise ValueError(f"VGGT images: values span [{lo:.4g}, {hi:.4g}], expected RGB in [0, 1] "
                             "(the model normalizes internally); divide uint8 images by 255 and "
                             "do not apply ImageNet normalization yourself")


class VGGT(nnx.Module):
    """Aggregator + optional camera, depth and point heads (track head not ported)."""

    def __init__(self, cfg: VGGTConfig = VGGTConfig(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.aggregator = Aggregator(cfg.aggregator, cfg.aggregator_patch_embed_vit,
                                     dtype=jnp.dtype(cfg.dtype), param_dtype=pdt, remat=cfg.remat,
                                     attention_impl=cfg.attention, rngs=rngs)
        self.camera_head = (CameraHead(cfg.camera_head, param_dtype=pdt, attention_impl=cfg.attention,
                                       rngs=rngs) if cfg.enable_camera else None)
        self.point_head = DPTHead(cfg.point_head, param_dtype=pdt, rngs=rngs) if cfg.enable_point else None
        self.depth_head = DPTHead(cfg.depth_head, param_dtype=pdt, rngs=rngs) if cfg.enable_depth else None

    def __call__(self, images, *, camera_iterations: int = 4, frames_chunk_size: int = 8) -> dict:
        """images `[B, S, 3, H, W]` or `[S, 3, H, W]`, float RGB in [0, 1] (see `check_images`).

        Returns upstream names: `aggregated_tokens` (list over layers of `[B, S, P, 2C]`, None
        where not kept), `patch_start_idx`, and for enabled heads `pose_enc` `[B, S, 9]`,
        `pose_enc_list`, `depth` `[B, S, H, W, 1]`, `depth_conf` `[B, S, H, W]`, `world_points`
        `[B, S, H, W, 3]`, `world_points_conf` `[B, S, H, W]`. The input is not echoed back.
        """
        check_images(images, self.cfg.aggregator.patch_size)
        if images.ndim == 4:
            images = images[None]
        hh, ww = images.shape[-2:]
        layers, psi = self.aggregator(jnp.moveaxis(images, 2, -1), keep_layers=self.cfg.keep_layers)
        out = {"aggregated_tokens": layers, "patch_start_idx": psi}
        head_dt = stat_dtype(jnp.dtype(self.cfg.param_dtype))
        tokens = [None if t is None else t.astype(head_dt) for t in layers]
        if self.camera_head is not None:
            poses = self.camera_head(tokens, num_iterations=camera_iterations)
            out["pose_enc"], out["pose_enc_list"] = poses[-1], poses
        if self.depth_head is not None:
            out["depth"], out["depth_conf"] = self.depth_head(
                tokens, (hh, ww), psi, frames_chunk_size=frames_chunk_size)
        if self.point_head is not None:
            out["world_points"], out["world_points_conf"] = self.point_head(
                tokens, (hh, ww), psi, frames_chunk_size=frames_chunk_size)
        return out

    def heads(self) -> dict[str, nnx.Module]:
        """Enabled heads in state-dict order (camera, point, depth)."""
        named = (("camera_head", self.camera_head), ("point_head", self.point_head),
                 ("depth_head", self.depth_head))
        return {n: m for n, m in named if m is not None}

    def load_torch(self, sd: StateDict) -> None:
        self.aggregator.load_torch(sd, "aggregator")
        for name, head in self.heads().items():
            head.load_torch(sd, name)

    def export_torch(self) -> dict[str, np.ndarray]:
        out = self.aggregator.export_torch("aggregator")
        for name, head in self.heads().items():
            out.update(head.export_torch(name))
        return out


def _as_config(config) -> VGGTConfig:
    if config is None:
        return VGGTConfig.vggt_1b()
    if isinstance(config, VGGTConfig):
        return config
    if isinstance(config, (Mapping, str, os.PathLike)):
        return VGGTConfig.from_json(config)
    raise TypeError(f"config must be a VGGTConfig, a config.json dict or path, or None; got {type(config).__name__}")


def abstract_model(config: VGGTConfig) -> VGGT:
    """A VGGT whose parameters are shapes only (`nnx.eval_shape`): nothing is allocated."""

    def build():
        # A plain RngCount is mutated in place on every draw; under tracing each such update makes
        # Flax probe the tracer's `.sharding`, whose error message scans the whole trace, so a
        # 1B build costs minutes (quadratic). A ref-backed count is updated without that probe.
        with nnx.var_defaults(ref=True):
            rngs = nnx.Rngs(0)
        return VGGT(config, rngs=rngs)

    return nnx.eval_shape(build)


def load_official(path_or_state_dict, config=None, dtype=None) -> VGGT:
    """Builds a VGGT from an official checkpoint (safetensors / torch file / state dict).

    `config`: a `VGGTConfig`, a fixture-style config.json dict or path, or None (VGGT-1B).
    `dtype`: parameter dtype; None keeps `config.param_dtype` (float32 unless set). The aggregator's
    compute dtype is `config.dtype`.
    `track_head.*` keys (not ported) and the keys of disabled heads are ignored on purpose; any
    other missing, unexpected or mis-shaped key is reported, all together, in one
    `CheckpointMismatchError`. Parameters are created abstractly and filled from the checkpoint,
    so no random weights are drawn.
    """
    cfg = _as_config(config)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, param_dtype=jnp.dtype(dtype).name)
    tensors, source = load_tensors(path_or_state_dict)
    sd = StateDict(tensors, source)
    model = abstract_model(cfg)
    model.load_torch(sd)
    skipped = [p for p, on in (("camera_head.", cfg.enable_camera), ("depth_head.", cfg.enable_depth),
                               ("point_head.", cfg.enable_point), ("track_head.", False)) if not on]
    sd.finish(ignore_unused=[k for k in tensors if k.startswith(tuple(skipped))], what="VGGT model")
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))


def export_official(model: VGGT) -> dict[str, np.ndarray]:
    """Official state-dict keys -> numpy arrays in PyTorch layouts (manifest order; no
    `_resnet_*` buffers, no track head, disabled heads absent)."""
    return model.export_torch()


def official_shapes(model: VGGT) -> dict[str, tuple[int, ...]]:
    """Key -> shape of `export_official` for a (possibly abstract) model, without materialising.

    Every parameter is replaced by a zero-stride numpy view of one element, so the exporters'
    transposes and reshapes run on views whose shapes are exact and whose memory is a scalar.
    """
    graphdef, state = nnx.split(model)

    def placeholder(x):
        return np.broadcast_to(np.zeros((), np.dtype(x.dtype)), x.shape)

    shadow = nnx.merge(graphdef, jax.tree.map(placeholder, state))
    return {k: tuple(v.shape) for k, v in shadow.export_torch().items()}


def count_params(model: nnx.Module) -> int:
    """Number of parameter scalars (works on abstract models)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
