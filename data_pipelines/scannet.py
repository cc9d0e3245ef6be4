"""ScanNet scenes: writer (synthetic scenes, exported-frame layout) and reader (synthetic and real).

Two frame layouts are read; `read_scene` tells them apart by what is on disk (`layout="auto"`:
a `color/` folder means an export) or takes `layout="export" | "posed_images"`.

Exported-frame layout, as ScanNet's SensReader exporter writes it, plus our `scene.json`:

  color/{id}.jpg | color/{id}.png   RGB frame (we write lossless PNG; PNG wins if both exist)
  depth/{id}.png                    uint16 millimetres, 0 = invalid
  pose/{id}.txt                     4x4 cam_to_world, whitespace-separated (OpenCV camera)
  intrinsic/intrinsic_color.txt     4x4, K in the top-left 3x3
  intrinsic/intrinsic_depth.txt     4x4, K of the depth camera (optional: defaults to the
                                    colour K scaled to the depth image size)
  scene.json                        sample_id, frame_ids, boxes [N,7], labels, label_names, qa
                                    (all optional: a real export without it reads with no
                                    boxes and no questions, and its folder name as sample_id)

posed_images layout, as 3D VLM projects (LLaVA-3D, Video-3D-LLM) store ScanNet, in a folder
`posed_images/<scene_id>/`:

  {id:05d}.jpg            colour          {id:05d}.png   uint16 depth, millimetres
  {id:05d}.txt            4x4 cam_to_world
  intrinsic.txt           4x4 colour K; depth_intrinsic.txt (optional) the depth K, else depth
                          shares the colour camera (its K scaled to the depth image size)
  scene.json              optional, as above

Both layouts give the same `Sample` for the same data. Frame ids are integers, ordered
numerically; every listed id must have its colour, depth and pose file (a gap is an error naming
the ids and the files they lack, never a silently shorter scene).

Colour and depth resolution: real ScanNet depth (640x480) is smaller than colour (1296x968) and
has its own intrinsics. Output frames are on the colour camera's pixel grid: every colour pixel
is mapped through K_depth K_color^-1 (depth and colour cameras share their pose) and takes the
nearest depth pixel, so depth is never interpolated across an object edge; colour pixels that
fall outside the depth image get 0 (invalid). With `image_size`, colour is resized bilinearly,
K is rescaled to the new grid, and depth is mapped (nearest, as above) onto that grid.

Poses: ScanNet writes an all -inf matrix for frames whose tracking failed. When the reader picks
frames itself (`frame_ids=None`) it skips every pose with an inf/nan entry and counts them
(`ReadStats.invalid_pose_ids`, also logged); a requested frame with such a pose is an error.

Scan files (optional), looked for in `scan_dir` when given, else in the scene folder, its parent,
and `<scene folder>/../../scans/<scene_id>/` (the `scans/` next to `posed_images/`), first hit:

  <scene_id>.txt                    holds `axisAlignment = m00 m01 ... m33` (row-major 4x4)
  <scene_id>_vh_clean_2.ply         mesh; only its vertex x, y, z are read (ascii or binary PLY)
  <scene_id>_vh_clean_2.0.010000.segs.json   `segIndices`: segment id of every vertex
  <scene_id>.aggregation.json       `segGroups`: [{objectId, label, segments: [...]}]
  <scene_id>_bbox.npy               votenet's boxes (or mmdet3d's <scene_id>_aligned_bbox.npy):
                                    [N, >=7] = cx cy cz dx dy dz nyu40_id, already axis-aligned

Axis alignment A (from `<scene_id>.txt`, or `axis_align=` a file path or a 4x4 array) maps the
scan's world frame to ScanNet's axis-aligned one: poses come out as A @ cam_to_world, mesh
vertices as A @ v, scene.json boxes are moved by A (A must rotate about z only). A real scene
without the file or the line is read with the identity, after one logging.warning naming the
file; scenes written by `write_scene` (scene.json carrying our format tag) are in their own world
frame already and use the identity silently unless a file is found or given.

Boxes (`box_source="auto"`): scene.json boxes if it lists any; else instance boxes from the mesh
(if its labels table is given); else the `_bbox.npy`; else the mesh (which then asks for the
table); else none. Mesh boxes: per aggregation instance, the axis-aligned bounding box of its
vertices after A (centre, size, yaw 0). Labels: raw category -> NYU40 through the user's
`scannetv2-labels.combined.tsv` (`labels_tsv=`), NYU40 -> ScanNet18 (see `scannet_labels`);
`labels` is the ScanNet18 index, `label_names` its class name. Instances that map to nothing
(wall, floor, a label not in the table) or have no vertices are skipped and counted
(`ReadStats.skipped_instances`, also logged).

Frame sampling (`frame_ids=None`, `num_views=S`): `sampling="uniform"` takes S frames evenly spread
over the valid ones; `"coverage"` greedily takes, S times, the frame whose back-projected depth
(a grid of at most ~COVERAGE_COLUMNS columns of depth pixels, valid depth only) adds the most
world voxels (COVERAGE_VOXEL_M edge, axis-aligned frame) not yet seen by the frames taken, ties
broken by a random order drawn from `seed`; the frames come back in id order. Both are
deterministic for a given seed (uniform does not use it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import re

import numpy as np
from PIL import Image

from data_pipelines import scannet_labels
from data_pipelines.sample import QA, Sample, SampleError

FORMAT = "spatial_distill/scannet-export/1"
MAX_DEPTH_MM = 65535  # uint16: 1 mm steps up to 65.535 m
LAYOUTS = ("export", "posed_images")
SAMPLINGS = ("uniform", "coverage")
BOX_SOURCES = ("auto", "scene.json", "mesh", "npy", "none")
COVERAGE_VOXEL_M = 0.1
COVERAGE_COLUMNS = 80

log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # files already warned about (the axis-alignment warning is given once)


class ScanNetFormatError(ValueError):
    """A scene folder file is missing or malformed; the message names the path and the fix."""


@dataclasses.dataclass
class ReadStats:
    """What `read_scene_with_stats` read and what it left out, so nothing is dropped unseen.

    Fields:
      scene_dir, layout: the folder read and its layout ("export" | "posed_images").
      frame_ids: the frames read, in output order.
      candidate_frames: frames the reader chose from (listed or on disk; 0 with frame_ids given).
      invalid_pose_ids: candidate frames skipped for an inf/nan pose.
      axis_alignment: the file whose axisAlignment was applied, "<array>" when passed as an
        array, None when the identity was used.
      box_source: "scene.json" | "mesh" | "npy" | "none".
      instances: instances in the box source (mesh aggregation groups or npy rows).
      skipped_instances: (object id, label, reason) of each instance left out.
    """

    scene_dir: str
    layout: str
    frame_ids: list[int] = dataclasses.field(default_factory=list)
    candidate_frames: int = 0
    invalid_pose_ids: list[int] = dataclasses.field(default_factory=list)
    axis_alignment: str | None = None
    box_source: str = "none"
    instances: int = 0
    skipped_instances: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)

    @property
    def invalid_poses(self) -> int:
        return len(self.invalid_pose_ids)

    @property
    def skipped_instance_count(self) -> int:
        return len(self.skipped_instances)


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


class _Layout:
    """File names of one scene folder in one layout."""

    KINDS = ("color", "depth", "pose")

    def __init__(self, d: pathlib.Path, name: str):
        self.d, self.name = d, name
        export = name == "export"
        self.k_color_path = d / "intrinsic" / "intrinsic_color.txt" if export else d / "intrinsic.txt"
        self.k_depth_path = (d / "intrinsic" / "intrinsic_depth.txt" if export
                             else d / "depth_intrinsic.txt")

    def color_paths(self, i: int) -> list[pathlib.Path]:
        """Candidates, the first existing one wins."""
        if self.name == "export":
            return [self.d / "color" / f"{i}.png", self.d / "color" / f"{i}.jpg"]
        return [self.d / f"{i:05d}.jpg"]

    def path(self, kind: str, i: int) -> pathlib.Path:
        if kind == "color":
            return self.color_paths(i)[0]
        ext = "png" if kind == "depth" else "txt"
        return self.d / kind / f"{i}.{ext}" if self.name == "export" else self.d / f"{i:05d}.{ext}"

    def has(self, kind: str, i: int) -> bool:
        paths = self.color_paths(i) if kind == "color" else [self.path(kind, i)]
        return any(p.is_file() for p in paths)

    def where(self, kind: str) -> str:
        """How a message names the files of one kind."""
        if self.name == "export":
            return f"{kind}/"
        return {"color": "*.jpg (colour)", "depth": "*.png (depth)", "pose": "*.txt (pose)"}[kind]

    def missing_message(self, kind: str, i: int) -> str:
        paths = self.color_paths(i) if kind == "color" else [self.path(kind, i)]
        extra = f" (nor {paths[1].name})" if len(paths) > 1 else ""
        return f"missing frame file {paths[0]}{extra}"

    def ids_on_disk(self) -> dict[str, set[int]]:
        ids: dict[str, set[int]] = {k: set() for k in self.KINDS}
        if self.name == "export":
            for kind, pattern in (("color", r"(\d+)\.(?:jpg|png)"), ("depth", r"(\d+)\.png"),
                                  ("pose", r"(\d+)\.txt")):
                folder = self.d / kind
                if kind == "color" and not folder.is_dir():
                    raise ScanNetFormatError(f"missing folder {folder}; is {self.d} a ScanNet "
                                             "export?")
                names = (re.fullmatch(pattern, p.name) for p in folder.iterdir()) if folder.is_dir() else ()
                ids[kind] = {int(m.group(1)) for m in names if m}
            return ids
        kinds = {"jpg": "color", "png": "depth", "txt": "pose"}
        for p in self.d.iterdir():
            m = re.fullmatch(r"(\d+)\.(jpg|png|txt)", p.name)
            if not m:
                continue
            if m.group(1) != f"{int(m.group(1)):05d}":
                raise ScanNetFormatError(f"{p}: posed_images frames are named {{id:05d}}.jpg / .png "
                                         f"/ .txt; rename it to {int(m.group(1)):05d}.{m.group(2)}")
            ids[kinds[m.group(2)]].add(int(m.group(1)))
        return ids


def detect_layout(scene_dir) -> str:
    """"export" when the folder has color/, "posed_images" when it has intrinsic.txt or
    {id}.jpg frames; anything else is an error."""
    d = pathlib.Path(scene_dir)
    if (d / "color").is_dir():
        return "export"
    if (d / "intrinsic.txt").is_file() or any(re.fullmatch(r"\d+\.jpg", p.name) for p in d.iterdir()):
        return "posed_images"
    raise ScanNetFormatError(f"missing folder {d / 'color'}; is {d} a ScanNet scene? (an export "
                             "has color/, depth/, pose/, intrinsic/; a posed_images scene has "
                             "00000.jpg, 00000.png, 00000.txt and intrinsic.txt)")


def _layout(d: pathlib.Path, layout: str) -> _Layout:
    if layout == "auto":
        return _Layout(d, detect_layout(d))
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    return _Layout(d, layout)


def frame_ids_on_disk(scene_dir, layout: str = "auto") -> list[int]:
    """Integer ids of the scene's colour frames (color/ or {id:05d}.jpg), ordered numerically."""
    d = pathlib.Path(scene_dir)
    lay = _layout(d, layout) if d.is_dir() else _Layout(d, "export")  # names the missing color/
    return sorted(lay.ids_on_disk()["color"])


