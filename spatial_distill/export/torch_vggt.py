"""PyTorch (torch.nn) re-implementation of our Flax VGGT aggregator, camera head and DPT head.

For inference (eval mode, no dropout anywhere) of a trained student in PyTorch. Written from
`shared/reference/vggt.md` and our Flax port (`spatial_distill.models.vggt`, `vit_layers`,
`camera_head`, `dpt`), whose numerics it mirrors op for op. `state_dict()` keys and shapes are the
official VGGT ones (under the prefixes `aggregator.`, `camera_head.`, `depth_head.` /
`point_head.`), i.e. exactly what the Flax modules' `export_torch(prefix)` writes, so official
checkpoints and our exports load with `load_state_dict(..., strict=True)`. The ImageNet
mean/std are non-persistent buffers (absent from checkpoints, as upstream).

Layouts. `Aggregator` takes the upstream image layout `[B, S, 3, H, W]` (RGB in [0, 1]; it
normalises internally) and returns per-layer tokens `[B, S, P, 2C]`, P = 1 camera + R register +
h*w patch tokens (row-major). Heads take that list; their outputs are channels-last as in Flax.

Precision (as the Flax port, i.e. as upstream under autocast). The aggregator's matmuls run in its
parameter dtype (float32, or bfloat16 after `.to(torch.bfloat16)`), while LayerNorms, QK-norm,
RoPE and the residual stream run in `promote(dtype, float32)`, so it returns float32 tokens. The
heads always compute in `promote(param dtype, float32)` (bf16 weights are upcast per op).
To build a big model without drawing random weights: construct under `torch.device("meta")`,
`load_state_dict(sd, strict=True, assign=True)`, then `.to(device)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spatial_distill.models.camera_head import CameraHeadConfig
from spatial_distill.models.dpt import DPTConfig, uv_grid
from spatial_distill.models.vggt import AggregatorConfig, PatchEmbedConfig, rope_positions
from spatial_distill.models.vit_layers import rope_inv_freq

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
POSE_DIM = 9


def _stat(dtype: torch.dtype) -> torch.dtype:
    """Dtype of norms and the residual stream: at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


# -- dtype-following layers: parameters are cast to the input's dtype per call -------------------
# This is how the Flax modules treat bf16 parameters in float32 computations (the heads), and it
# is a no-op when the dtypes already agree.

class Linear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), _cast(self.bias, x.dtype))


class Conv2d(nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.weight.to(x.dtype), _cast(self.bias, x.dtype))


class ConvTranspose2d(nn.ConvTranspose2d):
    def forward(self, x):
        return F.conv_transpose2d(x, self.weight.to(x.dtype), _cast(self.bias, x.dtype),
                                  self.stride, self.padding)


class LayerNorm(nn.LayerNorm):
    """LayerNorm over the last axis, computed and returned in `promote(x.dtype, float32)`."""

    def forward(self, x):
        dt = _stat(x.dtype)
        return F.layer_norm(x.to(dt), self.normalized_shape, _cast(self.weight, dt),
                            _cast(self.bias, dt), self.eps)


# -- ViT layers (vit_layers.py) -------------------------------------------------------------------

