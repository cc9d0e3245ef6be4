"""LLaVA-3D (ZCMax/LLaVA-3D, the 7B teacher) in Flax NNX, loadable from the official checkpoint.

Spec: `shared/reference/llava3d.md`. Data flow of one forward (`LLaVA3D.__call__`):

    3D: images [B, V, 3, H, W] -> CLIP hidden_states[-2] minus CLS      [B, V*h*w, C]
        depth, pose, K         -> xyz of each patch's top-left pixel    [B, V*h*w, 3]
        fused = feature + pos_mlp(xyz); mean per 0.2 m voxel           [B, K_b <= V*h*w, C]
        cap at 2560 voxels (replayed indices or a fixed stride rule)    [B, T, C]
    2D: images [B, 3, H, W]    -> CLIP features                          [B, h*w, C]
    projector (Linear, exact GELU, Linear)                               [B, T, D]
    splice: ids with -200 (visual tokens) and -300 (click tokens)        [B, L', D]
    Llama (models/llama.py) -> logits                                    [B, L', vocab]

Everything has static shapes under `jax.jit`: a scene's voxel count K_b is data, so voxel
tokens live in `[B, T]` slots with a count, and the spliced sequence in `[B, L_max]` with
segment ids (0 = padding, right-padded as upstream). Geometry runs in float32 (float64 in a
float64 model); upstream's default run casts it to bfloat16, which moves points across voxel
boundaries, so that is a documented deviation (spec §9).

The voxel cap (spec §4.5): upstream keeps `torch.randperm(K)[:2560]`, unseeded. Here a caller
may pass those indices (`subsample_indices`, e.g. replayed offline after `torch.manual_seed`),
else the fixed rule `VOXEL_CAP_RULE`: voxel `floor(i * K / cap)` for i < cap, an evenly strided
subset in sorted voxel order (deterministic, covers the whole scene). Dumps record which.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_distill.models import clip as clip_lib
from spatial_distill.models import llama as llama_lib
from spatial_distill.models.state_dict import (
    CheckpointMismatchError,
    StateDict,
    load_tensors,
    read_config,
)
from spatial_distill.models.vit_layers import dense, export_layernorm, layer_norm, stat_dtype
from spatial_distill.sharding import constrain

IMAGE_TOKEN_INDEX = -200
LOC_TOKEN_INDEX = -300
VOXEL_CAP_RULE = "stride: voxel floor(i*K/cap), i < cap, in sorted voxel order"
OPENAI_CLIP_336 = "openai/clip-vit-large-patch14-336"

_PREFIX = "model."
_CLIP_PREFIX = "model.vision_tower.vision_tower."
_POS_PREFIX = "model.video_tower.video_tower.positional_embedding.position_embedding_head"
_CLICK_PREFIX = "model.video_tower.prompt_encoder.pos_emb3d.position_embedding_head"


@dataclasses.dataclass(frozen=True)
class LLaVA3DConfig:
    """The teacher's architecture. `llama` and `clip` are the two towers' configs; the rest are
    the `mm_*` fields of the checkpoint's config.json plus the video tower's constants (upstream
    hard-codes voxel 0.2 m and the 2,560-token cap)."""

    llama: llama_lib.LlamaConfig
    clip: clip_lib.CLIPVisionConfig
    select_layer: int = -2
    select_feature: str = "patch"
    image_aspect_ratio: str = "square"  # 2D preprocessing only (data side)
    max_length: int = 4096  # tokenizer_model_max_length: spliced sequences are cut to it
    num_frames: int = 20  # views per scene in upstream preprocessing
    voxel_size: float = 0.2
    max_voxel_tokens: int = 2560

    def __post_init__(self):
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature={self.select_feature!r}: use 'patch' or 'cls_patch'")
        if not self.voxel_size > 0:
            raise ValueError(f"voxel_size={self.voxel_size} must be positive")
        for name in ("max_length", "num_frames", "max_voxel_tokens"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LLaVA3DConfig.{name}={getattr(self, name)} must be positive")

    @property
    def dtype(self):
        return self.llama.dtype

    @classmethod
    def seven_b(cls, **overrides) -> LLaVA3DConfig:
        """The reconstructed 7B config of the spec (§1), for shapes and AOT work."""
        llama = llama_lib.LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                      num_layers=32, num_heads=32, rms_norm_eps=1e-5,
                                      max_position_embeddings=4096)
        return cls(llama=llama, clip=clip_lib.CLIPVisionConfig.vit_l14_336(), **overrides)

    @classmethod
    def from_json(cls, config, clip_config=None, *, dtype=jnp.float32, param_dtype=None,
                  attention: str = "xla", **llama_overrides) -> LLaVA3DConfig:
        """From the checkpoint's config.json (dict or path; `llava_llama`), or a fixture-style
        dict (`llava_config`, `clip_vision_config`, `video_tower`). `clip_config`: the CLIP
        checkpoint's config (dict / path / `CLIPVisionConfig`); None takes the fixture's
        `clip_vision_config`, else ViT-L/14-336 when `mm_vision_tower` names it. `attention`:
        the `kernels.attention` implementation of both towers.

        Fields the spec could not verify are read and checked, never assumed: a missing one is
        an error naming it."""
        config, where = read_config(config, "llava config")
        d = dict(config.get("llava_config", config))
        video = dict(config.get("video_tower", {}))
        if clip_config is None:  # the fixture's layout, or `config_json`'s
            clip_config = config.get("clip_vision_config", d.get("clip_vision_config"))

        def need(field):
            if field not in d:
                raise ValueError(f"{where}: field {field!r} is missing; LLaVA-3D's behaviour depends "
                                 "on it and it is read from the checkpoint's config.json, never "
                                 "assumed (spec llava3d.md §1)")
            return d[field]

        def check(field, allowed):
            value = need(field)
            if value not in allowed:
                raise ValueError(f"{where}: {field}={value!r} is not supported; this port "
                                 f"implements {allowed}")
            return value

        if d.get("model_type", "llava_llama") != "llava_llama":
            raise ValueError(f"{where}: model_type={d.get('model_type')!r} is not 'llava_llama'")
        check("mm_projector_type", ("mlp2x_gelu",))
        check("mm_patch_merge_type", ("flat",))
        check("mm_video_tower", ("SpatialAwareModule",))
        for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
            if d.get(flag, False):
                raise ValueError(f"{where}: {flag}=True adds image start/patch tokens this port "
                                 "does not splice; LLaVA-3D's checkpoint has it False")
        select_layer = need("mm_vision_select_layer")
        select_feature = check("mm_vision_select_feature", ("patch", "cls_patch"))
        aspect = check("image_aspect_ratio", ("square", "pad"))
        max_length = need("tokenizer_model_max_length")
        mm_hidden = need("mm_hidden_size")
        if clip_config is None:
            tower = need("mm_vision_tower")
            if os.path.basename(str(tower).rstrip("/")) != OPENAI_CLIP_336.split("/")[1]:
                raise ValueError(f"{where}: mm_vision_tower={tower!r}: pass the CLIP checkpoint's "
                                 "config (clip_config=<local dir>) so its sizes are read")
            clip_config = clip_lib.CLIPVisionConfig.vit_l14_336()
        compute = jnp.dtype(dtype)
        params = compute if param_dtype is None else jnp.dtype(param_dtype)
        if isinstance(clip_config, clip_lib.CLIPVisionConfig):
            clip = dataclasses.replace(clip_config, dtype=compute, param_dtype=params, attention=attention)
        else:
            clip = clip_lib.CLIPVisionConfig.from_hf(clip_config, dtype=compute, param_dtype=params,
                                                     attention=attention)
        if clip.hidden_size != mm_hidden:
            raise ValueError(f"{where}: mm_hidden_size={mm_hidden} but the CLIP tower's width is "
                             f"{clip.hidden_size}; the config and the CLIP checkpoint disagree")
        llama = llama_lib.LlamaConfig.from_hf(d, dtype=compute, param_dtype=params, attention_impl=attention,
                                              **llama_overrides)
        return cls(llama=llama, clip=clip, select_layer=int(select_layer),
                   select_feature=select_feature, image_aspect_ratio=aspect,
                   max_length=int(max_length), num_frames=int(d.get("num_frames", 20)),
                   voxel_size=float(video.get("voxel_size", 0.2)),
                   max_voxel_tokens=int(video.get("max_3d_tokens", 2560)))


# -- geometry (spec §4.2, §4.4) --------------------------------------------------------------
def backproject(depth: jax.Array, pose: jax.Array, intrinsic: jax.Array, u: jax.Array,
                v: jax.Array) -> jax.Array:
    """World (axis-aligned) points of pixels (u = column, v = row; integer indices, no +0.5).

    depth `[..., n]` metres at those pixels, pose `[..., 4, 4]` camera-to-world, intrinsic
    `[..., 4, 4]`, u/v `[n]`. Returns `[..., n, 3]`. Depth 0 lands on the camera centre."""
    fx, fy = intrinsic[..., 0, 0, None], intrinsic[..., 1, 1, None]
    cx, cy = intrinsic[..., 0, 2, None], intrinsic[..., 1, 2, None]
    x = (u - cx) * depth / fx
    y = (v - cy) * depth / fy
    cam = jnp.stack([x, y, depth, jnp.ones_like(depth)], axis=-1)  # [..., n, 4]
    world = jnp.einsum("...ij,...nj->...ni", pose, cam)
    return world[..., :3] / world[..., 3:4]


def patch_points(depths: jax.Array, poses: jax.Array, intrinsics: jax.Array, patch: int) -> jax.Array:
    """xyz of each patch's top-left pixel (upstream back-projects every pixel, then takes them
    with a nearest 336 -> 24 resize, which picks pixel 14*r). depths `[B, V, H, W]`, poses /
    intrinsics `[B, V, 4, 4]` -> `[B, V, H/patch, W/patch, 3]`."""
    B, V, H, W = depths.shape
    h, w = H // patch, W // patch
    rows = jnp.arange(h) * patch
    cols = jnp.arange(w) * patch
    d = depths[:, :, rows][:, :, :, cols].reshape(B, V, h * w)
    vv, uu = jnp.meshgrid(rows, cols, indexing="ij")
    dt = d.dtype
    xyz = backproject(d, poses.astype(dt), intrinsics.astype(dt), uu.reshape(-1).astype(dt),
                      vv.reshape(-1).astype(dt))
    return xyz.reshape(B, V, h, w, 3)


def voxelize(xyz: jax.Array, voxel_size: float) -> tuple[jax.Array, jax.Array]:
    """Voxel ids as upstream numbers them: `round(xyz / size)` (half to even), ids in
    lexicographic (x, y, z) order of the occupied voxels. xyz `[N, 3]` -> (ids `[N]` int32,
    count `[]` int32). A lexicographic sort gives the order of upstream's mixed-radix keys
    without their int64 products."""
    q = jnp.round(xyz / jnp.asarray(voxel_size, xyz.dtype)).astype(jnp.int32)
    order = jnp.lexsort((q[:, 2], q[:, 1], q[:, 0]))
    sq = q[order]
    first = jnp.concatenate([jnp.ones((1,), bool), jnp.any(sq[1:] != sq[:-1], axis=-1)])
    rank = jnp.cumsum(first.astype(jnp.int32)) - 1
    ids = jnp.zeros_like(rank).at[order].set(rank)
    return ids, rank[-1] + 1


def voxel_mean(features: jax.Array, ids: jax.Array) -> jax.Array:
    """Mean of `features` `[N, C]` per voxel id `[N]` -> `[N, C]` (rows >= count are 0)."""
    n = features.shape[0]
    total = jax.ops.segment_sum(features, ids, num_segments=n)
    count = jax.ops.segment_sum(jnp.ones((n,), features.dtype), ids, num_segments=n)
    return total / jnp.maximum(count, 1)[:, None]


def cap_indices(count: jax.Array, cap: int, slots: int) -> jax.Array:
    """The fixed cap rule (`VOXEL_CAP_RULE`): `[slots]` voxel indices, identity below the cap."""
    i = jnp.arange(slots, dtype=jnp.int32)
    # Exact in int32 while i * count < 2^31: count <= the scene's patch count `slots`-many rows
    # of up to 838k points (e.g. 1,400 views of 576 patches).
    return jnp.where(count > cap, (i * count) // cap, i)


def select_voxels(voxels: jax.Array, counts: jax.Array, cap: int,
                  subsample_indices: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The voxel cap (spec §4.5). voxels `[B, N, C]` in sorted voxel order with `counts` `[B]`
    -> (`[B, min(N, cap), C]`, kept counts `[B]`). Scenes above the cap keep the voxels
    `subsample_indices[b]` (`[B, cap]`, upstream's `randperm(K)[:cap]` replayed; rows of scenes
    under the cap are ignored) or, without them, the fixed rule `cap_indices`."""
    B, N = voxels.shape[:2]
    slots = min(N, cap)
    if slots * N >= 2**31:
        raise ValueError(f"{N} patch points per scene is too many for the cap rule's int32 "
                         "arithmetic; use fewer views")
    index = jax.vmap(lambda k: cap_indices(k, cap, slots))(counts)
    if subsample_indices is not None:
        given = jnp.asarray(subsample_indices, jnp.int32)
        if given.shape != (B, cap):
            raise ValueError(f"subsample_indices shape {tuple(given.shape)} != [batch, cap] {(B, cap)}")
        if _is_concrete(given, counts):
            for b in np.flatnonzero(np.asarray(counts) > cap):
                row, k = np.asarray(given[b]), int(counts[b])
                if row.min() < 0 or row.max() >= k or len(np.unique(row)) != cap:
                    raise ValueError(f"subsample_indices[{b}] must be {cap} distinct voxel indices "
                                     f"in [0, {k}) (the scene has {k} voxels)")
        index = jnp.where((counts > cap)[:, None], given[:, :slots], index)
    kept = jnp.take_along_axis(voxels, index[:, :, None], axis=1)
    return kept, jnp.minimum(counts, cap).astype(jnp.int32)


