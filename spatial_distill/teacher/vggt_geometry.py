"""Depth, intrinsics and camera poses predicted from RGB alone (VGGT), for LLaVA-3D's 3D path.

LLaVA-3D's 3D mode needs per-view depth and poses; for plain image collections its authors point
to DUSt3R (ZCMax/LLaVA-3D#24). Here our VGGT port does it (`teacher.geometry = "vggt"`):

    rgb uint8 [S, H, W, 3] -> width `image_width` (a multiple of 14), RGB in [0, 1]
    VGGT depth head -> depth [S, h, w];  camera head -> pose_enc [S, 9]
    pose_enc -> camera-from-world extrinsics (world = camera 0) and intrinsics for (h, w)
    camera-to-world relative to camera 0, then the level frame: camera 0's (x right, y down, z forward) turned to
      (x right, y forward, z up), so "up" is +z as in LLaVA-3D's axis-aligned scenes

Two assumptions, recorded in `teacher_meta.json`: camera 0 is roughly level (VGGT knows no
gravity), and VGGT's depth is metric only up to its training normalisation; `median_depth`
rescales every scene so its median valid depth equals that many metres (None keeps VGGT's units).
The 0.2 m voxels of the 3D path are metric, so a wrong scale changes how many tokens a scene gets.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from spatial_distill.models import camera_head, vggt

# camera 0's OpenCV axes -> a z-up frame: x stays, the viewing direction z becomes +y, -y (up) +z.
LEVEL = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], np.float64)


def vggt_frames(rgb: np.ndarray, width: int, patch: int = 14) -> np.ndarray:
    """uint8 `[S, H, W, 3]` -> float32 `[S, 3, h, w]` in [0, 1], `w = width`, `h` the aspect-kept
    height rounded to a multiple of `patch` (VGGT's own preprocessing, without its crop)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"vggt_frames: expected uint8 [S, H, W, 3], got {rgb.dtype} {rgb.shape}")
    if width % patch:
        raise ValueError(f"config.teacher.vggt_image_width={width} must be a multiple of {patch}")
    S, H, W, _ = rgb.shape
    h = max(patch, round(H * width / W / patch) * patch)
    out = [np.asarray(Image.fromarray(f).resize((width, h), resample=Image.BICUBIC)) for f in rgb]
    return (np.stack(out).astype(np.float32) / 255.0).transpose(0, 3, 1, 2)


def geometry_from_predictions(depth: np.ndarray, pose_enc: np.ndarray, *,
                              median_depth: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """VGGT outputs of one scene -> (depth `[S, h, w]` metres, K `[S, 4, 4]` for (w, h),
    camera-to-world `[S, 4, 4]` in the level frame of camera 0).

    depth `[S, h, w]` (non-positive = invalid), pose_enc `[S, 9]` (VGGT's absT_quaR_FoV)."""
    depth = np.asarray(depth, np.float64)
    S, h, w = depth.shape
    extr, intr = camera_head.pose_encoding_to_extri_intri(jnp.asarray(pose_enc, jnp.float32), (h, w))
    cam_from_world = np.tile(np.eye(4), (S, 1, 1))
    cam_from_world[:, :3, :4] = np.asarray(extr, np.float64)
    cam_to_world = np.linalg.inv(cam_from_world)
    # VGGT is trained to put camera 0 at the origin; re-anchor on it so that holds exactly.
    cam_to_world = LEVEL[None] @ np.linalg.inv(cam_to_world[0])[None] @ cam_to_world
    valid = depth > 0
    if median_depth is not None:
        if not valid.any():
            raise ValueError("VGGT predicted no positive depth in this scene; cannot rescale to "
                             f"median_depth={median_depth}")
        scale = float(median_depth) / float(np.median(depth[valid]))
        depth = depth * scale
        cam_to_world[:, :3, 3] *= scale
    K = np.tile(np.eye(4), (S, 1, 1))
    K[:, :3, :3] = np.asarray(intr, np.float64)
    return np.where(valid, depth, 0.0).astype(np.float32), K, cam_to_world


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _predict(graphdef, state, images):
    out = nnx.merge(graphdef, state)(images)
    return out["depth"][0, ..., 0], out["pose_enc"][0]


class VGGTGeometry:
    """Callable: uint8 RGB views `[S, H, W, 3]` -> (depth, K, camera-to-world) as above."""

    def __init__(self, model: vggt.VGGT, *, image_width: int = 518, median_depth: float | None = None):
        if model.camera_head is None or model.depth_head is None:
            raise ValueError("teacher.geometry='vggt' needs a VGGT with its camera and depth heads")
        if median_depth is not None and not median_depth > 0:
            raise ValueError(f"config.teacher.vggt_median_depth={median_depth} must be positive")
        self.graphdef, self.state = nnx.split(model)
        self.patch = model.cfg.aggregator.patch_size
        self.image_width, self.median_depth = image_width, median_depth

    def describe(self) -> dict:
        return {"geometry": "vggt", "vggt_image_width": self.image_width,
                "vggt_scale": (f"median valid depth set to {self.median_depth} m" if self.median_depth
                               else "VGGT's own units (its training normalisation)"),
                "vggt_frame": "camera 0, levelled (assumes a level first camera)"}

    def __call__(self, rgb: np.ndarray):
        frames = vggt_frames(rgb, self.image_width, self.patch)
        depth, pose_enc = _predict(self.graphdef, self.state, jnp.asarray(frames)[None])
        return geometry_from_predictions(np.asarray(depth), np.asarray(pose_enc),
                                         median_depth=self.median_depth)

    @classmethod
    def from_config(cls, config) -> VGGTGeometry:
        t = config.teacher
        if not t.vggt_path:
            raise ValueError("config.teacher.geometry='vggt' needs config.teacher.vggt_path: "
                             "official VGGT weights (safetensors / .pt) on a local path")
        cfg = vggt.VGGTConfig.vggt_1b() if not t.vggt_config else vggt.VGGTConfig.from_json(t.vggt_config)
        cfg = dataclasses.replace(cfg, enable_camera=True, enable_depth=True, enable_point=False)
        model = vggt.load_official(t.vggt_path, cfg)
        return cls(model, image_width=t.vggt_image_width, median_depth=t.vggt_median_depth)


__all__ = ["LEVEL", "VGGTGeometry", "geometry_from_predictions", "vggt_frames"]