def rope_2d(x: torch.Tensor, pos: torch.Tensor, freq: float) -> torch.Tensor:
    """2D rotary embedding. x `[B, heads, N, D]`, pos `[B, N, 2]` int (row, col).

    First D/2 channels rotate with the row, last D/2 with the column, each rotate-half (not
    interleaved). Angles in float32 (as upstream, also in float64 runs); the rotation in
    `promote(x.dtype, float32)`, which is also the returned dtype.
    """
    half = x.shape[-1] // 2
    inv = torch.from_numpy(rope_inv_freq(half, freq)).to(x.device)
    cdt = _stat(x.dtype)
    x = x.to(cdt)

    def rotate(xa, p):
        ang = p.to(torch.float32)[..., None] * inv  # [B, N, half/2]
        ang = torch.cat([ang, ang], dim=-1).to(cdt)[:, None]  # [B, 1, N, half]
        x1, x2 = xa.chunk(2, dim=-1)
        return xa * ang.cos() + torch.cat([-x2, x1], dim=-1) * ang.sin()

    return torch.cat([rotate(x[..., :half], pos[..., 0]), rotate(x[..., half:], pos[..., 1])], -1)


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2, in the input's dtype. `[..., in] -> [..., out]`."""

    def __init__(self, in_features, hidden_features, out_features=None, bias=True):
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features, bias=bias)
        self.fc2 = Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Self-attention with optional QK-norm (LayerNorm per head vector) and 2D RoPE.

    x `[B, N, C]` in the compute dtype, pos `[B, N, 2]` or None -> `[B, N, C]` (same dtype).
    """

    def __init__(self, dim, num_heads, qkv_bias=True, proj_bias=True, qk_norm=False,
                 norm_eps=1e-5, rope_freq: float | None = None):
        super().__init__()
        self.num_heads, self.head_dim, self.rope_freq = num_heads, dim // num_heads, rope_freq
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)  # output rows: q, k, v, each head-major
        self.q_norm = LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.proj = Linear(dim, dim, bias=proj_bias)

    def forward(self, x, pos=None):
        b, n, c = x.shape
        dt = x.dtype
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, head_dim]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_freq is not None and pos is not None:
            q, k = rope_2d(q, pos, self.rope_freq), rope_2d(k, pos, self.rope_freq)
        o = F.scaled_dot_product_attention(q.to(dt), k.to(dt), v, scale=self.head_dim**-0.5)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma.to(x.dtype)


class Block(nn.Module):
    """Pre-norm block: x += ls1*attn(norm1(x), pos); x += ls2*mlp(norm2(x)).

    x `[B, N, C]`, pos `[B, N, 2]` int or None, `dtype` the matmul dtype (None: the parameters').
    Returns `[B, N, C]` in `promote(dtype, float32)`: the residual stream is never rounded to bf16.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, proj_bias=True,
                 ffn_bias=True, qk_norm=False, init_values: float | None = None, norm_eps=1e-5,
                 rope_freq: float | None = None):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, qk_norm, norm_eps, rope_freq)
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        has_ls = init_values is not None
        self.ls1 = LayerScale(dim, init_values) if has_ls else nn.Identity()
        self.ls2 = LayerScale(dim, init_values) if has_ls else nn.Identity()

    def forward(self, x, pos=None, dtype: torch.dtype | None = None):
        dtype = dtype or self.norm1.weight.dtype
        x = x.to(_stat(dtype))
        x = x + self.ls1(self.attn(self.norm1(x).to(dtype), pos).to(x.dtype))
        return x + self.ls2(self.mlp(self.norm2(x).to(dtype)).to(x.dtype))


# -- patch embed and aggregator (vggt.py) ---------------------------------------------------------

