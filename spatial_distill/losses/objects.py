"""Dense object supervision for the object head, and VGGT's camera loss.

Targets come from the ground truth every source has (depth, cameras, 3D boxes), so the same code
serves synthetic scenes and real scans:

- **ownership**: each sampled pixel is back-projected with its GT depth and camera; it belongs to
  the box that contains it (within `margin` metres; the nearest box when several do). A patch
  belongs to the object owning most of its sampled pixels when that is at least `min_fraction`
  of them, else to no object (floor, walls, sky).
- **colour**: an object's colour is the mean observed RGB of the pixels it owns, over all views,
  so it needs no colour annotation (and is what the images actually show).
- **geometry**: `geometry.box_attributes` (centre in camera 0's OpenCV frame, log sizes,
  cos/sin 2ψ) and, per view, the projection (u, v) and depth z of the box centre.

`object_loss` (per patch owned by an object, averaged over such patches; objectness over all
patches): objectness BCE + class CE + colour L1 + offset L1 (patch units) + log-depth L1 +
log-size L1 + cos/sin 2ψ L1 + centre L1 in metres after composing with the predicted cameras.
`camera_loss`: L1 between the camera head's pose encodings and the GT camera-from-camera-0
encoding, summed over refinement iterations with VGGT's weights 0.6^(n−1−i).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from spatial_distill import geometry
from spatial_distill.models.camera_head import extri_intri_to_pose_encoding

CAMERA_GAMMA = 0.6  # VGGT's weighting of the camera head's refinement iterations


def _subsample(x, stride: int):
    """`[B, S, H, W, ...]` -> every `stride`-th pixel, starting mid-cell."""
    return x[:, :, stride // 2::stride, stride // 2::stride]


def ownership(depth, intrinsics, cam_to_world, boxes, box_mask, *, patch: int, stride: int,
              margin: float = 0.02, min_fraction: float = 0.05):
    """Pixel and patch owners (module doc).

    depth `[B, S, H, W]` metres (0 invalid), intrinsics `[B, S, 3, 3]`, cam_to_world
    `[B, S, 4, 4]`, boxes `[B, N, 7]` world, box_mask `[B, N]`. Ownership is computed on every
    `stride`-th pixel (a divisor of `patch`), which bounds its memory at large image sizes.
    Returns (pixel owner `[B, S, H/stride, W/stride]` int32, patch owner `[B, S, h*w]` int32),
    −1 for no object.
    """
    b, s, hh, ww = depth.shape
    if patch % stride or hh % patch or ww % patch:
        raise ValueError(f"ownership: stride {stride} must divide the patch size {patch}, which "
                         f"must divide the image {hh}x{ww}")
    k = intrinsics.astype(jnp.float32)
    # Sampling every stride-th pixel from stride // 2 is the full-resolution camera with its
    # pixel grid scaled by 1 / stride.
    scale = jnp.array([1.0 / stride, 1.0 / stride, 1.0], jnp.float32)[:, None]
    k_sub = k * scale
    k_sub = k_sub.at[..., 0, 2].set((k[..., 0, 2] - stride // 2) / stride)
    k_sub = k_sub.at[..., 1, 2].set((k[..., 1, 2] - stride // 2) / stride)
    d = _subsample(depth.astype(jnp.float32), stride)
    points = geometry.pixel_points(d, k_sub, cam_to_world)
    dist = geometry.inside_box_distance(points, boxes)  # [B, S, h', w', N]
    valid = (d > 0)[..., None] & box_mask.astype(bool)[:, None, None, None, :]
    dist = jnp.where(valid, dist, jnp.inf)
    owner = jnp.where(dist.min(-1) <= margin, jnp.argmin(dist, -1), -1).astype(jnp.int32)
    n = boxes.shape[1]
    c = patch // stride
    counts = jax.nn.one_hot(owner, n, dtype=jnp.float32)  # −1 -> all zeros
    counts = counts.reshape(b, s, hh // patch, c, ww // patch, c, n).sum((3, 5)).reshape(b, s, -1, n)
    best = jnp.argmax(counts, -1).astype(jnp.int32)
    patch_owner = jnp.where(counts.max(-1) >= min_fraction * c * c, best, -1)
    return jax.lax.stop_gradient(owner), jax.lax.stop_gradient(patch_owner)


def observed_colours(rgb, pixel_owner, num_boxes: int, stride: int):
    """Mean observed colour `[B, N, 3]` in [0, 1] of each object's owned pixels, over all views,
    and whether any pixel saw it `[B, N]`. rgb `[B, S, H, W, 3]` uint8 or float in [0, 1]."""
    img = rgb.astype(jnp.float32)
    if rgb.dtype == jnp.uint8:
        img = img / 255.0
    img = _subsample(img, stride)
    onehot = jax.nn.one_hot(pixel_owner, num_boxes, dtype=jnp.float32)  # [B, S, h', w', N]
    count = onehot.sum((1, 2, 3))
    total = jnp.einsum("bshwn,bshwc->bnc", onehot, img)
    return total / jnp.maximum(count, 1.0)[..., None], count > 0


def object_targets(batch, *, patch: int, stride: int, margin: float, min_fraction: float) -> dict:
    """Everything `object_loss` and the grounding loss compare against, from a batch's GT:
    `patch_owner [B, S, h*w]`, `attributes [B, N, 8]`, `colours [B, N, 3]`, `seen [B, N]`,
    `uvz [B, S, N, 3]` (each box centre projected into each view)."""
    boxes = batch["boxes"].astype(jnp.float32)
    pixel_owner, patch_owner = ownership(
        batch["depth"], batch["intrinsics"], batch["cam_to_world"], boxes, batch["box_mask"],
        patch=patch, stride=stride, margin=margin, min_fraction=min_fraction)
    colours, seen = observed_colours(batch["rgb"], pixel_owner, boxes.shape[1], stride)
    return jax.lax.stop_gradient({
        "patch_owner": patch_owner, "colours": colours, "seen": seen & batch["box_mask"].astype(bool),
        "attributes": geometry.box_attributes(boxes, batch["cam_to_world"]),
        "uvz": geometry.project(boxes[..., :3], batch["cam_to_world"], batch["intrinsics"])})


def object_loss(parts: dict, centres: jax.Array, targets: dict, labels: jax.Array, *,
                patch: int, grid_hw: tuple[int, int]):
    """Loss and metrics of the object head (module doc).

    parts: `ObjectHead.split(raw)` (each `[B, S, P, ...]`); centres `[B, S, P, 3]` composed with
    the predicted cameras; targets: `object_targets`; labels `[B, N]` class ids (−1 padding).
    """
    owner = targets["patch_owner"]
    is_obj = owner >= 0
    idx = jnp.maximum(owner, 0)
    b, s, p = owner.shape

    def per_patch(x):  # [B, N, F] -> [B, S, P, F]
        return jnp.take_along_axis(x[:, None], idx[..., None], axis=2)

    attrs = per_patch(targets["attributes"])
    colours = per_patch(targets["colours"])
    cls = jnp.take_along_axis(jnp.broadcast_to(jnp.maximum(labels, 0)[:, None], (b, s, labels.shape[1])),
                              idx, axis=2)
    uvz = jnp.take_along_axis(targets["uvz"], idx[..., None], axis=2)  # [B, S, P, 3]
    n = jnp.maximum(is_obj.sum(), 1).astype(jnp.float32)

    def mean_obj(x):
        return jnp.where(is_obj, x, 0.0).sum() / n

    offset_target = (uvz[..., :2] - jnp.asarray(geometry.patch_centres(*grid_hw, patch))) / patch
    terms = {
        "objectness": optax.sigmoid_binary_cross_entropy(parts["objectness"], is_obj.astype(jnp.float32)).mean(),
        "class": mean_obj(optax.softmax_cross_entropy_with_integer_labels(parts["class_logits"], cls)),
        "colour": mean_obj(jnp.abs(jax.nn.sigmoid(parts["colour_logits"]) - colours).sum(-1)),
        "offset": mean_obj(jnp.abs(parts["offset"] - offset_target).sum(-1)),
        "log_z": mean_obj(jnp.abs(parts["log_z"] - jnp.log(jnp.maximum(uvz[..., 2], 1e-3)))),
        "log_size": mean_obj(jnp.abs(parts["log_size"] - attrs[..., 3:6]).sum(-1)),
        "yaw": mean_obj(jnp.abs(parts["yaw2"] - attrs[..., 6:8]).sum(-1)),
        "centre": mean_obj(jnp.abs(centres - attrs[..., :3]).sum(-1)),
    }
    loss = sum(terms.values())
    err = jnp.linalg.norm(centres - attrs[..., :3], axis=-1)
    metrics = {f"objects/{k}": v for k, v in terms.items()}
    view0 = is_obj[:, 0]
    metrics.update({
        "objects/centre_err_m": mean_obj(err),
        "objects/centre_err_view0_m": jnp.where(view0, err[:, 0], 0.0).sum() / jnp.maximum(view0.sum(), 1),
        "objects/class_acc": mean_obj((jnp.argmax(parts["class_logits"], -1) == cls).astype(jnp.float32)),
        "objects/objectness_acc": ((parts["objectness"] > 0) == is_obj).mean(),
        "objects/patch_fraction": is_obj.mean(),
    })
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def camera_loss(pose_encodings, cam_to_world, intrinsics, image_hw: tuple[int, int]):
    """L1 of each refinement iteration's pose encoding `[B, S, 9]` against the GT
    camera-from-camera-0 encoding, weighted 0.6^(n−1−i) (module doc)."""
    gt = extri_intri_to_pose_encoding(geometry.relative_extrinsics(cam_to_world),
                                      intrinsics.astype(jnp.float32), image_hw)
    n = len(pose_encodings)
    loss, last = 0.0, None
    for i, enc in enumerate(pose_encodings):
        err = jnp.abs(enc - gt)
        part = err[..., :3].sum(-1).mean() + err[..., 3:7].sum(-1).mean() + err[..., 7:].sum(-1).mean()
        loss = loss + CAMERA_GAMMA ** (n - 1 - i) * part
        last = err
    metrics = {"camera/translation_l1": last[..., :3].sum(-1).mean(),
               "camera/quaternion_l1": last[..., 3:7].sum(-1).mean(),
               "camera/fov_l1": last[..., 7:].sum(-1).mean()}
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
