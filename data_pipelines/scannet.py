"""The ScanNet exported-frame layout: writer (synthetic scenes) and reader (synthetic and real).

A scene folder, as ScanNet's SensReader exporter writes it, plus our `scene.json`:

  color/{id}.jpg | color/{id}.png   RGB frame (we write lossless PNG; PNG wins if both exist)
  depth/{id}.png                    uint16 millimetres, 0 = invalid
  pose/{id}.txt                     4x4 cam_to_world, whitespace-separated (OpenCV camera)
  intrinsic/intrinsic_color.txt     4x4, K in the top-left 3x3
  intrinsic/intrinsic_depth.txt     4x4, K of the depth camera (optional: defaults to the
                                    colour K scaled to the depth image size)
  scene.json                        sample_id, frame_ids, boxes [N,7], labels, label_names, qa
                                    (all optional: a real export without it reads with no
                                    boxes and no questions, and its folder name as sample_id)

Frame ids are integers, ordered numerically. Real ScanNet depth (640x480) is smaller than colour
(1296x968) and has its own intrinsics; the reader maps every colour pixel through
K_depth K_color^-1 (the exporter's depth and colour cameras share their pose) and takes the
nearest depth pixel, so depth is never interpolated across an object edge.

Poses: ScanNet writes an all -inf matrix for frames whose tracking failed. When the reader picks
frames itself (`frame_ids=None`) it skips those; a requested frame with such a pose is an error.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
from PIL import Image

from data_pipelines.sample import QA, Sample, SampleError

FORMAT = "spatial_distill/scannet-export/1"
MAX_DEPTH_MM = 65535  # uint16: 1 mm steps up to 65.535 m


class ScanNetFormatError(ValueError):
    """A scene folder file is missing or malformed; the message names the path and the fix."""


def _open_image(path: pathlib.Path) -> Image.Image:
    if not path.is_file():
        raise ScanNetFormatError(f"missing frame file {path}; export the frame or pick other "
                                 "frame_ids")
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise ScanNetFormatError(f"unreadable image {path} ({e}); re-export this frame") from e
    return img


def read_depth_png(path) -> np.ndarray:
    """`[H, W]` float32 metres from a 16-bit millimetre PNG (0 stays 0 = invalid)."""
    path = pathlib.Path(path)
    img = _open_image(path)
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise ScanNetFormatError(f"{path}: depth must be a 16-bit PNG of millimetres, got image "
                                 f"mode {img.mode!r}; write depth as uint16 mm")
    mm = np.asarray(img)
    if mm.min() < 0 or mm.max() > MAX_DEPTH_MM:
        raise ScanNetFormatError(f"{path}: depth values must lie in [0, {MAX_DEPTH_MM}] mm, got "
                                 f"[{mm.min()}, {mm.max()}]")
    return (mm.astype(np.float32) / 1000.0).astype(np.float32)


def read_matrix(path) -> np.ndarray:
    """A whitespace-separated 4x4 matrix as float64 (non-finite entries are returned as is)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ScanNetFormatError(f"missing matrix file {path}")
    try:
        values = [float(v) for v in path.read_text().split()]
    except ValueError as e:
        raise ScanNetFormatError(f"{path}: not a whitespace-separated list of numbers ({e})") from e
    if len(values) != 16:
        raise ScanNetFormatError(f"{path}: expected a 4x4 matrix (16 numbers), got {len(values)}")
    return np.array(values).reshape(4, 4)


def _check_pose(pose: np.ndarray, path: pathlib.Path) -> None:
    if not np.isfinite(pose).all():
        raise ScanNetFormatError(f"{path}: pose is not finite (ScanNet marks frames whose tracking "
                                 "failed with -inf); request another frame, or pass frame_ids=None "
                                 "so the reader skips such frames")
    rot = pose[:3, :3]
    err = np.abs(rot @ rot.T - np.eye(3)).max()
    if err > 1e-3 or np.linalg.det(rot) < 0 or np.abs(pose[3] - [0, 0, 0, 1]).max() > 1e-6:
        raise ScanNetFormatError(f"{path}: not a rigid cam_to_world transform (max |R R^T - I| = "
                                 f"{err:.2e}, det = {np.linalg.det(rot):.4f}, last row "
                                 f"{pose[3].tolist()})")


def _intrinsic(path: pathlib.Path) -> np.ndarray:
    m = read_matrix(path)
    k = m[:3, :3]
    if not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0 or np.abs(k[2] - [0, 0, 1]).max() > 1e-9:
        raise ScanNetFormatError(f"{path}: not a pinhole intrinsic matrix (need fx, fy > 0 and a "
                                 f"third row [0, 0, 1]), got {k.tolist()}")
    return k


def _matrix_text(m: np.ndarray) -> str:
    # %.9g round-trips float32 exactly; ScanNet's exporter writes %f, which the reader also takes.
    return "".join(" ".join(f"{float(v):.9g}" for v in row) + "\n" for row in np.asarray(m))