class DinoViT(nn.Module):
    """DINOv2 ViT with registers: normalised images `[N, 3, H, W]` -> normed patch tokens
    `[N, h*w, C]` in `promote(dtype, float32)` (cls and register outputs are dropped)."""

    def __init__(self, cfg: PatchEmbedConfig):
        super().__init__()
        self.cfg = cfg
        c, p = cfg.embed_dim, cfg.patch_size
        self.grid = cfg.img_size // p
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, c))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, c))
        self.mask_token = nn.Parameter(torch.zeros(1, c))  # pre-training only; in checkpoints
        self.patch_embed = nn.Module()  # a container: official key `patch_embed.proj.*`
        self.patch_embed.proj = Conv2d(3, c, p, stride=p)
        self.blocks = nn.ModuleList([
            Block(c, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.proj_bias, cfg.ffn_bias,
                  cfg.qk_norm, cfg.init_values or None, norm_eps=1e-6)
            for _ in range(cfg.depth)])
        self.norm = LayerNorm(c, eps=1e-6)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """`[1, 1+h*w, C]` table for an h x w grid: the grid part resized bicubic, antialiased,
        to an explicit size in float32 (cls row untouched), cast back to the parameter dtype."""
        table = self.pos_embed
        if h == w == self.grid:
            return table
        c = table.shape[-1]
        grid = table[:, 1:].float().reshape(1, self.grid, self.grid, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, c)
        return torch.cat([table[:, :1].float(), grid], dim=1).to(table.dtype)

    def forward(self, x, dtype: torch.dtype):
        n, _, hh, ww = x.shape
        p, sdt = self.cfg.patch_size, _stat(dtype)
        t = self.patch_embed.proj(x.to(dtype)).flatten(2).transpose(1, 2).to(sdt)  # [N, h*w, C]
        t = torch.cat([self.cls_token.to(sdt).expand(n, -1, -1), t], dim=1)
        t = t + self.pos_embed_for(hh // p, ww // p).to(sdt)
        # Registers go right after cls and get no positional embedding.
        t = torch.cat([t[:, :1], self.register_tokens.to(sdt).expand(n, -1, -1), t[:, 1:]], dim=1)
        for blk in self.blocks:
            t = blk(t, None, dtype)
        return self.norm(t)[:, 1 + self.cfg.num_register_tokens:]


class Aggregator(nn.Module):
    """DINOv2 patch embed + alternating frame/global attention (official `aggregator.*` keys).

    `forward(images [B, S, 3, H, W] in [0, 1], keep_layers=None)` -> `(layers, patch_start_idx)`:
    `layers[i]` is `[B, S, P, 2C]` (frame block i output ‖ global block i output) for kept layers
    (all when `keep_layers` is None; negative ids count from the end) and None for the others.
    """

    def __init__(self, cfg: AggregatorConfig, patch_embed: PatchEmbedConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_start_idx = cfg.patch_start_idx
        c, r = cfg.embed_dim, cfg.num_register_tokens
        self.patch_embed = DinoViT(patch_embed)
        # Slot 0 serves frame 0 of every sequence (it defines the world frame), slot 1 the rest.
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, c))
        self.register_token = nn.Parameter(torch.zeros(1, 2, r, c))

        def block():
            return Block(c, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.proj_bias,
                         cfg.ffn_bias, cfg.qk_norm, cfg.init_values, 1e-5, cfg.rope_freq)

        self.frame_blocks = nn.ModuleList([block() for _ in range(cfg.depth)])
        self.global_blocks = nn.ModuleList([block() for _ in range(cfg.depth)])
        for name, value in (("_resnet_mean", _MEAN), ("_resnet_std", _STD)):
            self.register_buffer(name, torch.tensor(value).view(1, 1, 3, 1, 1), persistent=False)

    def _apply(self, fn, recurse=True):
        # The ImageNet constants are rebuilt in float32 on the parameters' new device after any
        # `.to()`: `.to(torch.bfloat16)` must not round them (the Flax port, like upstream under
        # autocast, keeps them float32), and a model built on the meta device gets real ones.
        names = {"_resnet_mean": _MEAN, "_resnet_std": _STD}
        for name in names:
            self._buffers[name] = None  # skipped by `Module._apply`
        super()._apply(fn, recurse)
        for name, value in names.items():
            self._buffers[name] = torch.tensor(value, device=self.camera_token.device).view(
                1, 1, 3, 1, 1)
        return self

    def _special(self, token: torch.Tensor, b: int, s: int, dt) -> torch.Tensor:
        """`[1, 2, n, C]` -> `[B, S, n, C]`: slot 0 for frame 0, slot 1 for frames 1..S-1."""
        return token[:, [0] + [1] * (s - 1)].to(dt).expand(b, -1, -1, -1)

    def forward(self, images, keep_layers: Sequence[int] | None = None):
        cfg, p = self.cfg, self.cfg.patch_size
        if images.ndim != 5 or images.shape[2] != 3 or images.shape[3] % p or images.shape[4] % p:
            raise ValueError(f"Aggregator images {tuple(images.shape)}: expected [B, S, 3, H, W] "
                             f"(channels-first) with H and W multiples of {p}")
        b, s, _, hh, ww = images.shape
        h, w, c, depth = hh // p, ww // p, cfg.embed_dim, cfg.depth
        if keep_layers is not None and any(not -depth <= i < depth for i in keep_layers):
            raise ValueError(f"keep_layers {tuple(keep_layers)} outside the aggregator's "
                             f"{depth} layers")
        keep = set(range(depth)) if keep_layers is None else {i % depth for i in keep_layers}
        dt = self.camera_token.dtype
        sdt = _stat(dt)
        x = (images.to(sdt) - self._resnet_mean.to(sdt)) / self._resnet_std.to(sdt)
        patches = self.patch_embed(x.reshape(b * s, 3, hh, ww), dt).reshape(b, s, h * w, c)
        x = torch.cat([self._special(self.camera_token, b, s, sdt),
                       self._special(self.register_token, b, s, sdt), patches], dim=2)
        n = x.shape[2]
        # RoPE (row, col): 0 for special tokens, patch (r, c) -> (r+1, c+1); global attention
        # repeats the per-frame positions (no frame index).
        pos = torch.from_numpy(rope_positions(h, w, self.patch_start_idx)).to(images.device)
        pos_frame, pos_global = pos.expand(b * s, n, 2), pos.repeat(s, 1).expand(b, s * n, 2)
        layers: list[torch.Tensor | None] = []
        x = x.reshape(b * s, n, c)
        for i in range(depth):
            x = self.frame_blocks[i](x, pos_frame, dt)
            frame_out = x.reshape(b, s, n, c)
            x = self.global_blocks[i](x.reshape(b, s * n, c), pos_global, dt)
            global_out = x.reshape(b, s, n, c)
            x = x.reshape(b * s, n, c)
            layers.append(torch.cat([frame_out, global_out], dim=-1) if i in keep else None)
        return layers, self.patch_start_idx