# -- modules -----------------------------------------------------------------------------------
class PositionMLP(nnx.Module):
    """Linear(3 -> C) -> LayerNorm -> ReLU -> Linear(C -> C): upstream's
    `PositionEmbeddingLearnedMLP` (the 3D position embedding, and the click encoder)."""

    def __init__(self, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=stat_dtype(dtype), param_dtype=param_dtype, rngs=rngs)
        self.fc0 = dense(3, width, (None, "embed"), **kw)
        self.norm = layer_norm(width, 1e-5, dtype, param_dtype, rngs)
        self.fc3 = dense(width, width, ("embed", "mlp"), **kw)

    def __call__(self, xyz: jax.Array) -> jax.Array:
        """xyz `[..., 3]` metres (not normalised) -> `[..., C]`."""
        return self.fc3(jax.nn.relu(self.norm(self.fc0(xyz))))

    def load_torch(self, sd: StateDict, prefix: str) -> None:
        sd.linear(self.fc0, f"{prefix}.0")
        sd.layernorm(self.norm, f"{prefix}.1")
        sd.linear(self.fc3, f"{prefix}.3")

    def export_torch(self, prefix: str) -> dict[str, np.ndarray]:
        out = {}
        for name, lin in (("0", self.fc0), ("3", self.fc3)):
            out[f"{prefix}.{name}.weight"] = np.asarray(lin.kernel[...]).T
            out[f"{prefix}.{name}.bias"] = np.asarray(lin.bias[...])
        out.update(export_layernorm(self.norm, f"{prefix}.1"))
        return out


