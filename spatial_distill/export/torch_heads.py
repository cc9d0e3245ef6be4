"""PyTorch ports of the student's object head, detection head, slot grouping and word tags.

Eval-mode inference twins of the Flax pieces, for running an exported student without JAX:

    ObjectHead(cfg: ObjectHeadConfig, token_dim)   object_head.py (+ `cameras`, `split_features`)
    DetectionHead(cfg: DetHeadConfig, token_dim)   heads.py
    slots_group(...)                               slots.py `group`
    tags(...), keys(...)                           word_tags.py

Each matches its original in float32 to ~1e-6 (tests/test_torch_heads.py), including the
geometry it composes (`patch_centres`, `unproject_to_camera0`, `weighted_kabsch` from
geometry.py, `pose_encoding_to_extri_intri` from camera_head.py). Parameter names and layouts
are the Flax modules' `export_torch(prefix)` keys without the prefix, so
`load_export(module, flax_module.export_torch(prefix), prefix)` (or `load_state_dict(strict=True)`
on a parent holding the module as `prefix`) loads them. The configs are the Flax dataclasses.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spatial_distill.models.heads import DetHeadConfig
from spatial_distill.models.object_head import COLOUR_LOGIT_CLIP, ObjectHeadConfig
from spatial_distill.models.word_tags import WordTagConfig

_LN_EPS = 1e-6  # nnx.LayerNorm's default, not torch's 1e-5


def load_export(module: nn.Module, tensors: Mapping[str, np.ndarray], prefix: str) -> nn.Module:
    """Loads a Flax `export_torch(prefix)` dict into `module`, strictly: a missing, unexpected
    (including any key outside `prefix`) or mis-shaped key raises. Returns `module`."""
    p = f"{prefix}."
    module.load_state_dict({k.removeprefix(p): torch.from_numpy(np.array(v)) for k, v in tensors.items()},
                           strict=True)
    return module


# -- geometry (geometry.py, camera_head.py) -------------------------------------------------------
def patch_centres(h: int, w: int, patch: int) -> torch.Tensor:
    """`[h*w, 2]` pixel (u, v) of each patch's centre on an `h x w` grid, row-major."""
    u = torch.arange(w, dtype=torch.float32) * patch + (patch - 1) / 2
    v = torch.arange(h, dtype=torch.float32) * patch + (patch - 1) / 2
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return torch.stack([uu, vv], -1).reshape(-1, 2)


def quat_to_mat(quat: torch.Tensor) -> torch.Tensor:
    """Quaternion `[..., 4]` (x, y, z, w), not necessarily unit length -> rotation `[..., 3, 3]`."""
    x, y, z, w = quat.unbind(-1)
    s = 2.0 / (quat * quat).sum(-1)
    rows = [1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
            s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
            s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)]
    return torch.stack(rows, -1).reshape(*quat.shape[:-1], 3, 3)


def pose_encoding_to_extri_intri(pose_enc: torch.Tensor, image_hw: tuple[int, int]):
    """pose_enc `[..., 9]` -> (camera-from-world extrinsics `[..., 3, 4]`, intrinsics
    `[..., 3, 3]` with the principal point at (W/2, H/2), VGGT's convention)."""
    h, w = float(image_hw[0]), float(image_hw[1])
    extrinsics = torch.cat([quat_to_mat(pose_enc[..., 3:7]), pose_enc[..., :3, None]], -1)
    fy = (h / 2.0) / torch.tan(pose_enc[..., 7] / 2.0)
    fx = (w / 2.0) / torch.tan(pose_enc[..., 8] / 2.0)
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    intrinsics = torch.stack([fx, zero, zero + w / 2.0, zero, fy, zero + h / 2.0, zero, zero, one],
                             -1).reshape(*fx.shape, 3, 3)
    return extrinsics, intrinsics


