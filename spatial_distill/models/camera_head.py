"""VGGT's camera head and the "absT_quaR_FoV" pose encoding.

Spec: `shared/reference/vggt.md` §4 and pitfall 8. The camera token of the last aggregator layer
is refined over a few iterations: the current (raw) 9-d encoding is embedded and modulates the
token adaLN-style, a transformer trunk attends across the frames of each sequence, and a small MLP
predicts an additive update. Each iteration emits the activated encoding.

Pose encoding `[..., 9]` = [tx, ty, tz, qx, qy, qz, qw, fov_h, fov_w]: translation and quaternion
(scalar last) of the camera-from-world extrinsic (OpenCV axes: x right, y down, z forward) and the
vertical / horizontal fields of view, with the principal point at the image centre.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_distill.models.state_dict import StateDict
from spatial_distill.models.vit_layers import Block, dense, export_layernorm, layer_norm, stat_dtype
from spatial_distill.sharding import constrain

POSE_DIM = 9  # absT_quaR_FoV: 3 translation + 4 quaternion + 2 field of view

POSE_ACTIVATIONS = {
    "linear": lambda x: x,
    "relu": jax.nn.relu,
    "exp": jnp.exp,
    "inv_log": lambda x: jnp.sign(x) * jnp.expm1(jnp.abs(x)),
}


@dataclasses.dataclass(frozen=True)
class CameraHeadConfig:
    """Constructor arguments of upstream's CameraHead (keys of the fixture's `camera_head` dict)."""

    dim_in: int = 2048  # width of the aggregator tokens (2 x embed_dim)
    trunk_depth: int = 4  # transformer blocks per refinement iteration (shared across iterations)
    pose_encoding_type: str = "absT_quaR_FoV"  # the only encoding upstream defines
    num_heads: int = 16  # trunk attention heads
    mlp_ratio: float = 4  # trunk MLP width / dim_in
    init_values: float = 0.01  # LayerScale initial value of the trunk blocks
    trans_act: str = "linear"  # activation of the 3 translation entries
    quat_act: str = "linear"  # activation of the 4 quaternion entries (not normalised)
    fl_act: str = "relu"  # activation of the 2 field-of-view entries

    def __post_init__(self):
        if self.pose_encoding_type != "absT_quaR_FoV":
            raise ValueError(
                f"CameraHeadConfig.pose_encoding_type={self.pose_encoding_type!r}: only "
                "'absT_quaR_FoV' is defined"
            )
        for field in ("trans_act", "quat_act", "fl_act"):
            if getattr(self, field) not in POSE_ACTIVATIONS:
                raise ValueError(
                    f"CameraHeadConfig.{field}={getattr(self, field)!r}; choose one of "
                    f"{sorted(POSE_ACTIVATIONS)}"
                )
        if self.dim_in % self.num_heads:
            raise ValueError(
                f"CameraHeadConfig: dim_in {self.dim_in} is not divisible by num_heads "
                f"{self.num_heads}"
            )

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CameraHeadConfig:
        """From a dict with upstream's argument names (e.g. config.json["camera_head"])."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(
                f"CameraHeadConfig.from_json: unknown keys {unknown}; known keys are "
                f"{sorted(fields)}"
            )
        return cls(**d)


def activate_pose(enc: jax.Array, cfg: CameraHeadConfig) -> jax.Array:
    """Raw encoding `[..., 9]` -> emitted encoding (per-part activations of the config)."""
    return jnp.concatenate([
        POSE_ACTIVATIONS[cfg.trans_act](enc[..., :3]),
        POSE_ACTIVATIONS[cfg.quat_act](enc[..., 3:7]),
        POSE_ACTIVATIONS[cfg.fl_act](enc[..., 7:]),
    ], axis=-1)