# -- camera head (camera_head.py) -----------------------------------------------------------------

def _inv_log(y):
    return torch.sign(y) * torch.expm1(y.abs())


POSE_ACTIVATIONS = {"linear": lambda x: x, "relu": torch.relu, "exp": torch.exp,
                    "inv_log": _inv_log}


class CameraHead(nn.Module):
    """Iterative pose regressor over the camera token of the last aggregator layer.

    `forward(tokens, num_iterations=4)`: tokens is the per-layer list of `[B, S, P, dim_in]`
    (only `tokens[-1]` is read). Returns `num_iterations` activated "absT_quaR_FoV" encodings
    `[B, S, 9]` ([t(3), quaternion xyzw (4), fov_h, fov_w]), the last one final.
    """

    def __init__(self, cfg: CameraHeadConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim_in
        self.token_norm = LayerNorm(dim, eps=1e-5)
        self.trunk = nn.ModuleList([
            Block(dim, cfg.num_heads, cfg.mlp_ratio, init_values=cfg.init_values, norm_eps=1e-5)
            for _ in range(cfg.trunk_depth)])
        self.trunk_norm = LayerNorm(dim, eps=1e-5)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, POSE_DIM))
        self.embed_pose = Linear(POSE_DIM, dim)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 3 * dim))
        self.pose_branch = Mlp(dim, dim // 2, POSE_DIM)

    def _activate(self, enc):
        cfg = self.cfg
        return torch.cat([POSE_ACTIVATIONS[cfg.trans_act](enc[..., :3]),
                          POSE_ACTIVATIONS[cfg.quat_act](enc[..., 3:7]),
                          POSE_ACTIVATIONS[cfg.fl_act](enc[..., 7:])], dim=-1)

    def forward(self, aggregated_tokens_list, num_iterations: int = 4) -> list[torch.Tensor]:
        last = aggregated_tokens_list[-1]
        if last.ndim != 4 or last.shape[-1] != self.cfg.dim_in:
            raise ValueError(f"CameraHead: last aggregator layer has shape {tuple(last.shape)}; "
                             f"expected [B, S, P, {self.cfg.dim_in}]")
        dt = _stat(self.embed_pose.weight.dtype)  # float32 even for bf16 parameters
        t = self.token_norm(last[:, :, 0].to(dt))  # camera token [B, S, C], fixed across iterations
        t_ln = F.layer_norm(t, t.shape[-1:], eps=1e-6)  # adaLN base: no affine
        enc, outputs = None, []
        for _ in range(num_iterations):
            # Iteration 1 is conditioned on the learned empty pose, later ones on the raw
            # (pre-activation) encoding, detached as upstream.
            cond = (self.empty_pose_tokens.to(dt).expand(*t.shape[:2], POSE_DIM) if enc is None
                    else enc.detach())
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(cond)).chunk(3, dim=-1)
            x = gate * (t_ln * (1 + scale) + shift) + t
            for blk in self.trunk:
                x = blk(x, None, dt)  # attention across the S frames of each sequence
            delta = self.pose_branch(self.trunk_norm(x))
            enc = delta if enc is None else enc + delta
            outputs.append(self._activate(enc))
        return outputs