def unproject_to_camera0(uv: torch.Tensor, z: torch.Tensor, extrinsics: torch.Tensor,
                         intrinsics: torch.Tensor) -> torch.Tensor:
    """Pixels uv `[B, S, M, 2]` of view s at depth z `[B, S, M]` -> camera 0's OpenCV frame
    `[B, S, M, 3]`, with extrinsics `[B, S, 3, 4]` (camera-s-from-camera-0), intrinsics
    `[B, S, 3, 3]`."""
    k = intrinsics[:, :, None]
    x = (uv[..., 0] - k[..., 0, 2]) / k[..., 0, 0] * z
    y = (uv[..., 1] - k[..., 1, 2]) / k[..., 1, 1] * z
    cam = torch.stack([x, y, z], -1)
    rot, t = extrinsics[..., :3], extrinsics[..., 3]
    return torch.einsum("bsmj,bsji->bsmi", cam - t[:, :, None], rot)


def weighted_kabsch(src: torch.Tensor, dst: torch.Tensor, weights: torch.Tensor,
                    prior: torch.Tensor | None = None, prior_weight: float = 0.0):
    """Rigid (R `[B, 3, 3]`, t `[B, 3]`, total weight `[B]`) minimising Σ w_mn |R src_m + t − dst_n|²
    for src `[B, M, 3]`, dst `[B, N, 3]`, weights `[B, M, N]`, pulled towards `prior` `[B, 3, 3]`
    by `prior_weight` (relative to the cross-covariance's size), as `geometry.weighted_kabsch`."""
    src, dst, weights = (x.detach().float() for x in (src, dst, weights))
    total = weights.sum((1, 2))
    safe = total.clamp_min(1e-9)[:, None]
    mu_src = torch.einsum("bmn,bmk->bk", weights, src) / safe
    mu_dst = torch.einsum("bmn,bnk->bk", weights, dst) / safe
    h = torch.einsum("bmn,bmi,bnj->bij", weights, src - mu_src[:, None], dst - mu_dst[:, None])
    if prior is not None:
        scale = torch.sqrt((h ** 2).sum((1, 2)))[:, None, None] + 1e-12
        h = h + prior_weight * scale * prior.detach().transpose(1, 2)
    # R = V diag(1, 1, det(V Uᵀ)) Uᵀ is the same for either sign of each singular vector pair
    # (u_i, v_i), so torch's and LAPACK-via-JAX's differing SVD signs give the same R; a zero
    # determinant gives sign 0, as in JAX.
    u, _, vt = torch.linalg.svd(h)
    d = torch.sign(torch.linalg.det(u @ vt))
    fix = torch.diag_embed(torch.stack([torch.ones_like(d), torch.ones_like(d), d], -1))
    rot = torch.einsum("bji,bjk,blk->bil", vt, fix, u)
    return rot, mu_dst - torch.einsum("bij,bj->bi", rot, mu_src), total