class CameraHead(nnx.Module):
    """Iterative pose regressor over the camera tokens of the last aggregator layer.

    Attribute names follow the official module paths except `pose_fc{1,2}` (upstream
    `pose_branch.fc{1,2}`) and `adaln_norm`, which has no parameters.
    """

    def __init__(self, cfg: CameraHeadConfig, *, param_dtype=jnp.float32, attention_impl: str = "xla",
                 rngs: nnx.Rngs):
        self.cfg = cfg
        dim, pd = cfg.dim_in, param_dtype
        # float32 whatever dtype the aggregator ran in; float64 parameters give a float64 head.
        self.dtype = dt = stat_dtype(param_dtype)
        kw = dict(dtype=dt, param_dtype=pd, rngs=rngs)
        self.token_norm = layer_norm(dim, 1e-5, dt, pd, rngs)
        self.trunk = nnx.List([
            Block(dim, cfg.num_heads, cfg.mlp_ratio, init_values=cfg.init_values, norm_eps=1e-5,
                  attention_impl=attention_impl, **kw)
            for _ in range(cfg.trunk_depth)
        ])
        self.trunk_norm = layer_norm(dim, 1e-5, dt, pd, rngs)
        self.adaln_norm = layer_norm(dim, 1e-6, dt, pd, rngs, affine=False)
        self.empty_pose_tokens = nnx.Param(
            nnx.with_partitioning(nnx.initializers.zeros_init(), (None, None, None))(
                rngs.params(), (1, 1, POSE_DIM), pd))
        self.embed_pose = dense(POSE_DIM, dim, (None, "embed"), **kw)
        self.poseLN_modulation = dense(dim, 3 * dim, ("embed", "mlp"), **kw)
        self.pose_fc1 = dense(dim, dim // 2, ("embed", "mlp"), **kw)
        self.pose_fc2 = dense(dim // 2, POSE_DIM, ("mlp", None), **kw)

    def __call__(self, tokens: Sequence[jax.Array], num_iterations: int = 4) -> list[jax.Array]:
        """tokens: per-layer aggregator outputs `[B, S, P, dim_in]` (the last layer is read).

        Returns `num_iterations` activated pose encodings `[B, S, 9]`, the last one final.
        """
        last = tokens[-1]
        if last.ndim != 4 or last.shape[-1] != self.cfg.dim_in:
            raise ValueError(
                f"CameraHead: last aggregator layer has shape {last.shape}; expected [B, S, P, "
                f"{self.cfg.dim_in}] (dim_in of the config)"
            )
        t = last[:, :, 0].astype(self.dtype)  # camera token, [B, S, C]
        t = constrain(t, ("activation_batch", "activation_length", "activation_embed"))
        t = self.token_norm(t)
        t_ln = self.adaln_norm(t)  # fixed across iterations
        enc = None
        outputs = []
        for _ in range(num_iterations):
            if enc is None:
                cond = jnp.broadcast_to(self.empty_pose_tokens.get_value().astype(self.dtype),
                                        (*t.shape[:2], POSE_DIM))
            else:
                # Upstream detaches the fed-back encoding: no gradient through the recursion.
                cond = jax.lax.stop_gradient(enc)
            mod = self.poseLN_modulation(jax.nn.silu(self.embed_pose(cond)))
            shift, scale, gate = jnp.split(mod, 3, axis=-1)
            x = gate * (t_ln * (1 + scale) + shift) + t
            for block in self.trunk:
                x = block(x)  # attention across the S frames of each sequence
            y = self.trunk_norm(x)
            delta = self.pose_fc2(jax.nn.gelu(self.pose_fc1(y), approximate=False))
            enc = delta if enc is None else enc + delta
            outputs.append(activate_pose(enc, self.cfg))
        return outputs

    # -- official checkpoint ---------------------------------------------------------------------
    def load_torch(self, sd: StateDict, prefix: str) -> None:
        """Fills every parameter from official keys under `prefix` (e.g. "camera_head").

        Problems are recorded in `sd`; the caller's `sd.finish()` reports them all at once.
        """
        p = f"{prefix}."
        sd.layernorm(self.token_norm, f"{p}token_norm")
        for i, block in enumerate(self.trunk):
            block.load_torch(sd, f"{p}trunk.{i}")
        sd.layernorm(self.trunk_norm, f"{p}trunk_norm")
        sd.assign(self.empty_pose_tokens, f"{p}empty_pose_tokens")
        sd.linear(self.embed_pose, f"{p}embed_pose")
        sd.linear(self.poseLN_modulation, f"{p}poseLN_modulation.1")  # .0 is the SiLU
        sd.linear(self.pose_fc1, f"{p}pose_branch.fc1")
        sd.linear(self.pose_fc2, f"{p}pose_branch.fc2")

    def export_torch(self, prefix: str) -> dict[str, np.ndarray]:
        """Official key -> numpy tensor in torch layout (upstream's key order)."""
        p = f"{prefix}."

        def linear(m, key):
            return {f"{key}.weight": np.asarray(m.kernel.get_value()).T,
                    f"{key}.bias": np.asarray(m.bias.get_value())}

        out = {f"{p}empty_pose_tokens": np.asarray(self.empty_pose_tokens.get_value())}
        for i, block in enumerate(self.trunk):
            out.update(block.export_torch(f"{p}trunk.{i}"))
        out.update(export_layernorm(self.token_norm, f"{p}token_norm"))
        out.update(export_layernorm(self.trunk_norm, f"{p}trunk_norm"))
        out.update(linear(self.embed_pose, f"{p}embed_pose"))
        out.update(linear(self.poseLN_modulation, f"{p}poseLN_modulation.1"))
        out.update(linear(self.pose_fc1, f"{p}pose_branch.fc1"))
        out.update(linear(self.pose_fc2, f"{p}pose_branch.fc2"))
        return out


# ------------------------------------------------------------------------------------------------
# pose encoding <-> camera matrices (pure, jittable, any leading batch axes)


def quat_to_mat(quat: jax.Array) -> jax.Array:
    """Quaternion `[..., 4]` (x, y, z, w) -> rotation `[..., 3, 3]`. Need not be unit length."""
    x, y, z, w = jnp.moveaxis(quat, -1, 0)
    s = 2.0 / jnp.sum(quat * quat, axis=-1)  # dividing by |q|^2 tolerates unnormalised output
    rows = [
        1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
        s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
        s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
    ]
    return jnp.stack(rows, axis=-1).reshape(*quat.shape[:-1], 3, 3)


def mat_to_quat(rot: jax.Array) -> jax.Array:
    """Rotation `[..., 3, 3]` -> unit quaternion `[..., 4]` (x, y, z, w) with w >= 0.

    Each of the four components can anchor the solution (4 q_i^2 is read off the diagonal, the
    others from sums/differences of off-diagonal pairs); the largest q_i^2 is picked, so no
    division by a near-zero component happens for any rotation.
    """
    m = [[rot[..., i, j] for j in range(3)] for i in range(3)]
    tr = (m[0][0], m[1][1], m[2][2])
    four_sq = jnp.stack([  # 4 q_i^2 for (x, y, z, w)
        1 + tr[0] - tr[1] - tr[2], 1 - tr[0] + tr[1] - tr[2], 1 - tr[0] - tr[1] + tr[2],
        1 + tr[0] + tr[1] + tr[2],
    ], axis=-1)
    xy, xz, yz = m[0][1] + m[1][0], m[0][2] + m[2][0], m[1][2] + m[2][1]
    wx, wy, wz = m[2][1] - m[1][2], m[0][2] - m[2][0], m[1][0] - m[0][1]
    # Row i holds 4 q_i * q (x, y, z, w): 4 q_i q_j from the matrix for j != i.
    products = jnp.stack([
        jnp.stack([four_sq[..., 0], xy, xz, wx], -1),
        jnp.stack([xy, four_sq[..., 1], yz, wy], -1),
        jnp.stack([xz, yz, four_sq[..., 2], wz], -1),
        jnp.stack([wx, wy, wz, four_sq[..., 3]], -1),
    ], axis=-2)
    best = jnp.argmax(four_sq, axis=-1)[..., None, None]
    row = jnp.take_along_axis(products, best, axis=-2)[..., 0, :]
    anchor = jnp.take_along_axis(four_sq, best[..., 0], axis=-1)
    q = row / (2.0 * jnp.sqrt(jnp.maximum(anchor, 1e-12)))
    return jnp.where(q[..., 3:] < 0, -q, q)


def pose_encoding_to_extri_intri(pose_enc: jax.Array, image_hw: tuple[int, int]):
    """pose_enc `[..., 9]` -> (extrinsics `[..., 3, 4]`, intrinsics `[..., 3, 3]`).

    Extrinsics are camera-from-world. Works for any leading axes (e.g. `[B, S, 9]`); image_hw is
    the (H, W) the FoVs refer to.
    """
    if pose_enc.shape[-1] != POSE_DIM:
        raise ValueError(f"pose_enc has shape {pose_enc.shape}; the last axis must be {POSE_DIM}")
    h, w = float(image_hw[0]), float(image_hw[1])
    rot = quat_to_mat(pose_enc[..., 3:7])
    extrinsics = jnp.concatenate([rot, pose_enc[..., :3, None]], axis=-1)
    fy = (h / 2.0) / jnp.tan(pose_enc[..., 7] / 2.0)
    fx = (w / 2.0) / jnp.tan(pose_enc[..., 8] / 2.0)
    zero, one = jnp.zeros_like(fx), jnp.ones_like(fx)
    intrinsics = jnp.stack([
        fx, zero, zero + w / 2.0,
        zero, fy, zero + h / 2.0,
        zero, zero, one,
    ], axis=-1).reshape(*fx.shape, 3, 3)
    return extrinsics, intrinsics


def extri_intri_to_pose_encoding(extrinsics: jax.Array, intrinsics: jax.Array,
                                 image_hw: tuple[int, int]) -> jax.Array:
    """(extrinsics `[..., 3, 4]` camera-from-world, intrinsics `[..., 3, 3]`) -> `[..., 9]`.

    Only the focal lengths of the intrinsics are used: the encoding assumes a centred principal
    point. The quaternion comes out unit length with w >= 0.
    """
    if extrinsics.shape[-2:] != (3, 4) or intrinsics.shape[-2:] != (3, 3):
        raise ValueError(
            f"extrinsics {extrinsics.shape} / intrinsics {intrinsics.shape} must end in "
            "(3, 4) / (3, 3)"
        )
    h, w = float(image_hw[0]), float(image_hw[1])
    quat = mat_to_quat(extrinsics[..., :3, :3])
    fov_h = 2.0 * jnp.arctan((h / 2.0) / intrinsics[..., 1, 1])
    fov_w = 2.0 * jnp.arctan((w / 2.0) / intrinsics[..., 0, 0])
    trans = extrinsics[..., :3, 3]
    return jnp.concatenate([trans, quat, fov_h[..., None], fov_w[..., None]], axis=-1)