# -- DPT head (dpt.py) ----------------------------------------------------------------------------

ACTIVATIONS = {"exp": torch.exp, "inv_log": _inv_log, "relu": torch.relu,
               "sigmoid": torch.sigmoid, "linear": lambda y: y}
CONF_ACTIVATIONS = {"expp1": lambda c: 1 + torch.exp(c), "expp0": torch.exp,
                    "sigmoid": torch.sigmoid}


def _add_uv_embed(x: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """x `[N, C, h, w]` + the uv sinusoidal embedding for its own (C, h, w) (0.1 included).

    Channels [sin(u w_k), cos(u w_k), sin(v w_k), cos(v w_k)], w_k = 100^(-k/(C/4)), computed in
    float64 and added as float32 (as upstream, also in float64 runs). It is separable: a
    per-column and a per-row half, broadcast instead of materialised at full resolution.
    """
    _, c, h, w = x.shape
    q = c // 4
    omega = 100.0 ** (-np.arange(q) / q)
    grid = uv_grid(h, w, image_hw)

    def sincos(p):  # [L] -> [C/2, L]
        angle = p[:, None] * omega
        table = np.concatenate([np.sin(angle), np.cos(angle)], axis=-1).astype(np.float32)
        return torch.from_numpy(table * np.float32(0.1)).T.to(x.device)

    cols, rows = sincos(grid[0, :, 0]), sincos(grid[:, 0, 1])
    return x + torch.cat([cols[:, None, :].expand(-1, h, -1), rows[:, :, None].expand(-1, -1, w)])


def _resize(x, size):
    return F.interpolate(x, size=tuple(int(v) for v in size), mode="bilinear", align_corners=True)


class ResidualConvUnit(nn.Module):
    """conv2(relu(conv1(relu(x)))) + relu(x): the residual is relu(x) (upstream's in-place ReLU)."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = Conv2d(features, features, 3, padding=1)
        self.conv2 = Conv2d(features, features, 3, padding=1)

    def forward(self, x):
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FusionBlock(nn.Module):
    """out_conv(upsample(RCU2(x + RCU1(skip)), size)); no skip/RCU1 in the coarsest block."""

    def __init__(self, features: int, has_skip: bool):
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features) if has_skip else None
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = Conv2d(features, features, 1)

    def forward(self, x, skip=None, size=None):
        if self.resConfUnit1 is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        size = (2 * x.shape[2], 2 * x.shape[3]) if size is None else size
        return self.out_conv(_resize(x, size))


class DPTHead(nn.Module):
    """Dense prediction head (depth or world points, + confidence); frames decoded independently.

    `forward(tokens, image_hw, patch_start_idx, frames_chunk_size=None)`: tokens is the per-layer
    list of `[B, S, P, dim_in]` (indexed by `intermediate_layer_idx`). Returns (pred
    `[B, S, H, W, output_dim-1]` activated, conf `[B, S, H, W]`), or with `feature_only` the map
    before `output_conv2`, `[B, S, H/down, W/down, C1]`. Computes in float32 (float64 for float64
    parameters). `frames_chunk_size` decodes B*S frames in chunks (memory only, same values).
    """

    def __init__(self, cfg: DPTConfig):
        super().__init__()
        self.cfg = cfg
        f, oc = cfg.features, cfg.out_channels
        self.norm = LayerNorm(cfg.dim_in, eps=1e-5)
        self.projects = nn.ModuleList([Conv2d(cfg.dim_in, c, 1) for c in oc])
        # Pyramid at 4x, 2x, 1x, 1/2x patch resolution; slot 2 is an Identity (no keys).
        self.resize_layers = nn.ModuleList([
            ConvTranspose2d(oc[0], oc[0], 4, stride=4), ConvTranspose2d(oc[1], oc[1], 2, stride=2),
            nn.Identity(), Conv2d(oc[3], oc[3], 3, stride=2, padding=1)])
        self.scratch = nn.Module()  # a container: official keys `scratch.*`
        for j, c in enumerate(oc):
            setattr(self.scratch, f"layer{j + 1}_rn", Conv2d(c, f, 3, padding=1, bias=False))
        for j in range(4):
            setattr(self.scratch, f"refinenet{j + 1}", FusionBlock(f, has_skip=j < 3))
        if cfg.feature_only:
            self.scratch.output_conv1 = Conv2d(f, f, 3, padding=1)
        else:
            self.scratch.output_conv1 = Conv2d(f, f // 2, 3, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                Conv2d(f // 2, 32, 3, padding=1), nn.ReLU(), Conv2d(32, cfg.output_dim, 1))

    def _decode(self, levels: list[torch.Tensor], image_hw: tuple[int, int]) -> torch.Tensor:
        """levels 4 x `[N, h*w, dim_in]` -> `[N, C, H/down, W/down]` (raw logits, or features)."""
        cfg, sc = self.cfg, self.scratch
        h, w = image_hw[0] // cfg.patch_size, image_hw[1] // cfg.patch_size
        pyramid = []
        for j, x in enumerate(levels):
            if x.shape[1] != h * w:
                raise ValueError(f"DPTHead: {x.shape[1]} patch tokens per frame, but image "
                                 f"{tuple(image_hw)} has {h}x{w}; pass the tokens' image size "
                                 "and the aggregator's patch_start_idx")
            x = self.projects[j](self.norm(x).transpose(1, 2).reshape(x.shape[0], -1, h, w))
            if cfg.pos_embed:
                x = _add_uv_embed(x, image_hw)
            pyramid.append(getattr(sc, f"layer{j + 1}_rn")(self.resize_layers[j](x)))
        l1, l2, l3, l4 = pyramid
        out = sc.refinenet4(l4, size=l3.shape[2:])
        out = sc.refinenet3(out, l3, size=l2.shape[2:])
        out = sc.refinenet2(out, l2, size=l1.shape[2:])
        out = sc.output_conv1(sc.refinenet1(out, l1))
        scale = cfg.patch_size / cfg.down_ratio
        out = _resize(out, (int(h * scale), int(w * scale)))
        if cfg.pos_embed:
            out = _add_uv_embed(out, image_hw)
        return out if cfg.feature_only else sc.output_conv2(out)

    def forward(self, aggregated_tokens_list, image_hw: tuple[int, int], patch_start_idx: int,
                frames_chunk_size: int | None = None):
        cfg = self.cfg
        image_hw = tuple(int(v) for v in image_hw)
        dt = _stat(self.norm.weight.dtype)
        levels = []
        for i in cfg.intermediate_layer_idx:
            t = aggregated_tokens_list[i]
            if t.ndim != 4 or t.shape[-1] != cfg.dim_in:
                raise ValueError(f"DPTHead: aggregator layer {i} has shape {tuple(t.shape)}; "
                                 f"expected [B, S, P, {cfg.dim_in}]")
            levels.append(t[:, :, patch_start_idx:].to(dt).flatten(0, 1))  # fold S into batch
        b, s = aggregated_tokens_list[cfg.intermediate_layer_idx[0]].shape[:2]
        chunk = b * s if frames_chunk_size is None else max(1, int(frames_chunk_size))
        out = torch.cat([self._decode([lv[i:i + chunk] for lv in levels], image_hw)
                         for i in range(0, b * s, chunk)])
        out = out.permute(0, 2, 3, 1)  # channels-last, [B*S, H, W, C]
        out = out.reshape(b, s, *out.shape[1:])
        if cfg.feature_only:
            return out
        pred = ACTIVATIONS[cfg.activation](out[..., :-1])
        return pred, CONF_ACTIVATIONS[cfg.conf_activation](out[..., -1])