# -- object head (object_head.py) ---------------------------------------------------------------
def cameras(pose_enc: torch.Tensor, image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pose encoding `[B, S, 9]` -> (camera-from-camera-0 extrinsics `[B, S, 3, 4]`, intrinsics
    `[B, S, 3, 3]`) with the principal point at the data's ((W−1)/2, (H−1)/2) and view 0's
    extrinsics the identity (`object_head.cameras`)."""
    extrinsics, intrinsics = pose_encoding_to_extri_intri(pose_enc, image_hw)
    intrinsics[..., 0, 2] = (image_hw[1] - 1) / 2
    intrinsics[..., 1, 2] = (image_hw[0] - 1) / 2
    extrinsics[:, 0] = torch.eye(3, 4, dtype=extrinsics.dtype, device=extrinsics.device)
    return extrinsics, intrinsics


def split_features(fields: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """`ObjectHead.features` `[..., num_features]` -> objectness `[...]`, class_probs `[..., C]`,
    colour (sigmoid of the carried logits) `[..., 3]`, centre `[..., 3]`."""
    c = num_classes
    return {"objectness": fields[..., 0], "class_probs": fields[..., 1:1 + c],
            "colour": torch.sigmoid(fields[..., 1 + c:4 + c]), "centre": fields[..., 4 + c:7 + c]}


class ObjectHead(nn.Module):
    """Per-patch object predictions from aggregator patch tokens (`object_head.ObjectHead`)."""

    def __init__(self, cfg: ObjectHeadConfig, token_dim: int):
        super().__init__()
        self.cfg = cfg
        self.norm = nn.LayerNorm(token_dim, eps=_LN_EPS)
        self.fc1 = nn.Linear(token_dim, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.num_raw)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches `[B, S, h*w, token_dim]` -> raw outputs `[B, S, h*w, num_raw]` (float32)."""
        x = F.gelu(self.fc1(self.norm(patches.float())))
        return self.out(F.gelu(self.fc2(x)))

    def split(self, raw: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw channels by name: objectness `[...]`, class_logits `[..., C]`, colour_logits
        `[..., 3]`, offset `[..., 2]` (patch units), log_z `[...]`, log_size `[..., 3]`, yaw2 `[..., 2]`."""
        c = self.cfg.num_classes
        return {"objectness": raw[..., 0], "class_logits": raw[..., 1:1 + c],
                "colour_logits": raw[..., 1 + c:4 + c], "offset": raw[..., 4 + c:6 + c],
                "log_z": raw[..., 6 + c], "log_size": raw[..., 7 + c:10 + c],
                "yaw2": raw[..., 10 + c:12 + c]}

    def _view_points(self, parts, grid_hw, patch):
        """Each patch's object centre projection uv `[B, S, h*w, 2]` and depth `[B, S, h*w]`."""
        uv = patch_centres(*grid_hw, patch).to(parts["offset"]) + patch * parts["offset"]
        return uv, torch.exp(parts["log_z"].clamp(-7.0, 5.0))  # the Flax head's exp clamp

    def centres(self, raw: torch.Tensor, extrinsics: torch.Tensor, intrinsics: torch.Tensor,
                grid_hw: tuple[int, int], patch: int) -> torch.Tensor:
        """Each patch's object centre in camera 0's frame `[B, S, h*w, 3]`, with extrinsics
        `[B, S, 3, 4]` (camera-from-camera-0) and intrinsics `[B, S, 3, 3]`."""
        uv, z = self._view_points(self.split(raw), grid_hw, patch)
        return unproject_to_camera0(uv, z, extrinsics, intrinsics)

    def register_views(self, raw: torch.Tensor, extrinsics: torch.Tensor, intrinsics: torch.Tensor,
                       grid_hw: tuple[int, int], patch: int, *, min_weight: float = 1.0) -> torch.Tensor:
        """Extrinsics `[B, S, 3, 4]` registering each view's object centres onto view 0's by
        soft matches (objectness x colour x class) and a weighted Kabsch fit pulled towards the
        given extrinsics; views with match weight below `min_weight` keep the given ones."""
        parts = {k: v.detach() for k, v in self.split(raw).items()}
        b, s, _ = parts["log_z"].shape
        uv, z = self._view_points(parts, grid_hw, patch)
        own = torch.eye(3, 4, dtype=torch.float32, device=raw.device).expand(b, s, 3, 4)
        local = unproject_to_camera0(uv, z, own, intrinsics)  # each view's own frame
        obj = torch.sigmoid(parts["objectness"])
        colour = torch.sigmoid(parts["colour_logits"])
        cls = torch.softmax(parts["class_logits"], -1)
        out = [extrinsics[:, 0]]
        for v in range(1, s):
            d2 = ((colour[:, v, :, None] - colour[:, 0, None]) ** 2).sum(-1)
            w = (obj[:, v, :, None] * obj[:, 0, None] * torch.exp(-d2 / self.cfg.match_colour_scale ** 2)
                 * torch.einsum("bmc,bnc->bmn", cls[:, v], cls[:, 0]))
            prior = extrinsics[:, v, :, :3].transpose(1, 2)  # camera-0-from-view rotation
            rot, t, total = weighted_kabsch(local[:, v], local[:, 0], w, prior=prior, prior_weight=1e-3)
            # x_0 = R x_v + t  ->  extrinsics [Rᵀ | −Rᵀ t]
            ext = torch.cat([rot.transpose(1, 2), -torch.einsum("bji,bj->bi", rot, t)[..., None]], -1)
            out.append(torch.where((total >= min_weight)[:, None, None], ext, extrinsics[:, v]))
        return torch.stack(out, 1)

    def features(self, raw: torch.Tensor, pose_enc: torch.Tensor, image_hw: tuple[int, int],
                 patch: int) -> torch.Tensor:
        """`[B, S, h*w, num_features]`: objectness probability, class probabilities, clipped
        colour logits, centre (camera 0), log size, (cos 2ψ, sin 2ψ), with cameras from the pose
        encoding `[B, S, 9]` (registered on view 0's objects with `cfg.register_views`)."""
        parts = self.split(raw)
        extrinsics, intrinsics = cameras(pose_enc, image_hw)
        grid = (image_hw[0] // patch, image_hw[1] // patch)
        if self.cfg.register_views:
            extrinsics = self.register_views(raw, extrinsics, intrinsics, grid, patch)
        centre = self.centres(raw, extrinsics, intrinsics, grid, patch)
        return torch.cat([
            torch.sigmoid(parts["objectness"])[..., None], torch.softmax(parts["class_logits"], -1),
            parts["colour_logits"].clamp(-COLOUR_LOGIT_CLIP, COLOUR_LOGIT_CLIP), centre,
            parts["log_size"], parts["yaw2"]], -1)


# -- detection head (heads.py) ---------------------------------------------------------------------
class _MultiHeadAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, context, context_mask=None):
        """x `[B, Nq, D]`, context `[B, N, D]`, context_mask `[B, N]` bool (True: visible)."""
        b, n, d = x.shape
        heads = lambda t: t.reshape(b, t.shape[1], self.num_heads, -1).transpose(1, 2)
        q, k, v = heads(self.q(x)), heads(self.k(context)), heads(self.v(context))
        logits = (q @ k.transpose(-1, -2)) * (d // self.num_heads) ** -0.5
        if context_mask is not None:
            visible = context_mask[:, None, None, :]
            logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, -1)
        if context_mask is not None:  # a query that sees no key attends to nothing (kernels.attention)
            probs = probs * visible.any(-1, keepdim=True)
        return self.o((probs @ v).transpose(1, 2).reshape(b, n, d))


class _DecoderLayer(nn.Module):
    def __init__(self, cfg: DetHeadConfig):
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_mlp = (nn.LayerNorm(cfg.dim, eps=_LN_EPS) for _ in range(3))
        self.self_attn = _MultiHeadAttention(cfg.dim, cfg.num_heads)
        self.cross_attn = _MultiHeadAttention(cfg.dim, cfg.num_heads)
        self.fc1 = nn.Linear(cfg.dim, int(cfg.dim * cfg.mlp_ratio))
        self.fc2 = nn.Linear(int(cfg.dim * cfg.mlp_ratio), cfg.dim)

    def forward(self, q, memory, memory_mask=None):
        h = self.norm_self(q)
        q = q + self.self_attn(h, h)
        q = q + self.cross_attn(self.norm_cross(q), memory, memory_mask)
        return q + self.fc2(F.gelu(self.fc1(self.norm_mlp(q))))


class DetectionHead(nn.Module):
    """DETR-style class logits and 3D boxes from patch tokens (`heads.DetectionHead`)."""

    def __init__(self, cfg: DetHeadConfig, token_dim: int):
        super().__init__()
        self.cfg = cfg
        self.input_proj = nn.Linear(token_dim, cfg.dim)
        self.input_norm = nn.LayerNorm(cfg.dim, eps=_LN_EPS)
        self.queries = nn.Embedding(cfg.num_queries, cfg.dim)
        self.layers = nn.ModuleList([_DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.out_norm = nn.LayerNorm(cfg.dim, eps=_LN_EPS)
        self.class_out = nn.Linear(cfg.dim, cfg.num_classes + 1)
        self.box_hidden = nn.Linear(cfg.dim, cfg.dim)
        self.box_out = nn.Linear(cfg.dim, 8)  # 3 centre + 3 log-size + (sin, cos) of yaw

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None):
        """tokens `[B, N, token_dim]`, token_mask `[B, N]` bool -> (logits
        `[B, Nq, num_classes + 1]`, boxes `[B, Nq, 7]` = centre, size, yaw) in float32."""
        memory = self.input_norm(self.input_proj(tokens.float()))
        q = self.queries.weight.expand(tokens.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, memory, token_mask)
        q = self.out_norm(q)
        raw = self.box_out(F.gelu(self.box_hidden(q)))
        size = F.softplus(raw[..., 3:6]) + 1e-3
        yaw = torch.atan2(raw[..., 6], raw[..., 7] + 1.0)
        return self.class_out(q), torch.cat([raw[..., 0:3], size, yaw[..., None]], -1)


# -- slots (slots.py) ---------------------------------------------------------------------------
def slots_group(objectness: torch.Tensor, centres: torch.Tensor, colours: torch.Tensor,
                classes: torch.Tensor, k: int, *, radius: float, colour_scale: float,
                min_objectness: float) -> torch.Tensor:
    """Slot membership weights `[B, k, P]` (rows sum to 1, or 0 for an empty slot) from
    objectness `[B, P]`, centres `[B, P, 3]`, colours `[B, P, 3]`, class probabilities
    `[B, P, C]`: greedy NMS-like grouping (`slots.group`)."""
    objectness, centres, colours, classes = (x.detach() for x in (objectness, centres, colours, classes))
    label = classes.argmax(-1)
    free = torch.ones_like(objectness, dtype=torch.bool)
    batch, index = (torch.arange(n, device=objectness.device) for n in objectness.shape)
    rows = []
    for _ in range(k):
        # argmax takes the first maximum in torch as in JAX, so ties seed the same patch.
        seed = torch.where(free, objectness, -1.0).argmax(-1)  # [B]
        at_seed = lambda x: x[batch, seed][:, None]
        valid = (at_seed(objectness) >= min_objectness) & at_seed(free)
        near = ((centres - at_seed(centres)) ** 2).sum(-1) <= radius ** 2
        alike = ((colours - at_seed(colours)) ** 2).sum(-1) <= colour_scale ** 2
        member = free & valid & near & alike & (label == at_seed(label))
        member = member | (valid & (index == seed[:, None]))  # the seed joins its slot
        w = torch.where(member, objectness, 0.0)
        rows.append(w / w.sum(-1, keepdim=True).clamp_min(1e-12))
        free = free & ~member
    return torch.stack(rows, 1)


# -- word tags (word_tags.py) -------------------------------------------------------------------
def _mean_embeddings(embedding: torch.Tensor, groups: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """`[N, D]` float32: each group's mean embedding row."""
    width = max(len(g) for g in groups)
    idx = torch.tensor([g + (g[0],) * (width - len(g)) for g in groups], device=embedding.device)
    weight = torch.tensor([[1.0 / len(g)] * len(g) + [0.0] * (width - len(g)) for g in groups],
                          dtype=torch.float32, device=embedding.device)
    return torch.einsum("nw,nwd->nd", weight, embedding[idx].float())


def _words(class_probs: torch.Tensor, rgb: torch.Tensor, embedding: torch.Tensor,
           cfg: WordTagConfig) -> torch.Tensor:
    """Expected embedding `[B, N, D]` of the words naming each token's class and colour."""
    out = torch.einsum("bnc,cd->bnd", class_probs.float(), _mean_embeddings(embedding, cfg.class_ids))
    if cfg.colour_ids:
        proto = torch.tensor(cfg.colour_prototypes, dtype=torch.float32, device=rgb.device)
        d2 = ((rgb[..., None, :] - proto) ** 2).sum(-1)
        out = out + torch.einsum("bnk,kd->bnd", torch.softmax(-d2 / cfg.colour_temperature, -1),
                                 _mean_embeddings(embedding, cfg.colour_ids))
    return out


def tags(objectness: torch.Tensor, class_probs: torch.Tensor, rgb: torch.Tensor,
         embedding: torch.Tensor, cfg: WordTagConfig) -> torch.Tensor:
    """objectness `[B, N]`, class_probs `[B, N, C]`, rgb `[B, N, 3]` in [0, 1], the decoder's
    embedding `[V, D]` -> tags `[B, N, D]` (float32): `gain * objectness * words`."""
    return cfg.gain * objectness[..., None] * _words(class_probs, rgb, embedding, cfg)


def keys(objectness: torch.Tensor, class_probs: torch.Tensor, rgb: torch.Tensor,
         embedding: torch.Tensor, cfg: WordTagConfig) -> torch.Tensor:
    """Retrieval keys `[B, N, D]` (inputs as `tags`): `objectness * words / |words|`."""
    w = _words(class_probs, rgb, embedding, cfg)
    return objectness[..., None] * w * torch.rsqrt((w ** 2).sum(-1, keepdim=True) + 1e-12)
