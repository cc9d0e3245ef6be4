"""3D-FRONT rendered views: the on-disk layout of one rendered room, and its reader.

3D-FRONT has no images; the paper uses views rendered from its houses (BlenderProc or any other
renderer). A user renders a room and writes one folder per rendered room ("scene"):

  <scene>/rgb/{id:04d}.png       RGB (or RGBA: alpha is dropped), 8 bits a channel
  <scene>/depth/{id:04d}.png     uint16 millimetres, 0 = invalid (an 8-bit PNG is an error), or
  <scene>/depth/{id:04d}.npy     float32 metres [H, W]; inf / nan (a renderer's background) -> 0.
                                 Exactly one of the two per frame. Depth is z-depth (distance
                                 along the optical axis), not the length of the ray: BlenderProc's
                                 "depth" output, not its "distance" output. Same size as the RGB.
  <scene>/cameras.json           the cameras, below
  <scene>/scene.json             where the boxes come from, below

`id` is a non-negative integer (the file name is zero-padded to at least 4 digits: frame 7 is
`0007.png`, frame 12345 is `12345.png`). The frame ids in rgb/, depth/ and cameras.json must be the
same set: an image without a camera, or a camera without an image or depth, is an error.

cameras.json:

  {"convention": "opengl",            camera axes of every cam_to_world below (required):
                                        "opengl": x right, y up, looking along -z (Blender,
                                                  BlenderProc, OpenGL, three.js)
                                        "opencv": x right, y down, looking along +z
   "world_up": "y",                   the world frame of every cam_to_world below (required):
                                        "y": the house JSON's own frame (3D-FRONT is y-up)
                                        "z": our z-up frame, defined below; the frame a Blender
                                             scene has when the y-up data was imported with the
                                             y-up -> z-up axis change (x, y, z) -> (x, -z, y)
   "intrinsics": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]],
                                      pinhole K in pixels of the RGB images, with pixel (0, 0)
                                      the centre of the top-left pixel (OpenCV); shared by all
                                      frames unless a frame gives its own
   "depth_invalid_above": 100.0,      optional: depths >= this many metres become 0 (a
                                      renderer's background value, e.g. 1e10)
   "frames": [{"id": 0, "cam_to_world": 4x4 rows,
               "convention": "opencv",   optional, overrides the top-level convention
               "intrinsics": 3x3},       optional, overrides the top-level intrinsics
              ...]}

  `cam_to_world` maps camera coordinates to world coordinates (Blender's `matrix_world` of the
  camera object, BlenderProc's `cam2world_matrix`), a rigid transform with last row [0, 0, 0, 1].

scene.json (every path in it is relative to <scene>, or absolute):

  {"sample_id": "house-uid_LivingRoom-1234",   optional; default: the folder name
   "house_json": "../3D-FRONT/<uid>.json",     the 3D-FRONT house, or "house": {...} embedded
   "room_id": "LivingRoom-1234",               the room's `instanceid`; absent or null: every
                                               room of the house
   "future_dir": "../3D-FUTURE-model",         holds <jid>/raw_model.obj (and <jid>/bbox.json)
   "model_info": "../3D-FUTURE-model/model_info.json",   optional; this is the default
   "qa": [...]}                                optional, as `QA.to_json`

  or, with boxes computed elsewhere (already in our convention below):

  {"boxes": [[cx, cy, cz, dx, dy, dz, yaw], ...], "labels": [...], "label_names": [...]}

  Giving both a house and boxes is an error; giving neither reads the views with no boxes.

Conventions and the exact conversions. Our `Sample` world is z-up, our cameras OpenCV. With

  Y_UP_TO_Z_UP = [[1, 0, 0],          (x, y, z)_house -> (x, -z, y)_ours: a +90 degree rotation
                  [0, 0, -1],         about x, det +1; the house's up (+y) becomes our up (+z)
                  [0, 1, 0]]
  OPENGL_TO_OPENCV = diag(1, -1, -1)  flips the camera's y (up -> down) and z (-forward ->
                                      forward); its own inverse

  and W = Y_UP_TO_Z_UP for "world_up": "y" (identity for "z"), C = OPENGL_TO_OPENCV for
  "convention": "opengl" (identity for "opencv"), each as a 4x4 with zero translation:

      cam_to_world_ours = W @ cam_to_world_file @ C

  (C re-expresses camera coordinates before the camera's own transform, W re-expresses world
  coordinates after it; K is unchanged: it is already written for x right, y down pixels.)

Boxes from the house JSON. A room (house["scene"]["room"][i], picked by its "instanceid") lists
children {"ref", "instanceid", "pos" [3], "rot" [4], "scale" [3]}; a child whose "ref" is the
"uid" of an entry of house["furniture"] is a furniture instance of the 3D-FUTURE model with that
entry's "jid"; other children (walls, floors: house["mesh"] entries) are architecture, counted
and not boxed. The room's own pos / rot / scale must be the identity (as 3D-FRONT writes them): we
do not guess how a non-identity room transform composes, and say so. For each instance:

  1. The model's vertex bounds [lo, hi] (metres, in the model's own y-up frame, unscaled), from,
     in this order of precedence:
       <future_dir>/<jid>/bbox.json      {"min": [x, y, z], "max": [x, y, z]}: a precomputed cache
                                         of 2. (3D-FUTURE does not ship it; write it to skip
                                         parsing large OBJs)
       <future_dir>/<jid>/raw_model.obj  the min / max over its `v x y z` lines
     Neither present: the 3D-FUTURE model is missing (an error; see `on_bad_instance`).
  2. Scale: lo * scale, hi * scale (every scale entry must be > 0).
  3. Rotate by "rot", a unit quaternion (x, y, z, w), and translate by "pos", in the house's y-up
     frame: p_house = pos + R(rot) @ (scale * p_model). 3D-FRONT furniture turns about the vertical
     axis only; a rotation that tilts the model's up axis by more than MAX_TILT_DEG degrees is an
     error naming the instance (an axis-aligned box with one yaw cannot hold it).
  4. To our frame: centre = Y_UP_TO_Z_UP @ (pos + R(rot) @ (scale * (lo + hi) / 2));
     (dx, dy, dz) = scaled extents along the model's (x, z, y) axes (Y_UP_TO_Z_UP sends model x
     -> box x, model z -> box -y, model y -> box z); yaw = the angle about our +z from our +x to
     the model's +x axis, so a rotation by theta about the house's +y is a yaw of theta in
     (-pi, pi]. 3D-FUTURE models face their +z, which is the box's local -y.

Labels. `model_info.json` (3D-FUTURE: a list of {"model_id": jid, "category", "super-category",
...}) gives each model's super-category, mapped to a class id by `CLASSES` (3D-FUTURE's seven
furniture super-categories; matched case-insensitively, spaces around "/" ignored):

  0 cabinet/shelf/desk   1 bed   2 chair   3 table   4 sofa   5 pier/stool   6 lighting

An instance whose model has another super-category (e.g. "Others"), none, or no model_info entry
is skipped and counted in stats["skipped_unknown_category"] (by category name). The label name
is the fine category's first alternative, lower-cased ("Lounge Chair / Cafe Chair / Office
Chair" -> "lounge chair"), else the super-category's.

Nothing is dropped silently: `read_scene(..., stats={})` fills the dict given (see `read_scene`);
without one, a scene that skipped anything warns with the counts.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import re
import warnings
from collections import Counter

import numpy as np
from PIL import Image

from data_pipelines import scannet
from data_pipelines.sample import QA, Sample, SampleError

FORMAT = "spatial_distill/front3d-render/1"
MAX_TILT_DEG = 1.0  # furniture rotations must keep the model's up axis within this of vertical

Y_UP_TO_Z_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0])

CLASSES = ("cabinet/shelf/desk", "bed", "chair", "table", "sofa", "pier/stool", "lighting")
BAD_INSTANCE_POLICIES = ("raise", "skip")


class Front3DFormatError(ValueError):
    """A rendered-scene file is missing or malformed; the message names the path and the fix."""


# ---------------------------------------------------------------------------------- geometry

def _as_4x4(r3: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = r3
    return m


def convert_cam_to_world(cam_to_world, *, convention: str, world_up: str) -> np.ndarray:
    """A 4x4 cam_to_world in the given camera convention and world frame -> ours (OpenCV
    camera, z-up world): `W @ cam_to_world @ C` (module docstring). float64."""
    if convention not in ("opengl", "opencv"):
        raise ValueError(f"convention must be 'opengl' or 'opencv', got {convention!r}")
    if world_up not in ("y", "z"):
        raise ValueError(f"world_up must be 'y' or 'z', got {world_up!r}")
    m = np.asarray(cam_to_world, np.float64)
    if world_up == "y":
        m = _as_4x4(Y_UP_TO_Z_UP) @ m
    if convention == "opengl":
        m = m @ _as_4x4(OPENGL_TO_OPENCV)
    return m


def quaternion_to_matrix(q) -> np.ndarray:
    """3x3 rotation of a quaternion (x, y, z, w) (normalised first)."""
    x, y, z, w = np.asarray(q, np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def instance_box(lo, hi, *, pos, rot, scale) -> tuple[np.ndarray, float]:
    """The box `(cx, cy, cz, dx, dy, dz, yaw)` (ours, z-up) of a model with vertex bounds
    [lo, hi] (its own y-up frame) placed by a 3D-FRONT instance's pos / rot (x, y, z, w) / scale,
    and the tilt of the model's up axis in degrees (0 for a rotation about the vertical)."""
    lo, hi, scale = (np.asarray(v, np.float64) for v in (lo, hi, scale))
    r_house = quaternion_to_matrix(rot)
    r = Y_UP_TO_Z_UP @ r_house @ Y_UP_TO_Z_UP.T  # the same rotation, in our frame
    tilt = math.degrees(math.acos(float(np.clip(r[2, 2], -1.0, 1.0))))
    yaw = math.atan2(r[1, 0], r[0, 0])
    centre = Y_UP_TO_Z_UP @ (np.asarray(pos, np.float64) + r_house @ (scale * (lo + hi) / 2))
    ext = scale * (hi - lo)
    return np.array([*centre, ext[0], ext[2], ext[1], yaw]), tilt