def write_scene(sample: Sample, scene_dir) -> None:
    """Writes `sample` as frames 0..S-1 in the layout above (PNG colour, mm depth, exact poses).
    `scene.json` is written last. The layout holds one colour K per scene, so all views must share
    their intrinsics."""
    sample.validate()
    k = sample.intrinsics
    if np.abs(k - k[0]).max() > 0:
        raise ScanNetFormatError(f"sample {sample.sample_id!r}: the ScanNet layout stores one "
                                 "intrinsic matrix per scene, but the views' intrinsics differ; "
                                 "write views with different intrinsics as separate scenes")
    mm = np.round(sample.depth.astype(np.float64) * 1000.0)
    if mm.max() > MAX_DEPTH_MM:
        v = int(np.argmax(mm.reshape(len(mm), -1).max(1)))
        raise ScanNetFormatError(f"sample {sample.sample_id!r}: view {v} has depth "
                                 f"{sample.depth[v].max():.3f} m, beyond the {MAX_DEPTH_MM / 1000} m a "
                                 "uint16 mm PNG holds; set such pixels to 0 (invalid)")
    mm = np.where((sample.depth > 0) & (mm == 0), 1, mm).astype(np.uint16)  # keep tiny depths valid
    d = pathlib.Path(scene_dir)
    for sub in ("color", "depth", "pose", "intrinsic"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for i in range(sample.num_views):
        Image.fromarray(sample.rgb[i]).save(d / "color" / f"{i}.png")
        Image.fromarray(mm[i]).save(d / "depth" / f"{i}.png")
        (d / "pose" / f"{i}.txt").write_text(_matrix_text(sample.cam_to_world[i]))
    k4 = np.eye(4)
    k4[:3, :3] = k[0]
    for name in ("intrinsic_color.txt", "intrinsic_depth.txt"):
        (d / "intrinsic" / name).write_text(_matrix_text(k4.astype(np.float32)))
    meta = {"format": FORMAT, "sample_id": sample.sample_id,
            "frame_ids": list(range(sample.num_views)),
            "boxes": sample.boxes.tolist(), "labels": sample.labels.tolist(),
            "label_names": list(sample.label_names), "qa": [q.to_json() for q in sample.qa]}
    (d / "scene.json").write_text(json.dumps(meta, indent=1))


def frame_ids_on_disk(scene_dir) -> list[int]:
    """Integer ids of the colour frames in `scene_dir/color`, ordered numerically."""
    color = pathlib.Path(scene_dir) / "color"
    if not color.is_dir():
        raise ScanNetFormatError(f"missing folder {color}; is {scene_dir} a ScanNet export?")
    names = (re.fullmatch(r"(\d+)\.(?:jpg|png)", p.name) for p in color.iterdir())
    return sorted({int(m.group(1)) for m in names if m})


def _resample_depth(depth, k_depth, k_target, hw) -> np.ndarray:
    """Nearest depth pixel of every target pixel: both cameras share a pose, so the target ray
    through (u, v) meets the depth image at K_depth K_target^-1 (u, v, 1)."""
    h, w = hw
    u = (np.arange(w) - k_target[0, 2]) * (k_depth[0, 0] / k_target[0, 0]) + k_depth[0, 2]
    v = (np.arange(h) - k_target[1, 2]) * (k_depth[1, 1] / k_target[1, 1]) + k_depth[1, 2]
    ui, vi = np.floor(u + 0.5).astype(int), np.floor(v + 0.5).astype(int)
    inside = (vi >= 0) & (vi < depth.shape[0]), (ui >= 0) & (ui < depth.shape[1])
    out = depth[np.clip(vi, 0, depth.shape[0] - 1)][:, np.clip(ui, 0, depth.shape[1] - 1)]
    return np.where(inside[0][:, None] & inside[1][None, :], out, 0).astype(np.float32)


def _scale_k(k: np.ndarray, src_hw, dst_hw) -> np.ndarray:
    """K for the same camera resampled from `src_hw` to `dst_hw` (pixel centres at integers)."""
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    out = k.copy()
    out[0, 0], out[0, 2] = k[0, 0] * sx, (k[0, 2] + 0.5) * sx - 0.5
    out[1, 1], out[1, 2] = k[1, 1] * sy, (k[1, 2] + 0.5) * sy - 0.5
    return out


def _read_meta(d: pathlib.Path) -> dict:
    meta_path = d / "scene.json"
    try:
        return json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ScanNetFormatError(f"{meta_path}: not valid JSON ({e})") from e


def read_scene_qa(scene_dir) -> tuple[QA, ...]:
    """The scene's questions alone (no frames decoded): for tokenizer training and statistics."""
    return tuple(QA.from_json(q) for q in _read_meta(pathlib.Path(scene_dir)).get("qa", ()))


def read_scene(scene_dir, *, frame_ids=None, num_views: int | None = None,
               image_size=None) -> Sample:
    """Reads a scene folder into a validated `Sample`.

    Args:
      frame_ids: frames to read, in order; None picks `num_views` frames evenly spread over the
        sorted ids with a valid pose (all of them when `num_views` is None). The ids come from
        `scene.json` when it lists them, else from the files in color/.
      image_size: optional (height, width) to resize to (colour bilinear, depth nearest, K
        scaled); default: the colour frames' size.
    """
    d = pathlib.Path(scene_dir)
    if not d.is_dir():
        raise ScanNetFormatError(f"scene folder {d} does not exist")
    meta_path = d / "scene.json"
    meta = _read_meta(d)

    if frame_ids is None:
        ids = [int(i) for i in meta["frame_ids"]] if "frame_ids" in meta else frame_ids_on_disk(d)
        ids = [i for i in ids if np.isfinite(read_matrix(d / "pose" / f"{i}.txt")).all()]
        if num_views is not None:
            if not 1 <= num_views <= len(ids):
                raise ScanNetFormatError(f"{d}: asked for num_views={num_views} but it has "
                                         f"{len(ids)} frames with a valid pose")
            ids = [ids[j] for j in np.round(np.linspace(0, len(ids) - 1, num_views)).astype(int)]
    else:
        ids = [int(i) for i in frame_ids]
        if num_views is not None and num_views != len(ids):
            raise ScanNetFormatError(f"{d}: num_views={num_views} contradicts the {len(ids)} "
                                     "frame_ids given; pass one of them")
    if not ids:
        raise ScanNetFormatError(f"{d}: no frames to read (color/ is empty or every pose is invalid)")

    k_color = _intrinsic(d / "intrinsic" / "intrinsic_color.txt")
    rgbs, depths, poses = [], [], []
    for i in ids:
        png, jpg = d / "color" / f"{i}.png", d / "color" / f"{i}.jpg"
        if not png.is_file() and not jpg.is_file():
            raise ScanNetFormatError(f"missing frame file {png} (nor {jpg.name}); export the frame "
                                     "or pick other frame_ids")
        img = _open_image(png if png.is_file() else jpg).convert("RGB")
        if rgbs and img.size != rgbs[0].size:
            raise ScanNetFormatError(f"{d / 'color'}: frame {i} is {img.size[0]}x{img.size[1]} but "
                                     f"frame {ids[0]} is {rgbs[0].size[0]}x{rgbs[0].size[1]}")
        rgbs.append(img)
        depths.append(read_depth_png(d / "depth" / f"{i}.png"))
        pose = read_matrix(d / "pose" / f"{i}.txt")
        _check_pose(pose, d / "pose" / f"{i}.txt")
        poses.append(pose)

    color_hw = (rgbs[0].size[1], rgbs[0].size[0])
    hw = color_hw if image_size is None else tuple(int(s) for s in image_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size must be (height, width) with positive entries, got {image_size!r}")
    k = _scale_k(k_color, color_hw, hw)
    depth_k_path = d / "intrinsic" / "intrinsic_depth.txt"
    rgb = np.stack([np.asarray(im if im.size == (hw[1], hw[0]) else
                               im.resize((hw[1], hw[0]), Image.BILINEAR)) for im in rgbs])
    k_file = _intrinsic(depth_k_path) if depth_k_path.is_file() else None
    depth = []
    for dep in depths:
        k_depth = k_file if k_file is not None else _scale_k(k_color, color_hw, dep.shape)
        depth.append(dep if dep.shape == hw and np.array_equal(k_depth, k)
                     else _resample_depth(dep, k_depth, k, hw))

    boxes = meta.get("boxes", [])
    if any(len(b) != 7 for b in boxes):
        bad = next(j for j, b in enumerate(boxes) if len(b) != 7)
        raise ScanNetFormatError(f"{meta_path}: boxes[{bad}] must be (cx, cy, cz, dx, dy, dz, yaw), "
                                 f"got {boxes[bad]}")
    try:
        return Sample(
            sample_id=str(meta.get("sample_id", d.name)),
            rgb=rgb.astype(np.uint8),
            depth=np.stack(depth).astype(np.float32),
            intrinsics=np.repeat(k[None], len(ids), 0).astype(np.float32),
            cam_to_world=np.stack(poses).astype(np.float32),
            boxes=np.array(boxes, np.float32).reshape(-1, 7),
            labels=np.array(meta.get("labels", []), np.int32).reshape(-1),
            label_names=tuple(meta.get("label_names", ())),
            qa=tuple(QA.from_json(q) for q in meta.get("qa", ())),
        ).validate()
    except SampleError as e:
        raise ScanNetFormatError(f"{d}: {e}") from e
