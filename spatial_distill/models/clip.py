"""CLIP ViT vision tower (LLaVA's: OpenAI CLIP ViT-L/14-336) in Flax NNX, loadable from HF keys.

Spec: `shared/reference/llava3d.md` §3 (transformers 4.37.2 `CLIPVisionModel`). Pre-LayerNorm ViT:

    patches = Conv14x14/14(pixels, no bias)            # [N, h*w, D], row-major patches
    x = [class_embedding; patches] + position_embedding  # [N, 1 + h*w, D]
    hidden_states[0] = pre_layrnorm(x)                 # (upstream's spelling)
    hidden_states[i] = layer_i(hidden_states[i-1])     # x + attn(ln1(x)), then x + mlp(ln2(x))

LLaVA reads `hidden_states[select_layer]` (-2: the penultimate layer) and drops the CLS token;
`post_layernorm` is used only by the pooled output (`pooled`), kept so checkpoints load strictly.
Layers past the selected one are never run (`features`).

Pixels are channels-last `[N, H, W, 3]` here (the caller transposes upstream's NCHW tensors).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_distill.kernels.attention import attention
from spatial_distill.models.state_dict import StateDict, load_tensors, read_config
from spatial_distill.models.vit_layers import dense, export_layernorm, layer_norm, stat_dtype
from spatial_distill.sharding import constrain

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Field names are HF `CLIPVisionConfig`'s (`num_layers` is its `num_hidden_layers`)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    attention: str = "xla"  # kernels.attention implementation
    dtype: Any = jnp.float32  # compute dtype (LayerNorm statistics in at least float32)
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size",
                     "patch_size", "num_channels"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CLIPVisionConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"CLIPVisionConfig: hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        from spatial_distill.kernels.attention import parse

        try:
            parse(self.attention)
        except ValueError as e:
            raise ValueError(f"CLIPVisionConfig.attention={self.attention!r}: {e}") from None
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"CLIPVisionConfig.hidden_act={self.hidden_act!r} is not supported; "
                             f"choose one of {sorted(_ACTIVATIONS)}")
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, jnp.dtype(getattr(self, name)))

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @classmethod
    def vit_l14_336(cls, **overrides) -> CLIPVisionConfig:
        """`openai/clip-vit-large-patch14-336`'s vision tower."""
        return cls(**overrides)

    @classmethod
    def from_hf(cls, hf_config, **overrides) -> CLIPVisionConfig:
        """From a `CLIPVisionConfig` / `CLIPConfig` (its `vision_config`), their dict, or a
        config.json path. Absent fields take transformers' `CLIPVisionConfig` defaults, as
        `from_pretrained` would."""
        d, where = read_config(hf_config, "clip config")
        if "vision_config" in d:  # a full CLIPConfig
            d = dict(d["vision_config"] or {})
        model_type = d.get("model_type", "clip_vision_model")
        if model_type not in ("clip_vision_model", "clip"):
            raise ValueError(f"{where}: model_type={model_type!r} is not a CLIP vision config")
        hf_defaults = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=32, num_channels=3,
                           layer_norm_eps=1e-5, hidden_act="quick_gelu")
        v = {k: d.get(k, default) for k, default in hf_defaults.items()}
        fields = dict(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                      num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
                      image_size=v["image_size"], patch_size=v["patch_size"],
                      num_channels=v["num_channels"], layer_norm_eps=float(v["layer_norm_eps"]),
                      hidden_act=v["hidden_act"])
        fields.update(overrides)
        try:
            return cls(**fields)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def _param(rngs, shape, names, dtype, init=nnx.initializers.normal(0.02)):
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


