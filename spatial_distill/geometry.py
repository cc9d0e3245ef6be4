"""Geometry in the first camera's frame: the one place world coordinates become learning targets.

The images fix a scene only up to where camera 0 stands and which way it looks; the world origin
and heading are arbitrary choices of the data source. So everything the student learns
geometrically is expressed relative to camera 0 (DESIGN.md §3), in one of two frames:

- **camera 0's OpenCV frame** (x right, y down, z forward, origin at camera 0): positions. VGGT
  predicts its point maps and cameras in this frame, and the orientation questions are asked in
  it ("left of" compares x, "in front of" compares z). Object centres, the patch positions the
  object head composes and the grounding targets live here.
- **camera 0's gravity-aligned frame** (origin at camera 0, z = world up, x = the horizontal
  direction camera 0 looks along, y = z × x): only for boxes whose yaw turns about the up axis,
  where a rotated-box IoU needs a z-up frame (the DETR detection loss).

A box's orientation is the same number in both: ψ = yaw − heading, where the heading is the
angle of camera 0's optical axis projected on the floor (a camera looking straight down uses its
image "up", −y, instead). Boxes look the same turned by π, so learned targets carry (cos 2ψ,
sin 2ψ), which is continuous across that symmetry.

Conventions as in `data_pipelines/sample.py`: `cam_to_world [B, S, 4, 4]` maps OpenCV camera
coordinates to world coordinates, world z is up, `boxes [B, N, 7]` are world
(cx, cy, cz, dx, dy, dz, yaw), `intrinsics [B, S, 3, 3]` are pinhole K in pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Per-object attributes in camera 0's frame (`box_attributes`), in this order.
ATTRIBUTES = ("cx", "cy", "cz", "log_dx", "log_dy", "log_dz", "cos2psi", "sin2psi")
NUM_ATTRIBUTES = len(ATTRIBUTES)
_MIN_SIZE = 1e-3  # metres; a log size below this is clamped (sizes are validated > 0 anyway)


def wrap_angle(a: jax.Array) -> jax.Array:
    """Angles to [−π, π)."""
    return (a + jnp.pi) % (2 * jnp.pi) - jnp.pi


def camera0_heading(cam_to_world: jax.Array) -> jax.Array:
    """`[B]` angle about world z of camera 0's horizontal viewing direction."""
    pose = cam_to_world[:, 0].astype(jnp.float32)
    forward, up_img = pose[:, :3, 2], -pose[:, :3, 1]
    flat = jnp.hypot(forward[:, 0], forward[:, 1]) < 1e-6
    axis = jnp.where(flat[:, None], up_img, forward)
    return jnp.arctan2(axis[:, 1], axis[:, 0])


def boxes_in_camera0_frame(boxes: jax.Array, cam_to_world: jax.Array) -> jax.Array:
    """World boxes `[B, N, 7]` -> camera 0's gravity-aligned frame `[B, N, 7]` (module doc):
    centre relative to camera 0 rotated by −heading about z, sizes unchanged, yaw −> ψ."""
    heading = camera0_heading(cam_to_world)
    centre = cam_to_world[:, 0, :3, 3].astype(jnp.float32)
    c, s = jnp.cos(heading)[:, None], jnp.sin(heading)[:, None]
    d = boxes[..., :3].astype(jnp.float32) - centre[:, None, :]
    x = c * d[..., 0] + s * d[..., 1]
    y = -s * d[..., 0] + c * d[..., 1]
    yaw = wrap_angle(boxes[..., 6] - heading[:, None])
    return jnp.concatenate([jnp.stack([x, y, d[..., 2]], -1), boxes[..., 3:6], yaw[..., None]], -1)


def boxes_from_camera0_frame(boxes: jax.Array, cam_to_world: jax.Array) -> jax.Array:
    """The inverse of `boxes_in_camera0_frame`: camera 0's gravity-aligned frame `[B, N, 7]` ->
    world `[B, N, 7]` (e.g. predicted boxes, to draw them into any view)."""
    heading = camera0_heading(cam_to_world)
    centre = cam_to_world[:, 0, :3, 3].astype(jnp.float32)
    c, s = jnp.cos(heading)[:, None], jnp.sin(heading)[:, None]
    x, y = boxes[..., 0].astype(jnp.float32), boxes[..., 1].astype(jnp.float32)
    world = jnp.stack([c * x - s * y, s * x + c * y, boxes[..., 2].astype(jnp.float32)], -1)
    yaw = wrap_angle(boxes[..., 6] + heading[:, None])
    return jnp.concatenate([world + centre[:, None, :], boxes[..., 3:6], yaw[..., None]], -1)