class Projector(nnx.Module):
    """`mlp2x_gelu`: Linear(C -> D) -> exact GELU -> Linear(D -> D)."""

    def __init__(self, din: int, dout: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear0 = dense(din, dout, ("mlp", "embed"), **kw)
        self.linear2 = dense(dout, dout, ("embed", "mlp"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear2(jax.nn.gelu(self.linear0(x), approximate=False))

    def load_torch(self, sd: StateDict, prefix: str) -> None:
        sd.linear(self.linear0, f"{prefix}.0")
        sd.linear(self.linear2, f"{prefix}.2")

    def export_torch(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.0.weight": np.asarray(self.linear0.kernel[...]).T,
                f"{prefix}.0.bias": np.asarray(self.linear0.bias[...]),
                f"{prefix}.2.weight": np.asarray(self.linear2.kernel[...]).T,
                f"{prefix}.2.bias": np.asarray(self.linear2.bias[...])}


class SceneTokens(NamedTuple):
    """A batch's visual tokens before splicing: `tokens` `[B, T, D]`, `counts` `[B]` int32 (the
    first `counts[b]` rows of sample b are real)."""

    tokens: jax.Array
    counts: jax.Array


class Spliced(NamedTuple):
    """The LLM's input: `embeds` `[B, L, D]`, `segment_ids` `[B, L]` (1 real, 0 right padding),
    `positions` `[B, L]` (0..len-1), `lengths` `[B]` int32."""

    embeds: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    lengths: jax.Array


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


class LLaVA3D(nnx.Module):
    """CLIP tower + 3D position MLP + click encoder + projector + Llama (spec §1)."""

    def __init__(self, config: LLaVA3DConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        C, D = c.clip.hidden_size, c.llama.hidden_size
        kw = dict(dtype=c.llama.dtype, param_dtype=c.llama.param_dtype, rngs=rngs)
        self.vision_tower = clip_lib.CLIPVisionTower(c.clip, rngs=rngs)
        self.pos_mlp = PositionMLP(C, **kw)  # width = CLIP's: added to its features
        self.prompt_encoder = PositionMLP(D, **kw)  # width = the LLM's: one token per click
        self.projector = Projector(C, D, **kw)
        self.llm = llama_lib.Llama(c.llama, rngs=rngs)

    # -- vision --------------------------------------------------------------------------------
    def clip_features(self, images: jax.Array) -> jax.Array:
        """images `[N, 3, H, W]` (upstream's preprocessed NCHW) -> `[N, h*w, C]`."""
        c = self.config
        return self.vision_tower.features(jnp.transpose(images, (0, 2, 3, 1)), c.select_layer,
                                          c.select_feature)

    def encode_images(self, images: jax.Array) -> SceneTokens:
        """2D mode: images `[B, 3, H, W]` -> 576 (h*w) projected tokens per image."""
        tokens = self.projector(self.clip_features(images).astype(self.config.dtype))
        return SceneTokens(tokens, jnp.full((images.shape[0],), tokens.shape[1], jnp.int32))

    def scene_features(self, images, depths, poses, intrinsics) -> dict[str, jax.Array]:
        """3D mode up to the voxel means (spec §4.1-4.4). images `[B, V, 3, H, W]`, depths
        `[B, V, H, W]` metres, poses (camera-to-world, axis-aligned) and intrinsics `[B, V, 4, 4]`.

        Returns `xyz` `[B, V*h*w, 3]`, `pos` and `fused` `[B, V*h*w, C]`, `voxel_ids`
        `[B, V*h*w]`, `counts` `[B]` and `voxels` `[B, V*h*w, C]` (voxel means in sorted voxel
        order; rows >= counts[b] are 0)."""
        c = self.config
        B, V = images.shape[:2]
        self._check_scene(images, depths, poses, intrinsics)
        feats = self.clip_features(images.reshape(B * V, *images.shape[2:]))
        geo = stat_dtype(c.dtype)
        xyz = patch_points(depths.astype(geo), poses, intrinsics, c.clip.patch_size)
        xyz = xyz.reshape(B, -1, 3)
        pos = self.pos_mlp(xyz)
        fused = feats.reshape(B, -1, feats.shape[-1]).astype(pos.dtype) + pos
        ids, counts = jax.vmap(lambda p: voxelize(p, c.voxel_size))(xyz)
        voxels = jax.vmap(voxel_mean)(fused, ids)
        return dict(xyz=xyz, pos=pos, fused=fused, voxel_ids=ids, counts=counts, voxels=voxels)

    def encode_scene(self, images, depths, poses, intrinsics, subsample_indices=None) -> SceneTokens:
        """3D mode: projected voxel tokens, at most `max_voxel_tokens` per scene.

        `subsample_indices` `[B, cap]` int: for a scene with more voxels than the cap, the voxel
        indices to keep, in order (upstream's `torch.randperm(K)[:cap]`, replayed); rows of
        scenes under the cap are ignored. None: the fixed rule `VOXEL_CAP_RULE`."""
        c = self.config
        f = self.scene_features(images, depths, poses, intrinsics)
        kept, counts = select_voxels(f["voxels"], f["counts"], c.max_voxel_tokens, subsample_indices)
        return SceneTokens(self.projector(kept.astype(c.dtype)), counts)

    def encode_clicks(self, clicks: jax.Array) -> jax.Array:
        """clicks `[B, C, 3]` (axis-aligned metres) -> `[B, C, D]` click tokens."""
        return self.prompt_encoder(clicks.astype(stat_dtype(self.config.dtype))).astype(self.config.dtype)

    # -- splice (spec §6.3) ----------------------------------------------------------------------
    def splice(self, input_ids: jax.Array, visual: SceneTokens | None,
               click_tokens: jax.Array | None = None, attention_mask: jax.Array | None = None) -> Spliced:
        """ids `[B, L]` holding at most one -200 (the sample's visual tokens go there) and any
        number of -300 (its click tokens, in order) -> the LLM input, cut to `max_length`.
        `attention_mask` `[B, L]` (0 = padding, either side) drops positions first, as upstream."""
        c = self.config
        ids = jnp.asarray(input_ids)
        B, L = ids.shape
        keep = jnp.ones((B, L), bool) if attention_mask is None else jnp.asarray(attention_mask) != 0
        if keep.shape != (B, L):
            raise ValueError(f"attention_mask shape {tuple(keep.shape)} != input_ids {(B, L)}")
        ids = jnp.where(keep, ids, 0)
        is_img, is_loc = ids == IMAGE_TOKEN_INDEX, ids == LOC_TOKEN_INDEX
        if _is_concrete(ids):
            self._check_ids(np.asarray(ids), visual, click_tokens)
        T = 0 if visual is None else visual.tokens.shape[1]
        counts = jnp.zeros((B,), jnp.int32) if visual is None else visual.counts
        piece = jnp.where(keep, jnp.where(is_img, counts[:, None], 1), 0)
        ends = jnp.cumsum(piece, axis=1)
        length = jnp.minimum(ends[:, -1], c.max_length).astype(jnp.int32)
        L_out = min(L + max(T - 1, 0), c.max_length)
        p = jnp.arange(L_out, dtype=jnp.int32)
        src = jax.vmap(lambda e: jnp.searchsorted(e, p, side="right"))(ends)
        src = jnp.minimum(src, L - 1)
        start = jnp.take_along_axis(ends - piece, src, axis=1)
        offset = p[None] - start
        text = self.llm.embed(jnp.where(ids >= 0, ids, 0))
        out = jnp.take_along_axis(text, src[:, :, None], axis=1)
        if visual is not None:
            vis = jnp.take_along_axis(visual.tokens.astype(out.dtype),
                                      jnp.clip(offset, 0, T - 1)[:, :, None], axis=1)
            out = jnp.where(jnp.take_along_axis(is_img, src, axis=1)[:, :, None], vis, out)
        if click_tokens is not None:
            k = jnp.cumsum(is_loc.astype(jnp.int32), axis=1) - 1
            k = jnp.clip(jnp.take_along_axis(k, src, axis=1), 0, click_tokens.shape[1] - 1)
            clk = jnp.take_along_axis(click_tokens.astype(out.dtype), k[:, :, None], axis=1)
            out = jnp.where(jnp.take_along_axis(is_loc, src, axis=1)[:, :, None], clk, out)
        valid = p[None] < length[:, None]
        out = jnp.where(valid[:, :, None], out, 0)
        names = ("activation_batch", "activation_length", "activation_embed")
        return Spliced(constrain(out, names), valid.astype(jnp.int32),
                       jnp.broadcast_to(p, (B, L_out)), length)

    # -- forward ---------------------------------------------------------------------------------
    def prepare(self, input_ids, images=None, depths=None, poses=None, intrinsics=None,
                clicks=None, subsample_indices=None, attention_mask=None) -> Spliced:
        """Encodes the visual inputs and splices them into the ids (jit-friendly)."""
        visual = None
        if images is not None:
            images = jnp.asarray(images)
            if images.ndim == 5:
                if depths is None or poses is None or intrinsics is None:
                    raise ValueError("3D mode (images [B, V, 3, H, W]) needs depths, poses and "
                                     "intrinsics; for single images pass images [B, 3, H, W] (2D mode)")
                visual = self.encode_scene(images, depths, poses, intrinsics, subsample_indices)
            elif images.ndim == 4:
                visual = self.encode_images(images)
            else:
                raise ValueError(f"images must be [B, V, 3, H, W] (3D) or [B, 3, H, W] (2D), got "
                                 f"shape {tuple(images.shape)}")
        click_tokens = None
        if clicks is not None:
            clicks = jnp.asarray(clicks)
            clicks = clicks[:, None] if clicks.ndim == 2 else clicks
            if clicks.ndim != 3 or clicks.shape[-1] != 3:
                raise ValueError(f"clicks must be [B, 3] or [B, C, 3], got {tuple(clicks.shape)}")
            click_tokens = self.encode_clicks(clicks)
        return self.splice(input_ids, visual, click_tokens, attention_mask)

    def logits(self, spliced: Spliced) -> jax.Array:
        """`[B, L, vocab]` float32 from a `Spliced` input."""
        h, _ = self.llm.hidden(spliced.embeds, positions=spliced.positions,
                               segment_ids=spliced.segment_ids)
        return self.llm.logits(h)

    def __call__(self, input_ids, images=None, depths=None, poses=None, intrinsics=None,
                 clicks=None, subsample_indices=None, attention_mask=None) -> jax.Array:
        """Upstream's forward on its preprocessed tensors -> logits `[B, L_spliced, vocab]`
        (right padded; eagerly cut to the longest sample, under jit the static maximum)."""
        s = self.prepare(input_ids, images, depths, poses, intrinsics, clicks, subsample_indices,
                         attention_mask)
        out = self.logits(s)
        if _is_concrete(s.lengths):
            out = out[:, : int(np.max(np.asarray(s.lengths)))]
        return out

    # -- input checks (eager calls) ----------------------------------------------------------------
    def _check_scene(self, images, depths, poses, intrinsics) -> None:
        B, V, _, H, W = images.shape
        for name, x, shape in (("depths", depths, (B, V, H, W)), ("poses", poses, (B, V, 4, 4)),
                               ("intrinsics", intrinsics, (B, V, 4, 4))):
            if tuple(x.shape) != shape:
                raise ValueError(f"{name} shape {tuple(x.shape)} != {shape} for images "
                                 f"{tuple(images.shape)}")
            if _is_concrete(x) and not np.all(np.isfinite(np.asarray(x, np.float64))):
                raise ValueError(f"{name} holds NaN or inf; drop views with invalid poses/depth "
                                 "(ScanNet marks them with inf) before the forward")

    def _check_ids(self, ids: np.ndarray, visual, click_tokens) -> None:
        bad = ids[(ids < 0) & (ids != IMAGE_TOKEN_INDEX) & (ids != LOC_TOKEN_INDEX)]
        if bad.size:
            raise ValueError(f"input_ids hold negative id {bad[0]}; only {IMAGE_TOKEN_INDEX} "
                             f"(image) and {LOC_TOKEN_INDEX} (click) are placeholders")
        if ids.max(initial=0) >= self.config.llama.vocab_size:
            raise ValueError(f"input_ids hold id {ids.max()} >= vocab_size "
                             f"{self.config.llama.vocab_size}; is the tokenizer the teacher's?")
        n_img = (ids == IMAGE_TOKEN_INDEX).sum(1)
        if n_img.max(initial=0) > 1:
            raise ValueError(f"a sample holds {n_img.max()} image placeholders ({IMAGE_TOKEN_INDEX});"
                             " LLaVA-3D prompts have one <image>")
        if n_img.max(initial=0) and visual is None:
            raise ValueError(f"input_ids hold {IMAGE_TOKEN_INDEX} (<image>) but no images were given")
        n_loc = (ids == LOC_TOKEN_INDEX).sum(1).max(initial=0)
        have = 0 if click_tokens is None else click_tokens.shape[1]
        if n_loc > have:
            raise ValueError(f"input_ids hold {n_loc} click placeholders ({LOC_TOKEN_INDEX}, "
                             f"<boxes>) in a sample but clicks give {have} per sample")

    # -- checkpoints -------------------------------------------------------------------------------
    def load_torch(self, sd: StateDict, *, clip: StateDict | None = None, clip_prefix: str = "") -> None:
        """Official keys (spec §8). The CLIP tower from `clip` (its own checkpoint) when given,
        else from the `model.vision_tower.vision_tower.vision_model.*` keys of `sd`."""
        if clip is None:
            self.vision_tower.load_torch(sd, f"{_CLIP_PREFIX}vision_model.")
        else:
            self.vision_tower.load_torch(clip, clip_prefix)
        self.pos_mlp.load_torch(sd, _POS_PREFIX)
        self.prompt_encoder.load_torch(sd, _CLICK_PREFIX)
        self.projector.load_torch(sd, f"{_PREFIX}mm_projector")
        llama_lib.load_weights(self.llm, sd)

    def export_torch(self) -> dict[str, np.ndarray]:
        """The official state dict (CLIP attached, as at inference), numpy in torch layouts."""
        out = llama_lib.to_hf_state_dict(self.llm)
        out.update(self.projector.export_torch(f"{_PREFIX}mm_projector"))
        out.update(self.pos_mlp.export_torch(_POS_PREFIX))
        out.update(self.prompt_encoder.export_torch(_CLICK_PREFIX))
        out.update(self.vision_tower.export_torch(f"{_CLIP_PREFIX}vision_model."))
        return out


def abstract_model(config: LLaVA3DConfig) -> LLaVA3D:
    """Shapes only (`nnx.eval_shape`): a 7B model costs no memory."""

    return nnx.eval_shape(lambda: LLaVA3D(config, rngs=nnx.Rngs(0)))


def official_shapes(model: LLaVA3D) -> dict[str, tuple[int, ...]]:
    """Key -> torch shape of the official state dict, for a (possibly abstract) model: every
    parameter becomes a zero-stride view of one element, so nothing is materialised."""
    graphdef, state = nnx.split(model)
    shadow = nnx.merge(graphdef, jax.tree.map(
        lambda x: np.broadcast_to(np.zeros((), np.dtype(x.dtype)), x.shape), state))
    return {k: tuple(v.shape) for k, v in shadow.export_torch().items()}


def count_params(model: nnx.Module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def load_official(path_or_state_dict, config=None, dtype=jnp.float32, *, clip=None,
                  param_dtype=None, attention: str = "xla", **llama_overrides) -> LLaVA3D:
    """LLaVA-3D from its official checkpoint.

    Args:
      path_or_state_dict: the checkpoint directory (config.json + sharded safetensors with
        `model.safetensors.index.json`, or pytorch_model*.bin read with weights_only=True), a
        single weights file, or a state dict with the official key names.
      config: an `LLaVA3DConfig`, the checkpoint's config.json (dict or path; a fixture's
        config.json dict too) or None (the directory's config.json).
      dtype: compute dtype (parameters too unless `param_dtype`).
      clip: the CLIP ViT-L/14-336 checkpoint (a local directory or file, as upstream loads
        `mm_vision_tower` separately), or None to take the tower from the checkpoint's own
        `model.vision_tower.*` keys. With `clip`, those keys are ignored, as upstream does.
      attention: `kernels.attention` implementation of both towers (xla | pallas | auto).
      llama_overrides: LlamaConfig fields (scan_layers, remat_policy).
    Raises CheckpointMismatchError naming every missing, unexpected and mis-shaped key.
    """
    if config is None:
        if isinstance(path_or_state_dict, Mapping) or not os.path.isdir(os.fspath(path_or_state_dict)):
            raise ValueError("llava3d.load_official: a weights file or state dict needs `config` "
                             "(the checkpoint's config.json)")
        config = os.path.join(os.fspath(path_or_state_dict), "config.json")
    if isinstance(config, LLaVA3DConfig):
        cfg = config
    else:
        clip_config = None
        if clip is not None and not isinstance(clip, Mapping) and os.path.isdir(os.fspath(clip)):
            clip_config = os.path.join(os.fspath(clip), "config.json")
        cfg = LLaVA3DConfig.from_json(config, clip_config, dtype=dtype, param_dtype=param_dtype,
                                      attention=attention, **llama_overrides)
    tensors, source = read_checkpoint(path_or_state_dict)
    sd = StateDict(tensors, source)
    clip_sd, clip_prefix = None, ""
    if clip is not None:
        clip_tensors, clip_source = load_tensors(clip)
        clip_sd = StateDict(clip_tensors, clip_source)
        clip_prefix = "vision_model." if any(k.startswith("vision_model.") for k in clip_tensors) else ""
    elif not any(k.startswith(_CLIP_PREFIX) for k in tensors):
        raise CheckpointMismatchError(
            f"{source} holds no vision tower ({_CLIP_PREFIX}*): upstream loads it from "
            f"{OPENAI_CLIP_336}; pass clip=<local directory of that checkpoint>")
    model = abstract_model(cfg)
    model.load_torch(sd, clip=clip_sd, clip_prefix=clip_prefix)
    ignore = [k for k in tensors if k.endswith(("rotary_emb.inv_freq", "position_ids"))]
    if clip_sd is not None:
        ignore += [k for k in tensors if k.startswith(_CLIP_PREFIX)]
        clip_sd.finish(ignore_unused=[k for k in clip_sd.tensors if not k.startswith(clip_prefix)
                                      or k.endswith("position_ids")], what="CLIP vision tower")
    sd.finish(ignore_unused=ignore, what="LLaVA-3D model")
    return clip_lib.materialize(model)


def config_json(config: LLaVA3DConfig) -> dict:
    """The checkpoint config.json (`llava_llama`) describing `config`, with the CLIP tower's HF
    config under `clip_vision_config` so `from_json` rebuilds it without a separate checkpoint."""
    ll, cl = config.llama, config.clip
    return {
        "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
        "vocab_size": ll.vocab_size, "hidden_size": ll.hidden_size,
        "intermediate_size": ll.intermediate_size, "num_hidden_layers": ll.num_layers,
        "num_attention_heads": ll.num_heads, "num_key_value_heads": ll.num_kv_heads,
        "max_position_embeddings": ll.max_position_embeddings, "rms_norm_eps": ll.rms_norm_eps,
        "rope_theta": ll.rope_theta, "rope_scaling": None, "hidden_act": "silu",
        "tie_word_embeddings": ll.tie_word_embeddings, "bos_token_id": 1, "eos_token_id": 2,
        "mm_vision_tower": "clip_vision_config", "mm_video_tower": "SpatialAwareModule",
        "mm_hidden_size": cl.hidden_size, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": config.select_layer,
        "mm_vision_select_feature": config.select_feature, "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_aspect_ratio": config.image_aspect_ratio,
        "tokenizer_model_max_length": config.max_length, "tokenizer_padding_side": "right",
        "num_frames": config.num_frames,
        "clip_vision_config": {
            "model_type": "clip_vision_model", "hidden_size": cl.hidden_size,
            "intermediate_size": cl.intermediate_size, "num_hidden_layers": cl.num_layers,
            "num_attention_heads": cl.num_heads, "image_size": cl.image_size,
            "patch_size": cl.patch_size, "num_channels": cl.num_channels,
            "layer_norm_eps": cl.layer_norm_eps, "hidden_act": cl.hidden_act},
    }


def save_official(model: LLaVA3D, path: str, *, max_shard_bytes: int = 2 << 30) -> None:
    """Writes `model` as an official-layout checkpoint directory: config.json, safetensors shards
    of at most `max_shard_bytes` and `model.safetensors.index.json` (CLIP tower included).
    Random-weight teachers for tests and benchmarks are made this way."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tensors = model.export_torch()
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        value = np.ascontiguousarray(tensors[key])  # safetensors writes a view's memory as is
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
                   "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_json(model.config), f, indent=1)


def read_checkpoint(src) -> tuple[dict[str, np.ndarray], str]:
    """Tensors of a checkpoint. A directory with `model.safetensors.index.json` is read shard by
    shard as the index lists them (a missing shard or a key in the wrong shard is an error)."""
    if isinstance(src, Mapping) or not os.path.isdir(os.fspath(src)):
        return load_tensors(src)
    path = os.fspath(src)
    index_path = os.path.join(path, "model.safetensors.index.json")
    if not os.path.exists(index_path):
        return llama_lib.read_hf_weights(path)
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointMismatchError(f"{index_path}: no 'weight_map'; is the index complete?")
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(path, shard)
        if os.path.basename(shard) != shard or not os.path.exists(shard_path):
            raise FileNotFoundError(f"{index_path} lists shard {shard!r}, which is not in {path}; "
                                    "download the complete checkpoint")
        part, _ = load_tensors(shard_path)
        listed = {k for k, v in weight_map.items() if v == shard}
        if set(part) != listed:
            extra, absent = sorted(set(part) - listed), sorted(listed - set(part))
            raise CheckpointMismatchError(f"{shard_path} does not hold what {index_path} lists: "
                                          f"unlisted {extra[:5]}, absent {absent[:5]}")
        tensors.update(part)
    return tensors, path


__all__ = ["IMAGE_TOKEN_INDEX", "LLaVA3D", "LLaVA3DConfig", "LOC_TOKEN_INDEX", "PositionMLP",
           "Projector", "SceneTokens", "Spliced", "VOXEL_CAP_RULE", "abstract_model", "backproject",
           "cap_indices", "config_json", "count_params", "load_official", "official_shapes",
           "patch_points", "read_checkpoint", "save_official", "select_voxels", "voxel_mean",
           "voxelize"]