class EncoderLayer(nnx.Module):
    """x + out_proj(MHA(layer_norm1(x))), then x + fc2(act(fc1(layer_norm2(x)))). `[N, T, D]`."""

    def __init__(self, c: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = c
        D, H = c.hidden_size, c.num_heads
        hd, pd = D // H, c.param_dtype
        zeros = nnx.initializers.zeros
        self.layer_norm1 = layer_norm(D, c.layer_norm_eps, c.dtype, pd, rngs)
        self.q = _param(rngs, (D, H, hd), ("embed", "heads", "head_dim"), pd)
        self.k = _param(rngs, (D, H, hd), ("embed", "heads", "head_dim"), pd)
        self.v = _param(rngs, (D, H, hd), ("embed", "heads", "head_dim"), pd)
        self.q_bias = _param(rngs, (H, hd), ("heads", "head_dim"), pd, zeros)
        self.k_bias = _param(rngs, (H, hd), ("heads", "head_dim"), pd, zeros)
        self.v_bias = _param(rngs, (H, hd), ("heads", "head_dim"), pd, zeros)
        self.out = _param(rngs, (H, hd, D), ("heads", "head_dim", "embed"), pd)
        self.out_bias = _param(rngs, (D,), ("embed",), pd, zeros)
        self.layer_norm2 = layer_norm(D, c.layer_norm_eps, c.dtype, pd, rngs)
        kw = dict(dtype=c.dtype, param_dtype=pd, rngs=rngs)
        self.fc1 = dense(D, c.intermediate_size, ("embed", "mlp"), **kw)
        self.fc2 = dense(c.intermediate_size, D, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        dt, res = c.dtype, stat_dtype(c.dtype)
        h = self.layer_norm1(x).astype(dt)
        q = jnp.einsum("btd,dhk->bthk", h, self.q[...].astype(dt)) + self.q_bias[...].astype(dt)
        k = jnp.einsum("btd,dhk->bthk", h, self.k[...].astype(dt)) + self.k_bias[...].astype(dt)
        v = jnp.einsum("btd,dhk->bthk", h, self.v[...].astype(dt)) + self.v_bias[...].astype(dt)
        names = ("activation_batch", "activation_length", "activation_heads", None)
        a = attention(constrain(q, names), constrain(k, names), constrain(v, names),
                      implementation=c.attention)
        a = jnp.einsum("bthk,hkd->btd", a, self.out[...].astype(dt)) + self.out_bias[...].astype(dt)
        x = x.astype(res) + a.astype(res)
        h = self.layer_norm2(x).astype(dt)
        m = _ACTIVATIONS[c.hidden_act](self.fc1(h))
        m = constrain(m, ("activation_batch", "activation_length", "activation_mlp"))
        return x + self.fc2(m).astype(res)

    def load_torch(self, sd: StateDict, prefix: str) -> None:
        D, H = self.config.hidden_size, self.config.num_heads
        hd = D // H
        sd.layernorm(self.layer_norm1, f"{prefix}.layer_norm1")
        for name in ("q", "k", "v"):
            sd.assign(getattr(self, name), f"{prefix}.self_attn.{name}_proj.weight",
                      lambda w: w.T.reshape(D, H, hd))
            sd.assign(getattr(self, f"{name}_bias"), f"{prefix}.self_attn.{name}_proj.bias",
                      lambda b: b.reshape(H, hd))
        sd.assign(self.out, f"{prefix}.self_attn.out_proj.weight", lambda w: w.T.reshape(H, hd, D))
        sd.assign(self.out_bias, f"{prefix}.self_attn.out_proj.bias")
        sd.layernorm(self.layer_norm2, f"{prefix}.layer_norm2")
        sd.linear(self.fc1, f"{prefix}.mlp.fc1")
        sd.linear(self.fc2, f"{prefix}.mlp.fc2")

    def export_torch(self, prefix: str) -> dict[str, np.ndarray]:
        D = self.config.hidden_size
        out = export_layernorm(self.layer_norm1, f"{prefix}.layer_norm1")
        for name in ("q", "k", "v"):
            out[f"{prefix}.self_attn.{name}_proj.weight"] = np.asarray(getattr(self, name)[...]).reshape(D, D).T
            out[f"{prefix}.self_attn.{name}_proj.bias"] = np.asarray(getattr(self, f"{name}_bias")[...]).reshape(D)
        out[f"{prefix}.self_attn.out_proj.weight"] = np.asarray(self.out[...]).reshape(D, D).T
        out[f"{prefix}.self_attn.out_proj.bias"] = np.asarray(self.out_bias[...])
        out.update(export_layernorm(self.layer_norm2, f"{prefix}.layer_norm2"))
        for name in ("fc1", "fc2"):
            lin = getattr(self, name)
            out[f"{prefix}.mlp.{name}.weight"] = np.asarray(lin.kernel[...]).T
            out[f"{prefix}.mlp.{name}.bias"] = np.asarray(lin.bias[...])
        return out


class CLIPVisionTower(nnx.Module):
    """Patch embedding, CLS + position embeddings, pre-LN, `num_layers` EncoderLayers, post-LN."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        D, p, pd = c.hidden_size, c.patch_size, c.param_dtype
        self.patch_embedding = _param(rngs, (p, p, c.num_channels, D), (None, None, None, "embed"), pd)
        self.class_embedding = _param(rngs, (D,), ("embed",), pd)
        self.position_embedding = _param(rngs, (c.grid**2 + 1, D), (None, "embed"), pd)
        self.pre_layrnorm = layer_norm(D, c.layer_norm_eps, c.dtype, pd, rngs)
        self.layers = nnx.List([EncoderLayer(c, rngs=rngs) for _ in range(c.num_layers)])
        self.post_layernorm = layer_norm(D, c.layer_norm_eps, c.dtype, pd, rngs)

    def _check(self, pixels) -> None:
        c = self.config
        want = (c.image_size, c.image_size, c.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise ValueError(f"CLIP tower: pixels must be [N, {c.image_size}, {c.image_size}, "
                             f"{c.num_channels}] (channels last, preprocessed to the config's "
                             f"image_size), got {tuple(pixels.shape)}")

    def hidden_states(self, pixels: jax.Array, num_layers: int | None = None) -> list[jax.Array]:
        """pixels `[N, H, W, 3]` -> `[hidden_states[0], ..., hidden_states[num_layers]]`, each
        `[N, 1 + h*w, D]` (CLS first), in the residual dtype. `num_layers` defaults to all."""
        self._check(pixels)
        c = self.config
        n = c.num_layers if num_layers is None else num_layers
        if not 0 <= n <= c.num_layers:
            raise ValueError(f"CLIP tower: num_layers={n} outside [0, {c.num_layers}]")
        dt, res = c.dtype, stat_dtype(c.dtype)
        patches = jax.lax.conv_general_dilated(
            pixels.astype(dt), self.patch_embedding[...].astype(dt), (c.patch_size,) * 2, "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        N = patches.shape[0]
        patches = patches.reshape(N, c.grid**2, c.hidden_size).astype(res)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(res), (N, 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1) + self.position_embedding[...].astype(res)
        x = self.pre_layrnorm(constrain(x, ("activation_batch", "activation_length", "activation_embed")))
        out = [x]
        for layer in self.layers[:n]:
            x = layer(x)
            out.append(x)
        return out

    def features(self, pixels: jax.Array, select_layer: int = -2, select_feature: str = "patch") -> jax.Array:
        """LLaVA's feature selection: `hidden_states[select_layer]` without the CLS token
        (`patch`, `[N, h*w, D]`) or with it (`cls_patch`). Only the layers it needs are run."""
        total = self.config.num_layers + 1
        index = select_layer + total if select_layer < 0 else select_layer
        if not 0 <= index < total:
            raise ValueError(f"mm_vision_select_layer={select_layer} is outside the tower's "
                             f"{total} hidden states")
        h = self.hidden_states(pixels, num_layers=index)[-1]
        if select_feature == "patch":
            return h[:, 1:]
        if select_feature == "cls_patch":
            return h
        raise ValueError(f"mm_vision_select_feature={select_feature!r} is unknown; LLaVA uses "
                         "'patch' or 'cls_patch'")

    def pooled(self, pixels: jax.Array) -> jax.Array:
        """HF `pooler_output`: post_layernorm of the last layer's CLS token, `[N, D]`."""
        return self.post_layernorm(self.hidden_states(pixels)[-1][:, 0])

    # -- checkpoints (HF `CLIPVisionModel` keys under `prefix`, e.g. "vision_model.") --------
    def load_torch(self, sd: StateDict, prefix: str = "vision_model.") -> None:
        sd.assign(self.patch_embedding, f"{prefix}embeddings.patch_embedding.weight",
                  lambda w: w.transpose(2, 3, 1, 0))
        sd.assign(self.class_embedding, f"{prefix}embeddings.class_embedding")
        sd.assign(self.position_embedding, f"{prefix}embeddings.position_embedding.weight")
        sd.layernorm(self.pre_layrnorm, f"{prefix}pre_layrnorm")
        for i, layer in enumerate(self.layers):
            layer.load_torch(sd, f"{prefix}encoder.layers.{i}")
        sd.layernorm(self.post_layernorm, f"{prefix}post_layernorm")

    def export_torch(self, prefix: str = "vision_model.") -> dict[str, np.ndarray]:
        out = {f"{prefix}embeddings.class_embedding": np.asarray(self.class_embedding[...]),
               f"{prefix}embeddings.patch_embedding.weight":
                   np.asarray(self.patch_embedding[...]).transpose(3, 2, 0, 1),
               f"{prefix}embeddings.position_embedding.weight": np.asarray(self.position_embedding[...])}
        out.update(export_layernorm(self.pre_layrnorm, f"{prefix}pre_layrnorm"))
        for i, layer in enumerate(self.layers):
            out.update(layer.export_torch(f"{prefix}encoder.layers.{i}"))
        out.update(export_layernorm(self.post_layernorm, f"{prefix}post_layernorm"))
        return out


def abstract_tower(config: CLIPVisionConfig) -> CLIPVisionTower:
    """Shapes only (`nnx.eval_shape`): nothing is allocated."""

    def build():
        with nnx.var_defaults(ref=True):  # see vggt.abstract_model: keeps large builds linear
            rngs = nnx.Rngs(0)
        return CLIPVisionTower(config, rngs=rngs)

    return nnx.eval_shape(build)


def materialize(model: nnx.Module) -> nnx.Module:
    """The model with every (numpy-filled) variable turned into a device array."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))


def load_official(path_or_state_dict, config=None, dtype=None) -> CLIPVisionTower:
    """A CLIP vision tower from a local HF checkpoint: a `CLIPModel` or `CLIPVisionModel`
    directory (config.json + safetensors / pytorch_model.bin), a weights file or a state dict.

    `config`: a `CLIPVisionConfig`, an HF config dict / path, or None (the directory's
    config.json). `dtype` sets the parameter and compute dtype. The text tower and projections of
    a full `CLIPModel` are ignored; every missing or mis-shaped vision key is named in one error.
    """
    if config is None:
        if isinstance(path_or_state_dict, Mapping) or not os.path.isdir(os.fspath(path_or_state_dict)):
            raise ValueError("clip.load_official: a weights file or state dict needs `config`")
        config = os.path.join(os.fspath(path_or_state_dict), "config.json")
    cfg = config if isinstance(config, CLIPVisionConfig) else CLIPVisionConfig.from_hf(config)
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    tensors, source = load_tensors(path_or_state_dict)
    sd = StateDict(tensors, source)
    model = abstract_tower(cfg)
    # `CLIPModel` and transformers-4 `CLIPVisionModel` files prefix the tower's keys with
    # "vision_model."; transformers 5 saves a `CLIPVisionModel` without it.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""
    model.load_torch(sd, prefix)
    other = [k for k in tensors if not k.startswith(prefix) or k.endswith("embeddings.position_ids")]
    sd.finish(ignore_unused=other, what=f"CLIP vision tower ({cfg.num_layers} layers x {cfg.hidden_size})")
    return materialize(model)


__all__ = ["CLIPVisionConfig", "CLIPVisionTower", "EncoderLayer", "abstract_tower", "load_official",
           "materialize"]