def world_to_camera0(points: jax.Array, cam_to_world: jax.Array) -> jax.Array:
    """World points `[B, N, 3]` -> camera 0's OpenCV frame `[B, N, 3]`."""
    pose = cam_to_world[:, 0].astype(jnp.float32)
    return jnp.einsum("bnk,bkj->bnj", points.astype(jnp.float32) - pose[:, None, :3, 3], pose[:, :3, :3])


def box_attributes(boxes: jax.Array, cam_to_world: jax.Array) -> jax.Array:
    """World boxes `[B, N, 7]` -> `[B, N, 8]` (`ATTRIBUTES`): centre in camera 0's OpenCV frame,
    log sizes, (cos 2ψ, sin 2ψ)."""
    psi = boxes[..., 6].astype(jnp.float32) - camera0_heading(cam_to_world)[:, None]
    return jnp.concatenate([
        world_to_camera0(boxes[..., :3], cam_to_world),
        jnp.log(jnp.maximum(boxes[..., 3:6].astype(jnp.float32), _MIN_SIZE)),
        jnp.stack([jnp.cos(2 * psi), jnp.sin(2 * psi)], -1)], -1)


def relative_extrinsics(cam_to_world: jax.Array) -> jax.Array:
    """`[B, S, 3, 4]` camera-from-camera-0 transforms (VGGT's extrinsics, camera 0 as the world):
    view 0 gets the identity."""
    pose = cam_to_world.astype(jnp.float32)
    rot, t = pose[..., :3, :3], pose[..., :3, 3]
    # x_s = R_s^T (R_0 x_0 + t_0 - t_s)
    r = jnp.einsum("bsji,bjk->bsik", rot, rot[:, 0])
    trans = jnp.einsum("bsji,bsj->bsi", rot, t[:, :1] - t)
    return jnp.concatenate([r, trans[..., None]], -1)


def project(points: jax.Array, cam_to_world: jax.Array, intrinsics: jax.Array) -> jax.Array:
    """World points `[B, N, 3]` seen from every view: `[B, S, N, 3]` = (u, v, z) with (u, v) in
    pixels (OpenCV: pixel centres at integers) and z the camera-frame depth in metres. A point
    behind a camera has z <= 0 and meaningless (u, v); callers mask on z."""
    pose = cam_to_world.astype(jnp.float32)
    rot, t = pose[..., :3, :3], pose[..., :3, 3]
    cam = jnp.einsum("bnk,bskj->bsnj", points.astype(jnp.float32), rot) - jnp.einsum(
        "bsk,bskj->bsj", t, rot)[:, :, None]
    z = cam[..., 2]
    safe = jnp.where(jnp.abs(z) < 1e-6, 1e-6, z)
    k = intrinsics.astype(jnp.float32)[:, :, None]
    u = k[..., 0, 0] * cam[..., 0] / safe + k[..., 0, 2]
    v = k[..., 1, 1] * cam[..., 1] / safe + k[..., 1, 2]
    return jnp.stack([u, v, z], -1)


def unproject_to_camera0(uv: jax.Array, z: jax.Array, extrinsics: jax.Array,
                         intrinsics: jax.Array) -> jax.Array:
    """Pixels of view s at depth z -> camera 0's OpenCV frame.

    uv `[B, S, M, 2]` pixels, z `[B, S, M]` metres, extrinsics `[B, S, 3, 4]` camera-s-from-
    camera-0 (`relative_extrinsics`, or the camera head's prediction), intrinsics `[B, S, 3, 3]`.
    Returns `[B, S, M, 3]`. Differentiable in every input (the object head learns through it).
    """
    k = intrinsics[:, :, None]
    x = (uv[..., 0] - k[..., 0, 2]) / k[..., 0, 0] * z
    y = (uv[..., 1] - k[..., 1, 2]) / k[..., 1, 1] * z
    cam = jnp.stack([x, y, z], -1)
    rot, t = extrinsics[..., :3], extrinsics[..., 3]
    return jnp.einsum("bsmj,bsji->bsmi", cam - t[:, :, None], rot)


