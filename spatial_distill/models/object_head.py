"""The object head: what object each VGGT patch token sees, and where it is in camera 0's frame.

A dense alternative to DETR queries, read per patch like VGGT's own dense heads: every patch token
of every view predicts whether it sees an object, that object's class and colour, and the
object's 3D box. Dense targets need no set matching, so the head learns in a few thousand steps
where a DETR head from scratch sits on its no-object plateau (docs/learning.md).

Positions are predicted the way VGGT predicts geometry, as image-space quantities of the view the
patch belongs to, then composed with the (predicted) camera: the offset `(du, dv)` from the patch
centre to the object centre's projection, in patch units, and the log depth of the object centre
in that view. `decode` unprojects them with the camera head's intrinsics and camera-from-camera-0
extrinsics into camera 0's OpenCV frame (`geometry.unproject_to_camera0`). Sizes and orientation
(cos 2ψ, sin 2ψ, ψ = yaw − camera 0's heading) are view-independent and regressed directly.

Raw output channels (`RAW`): objectness logit, class logits [C], colour logits [3], du, dv,
log z, log dx, log dy, log dz, cos 2ψ, sin 2ψ.

`features(...)` is what the student's vision tokens carry beside the patch features:
objectness probability, class probabilities, colour logits (clipped to ±`COLOUR_LOGIT_CLIP`),
centre (camera 0), log size, (cos 2ψ, sin 2ψ). Colour goes in as logits, not as the [0, 1] colour:
observed (shaded) colours span only ~0.1–0.55, so two objects' colours differ by ~0.15 beside
centres that differ by metres, and a decoder trained from scratch needs hundreds of steps to grow
projector weights large enough to tell them apart; logits spread them ~5x wider. In the
readout probe on exact fields this cut the referred-object centre error at step 400 from 0.52 m
to 0.35 m (docs/learning.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_distill import geometry
from spatial_distill.models.camera_head import pose_encoding_to_extri_intri
from spatial_distill.models.state_dict import StateDict
from spatial_distill.models.vit_layers import export_layernorm
from spatial_distill.sharding import constrain

COLOUR_LOGIT_CLIP = 6.0  # sigmoid(6) = 0.998: any colour, without unbounded inputs


@dataclasses.dataclass(frozen=True)
class ObjectHeadConfig:
    num_classes: int = 3
    hidden: int = 256  # MLP width
    # Place views 1.. by registering their object centres onto view 0's (`register_views`)
    # instead of with the camera head's extrinsics alone.
    register_views: bool = False
    match_colour_scale: float = 0.1  # colour distance at which a match weighs e^-1

    def __post_init__(self):
        if self.num_classes < 1 or self.hidden < 1:
            raise ValueError(f"ObjectHeadConfig: num_classes = {self.num_classes} and hidden = "
                             f"{self.hidden} must be >= 1")

    @property
    def num_raw(self) -> int:
        return 1 + self.num_classes + 3 + 2 + 1 + 3 + 2

    @property
    def num_features(self) -> int:
        return 1 + self.num_classes + 3 + geometry.NUM_ATTRIBUTES


def _dense(din, dout, names, rngs):
    return nnx.Linear(din, dout, rngs=rngs,
                      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
                      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)))


def cameras(pose_enc: jax.Array, image_hw: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """The camera head's pose encoding `[B, S, 9]` -> (camera-from-camera-0 extrinsics
    `[B, S, 3, 4]`, intrinsics `[B, S, 3, 3]`) in the data's pixel convention.

    VGGT's encoding puts the principal point at (W/2, H/2); the canonical samples put pixel
    centres at integers (OpenCV), where the image centre is ((W−1)/2, (H−1)/2). Half a pixel is
    ~2 cm at the tiny preset's 112 px and 3 m, so the centre is moved to the data's convention.
    View 0's extrinsics are the identity by definition of the frame, whatever the head says.
    """
    extrinsics, intrinsics = pose_encoding_to_extri_intri(pose_enc, image_hw)
    intrinsics = intrinsics.at[..., 0, 2].set((image_hw[1] - 1) / 2).at[..., 1, 2].set((image_hw[0] - 1) / 2)
    extrinsics = extrinsics.at[:, 0].set(jnp.eye(3, 4, dtype=extrinsics.dtype))
    return extrinsics, intrinsics


def split_features(fields: jax.Array, num_classes: int) -> dict[str, jax.Array]:
    """`ObjectHead.features` output `[..., num_features]` by name: objectness `[...]`, class
    probabilities `[..., C]`, colour (in [0, 1], from the logits the fields carry) `[..., 3]`,
    centre `[..., 3]`."""
    c = num_classes
    return {"objectness": fields[..., 0], "class_probs": fields[..., 1:1 + c],
            "colour": jax.nn.sigmoid(fields[..., 1 + c:4 + c]), "centre": fields[..., 4 + c:7 + c]}


class ObjectHead(nnx.Module):
    """Per-patch object predictions from aggregator patch tokens."""

    def __init__(self, cfg: ObjectHeadConfig, token_dim: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.norm = nnx.LayerNorm(token_dim, rngs=rngs,
                                  scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                                  bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)))
        self.fc1 = _dense(token_dim, cfg.hidden, ("embed", "mlp"), rngs)
        self.fc2 = _dense(cfg.hidden, cfg.hidden, ("mlp", "embed"), rngs)
        self.out = _dense(cfg.hidden, cfg.num_raw, ("embed", None), rngs)

    def __call__(self, patches: jax.Array) -> jax.Array:
        """patches `[B, S, h*w, token_dim]` -> raw outputs `[B, S, h*w, num_raw]` (float32)."""
        x = constrain(patches.astype(jnp.float32), ("activation_batch", None, "activation_length", "activation_embed"))
        x = jax.nn.gelu(self.fc1(self.norm(x)), approximate=False)
        return self.out(jax.nn.gelu(self.fc2(x), approximate=False))

    def split(self, raw: jax.Array) -> dict[str, jax.Array]:
        """Raw channels by name: objectness `[...]`, class_logits `[..., C]`, colour_logits `[..., 3]`,
        offset `[..., 2]` (patch units), log_z `[...]`, log_size `[..., 3]`, yaw2 `[..., 2]`."""
        c = self.cfg.num_classes
        return {"objectness": raw[..., 0], "class_logits": raw[..., 1:1 + c],
                "colour_logits": raw[..., 1 + c:4 + c], "offset": raw[..., 4 + c:6 + c],
                "log_z": raw[..., 6 + c], "log_size": raw[..., 7 + c:10 + c],
                "yaw2": raw[..., 10 + c:12 + c]}

    def centres(self, raw: jax.Array, extrinsics: jax.Array, intrinsics: jax.Array,
                grid_hw: tuple[int, int], patch: int, *, train_views: bool = True) -> jax.Array:
        """Each patch's object centre in camera 0's OpenCV frame `[B, S, h*w, 3]`, composed
        with cameras `extrinsics [B, S, 3, 4]` (camera-from-camera-0), `intrinsics [B, S, 3, 3]`.
        `train_views=False` passes no gradient into the per-view predictions (offset, depth),
        only into the cameras."""
        parts = self.split(raw)
        if not train_views:
            parts = jax.lax.stop_gradient(parts)
        uv = jnp.asarray(geometry.patch_centres(*grid_hw, patch)) + patch * parts["offset"]
        # Clamped so an untrained head cannot overflow exp; 1 mm to ~150 m covers any scene.
        z = jnp.exp(jnp.clip(parts["log_z"], -7.0, 5.0))
        return geometry.unproject_to_camera0(uv, z, extrinsics, intrinsics)

    def register_views(self, raw: jax.Array, extrinsics: jax.Array, intrinsics: jax.Array,
                       grid_hw: tuple[int, int], patch: int, *, min_weight: float = 1.0) -> jax.Array:
        """Camera-from-camera-0 extrinsics `[B, S, 3, 4]` that register each view's predicted
        object centres onto view 0's.

        Every patch predicts the centre of the object it sees in its own view's frame (offset +
        depth + intrinsics, no extrinsics). A patch of view s and a patch of view 0 that see the
        same object predict the same 3D point in two frames; they are matched softly by
        objectness x colour similarity x class agreement, and a weighted Kabsch fit gives the
        rigid transform between the frames (`geometry.weighted_kabsch`), pulled towards the camera
        head's rotation so that too few matches still give a defined answer. Views with less
        than `min_weight` total match weight keep the camera head's extrinsics.
        """
        parts = jax.lax.stop_gradient(self.split(raw))
        b, s, p = parts["log_z"].shape
        uv = jnp.asarray(geometry.patch_centres(*grid_hw, patch)) + patch * parts["offset"]
        z = jnp.exp(jnp.clip(parts["log_z"], -7.0, 5.0))
        own = jnp.broadcast_to(jnp.eye(3, 4, dtype=jnp.float32), (b, s, 3, 4))
        local = geometry.unproject_to_camera0(uv, z, own, intrinsics)  # each view's own frame
        obj = jax.nn.sigmoid(parts["objectness"])
        colour = jax.nn.sigmoid(parts["colour_logits"])
        cls = jax.nn.softmax(parts["class_logits"], -1)
        out = [extrinsics[:, 0]]
        for v in range(1, s):
            d2 = ((colour[:, v, :, None] - colour[:, 0, None]) ** 2).sum(-1)
            w = (obj[:, v, :, None] * obj[:, 0, None] * jnp.exp(-d2 / self.cfg.match_colour_scale ** 2)
                 * jnp.einsum("bmc,bnc->bmn", cls[:, v], cls[:, 0]))
            # Prior: the camera head's camera-0-from-view rotation (transpose of its extrinsics').
            prior = jnp.swapaxes(extrinsics[:, v, :, :3], 1, 2)
            rot, t, total = geometry.weighted_kabsch(local[:, v], local[:, 0], w, prior=prior,
                                                     prior_weight=1e-3)
            # x_0 = R x_v + t  ->  x_v = Rᵀ (x_0 − t): the extrinsics are [Rᵀ | −Rᵀ t].
            ext = jnp.concatenate([jnp.swapaxes(rot, 1, 2), -jnp.einsum("bji,bj->bi", rot, t)[..., None]], -1)
            out.append(jnp.where((total >= min_weight)[:, None, None], ext, extrinsics[:, v]))
        return jnp.stack(out, 1)

    def features(self, raw: jax.Array, pose_enc: jax.Array, image_hw: tuple[int, int],
                 patch: int) -> jax.Array:
        """`[B, S, h*w, num_features]` per-patch object summary for the decoder (module doc),
        with the camera head's pose encoding `[B, S, 9]` for the cameras (registered on view 0's
        objects with `register_views`)."""
        parts = self.split(raw)
        extrinsics, intrinsics = cameras(pose_enc, image_hw)
        grid = (image_hw[0] // patch, image_hw[1] // patch)
        if self.cfg.register_views:
            extrinsics = self.register_views(raw, extrinsics, intrinsics, grid, patch)
        centre = self.centres(raw, extrinsics, intrinsics, grid, patch)
        return jnp.concatenate([
            jax.nn.sigmoid(parts["objectness"])[..., None], jax.nn.softmax(parts["class_logits"], -1),
            jnp.clip(parts["colour_logits"], -COLOUR_LOGIT_CLIP, COLOUR_LOGIT_CLIP), centre,
            parts["log_size"], parts["yaw2"]], -1)

    # -- checkpoints (torch layout, like the VGGT heads it ships beside) --------------------------
    def load_torch(self, sd: StateDict, prefix: str) -> None:
        sd.layernorm(self.norm, f"{prefix}.norm")
        for name in ("fc1", "fc2", "out"):
            sd.linear(getattr(self, name), f"{prefix}.{name}")

    def export_torch(self, prefix: str) -> dict[str, np.ndarray]:
        out = export_layernorm(self.norm, f"{prefix}.norm")
        for name in ("fc1", "fc2", "out"):
            m = getattr(self, name)
            out[f"{prefix}.{name}.weight"] = np.asarray(m.kernel.get_value()).T
            out[f"{prefix}.{name}.bias"] = np.asarray(m.bias.get_value())
        return out