# ---------------------------------------------------------------------------- 3D-FUTURE models

def read_obj_bounds(path) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) over the `v x y z [w | r g b]` vertex lines of a Wavefront OBJ file."""
    path = pathlib.Path(path)
    xyz = []
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith((b"v ", b"v\t")):
                    xyz.append(line.split()[1:4])
        arr = np.array(xyz, np.float64)
    except OSError as e:
        raise Front3DFormatError(f"{path}: unreadable ({e})") from e
    except ValueError as e:
        raise Front3DFormatError(f"{path}: a vertex line is not 'v x y z' numbers ({e}); "
                                 "re-extract the 3D-FUTURE model") from e
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] != 3:
        raise Front3DFormatError(f"{path}: no 'v x y z' vertex lines; re-extract the 3D-FUTURE "
                                 "model or write its bbox.json")
    return arr.min(0), arr.max(0)


@functools.lru_cache(maxsize=8192)
def _bounds_cached(path: str, mtime_ns: int) -> tuple[tuple, tuple, str]:
    p = pathlib.Path(path)
    if p.name == "bbox.json":
        try:
            d = json.loads(p.read_text())
            lo, hi = np.array(d["min"], np.float64), np.array(d["max"], np.float64)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise Front3DFormatError(f"{p}: must be {{\"min\": [x, y, z], \"max\": [x, y, z]}} "
                                     f"({type(e).__name__}: {e}); fix or delete it") from e
        if lo.shape != (3,) or hi.shape != (3,) or not np.isfinite([lo, hi]).all():
            raise Front3DFormatError(f"{p}: min and max must be 3 finite numbers each, got "
                                     f"{d['min']} and {d['max']}")
    else:
        lo, hi = read_obj_bounds(p)
    return tuple(lo), tuple(hi), p.name


def model_bounds(model_dir) -> tuple[np.ndarray, np.ndarray, str]:
    """(lo, hi, source file name) of a 3D-FUTURE model folder: bbox.json, else raw_model.obj.
    Cached by path and modification time."""
    d = pathlib.Path(model_dir)
    for name in ("bbox.json", "raw_model.obj"):
        p = d / name
        if p.is_file():
            lo, hi, src = _bounds_cached(str(p.resolve()), p.stat().st_mtime_ns)
            return np.array(lo), np.array(hi), src
    raise Front3DFormatError(f"missing 3D-FUTURE model {d} (neither raw_model.obj nor bbox.json); "
                             "point future_dir at the extracted 3D-FUTURE-model folder, or pass "
                             "on_bad_instance='skip'")


@functools.lru_cache(maxsize=8)
def _model_info_cached(path: str, mtime_ns: int) -> dict:
    p = pathlib.Path(path)
    try:
        entries = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise Front3DFormatError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "model_id" in e
                                                for e in entries):
        raise Front3DFormatError(f"{p}: must be a list of {{\"model_id\", \"category\", "
                                 "\"super-category\", ...}} (3D-FUTURE's model_info.json)")
    return {str(e["model_id"]): e for e in entries}


def read_model_info(path) -> dict:
    """3D-FUTURE's model_info.json as {jid: entry}. Cached by path and modification time."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise Front3DFormatError(f"missing {p}; it ships with 3D-FUTURE-model (set scene.json "
                                 "'model_info' to its path if it lives elsewhere)")
    return _model_info_cached(str(p.resolve()), p.stat().st_mtime_ns)