def patch_centres(h: int, w: int, patch: int) -> np.ndarray:
    """`[h*w, 2]` pixel (u, v) of each patch's centre on an `h x w` patch grid, row-major like
    the patch tokens."""
    u = np.arange(w, dtype=np.float32) * patch + (patch - 1) / 2
    v = np.arange(h, dtype=np.float32) * patch + (patch - 1) / 2
    return np.stack(np.meshgrid(u, v, indexing="xy"), -1).reshape(-1, 2)


def pixel_points(depth: jax.Array, intrinsics: jax.Array, cam_to_world: jax.Array) -> jax.Array:
    """Depth maps `[B, S, H, W]` -> world points `[B, S, H, W, 3]` (invalid pixels: depth 0,
    hence the camera centre; mask them with `depth > 0`)."""
    _, _, h, w = depth.shape
    v, u = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
    k = intrinsics.astype(jnp.float32)[:, :, None, None]
    z = depth.astype(jnp.float32)
    cam = jnp.stack([(u - k[..., 0, 2]) / k[..., 0, 0] * z, (v - k[..., 1, 2]) / k[..., 1, 1] * z, z], -1)
    pose = cam_to_world.astype(jnp.float32)[:, :, None, None]
    return jnp.einsum("bshwk,bshwjk->bshwj", cam, pose[..., :3, :3]) + pose[..., :3, 3]


def inside_box_distance(points: jax.Array, boxes: jax.Array) -> jax.Array:
    """Distance from each point to each (yawed) box, 0 inside: points `[..., 3]`, boxes `[B, N, 7]`
    with points' leading axis B -> `[..., N]` (points broadcast against the boxes)."""
    b = boxes.astype(jnp.float32)
    shape = (b.shape[0],) + (1,) * (points.ndim - 2) + b.shape[1:]
    b = b.reshape(shape)
    d = points[..., None, :] - b[..., :3]
    c, s = jnp.cos(b[..., 6]), jnp.sin(b[..., 6])
    local = jnp.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1], d[..., 2]], -1)
    return jnp.linalg.norm(jnp.maximum(jnp.abs(local) - 0.5 * b[..., 3:6], 0.0), axis=-1)



def weighted_kabsch(src: jax.Array, dst: jax.Array, weights: jax.Array,
                    prior: jax.Array | None = None, prior_weight: float = 0.0):
    """The rigid transform that best maps `src` points onto `dst` points under soft matches.

    src `[B, M, 3]`, dst `[B, N, 3]`, weights `[B, M, N]` >= 0 (how much src point m matches dst
    point n). Minimises Σ w_mn |R src_m + t − dst_n|² (Kabsch / Umeyama without scale); with a
    `prior` rotation `[B, 3, 3]`, `prior_weight` λ pulls R towards it, which keeps R defined
    when the matches are too few or collinear to fix it (λ is relative to the size of the
    matches' cross-covariance, so a small λ leaves well-posed fits nearly untouched). Returns
    (R `[B, 3, 3]`, t `[B, 3]`, total weight `[B]`). Not differentiated (an SVD of near-degenerate matrices has unbounded
    gradients): callers use it on frozen predictions.
    """
    src, dst, weights = (jax.lax.stop_gradient(x.astype(jnp.float32)) for x in (src, dst, weights))
    total = weights.sum((1, 2))
    safe = jnp.maximum(total, 1e-9)[:, None]
    mu_src = jnp.einsum("bmn,bmk->bk", weights, src) / safe
    mu_dst = jnp.einsum("bmn,bnk->bk", weights, dst) / safe
    h = jnp.einsum("bmn,bmi,bnj->bij", weights, src - mu_src[:, None], dst - mu_dst[:, None])
    if prior is not None:
        # R maximises tr(R H) (H = Σ w src' dst'ᵀ); the prior adds λ tr(Rᵀ P) = λ tr(R Pᵀ).
        scale = jnp.sqrt((h ** 2).sum((1, 2)))[:, None, None] + 1e-12
        h = h + prior_weight * scale * jnp.swapaxes(jax.lax.stop_gradient(prior), 1, 2)
    u, _, vt = jnp.linalg.svd(h)  # H = U S Vᵀ  ->  R = V diag(1, 1, det(V Uᵀ)) Uᵀ
    d = jnp.sign(jnp.linalg.det(jnp.einsum("bij,bjk->bik", u, vt)))
    fix = jnp.broadcast_to(jnp.eye(3), h.shape).at[:, 2, 2].set(d)
    rot = jnp.einsum("bji,bjk,blk->bil", vt, fix, u)
    return rot, mu_dst - jnp.einsum("bij,bj->bi", rot, mu_src), total