def _check_complete(lay: _Layout, ids: list[int], counts: dict[str, int] | None,
                    what: str = "the requested frames") -> None:
    """Every id has its colour, depth and pose file, or an error names the gaps. `counts`: the
    files of each kind on disk, when the ids were listed from disk."""
    lacks = {k: [i for i in ids if not lay.has(k, i)] for k in lay.KINDS}
    if not any(lacks.values()):
        return
    kind, i = next((k, v[0]) for k, v in lacks.items() if v)
    gaps = "; ".join(f"{lay.where(k)} lacks ids {v}" for k, v in lacks.items() if v)
    if counts is None:
        raise ScanNetFormatError(f"{lay.missing_message(kind, i)}; of {what}, {gaps}; export the "
                                 "frame or pick other frame_ids")
    have = ", ".join(f"{lay.where(k)} {n}" for k, n in counts.items())
    raise ScanNetFormatError(f"{lay.missing_message(kind, i)}; the frame files of {lay.d} do not "
                             f"match ({have} frames): {gaps}; re-export the scene or remove the "
                             "incomplete frames")


# -- axis alignment -------------------------------------------------------------------------------
def _scan_dirs(d: pathlib.Path, scan_dir) -> list[pathlib.Path]:
    if scan_dir is not None:
        return [pathlib.Path(scan_dir)]
    return [d, d.parent, d.parent.parent / "scans" / d.name]