def _norm_category(name) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\s*/\s*", "/", str(name).strip().lower()))


_CLASS_IDS = {name: i for i, name in enumerate(CLASSES)}


def _label(info: dict | None) -> tuple[int | None, str]:
    """(class id or None, label name) of a model_info entry; the name of an unknown one is its
    super-category as written (for the skip counts)."""
    if info is None:
        return None, "<no model_info entry>"
    sup, cat = info.get("super-category"), info.get("category")
    if not sup:
        return None, "<no super-category>"
    cid = _CLASS_IDS.get(_norm_category(sup))
    if cid is None:
        return None, str(sup)
    return cid, _norm_category(cat or sup).split("/")[0].strip()


# ------------------------------------------------------------------------------- house boxes

def _vec(child: dict, key: str, n: int, default, where: str) -> np.ndarray:
    v = child.get(key, default)
    try:
        arr = np.array(v, np.float64).reshape(-1)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise Front3DFormatError(f"{where}: '{key}' must be {n} finite numbers, got {v!r}")
    return arr


def house_boxes(house: dict, *, future_dir, room_id=None, model_info: dict,
                on_bad_instance: str = "raise", stats: dict | None = None, where: str = "house"
                ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Boxes `[N, 7]` float32, labels `[N]` int32 and label names of the furniture of one room
    (`room_id`, its "instanceid") or of every room (None), per the module docstring.

    `model_info` is `read_model_info(...)`; `where` names the house in messages.
    `on_bad_instance`: "raise" (default) on a missing 3D-FUTURE model, a tilted rotation, a
    non-positive scale or an empty box; "skip" skips such instances and lists them in
    stats["skipped_bad_instance"]. `stats`, when given, is filled with "instances",
    "non_furniture", "boxes", "skipped_unknown_category" and "skipped_bad_instance"."""
    if on_bad_instance not in BAD_INSTANCE_POLICIES:
        raise ValueError(f"on_bad_instance must be one of {BAD_INSTANCE_POLICIES}, got "
                         f"{on_bad_instance!r}")
    future_dir = pathlib.Path(future_dir)
    try:
        rooms = house["scene"]["room"]
        furniture = {f["uid"]: f for f in house.get("furniture", [])}
    except (KeyError, TypeError) as e:
        raise Front3DFormatError(f"{where}: not a 3D-FRONT house (needs scene.room[] and "
                                 f"furniture[] with uid; missing {e})") from e
    if room_id is not None:
        rooms = [r for r in rooms if r.get("instanceid") == room_id]
        if not rooms:
            have = [r.get("instanceid") for r in house["scene"]["room"]]
            raise Front3DFormatError(f"{where}: no room with instanceid {room_id!r}; it has "
                                     f"{have[:20]}; fix scene.json 'room_id'")

    boxes, labels, names = [], [], []
    unknown: Counter = Counter()
    bad: list[str] = []
    n_inst = n_arch = 0
    for room in rooms:
        rwhere = f"{where} room {room.get('instanceid')!r}"
        for key, ident in (("pos", [0, 0, 0]), ("rot", [0, 0, 0, 1]), ("scale", [1, 1, 1])):
            v = _vec(room, key, len(ident), ident, rwhere)
            if np.abs(v - ident).max() > 1e-6:
                raise Front3DFormatError(f"{rwhere}: room '{key}' is {v.tolist()}, not the "
                                         f"identity {ident}; this reader takes children's "
                                         "pos/rot/scale as world placements only")
        for child in room.get("children", []):
            f = furniture.get(child.get("ref"))
            if f is None:
                n_arch += 1
                continue
            n_inst += 1
            jid = str(f.get("jid") or "")
            cwhere = f"{rwhere} instance {child.get('instanceid')!r} (jid {jid!r})"
            try:
                pos = _vec(child, "pos", 3, None, cwhere)
                rot = _vec(child, "rot", 4, None, cwhere)
                scale = _vec(child, "scale", 3, [1, 1, 1], cwhere)
                if np.linalg.norm(rot) < 1e-6:
                    raise Front3DFormatError(f"{cwhere}: 'rot' {rot.tolist()} is not a rotation "
                                             "quaternion (x, y, z, w)")
                if (scale <= 0).any():
                    raise Front3DFormatError(f"{cwhere}: scale {scale.tolist()} must be > 0 "
                                             "(a mirrored or flattened model has no box)")
                if not jid:
                    raise Front3DFormatError(f"{cwhere}: its furniture entry has no 'jid'")
                cid, name = _label(model_info.get(jid))
                if cid is None:  # before the model is read: unknown ones need no mesh
                    unknown[name] += 1
                    continue
                try:
                    lo, hi, src = model_bounds(future_dir / jid)
                except Front3DFormatError as e:
                    raise Front3DFormatError(f"{cwhere}: {e}") from e
                box, tilt = instance_box(lo, hi, pos=pos, rot=rot, scale=scale)
                if tilt > MAX_TILT_DEG:
                    raise Front3DFormatError(
                        f"{cwhere}: rotation {rot.tolist()} (x, y, z, w) tilts the model's up "
                        f"axis by {tilt:.2f} deg (> {MAX_TILT_DEG}); 3D-FRONT furniture turns "
                        "about the vertical only; fix the instance or pass on_bad_instance='skip'")
                if (box[3:6] <= 0).any():
                    raise Front3DFormatError(f"{cwhere}: {future_dir / jid / src} gives an empty "
                                             f"box (size {box[3:6].tolist()}); write a bbox.json "
                                             "with its true extent")
            except Front3DFormatError as e:
                if on_bad_instance == "raise":
                    raise
                bad.append(str(e))
                continue
            boxes.append(box)
            labels.append(cid)
            names.append(name)
    if stats is not None:
        stats.update(instances=n_inst, non_furniture=n_arch, boxes=len(boxes),
                     skipped_unknown_category=dict(unknown), skipped_bad_instance=bad)
    return (np.array(boxes, np.float32).reshape(-1, 7), np.array(labels, np.int32),
            tuple(names))


# -------------------------------------------------------------------------------- the views

def _read_json(path: pathlib.Path, fix: str):
    if not path.is_file():
        raise Front3DFormatError(f"missing {path}; {fix}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise Front3DFormatError(f"{path}: not valid JSON ({e})") from e


def _intrinsic(k, where: str) -> np.ndarray:
    try:
        k = np.array(k, np.float64)
    except (TypeError, ValueError):
        k = np.zeros(0)
    if (k.shape != (3, 3) or not np.isfinite(k).all() or k[0, 0] <= 0 or k[1, 1] <= 0
            or np.abs(k[2] - [0, 0, 1]).max() > 1e-9):
        raise Front3DFormatError(f"{where}: intrinsics must be a pinhole 3x3 [[fx, 0, cx], "
                                 f"[0, fy, cy], [0, 0, 1]] with fx, fy > 0, got {k.tolist()}")
    return k


def _pose(m, where: str) -> np.ndarray:
    try:
        m = np.array(m, np.float64)
    except (TypeError, ValueError):
        m = np.zeros(0)
    if m.shape != (4, 4) or not np.isfinite(m).all():
        raise Front3DFormatError(f"{where}: cam_to_world must be a finite 4x4 matrix (rows)")
    rot = m[:3, :3]
    err = np.abs(rot @ rot.T - np.eye(3)).max()
    if err > 1e-3 or np.linalg.det(rot) < 0 or np.abs(m[3] - [0, 0, 0, 1]).max() > 1e-6:
        raise Front3DFormatError(f"{where}: cam_to_world is not a rigid transform (max |R R^T - I| "
                                 f"= {err:.2e}, det = {np.linalg.det(rot):.4f}, last row "
                                 f"{m[3].tolist()}); remove any camera scale, write rows")
    return m


def _ids_in(folder: pathlib.Path, exts: tuple[str, ...]) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            m = re.fullmatch(r"(\d+)\.(\w+)", p.name)
            if m and m.group(2) in exts:
                found.setdefault(int(m.group(1)), []).append(m.group(2))
    return found


def _mismatch(d: pathlib.Path, what: str, extra: set, missing: set) -> None:
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"frames {sorted(extra)[:10]} are in {what} but not in cameras.json")
        if missing:
            parts.append(f"frames {sorted(missing)[:10]} of cameras.json have no file in {what}")
        raise Front3DFormatError(f"{d}: " + "; ".join(parts) + " (frame counts differ); render "
                                 "or delete the odd frames so rgb/, depth/ and cameras.json list "
                                 "the same ids")


def _read_depth(d: pathlib.Path, fid: int, ext: str, invalid_above) -> np.ndarray:
    path = d / "depth" / f"{fid:04d}.{ext}"
    if ext == "png":
        try:
            return scannet.read_depth_png(path)
        except scannet.ScanNetFormatError as e:
            raise Front3DFormatError(str(e)) from e
    try:
        dep = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise Front3DFormatError(f"{path}: unreadable .npy ({e}); write it with np.save") from e
    if dep.ndim != 2 or dep.dtype.kind != "f":
        raise Front3DFormatError(f"{path}: depth .npy must be a float [H, W] array of metres, got "
                                 f"{dep.dtype.name} {list(dep.shape)}")
    dep = dep.astype(np.float32)
    dep[~np.isfinite(dep)] = 0.0
    if invalid_above is not None:
        dep[dep >= invalid_above] = 0.0
    if (dep < 0).any():
        raise Front3DFormatError(f"{path}: depth must be >= 0 metres (0 = invalid), got "
                                 f"{float(dep.min())}")
    return dep


def _boxes_from_meta(d: pathlib.Path, meta: dict, on_bad_instance: str, stats: dict):
    meta_path = d / "scene.json"
    has_house = "house_json" in meta or "house" in meta
    if has_house and "boxes" in meta:
        raise Front3DFormatError(f"{meta_path}: gives both a house and 'boxes'; keep one")
    if "boxes" in meta:
        stats["box_source"] = "scene.json"
        boxes = meta["boxes"]
        if any(len(b) != 7 for b in boxes):
            bad = next(j for j, b in enumerate(boxes) if len(b) != 7)
            raise Front3DFormatError(f"{meta_path}: boxes[{bad}] must be (cx, cy, cz, dx, dy, dz, "
                                     f"yaw), got {boxes[bad]}")
        return (np.array(boxes, np.float32).reshape(-1, 7),
                np.array(meta.get("labels", []), np.int32).reshape(-1),
                tuple(meta.get("label_names", ())))
    if not has_house:
        stats["box_source"] = "none"
        return np.zeros((0, 7), np.float32), np.zeros(0, np.int32), ()
    stats["box_source"] = "house"

    def resolve(key):
        return (d / meta[key]).resolve()  # an absolute path stays as is

    if "house" in meta:
        house, where = meta["house"], f"{meta_path} (embedded house)"
    else:
        house_path = resolve("house_json")
        house = _read_json(house_path, "fix scene.json 'house_json' (a 3D-FRONT house JSON)")
        where = str(house_path)
    if "future_dir" not in meta:
        raise Front3DFormatError(f"{meta_path}: a house needs 'future_dir', the 3D-FUTURE-model "
                                 "folder holding <jid>/raw_model.obj")
    future_dir = resolve("future_dir")
    info = read_model_info(resolve("model_info") if "model_info" in meta
                           else future_dir / "model_info.json")
    return house_boxes(house, future_dir=future_dir, room_id=meta.get("room_id"),
                       model_info=info, on_bad_instance=on_bad_instance, stats=stats, where=where)


def read_scene(scene_dir, *, num_views: int | None = None, frame_ids=None, image_size=None,
               seed: int = 0, on_bad_instance: str = "raise", stats: dict | None = None) -> Sample:
    """Reads a rendered 3D-FRONT scene folder (module docstring) into a validated `Sample`.

    Args:
      num_views: with `frame_ids=None`, read this many frames drawn at random (without
        replacement, by `seed`) and kept in id order; None: every frame.
      frame_ids: frames to read, in this order.
      image_size: optional (height, width) to resize to (colour bilinear, depth nearest, K
        scaled); default: the frames' own size.
      on_bad_instance: "raise" or "skip" furniture instances with a missing 3D-FUTURE model, a
        tilted rotation, a non-positive scale or an empty box (`house_boxes`).
      stats: a dict to fill with "frame_ids" (read), "box_source" ("house", "scene.json" or
        "none") and, for a house, "instances" (furniture instances seen), "non_furniture"
        (architecture children), "boxes" (kept), "skipped_unknown_category" ({name: count}) and
        "skipped_bad_instance" (one message each). Without it, skips warn.
    """
    d = pathlib.Path(scene_dir)
    if not d.is_dir():
        raise Front3DFormatError(f"scene folder {d} does not exist")
    cams_path = d / "cameras.json"
    cams = _read_json(cams_path, "write the renderer's cameras there (see data_pipelines/front3d.py)")
    out_stats = {} if stats is None else stats

    def field(obj, key, allowed, where):
        if key not in obj:
            raise Front3DFormatError(f"{where}: missing '{key}'; set one of {allowed}")
        if obj[key] not in allowed:
            raise Front3DFormatError(f"{where}: '{key}' must be one of {allowed}, got {obj[key]!r}")
        return obj[key]

    conv_all = field(cams, "convention", ("opengl", "opencv"),
                     f"{cams_path} (Blender / BlenderProc cameras are 'opengl')")
    world_up = field(cams, "world_up", ("y", "z"),
                     f"{cams_path} ('y': the house JSON's frame; 'z': (x, -z, y) of it)")
    frames = cams.get("frames")
    if not isinstance(frames, list) or not frames:
        raise Front3DFormatError(f"{cams_path}: 'frames' must be a non-empty list of "
                                 "{\"id\", \"cam_to_world\"}")
    by_id = {}
    for j, fr in enumerate(frames):
        try:
            fid = int(fr["id"])
        except (KeyError, TypeError, ValueError) as e:
            raise Front3DFormatError(f"{cams_path}: frames[{j}] needs an integer 'id'") from e
        if fid < 0 or fid in by_id:
            raise Front3DFormatError(f"{cams_path}: frames[{j}] id {fid} is negative or repeated")
        by_id[fid] = fr
    invalid_above = cams.get("depth_invalid_above")

    rgb_ids = _ids_in(d / "rgb", ("png",))
    depth_ids = _ids_in(d / "depth", ("png", "npy"))
    cam_ids = set(by_id)
    _mismatch(d, "rgb/", set(rgb_ids) - cam_ids, cam_ids - set(rgb_ids))
    _mismatch(d, "depth/", set(depth_ids) - cam_ids, cam_ids - set(depth_ids))
    both = sorted(i for i, e in depth_ids.items() if len(e) > 1)
    if both:
        raise Front3DFormatError(f"{d / 'depth'}: frame {both[0]} has both {both[0]:04d}.png and "
                                 f"{both[0]:04d}.npy; delete one")

    all_ids = sorted(cam_ids)
    if frame_ids is None:
        ids = all_ids
        if num_views is not None:
            if not 1 <= num_views <= len(ids):
                raise Front3DFormatError(f"{d}: asked for num_views={num_views} but it has "
                                         f"{len(ids)} frames")
            pick = np.random.default_rng(seed).choice(len(ids), num_views, replace=False)
            ids = [ids[j] for j in sorted(pick)]
    else:
        ids = [int(i) for i in frame_ids]
        if num_views is not None and num_views != len(ids):
            raise Front3DFormatError(f"{d}: num_views={num_views} contradicts the {len(ids)} "
                                     "frame_ids given; pass one of them")
        unknown = [i for i in ids if i not in by_id]
        if unknown or not ids:
            raise Front3DFormatError(f"{d}: frame_ids {unknown or ids} are not frames of "
                                     f"cameras.json (it has {all_ids[:20]})")

    k_all = cams.get("intrinsics")
    rgbs, depths, ks, poses = [], [], [], []
    for fid in ids:
        fr, where = by_id[fid], f"{cams_path} frame {fid}"
        if "intrinsics" not in fr and k_all is None:
            raise Front3DFormatError(f"{where}: no intrinsics (neither the frame's nor the "
                                     "top-level 'intrinsics'); write the renderer's K")
        ks.append(_intrinsic(fr.get("intrinsics", k_all), where))
        conv = field(fr, "convention", ("opengl", "opencv"), where) if "convention" in fr else conv_all
        if "cam_to_world" not in fr:
            raise Front3DFormatError(f"{where}: missing 'cam_to_world' (4x4 rows)")
        poses.append(convert_cam_to_world(_pose(fr["cam_to_world"], where), convention=conv,
                                          world_up=world_up))
        rgb_path = d / "rgb" / f"{fid:04d}.png"
        try:
            img = Image.open(rgb_path)
            img.load()
        except (OSError, ValueError, SyntaxError) as e:
            raise Front3DFormatError(f"{rgb_path}: unreadable image ({e}); re-render it") from e
        img = img.convert("RGB")
        if rgbs and img.size != rgbs[0].size:
            raise Front3DFormatError(f"{rgb_path}: is {img.size[0]}x{img.size[1]} but frame "
                                     f"{ids[0]} is {rgbs[0].size[0]}x{rgbs[0].size[1]}; render "
                                     "every view at one size")
        dep = _read_depth(d, fid, depth_ids[fid][0], invalid_above)
        if dep.shape != (img.size[1], img.size[0]):
            raise Front3DFormatError(f"{d / 'depth'} frame {fid}: depth is {dep.shape[1]}x"
                                     f"{dep.shape[0]} but its RGB is {img.size[0]}x{img.size[1]}; "
                                     "write depth at the RGB size")
        rgbs.append(img)
        depths.append(dep)

    src_hw = (rgbs[0].size[1], rgbs[0].size[0])
    hw = src_hw if image_size is None else tuple(int(s) for s in image_size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size must be (height, width) with positive entries, got {image_size!r}")
    if hw != src_hw:
        k_new = [scannet._scale_k(k, src_hw, hw) for k in ks]
        rgbs = [im.resize((hw[1], hw[0]), Image.BILINEAR) for im in rgbs]
        depths = [scannet._resample_depth(dep, k, kn, hw) for dep, k, kn in zip(depths, ks, k_new)]
        ks = k_new

    meta_path = d / "scene.json"
    meta = _read_json(meta_path, "write it (see data_pipelines/front3d.py)") if meta_path.is_file() else {}
    boxes, labels, names = _boxes_from_meta(d, meta, on_bad_instance, out_stats)
    out_stats["frame_ids"] = list(ids)
    if stats is None:
        skipped = sum(out_stats.get("skipped_unknown_category", {}).values())
        bad = out_stats.get("skipped_bad_instance", [])
        if skipped or bad:
            warnings.warn(f"{d}: skipped {skipped} furniture instance(s) of unknown category "
                          f"{out_stats['skipped_unknown_category']} and {len(bad)} bad one(s) "
                          f"{bad[:3]}; pass stats={{}} to read_scene to get the counts",
                          stacklevel=2)
    try:
        return Sample(
            sample_id=str(meta.get("sample_id", d.name)),
            rgb=np.stack([np.asarray(im) for im in rgbs]).astype(np.uint8),
            depth=np.stack(depths).astype(np.float32),
            intrinsics=np.stack(ks).astype(np.float32),
            cam_to_world=np.stack(poses).astype(np.float32),
            boxes=boxes,
            labels=labels,
            label_names=names,
            qa=tuple(QA.from_json(q) for q in meta.get("qa", ())),
        ).validate()
    except SampleError as e:
        raise Front3DFormatError(f"{d}: {e}") from e