def _find(dirs: list[pathlib.Path], name: str) -> pathlib.Path | None:
    return next((p / name for p in dirs if (p / name).is_file()), None)


def read_axis_alignment(path) -> np.ndarray | None:
    """The 4x4 `axisAlignment` of a ScanNet `<scene_id>.txt`, or None if it has no such line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ScanNetFormatError(f"missing axis-alignment file {path}; pass the scene's "
                                 "<scene_id>.txt from ScanNet's scans/ folder")
    for line in path.read_text().splitlines():
        key, eq, value = line.partition("=")
        if eq and key.strip() == "axisAlignment":
            try:
                values = [float(v) for v in value.split()]
            except ValueError as e:
                raise ScanNetFormatError(f"{path}: axisAlignment is not a list of numbers ({e})") from e
            if len(values) != 16:
                raise ScanNetFormatError(f"{path}: axisAlignment must hold 16 numbers (a row-major "
                                         f"4x4), got {len(values)}")
            return _check_align(np.array(values).reshape(4, 4), path)
    return None


def _check_align(a: np.ndarray, where) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all():
        raise ScanNetFormatError(f"{where}: axis alignment must be a finite 4x4 matrix, got shape "
                                 f"{list(a.shape)}")
    rot = a[:3, :3]
    if (np.abs(rot @ rot.T - np.eye(3)).max() > 1e-3 or np.linalg.det(rot) < 0
            or np.abs(a[3] - [0, 0, 0, 1]).max() > 1e-6):
        raise ScanNetFormatError(f"{where}: axis alignment is not a rigid transform "
                                 f"(rows {a.tolist()}); use ScanNet's axisAlignment line as is")
    return a


def _axis_alignment(d: pathlib.Path, dirs, axis_align, ours: bool) -> tuple[np.ndarray | None, str | None]:
    """(A or None for the identity, what it came from)."""
    if axis_align is not None and not isinstance(axis_align, (str, pathlib.PurePath)):
        return _check_align(axis_align, "axis_align argument"), "<array>"
    path = pathlib.Path(axis_align) if axis_align is not None else _find(dirs, f"{d.name}.txt")
    a = read_axis_alignment(path) if path is not None else None
    if a is not None:
        return a, str(path)
    if path is not None or not ours:
        looked = path if path is not None else " or ".join(str(p / f"{d.name}.txt") for p in dirs)
        key = str(looked)
        if key not in _WARNED:
            _WARNED.add(key)
            why = "has no 'axisAlignment = ...' line" if path is not None else "does not exist"
            log.warning("%s %s: scene %s is read without axis alignment (identity); its poses "
                        "and boxes stay in the scan's frame", looked, why, d)
    return None, None


# -- annotation: mesh instances and npy boxes -----------------------------------------------------
_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2",
              "int16": "i2", "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4",
              "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4", "double": "f8",
              "float64": "f8"}


def read_ply_vertices(path) -> np.ndarray:
    """`[V, 3]` float64 x, y, z of a PLY file's vertex element (ascii, binary_little_endian or
    binary_big_endian). Elements before the vertex one must not hold list properties in binary
    files (ScanNet's meshes put vertices first)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ScanNetFormatError(f"missing mesh {path}; copy ScanNet's <scene_id>_vh_clean_2.ply")
    data = path.read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ScanNetFormatError(f"{path}: not a PLY file (no 'ply' magic or no end_header)")
    body = data.index(b"\n", end) + 1 if b"\n" in data[end:] else len(data)
    fmt, elements = None, []
    for line in data[:end].decode("ascii", "replace").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            fmt = words[1] if len(words) > 1 else None
        elif words[0] == "element" and len(words) == 3:
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements:
            if words[1] == "list":
                elements[-1][2].append((words[-1], None))
            elif words[1] in _PLY_TYPES:
                elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
            else:
                raise ScanNetFormatError(f"{path}: unknown PLY property type {words[1]!r}")
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ScanNetFormatError(f"{path}: unsupported PLY format {fmt!r} (ascii or binary only)")
    vi = next((j for j, e in enumerate(elements) if e[0] == "vertex"), None)
    if vi is None:
        raise ScanNetFormatError(f"{path}: no 'element vertex' in the PLY header")
    _, count, props = elements[vi]
    names = [n for n, _ in props]
    if not {"x", "y", "z"} <= set(names) or any(t is None for _, t in props):
        raise ScanNetFormatError(f"{path}: the vertex element needs scalar x, y, z properties, got "
                                 f"{names}")
    if fmt == "ascii":
        lines = data[body:].decode("ascii", "replace").splitlines()
        skip = sum(e[1] for e in elements[:vi])
        rows = [ln.split() for ln in lines[skip:skip + count]]
        if len(rows) < count or any(len(r) < len(props) for r in rows):
            raise ScanNetFormatError(f"{path}: truncated; expected {count} vertex rows of "
                                     f"{len(props)} values")
        try:
            xyz = np.array([[float(r[names.index(a)]) for a in "xyz"] for r in rows], np.float64)
        except ValueError as e:
            raise ScanNetFormatError(f"{path}: a vertex row is not numeric ({e})") from e
        return xyz.reshape(-1, 3)
    order = "<" if fmt == "binary_little_endian" else ">"
    offset = body
    for name, n, eprops in elements[:vi]:
        if any(t is None for _, t in eprops):
            raise ScanNetFormatError(f"{path}: element {name!r} with list properties comes before "
                                     "the vertices; write the vertex element first")
        offset += n * sum(np.dtype(t).itemsize for _, t in eprops)
    dtype = np.dtype([(n, order + t) for n, t in props])
    if len(data) < offset + count * dtype.itemsize:
        raise ScanNetFormatError(f"{path}: truncated; the header promises {count} vertices of "
                                 f"{dtype.itemsize} bytes")
    v = np.frombuffer(data, dtype, count, offset)
    return np.stack([v[a].astype(np.float64) for a in "xyz"], axis=1)


def _read_json(path: pathlib.Path, key: str, fix: str):
    if not path.is_file():
        raise ScanNetFormatError(f"missing annotation file {path}; {fix}")
    try:
        value = json.loads(path.read_text())[key]
    except json.JSONDecodeError as e:
        raise ScanNetFormatError(f"{path}: not valid JSON ({e})") from e
    except (KeyError, TypeError) as e:
        raise ScanNetFormatError(f"{path}: no '{key}' list; {fix}") from e
    if not isinstance(value, list):
        raise ScanNetFormatError(f"{path}: '{key}' must be a list, got {type(value).__name__}")
    return value


def _box_of(points: np.ndarray) -> np.ndarray:
    lo, hi = points.min(0), points.max(0)
    return np.concatenate([(lo + hi) / 2, hi - lo, [0.0]])


def _mesh_boxes(ply, segs, agg, table, align, stats: ReadStats):
    verts = read_ply_vertices(ply)
    seg = _read_json(segs, "segIndices", "copy ScanNet's <scene_id>_vh_clean_2.0.010000.segs.json")
    groups = _read_json(agg, "segGroups", "copy ScanNet's <scene_id>.aggregation.json")
    if len(seg) != len(verts):
        raise ScanNetFormatError(f"{segs}: {len(seg)} segIndices but {ply} has {len(verts)} "
                                 "vertices; use the segs.json of this very mesh")
    seg = np.asarray(seg, np.int64)
    if align is not None:
        verts = verts @ align[:3, :3].T + align[:3, 3]
    boxes, labels = [], []
    for j, g in enumerate(groups):
        if not isinstance(g, dict) or "label" not in g or not isinstance(g.get("segments"), list):
            raise ScanNetFormatError(f"{agg}: segGroups[{j}] needs 'label' and a 'segments' list, "
                                     f"got {str(g)[:80]}")
        oid, raw = int(g.get("objectId", g.get("id", j))), str(g["label"])
        idx, why = scannet_labels.raw_to_scannet18(raw, table)
        pts = verts[np.isin(seg, np.asarray(g["segments"], np.int64))]
        if idx is not None and not len(pts):
            why = "no mesh vertex lies in its segments"
        box = _box_of(pts) if len(pts) else None
        if idx is not None and box is not None and (box[3:6] <= 0).any():
            why = f"degenerate box (size {box[3:6].tolist()})"
        if why:
            stats.skipped_instances.append((oid, raw, why))
            continue
        boxes.append(box)
        labels.append(idx)
    stats.instances = len(groups)
    return boxes, labels


def _npy_boxes(path: pathlib.Path, stats: ReadStats):
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ScanNetFormatError(f"{path}: not a numpy .npy array ({e})") from e
    if arr.ndim != 2 or (arr.size and arr.shape[1] < 7) or not np.isfinite(arr).all():
        raise ScanNetFormatError(f"{path}: boxes must be a finite [N, 7] array (cx cy cz dx dy dz "
                                 f"nyu40_id), got shape {list(arr.shape)}")
    boxes, labels = [], []
    for j, row in enumerate(arr.reshape(-1, max(arr.shape[1], 7)) if arr.size else []):
        nyu = int(round(float(row[6])))
        idx, why = scannet_labels.nyu40_to_class(nyu)
        box = np.concatenate([row[:6].astype(np.float64), [0.0]])
        if idx is not None and (box[3:6] <= 0).any():
            why = f"degenerate box (size {box[3:6].tolist()})"
        if why:
            stats.skipped_instances.append((j, scannet_labels.nyu40_name(nyu), why))
            continue
        boxes.append(box)
        labels.append(idx)
    stats.instances = len(arr)
    return boxes, labels


def _align_boxes(boxes: np.ndarray, a: np.ndarray, where) -> np.ndarray:
    """(cx, cy, cz, dx, dy, dz, yaw) boxes moved by a rigid A that rotates about z only."""
    r = a[:3, :3]
    if np.abs(r[2] - [0, 0, 1]).max() > 1e-4 or np.abs(r[:2, 2]).max() > 1e-4:
        raise ScanNetFormatError(f"{where}: boxes cannot follow an axis alignment that tilts the z "
                                 "axis; store the scene.json boxes already axis-aligned")
    out = boxes.astype(np.float64).copy()
    out[:, :3] = boxes[:, :3] @ r.T + a[:3, 3]
    yaw = boxes[:, 6] + math.atan2(r[1, 0], r[0, 0])
    out[:, 6] = np.arctan2(np.sin(yaw), np.cos(yaw))
    return out


# -- frame sampling -------------------------------------------------------------------------------
def _coverage_pick(lay: _Layout, ids, poses, k_color, color_hw, num_views: int, seed: int):
    """Greedy max-coverage over world voxels of back-projected depth (module docstring)."""
    k_file = _intrinsic(lay.k_depth_path) if lay.k_depth_path.is_file() else None
    keys = []
    for i, pose in zip(ids, poses):
        depth = read_depth_png(lay.path("depth", i))
        k = k_file if k_file is not None else _scale_k(k_color, color_hw, depth.shape)
        step = max(1, math.ceil(depth.shape[1] / COVERAGE_COLUMNS))
        v, u = np.mgrid[0:depth.shape[0]:step, 0:depth.shape[1]:step]
        z = depth[v, u]
        ok = z > 0
        z, u, v = z[ok], u[ok].astype(np.float64), v[ok].astype(np.float64)
        cam = np.stack([(u - k[0, 2]) / k[0, 0] * z, (v - k[1, 2]) / k[1, 1] * z, z], 1)
        world = cam @ pose[:3, :3].T + pose[:3, 3]
        keys.append(np.unique(np.floor(world / COVERAGE_VOXEL_M).astype(np.int64), axis=0))
    allkeys = np.concatenate(keys) if keys else np.zeros((0, 3), np.int64)
    _, inv = np.unique(allkeys, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    splits = np.cumsum([len(x) for x in keys])[:-1]
    voxels = np.split(inv, splits)
    seen = np.zeros(inv.max() + 1 if len(inv) else 0, bool)
    priority = np.random.default_rng(seed).permutation(len(ids))
    chosen: list[int] = []
    for _ in range(num_views):
        best = max((j for j in range(len(ids)) if j not in chosen),
                   key=lambda j: (int((~seen[voxels[j]]).sum()), -priority[j]))
        chosen.append(best)
        seen[voxels[best]] = True
    return [ids[j] for j in sorted(chosen)]


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


def read_scene(scene_dir, **kwargs) -> Sample:
    """`read_scene_with_stats(scene_dir, **kwargs)[0]`: the scene as a validated `Sample`."""
    return read_scene_with_stats(scene_dir, **kwargs)[0]


def read_scene_with_stats(scene_dir, *, frame_ids=None, num_views: int | None = None,
                          image_size=None, layout: str = "auto", sampling: str = "uniform",
                          seed: int = 0, scan_dir=None, axis_align=None, box_source: str = "auto",
                          labels_tsv=None, boxes_npy=None) -> tuple[Sample, ReadStats]:
    """Reads a scene folder (either layout) into a validated `Sample` and says what it skipped.

    Args:
      frame_ids: frames to read, in order; None picks `num_views` frames (by `sampling`) from the
        sorted ids with a valid pose (all of them when `num_views` is None). The ids come from
        `scene.json` when it lists them, else from the files on disk.
      num_views: how many frames to pick when `frame_ids` is None.
      image_size: optional (height, width) to resize to (colour bilinear, depth nearest, K
        scaled); default: the colour frames' size.
      layout: "auto" (by what is on disk), "export" or "posed_images".
      sampling: "uniform" or "coverage" (module docstring); `seed` breaks coverage ties.
      scan_dir: folder holding ScanNet's scan files (<scene_id>.txt, mesh, segs, aggregation,
        _bbox.npy); default: searched next to the scene (module docstring).
      axis_align: None (look for <scene_id>.txt), a path to that file, or a 4x4 array.
      box_source: "auto", "scene.json", "mesh", "npy" or "none".
      labels_tsv: path of scannetv2-labels.combined.tsv (needed for mesh boxes).
      boxes_npy: path of a votenet/mmdet3d boxes .npy (default: searched as a scan file).

    Returns:
      (sample, stats): `stats` counts the frames skipped for invalid poses and the instances
      skipped for unmapped labels or empty geometry; both are also logged.
    """
    d = pathlib.Path(scene_dir)
    if not d.is_dir():
        raise ScanNetFormatError(f"scene folder {d} does not exist")
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    if box_source not in BOX_SOURCES:
        raise ValueError(f"box_source must be one of {BOX_SOURCES}, got {box_source!r}")
    lay = _layout(d, layout)
    stats = ReadStats(scene_dir=str(d), layout=lay.name)
    meta_path = d / "scene.json"
    meta = _read_meta(d)
    dirs = _scan_dirs(d, scan_dir)
    align, stats.axis_alignment = _axis_alignment(d, dirs, axis_align, meta.get("format") == FORMAT)
    k_color = _intrinsic(lay.k_color_path)

    if frame_ids is None:
        if "frame_ids" in meta:
            ids, counts = [int(i) for i in meta["frame_ids"]], None
        else:
            on_disk = lay.ids_on_disk()
            ids = sorted(set().union(*on_disk.values()))
            counts = {k: len(v) for k, v in on_disk.items()}
        _check_complete(lay, ids, counts, f"the frames {meta_path.name} lists")
        stats.candidate_frames = len(ids)
        pose_of = {i: read_matrix(lay.path("pose", i)) for i in ids}
        stats.invalid_pose_ids = [i for i in ids if not np.isfinite(pose_of[i]).all()]
        ids = [i for i in ids if np.isfinite(pose_of[i]).all()]
        if num_views is not None:
            if not 1 <= num_views <= len(ids):
                raise ScanNetFormatError(f"{d}: asked for num_views={num_views} but it has "
                                         f"{len(ids)} frames with a valid pose")
            if sampling == "uniform":
                ids = [ids[j] for j in np.round(np.linspace(0, len(ids) - 1, num_views)).astype(int)]
            else:
                for i in ids:
                    _check_pose(pose_of[i], lay.path("pose", i))
                color_hw = _image_hw(lay, ids[0])
                world = [pose_of[i] if align is None else align @ pose_of[i] for i in ids]
                ids = _coverage_pick(lay, ids, world, k_color, color_hw, num_views, seed)
    else:
        ids = [int(i) for i in frame_ids]
        if num_views is not None and num_views != len(ids):
            raise ScanNetFormatError(f"{d}: num_views={num_views} contradicts the {len(ids)} "
                                     "frame_ids given; pass one of them")
        _check_complete(lay, ids, None)
    if not ids:
        raise ScanNetFormatError(f"{d}: no frames to read (no colour frames, or every pose is "
                                 "invalid)")
    stats.frame_ids = list(ids)

    rgbs, depths, poses = [], [], []
    for i in ids:
        path = next(p for p in lay.color_paths(i) if p.is_file())
        img = _open_image(path).convert("RGB")
        if rgbs and img.size != rgbs[0].size:
            raise ScanNetFormatError(f"{path}: frame {i} is {img.size[0]}x{img.size[1]} but "
                                     f"frame {ids[0]} is {rgbs[0].size[0]}x{rgbs[0].size[1]}")
        rgbs.append(img)
        depths.append(read_depth_png(lay.path("depth", i)))
        pose = read_matrix(lay.path("pose", i))
        _check_pose(pose, lay.path("pose", i))
        poses.append(pose if align is None else align @ pose)

    color_hw = (rgbs[0].size[1], rgbs[0].size[0])
    hw = color_hw if image_size is None else tuple(int(s) for s in image_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size must be (height, width) with positive entries, got {image_size!r}")
    k = _scale_k(k_color, color_hw, hw)
    rgb = np.stack([np.asarray(im if im.size == (hw[1], hw[0]) else
                               im.resize((hw[1], hw[0]), Image.BILINEAR)) for im in rgbs])
    k_file = _intrinsic(lay.k_depth_path) if lay.k_depth_path.is_file() else None
    depth = []
    for dep in depths:
        k_depth = k_file if k_file is not None else _scale_k(k_color, color_hw, dep.shape)
        depth.append(dep if dep.shape == hw and np.array_equal(k_depth, k)
                     else _resample_depth(dep, k_depth, k, hw))

    boxes, labels, names = _boxes(d, meta, meta_path, dirs, align, box_source, labels_tsv,
                                  boxes_npy, stats)
    if stats.invalid_pose_ids or stats.skipped_instances:
        log.info("%s: skipped %d of %d frames for an invalid pose %s and %d of %d %s instances %s",
                 d, stats.invalid_poses, stats.candidate_frames, stats.invalid_pose_ids,
                 stats.skipped_instance_count, stats.instances, stats.box_source,
                 [(o, lab) for o, lab, _ in stats.skipped_instances])
    try:
        sample = Sample(
            sample_id=str(meta.get("sample_id", d.name)),
            rgb=rgb.astype(np.uint8),
            depth=np.stack(depth).astype(np.float32),
            intrinsics=np.repeat(k[None], len(ids), 0).astype(np.float32),
            cam_to_world=np.stack(poses).astype(np.float32),
            boxes=boxes,
            labels=labels,
            label_names=names,
            qa=tuple(QA.from_json(q) for q in meta.get("qa", ())),
        ).validate()
    except SampleError as e:
        raise ScanNetFormatError(f"{d}: {e}") from e
    return sample, stats


def _image_hw(lay: _Layout, i: int) -> tuple[int, int]:
    img = _open_image(next(p for p in lay.color_paths(i) if p.is_file()))
    return img.size[1], img.size[0]


def _boxes(d, meta, meta_path, dirs, align, source, labels_tsv, boxes_npy, stats: ReadStats):
    """(boxes [N,7] float32, labels int32 [N], label_names) from the chosen box source."""
    sid = d.name
    mesh = [dirs[0] / n for n in (f"{sid}_vh_clean_2.ply", f"{sid}_vh_clean_2.0.010000.segs.json",
                                  f"{sid}.aggregation.json")]
    found = [_find(dirs, p.name) for p in mesh]
    mesh = [f or p for f, p in zip(found, mesh)]
    npy = (pathlib.Path(boxes_npy) if boxes_npy is not None else
           _find(dirs, f"{sid}_bbox.npy") or _find(dirs, f"{sid}_aligned_bbox.npy"))
    if source == "auto":
        source = ("scene.json" if meta.get("boxes") else
                  "mesh" if all(found) and labels_tsv is not None else
                  "npy" if npy is not None else
                  "mesh" if any(found) else "none")
    stats.box_source = source
    if source == "none":
        return np.zeros((0, 7), np.float32), np.zeros(0, np.int32), ()
    if source == "scene.json":
        boxes = meta.get("boxes", [])
        if any(len(b) != 7 for b in boxes):
            bad = next(j for j, b in enumerate(boxes) if len(b) != 7)
            raise ScanNetFormatError(f"{meta_path}: boxes[{bad}] must be (cx, cy, cz, dx, dy, dz, "
                                     f"yaw), got {boxes[bad]}")
        arr = np.array(boxes, np.float64).reshape(-1, 7)
        if align is not None and len(arr):
            arr = _align_boxes(arr, align, meta_path)
        stats.instances = len(arr)
        return (arr.astype(np.float32), np.array(meta.get("labels", []), np.int32).reshape(-1),
                tuple(meta.get("label_names", ())))
    if source == "npy":
        if npy is None or not npy.is_file():
            want = npy or " or ".join(str(p / f"{sid}_bbox.npy") for p in dirs)
            raise ScanNetFormatError(f"missing boxes file {want}; pass boxes_npy= or another "
                                     "box_source")
        boxes, labels = _npy_boxes(npy, stats)
    else:
        missing = next((p for p in mesh if not p.is_file()), None)
        if missing is not None:
            raise ScanNetFormatError(f"missing annotation file {missing}; copy it from ScanNet's "
                                     f"scans/{sid}/ (mesh boxes need the .ply, .segs.json and "
                                     ".aggregation.json) or pass another box_source")
        if labels_tsv is None:
            raise ScanNetFormatError(f"{mesh[2]}: mesh instances carry raw ScanNet labels; pass "
                                     "labels_tsv=<path of scannetv2-labels.combined.tsv>")
        try:
            table = scannet_labels.read_label_table(labels_tsv)
        except scannet_labels.LabelTableError as e:
            raise ScanNetFormatError(str(e)) from e
        boxes, labels = _mesh_boxes(*mesh, table, align, stats)
    return (np.array(boxes, np.float32).reshape(-1, 7), np.array(labels, np.int32),
            tuple(scannet_labels.SCANNET18_CLASSES[i] for i in labels))
