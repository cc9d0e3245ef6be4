"""Built-in synthetic scenes: primitives on a floor, exact RGB-D by numpy ray casting (DESIGN.md §3).

A scene is deterministic from one integer seed, so any scene of a split can be regenerated alone
and in parallel: scene i of a split uses `scene_seed(split_seed, i)`. The seed feeds three
independent streams (objects, cameras, questions), so the same seed gives the same objects at
every image size and view count.

Layout by construction: 3-8 primitives (boxes with a yaw, spheres, vertical cylinders), each in
a distinct palette colour so "the red box" names one object. One or two of them rest exactly on a
box or cylinder (contact), some stand a few centimetres from another (near), the rest are spread
over a disc of radius AREA_RADIUS (far). Objects on the floor draw a size class (SIZE_CLASSES);
an object resting on another is sized to the top it stands on. Every pair that is not a support pair is at least MIN_GAP apart, so
nothing interpenetrates and contact is never ambiguous. Cameras sit on a ring around the scene,
looking at its centre from above, far enough that every object is fully in every view.

Rendering: per view, one ray per pixel through K^-1 [u, v, 1] (OpenCV camera, world z up), so the
ray parameter at a hit is the metric z-depth. Nearest hit over a finite checkered floor (z = 0)
and every primitive; Lambertian shading with one directional light; rays that hit nothing are
sky with depth 0 (invalid).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pathlib
import shutil
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import numpy as np
import tqdm

from data_pipelines import scannet, spatial_qa
from data_pipelines.sample import Sample
from data_pipelines.spatial_qa import Primitive

PALETTE = {  # name -> linear albedo; no two objects of a scene share one
    "red": (0.85, 0.12, 0.10), "green": (0.15, 0.65, 0.20), "blue": (0.12, 0.30, 0.88),
    "yellow": (0.92, 0.85, 0.15), "purple": (0.55, 0.20, 0.72), "orange": (0.95, 0.50, 0.08),
    "cyan": (0.12, 0.80, 0.85), "white": (0.95, 0.95, 0.95), "pink": (0.95, 0.50, 0.72),
    "brown": (0.50, 0.30, 0.14),
}
SIZE_CLASSES = {"small": (0.15, 0.25), "medium": (0.28, 0.42), "large": (0.45, 0.65)}  # metres
FLOOR_HALF = 6.0  # the floor is the square |x|, |y| <= FLOOR_HALF; beyond it is sky
FLOOR_RGB = np.array([0.58, 0.56, 0.52])
CHECKER = 0.5  # metres per floor tile; +-6% brightness so depth cues are visible
LIGHT = np.array([0.35, 0.25, 1.0]) / np.linalg.norm([0.35, 0.25, 1.0])
AMBIENT = 0.35
AREA_RADIUS = 1.2  # metres: object centres stay within this distance of the origin
MIN_GAP = 0.02  # metres between any two objects that do not rest on each other
NEAR_GAP = (0.03, 0.08)  # gap of "adjacent" placements: clearly near, clearly not touching
FREE_GAP = 0.15  # minimum gap of a free placement to everything placed before
SPLIT_MANIFEST = "split.json"


def scene_seed(split_seed: int, index: int) -> int:
    """The seed of scene `index` of the split seeded `split_seed` (independent streams)."""
    return int(np.random.SeedSequence([int(split_seed), int(index)]).generate_state(1)[0])


def _as_hw(image_size) -> tuple[int, int]:
    hw = (int(image_size), int(image_size)) if np.isscalar(image_size) else tuple(map(int, image_size))
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size must be (height, width) with positive entries, got {image_size!r}")
    return hw


# ----------------------------------------------------------------------------------- layout


def _sample_shape(rng, kind: str, scale: float) -> np.ndarray:
    if kind == "box":
        return scale * rng.uniform(0.7, 1.3, 3)
    if kind == "sphere":
        return np.full(3, scale)
    return np.array([1.0, 1.0, 0.0]) * scale * rng.uniform(0.7, 1.1) + [0, 0, scale * rng.uniform(0.8, 1.6)]


def _on_floor(kind, size, xy, yaw) -> Primitive:
    return Primitive(kind, np.array([xy[0], xy[1], size[2] / 2]), size, float(yaw))


def _place_adjacent(rng, kind, size, yaw, anchor: Primitive) -> Primitive:
    """Puts the new object along a random direction from `anchor` at a gap in NEAR_GAP. The gap
    between convex solids grows monotonically once they separate, so bisection finds it."""
    target, angle = rng.uniform(*NEAR_GAP), rng.uniform(0, 2 * np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    at = lambda t: _on_floor(kind, size, anchor.center[:2] + t * direction, yaw)
    lo, hi = 0.0, 1.0
    while spatial_qa.surface_gap(at(hi), anchor) < target:
        hi *= 2
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if spatial_qa.surface_gap(at(mid), anchor) < target else (lo, mid)
    return at(hi)


def _clear(p: Primitive, others: list[Primitive], gap: float) -> bool:
    return all(spatial_qa.surface_gap(p, o) >= gap for o in others)


def _sample_objects(rng) -> tuple[list[Primitive], list[str]]:
    n = int(rng.integers(3, 9))
    num_up = 1 + int(rng.integers(0, n // 3))
    colours = [list(PALETTE)[c] for c in rng.choice(len(PALETTE), n, replace=False)]
    kinds = [spatial_qa.KINDS[k] for k in rng.integers(0, 3, n)]
    for s in range(num_up):  # supports (the first num_up objects) need a flat top
        kinds[s] = ("box", "cylinder")[int(rng.integers(0, 2))]
    for _ in range(200):
        ground: list[Primitive] = []
        for k in range(n - num_up):
            scale = rng.uniform(*SIZE_CLASSES[rng.choice(list(SIZE_CLASSES))])
            size, yaw = _sample_shape(rng, kinds[k], scale), rng.uniform(-np.pi / 2, np.pi / 2)
            for _ in range(50):
                if ground and rng.random() < 0.5:
                    p = _place_adjacent(rng, kinds[k], size, yaw, ground[rng.integers(len(ground))])
                    ok = _clear(p, ground, MIN_GAP)
                else:
                    xy = rng.uniform(-AREA_RADIUS, AREA_RADIUS, 2)
                    p = _on_floor(kinds[k], size, xy, yaw)
                    ok = _clear(p, ground, FREE_GAP)
                if ok and np.linalg.norm(p.center[:2]) <= AREA_RADIUS:
                    ground.append(p)
                    break
            else:
                break
        if len(ground) < n - num_up:
            continue
        uppers = []
        for u in range(num_up):
            support, kind = ground[u], kinds[n - num_up + u]
            top = 0.5 * np.min(support.size[:2])  # inscribed radius of the top face
            for _ in range(50):
                size = _sample_shape(rng, kind, rng.uniform(0.6, 1.0) * 2 * top)
                r, phi = 0.3 * top * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
                xy = support.center[:2] + r * np.array([np.cos(phi), np.sin(phi)])
                z = support.z_max + size[2] / 2  # rests exactly on the support's top face
                p = Primitive(kind, np.array([xy[0], xy[1], z]), size, float(rng.uniform(-np.pi / 2, np.pi / 2)))
                if _clear(p, [o for o in ground + uppers if o is not support], MIN_GAP):
                    uppers.append(p)
                    break
        if len(uppers) == num_up:
            prims = ground + uppers
            names = [f"{c} {p.kind}" for c, p in zip(colours, prims)]
            order = rng.permutation(n)  # so supports are not always the first objects
            return [prims[i] for i in order], [names[i] for i in order]
    raise RuntimeError("could not lay out a scene in 200 attempts; AREA_RADIUS is too small "
                       "for the object sizes")


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """`[4, 4]` OpenCV cam_to_world (x right, y down, z forward) at `eye` looking at `target`,
    world z up."""
    z = (target - eye) / np.linalg.norm(target - eye)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([x, np.cross(z, x), z], axis=1)
    pose[:3, 3] = eye
    return pose


def _fit_distance(k, hw, target, direction, corners, margin=0.06) -> float:
    """Smallest distance along `direction` from `target` at which every corner projects inside
    the image with `margin` (fraction of its size) to spare. Moving the camera back along its
    axis keeps each point's camera x, y and adds the distance to its z, so each corner and image
    bound gives the least z it needs in closed form."""
    pose = look_at(target + direction, target)
    cam = (corners - target) @ pose[:3, :3]  # camera coordinates at distance 0
    need = [np.full(len(cam), 0.1)]  # stay well in front of the camera
    for axis, size in ((0, hw[1]), (1, hw[0])):
        f, c = k[axis, axis], k[axis, 2]
        lo, hi = margin * size - c, (1 - margin) * size - 1 - c  # pixel offsets from the centre
        need.append(f * np.maximum(cam[:, axis] / hi, cam[:, axis] / lo))
    return float((np.max(need, axis=0) - cam[:, 2]).max())


def _sample_cameras(rng, prims, hw, num_views) -> tuple[np.ndarray, np.ndarray]:
    """One pinhole K (field of view 55-65 degrees across the longer side) and `num_views` poses
    on a ring around the scene, looking at it from 25-45 degrees above the floor, each as close
    as keeps every object in the frame times 1-1.2."""
    h, w = hw
    fov = np.deg2rad(rng.uniform(55, 65))
    f = 0.5 * max(h, w) / np.tan(fov / 2)
    k = np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]])
    corners = np.concatenate([_box_corners(p) for p in prims])
    lo, hi = corners.min(0), corners.max(0)
    target = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, 0.4 * hi[2]])
    az0, el0 = rng.uniform(0, 2 * np.pi), np.deg2rad(rng.uniform(25, 45))
    poses = []
    for v in range(num_views):
        az = az0 + 2 * np.pi * v / num_views + rng.uniform(-0.2, 0.2)
        el = el0 + np.deg2rad(rng.uniform(-5, 5))
        direction = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
        dist = _fit_distance(k, hw, target, direction, corners) * rng.uniform(1.0, 1.2)
        poses.append(look_at(target + dist * direction, target))
    return k, np.stack(poses)


def _box_corners(p: Primitive) -> np.ndarray:
    signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
    local = 0.5 * signs * p.size
    c, s = np.cos(p.yaw), np.sin(p.yaw)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) if p.kind == "box" else np.eye(3)
    return p.center + local @ rot.T


# -------------------------------------------------------------------------------- rendering
# Rays are component-major: origins `o` and directions `d` are [3, M] (or [3, 1], shared by all
# rays), so every step is an elementwise op over contiguous rows. Each `_hit_*` returns the first
# entry parameter t [M] (inf on a miss) and the outward unit normal there [3, M].


def _yaw_inv(p: Primitive, x, y):
    """World (x, y) offsets into the frame of `p` (rotated by -yaw)."""
    c, s = np.cos(p.yaw), np.sin(p.yaw)
    return c * x + s * y, -s * x + c * y


def _hit_box(p: Primitive, o, d):
    c, s = np.cos(p.yaw), np.sin(p.yaw)
    rel = o - p.center[:, None]
    ol = np.stack([*_yaw_inv(p, rel[0], rel[1]), rel[2]])
    dl = np.stack([*_yaw_inv(p, d[0], d[1]), d[2]])
    ol, dl = np.broadcast_arrays(ol, np.where(dl == 0, 1e-12, dl))
    half = 0.5 * p.size[:, None]
    t1, t2 = (-half - ol) / dl, (half - ol) / dl
    tmin = np.minimum(t1, t2)
    t_near, t_far = tmin.max(0), np.maximum(t1, t2).min(0)
    t = np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)
    axis, cols = tmin.argmax(0), np.arange(dl.shape[1])
    nl = np.zeros_like(dl)
    nl[axis, cols] = -np.sign(dl[axis, cols])
    return t, np.stack([c * nl[0] - s * nl[1], s * nl[0] + c * nl[1], nl[2]])


def _hit_sphere(p: Primitive, o, d):
    oc = o - p.center[:, None]
    a, b, c = (d * d).sum(0), 2 * (d * oc).sum(0), (oc * oc).sum(0) - p.radius ** 2
    disc = b * b - 4 * a * c
    t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
    t = np.where((disc >= 0) & (t > 0), t, np.inf)
    return t, (oc + np.where(np.isfinite(t), t, 0) * d) / p.radius


def _hit_cylinder(p: Primitive, o, d):
    r, z0, z1 = p.radius, p.z_min, p.z_max
    qx, qy = o[0] - p.center[0], o[1] - p.center[1]
    a, b, c = d[0] ** 2 + d[1] ** 2, 2 * (d[0] * qx + d[1] * qy), qx * qx + qy * qy - r * r
    disc = b * b - 4 * a * c
    t_side = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * np.maximum(a, 1e-12))
    z_side = o[2] + t_side * d[2]
    t_side = np.where((disc >= 0) & (a > 0) & (t_side > 0) & (z_side >= z0) & (z_side <= z1),
                      t_side, np.inf)
    dz = np.where(d[2] == 0, 1e-12, d[2])
    t_cap = np.where(dz < 0, z1 - o[2], z0 - o[2]) / dz  # top cap seen from above, bottom from below
    cx, cy = qx + t_cap * d[0], qy + t_cap * d[1]
    t_cap = np.where((t_cap > 0) & (cx * cx + cy * cy <= r * r), t_cap, np.inf)
    ts = np.where(np.isfinite(t_side), t_side, 0)
    side = t_side <= t_cap
    n = np.stack([np.where(side, (qx + ts * d[0]) / r, 0), np.where(side, (qy + ts * d[1]) / r, 0),
                  np.where(side, 0, -np.sign(dz))])
    return np.minimum(t_side, t_cap), n


_HIT = {"box": _hit_box, "sphere": _hit_sphere, "cylinder": _hit_cylinder}


def _hit(p: Primitive, o, d):
    """`_HIT` on only the rays whose line passes the primitive's bounding sphere: each object
    covers a small part of a view, so this skips most of the exact tests. Returns the tested ray
    indices [M] and their t [M] and normals [3, M]."""
    w = p.center[:, None] - o
    wd, ww, dd = (w * d).sum(0), (w * w).sum(0), (d * d).sum(0)
    near = np.flatnonzero(ww * dd - wd * wd <= 0.25 * float(p.size @ p.size) * dd)
    pick = lambda x: x[:, near] if x.shape[1] > 1 else x
    if not len(near):
        return near, np.zeros(0), np.zeros((3, 0))
    return (near, *_HIT[p.kind](p, pick(o), pick(d)))


def _cast(prims: list[Primitive], intrinsics: np.ndarray, cam_to_world: np.ndarray, hw):
    """Primary rays of one view: the ray directions `[3, H*W]`, origin `[3, 1]`, hit distance
    (z-depth, inf for sky) `[H*W]`, the primitive each pixel sees (-1: floor or sky) `[H*W]`,
    surface normals `[3, H*W]` and the floor hit's x, y `[H*W]`."""
    h, w = hw
    k, pose = np.asarray(intrinsics, np.float64), np.asarray(cam_to_world, np.float64)
    v, u = np.mgrid[0:h, 0:w].reshape(2, -1).astype(np.float64)
    xc, yc = (u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1]
    # Camera z = 1 along each ray, so the hit parameter is the z-depth.
    d = np.stack([r[0] * xc + r[1] * yc + r[2] for r in pose[:3, :3]])
    o = pose[:3, 3:4]

    down = d[2] < 0
    best = np.where(down, -o[2] / np.where(down, d[2], -1.0), np.inf)  # the floor z = 0
    fx, fy = (o[i] + np.where(down, best, 0.0) * d[i] for i in (0, 1))
    best[(np.abs(fx) > FLOOR_HALF) | (np.abs(fy) > FLOOR_HALF)] = np.inf
    owner = np.full(h * w, -1)  # index of the primitive seen; -1 floor or sky
    normal = np.zeros((3, h * w))
    normal[2] = 1.0
    for j, p in enumerate(prims):
        idx, t, n = _hit(p, o, d)
        closer = t < best[idx]
        sel = idx[closer]
        best[sel], normal[:, sel], owner[sel] = t[closer], n[:, closer], j
    return d, o, best, owner, normal, fx, fy


def render_view(prims: list[Primitive], albedo: np.ndarray, intrinsics: np.ndarray,
                cam_to_world: np.ndarray, image_size) -> tuple[np.ndarray, np.ndarray]:
    """Ray casts one view. Returns rgb uint8 `[H, W, 3]` and z-depth float32 `[H, W]` (0 = sky).

    Args:
      albedo: `[N, 3]` colours in [0, 1] of `prims`.
      intrinsics: `[3, 3]` pinhole K for this image size; cam_to_world: `[4, 4]` OpenCV pose.
    """
    h, w = _as_hw(image_size)
    d, o, best, owner, normal, fx, fy = _cast(prims, intrinsics, cam_to_world, (h, w))

    hit = np.isfinite(best)
    tile = (np.floor(fx / CHECKER) + np.floor(fy / CHECKER)) % 2
    colour = FLOOR_RGB[:, None] * (1 + 0.06 * (2 * tile - 1))
    colour[:, owner >= 0] = np.asarray(albedo, np.float64).T[:, owner[owner >= 0]]
    cos = np.where(hit, np.maximum((LIGHT[:, None] * normal).sum(0), 0.0), 0.0)
    # Shadows show where objects meet the floor and each other. Only surfaces facing the light
    # need a shadow ray, and those start just off the surface so they cannot hit it again.
    lit = np.flatnonzero(cos > 0)
    start = o + best[lit] * d[:, lit] + 1e-6 * normal[:, lit]
    blocked = np.zeros(len(lit), bool)
    for p in prims:
        idx, t, _ = _hit(p, start, LIGHT[:, None])
        blocked[idx[np.isfinite(t)]] = True
    cos[lit[blocked]] = 0.0
    shade = AMBIENT + (1 - AMBIENT) * cos

    sky = np.array([0.62, 0.74, 0.90])[:, None] + 0.25 * np.clip(d[2] / np.sqrt((d * d).sum(0)), 0, 1)
    rgb = np.where(hit, colour * shade, sky)
    rgb = np.round(np.clip(rgb.T, 0, 1) * 255).astype(np.uint8).reshape(h, w, 3)
    depth = np.where(hit, best, 0.0).astype(np.float32).reshape(h, w)
    return rgb, depth


# ------------------------------------------------------------------------------------ scenes


class Layout(NamedTuple):
    """The geometry of one scene, before rendering."""

    prims: list[Primitive]
    names: list[str]  # "red box", unique within the scene
    albedo: np.ndarray  # [N, 3] in [0, 1]
    intrinsics: np.ndarray  # [3, 3], shared by all views
    cam_to_world: np.ndarray  # [S, 4, 4] OpenCV, world z up
    qa_rng: np.random.Generator  # the question stream of this seed


def sample_layout(seed: int, *, image_size=(112, 112), num_views: int = 4) -> Layout:
    """Objects and cameras of scene `seed`; objects do not depend on image size or view count."""
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    objects_rng, camera_rng, qa_rng = (np.random.default_rng(s)
                                       for s in np.random.SeedSequence(int(seed)).spawn(3))
    prims, names = _sample_objects(objects_rng)
    albedo = np.array([PALETTE[n.split()[0]] for n in names])
    k, poses = _sample_cameras(camera_rng, prims, _as_hw(image_size), num_views)
    return Layout(prims, names, albedo, k, poses, qa_rng)


def generate_scene(seed: int, *, image_size=(112, 112), num_views: int = 4) -> Sample:
    """Scene `seed` rendered from `num_views` cameras at `image_size` (height, width), with its
    boxes, class ids (0 box, 1 sphere, 2 cylinder), names ("red box") and grounded QA."""
    hw = _as_hw(image_size)
    prims, names, albedo, k, poses, qa_rng = sample_layout(seed, image_size=hw, num_views=num_views)
    views = [render_view(prims, albedo, k, pose, hw) for pose in poses]
    return Sample(
        sample_id=f"synthetic-{int(seed)}",
        rgb=np.stack([v[0] for v in views]),
        depth=np.stack([v[1] for v in views]),
        intrinsics=np.repeat(k[None], num_views, 0).astype(np.float32),
        cam_to_world=poses.astype(np.float32),
        boxes=np.stack([p.box() for p in prims]).astype(np.float32),
        labels=np.array([p.label for p in prims], np.int32),
        label_names=tuple(names),
        qa=spatial_qa.generate_qa(prims, names, poses[0], qa_rng),
    ).validate()


def visible_pixels(layout: Layout) -> np.ndarray:
    """`[S, N]` pixels in which each view sees each object of `layout` (the nearest surface along
    the pixel's ray is the object's), at the image size the layout was sampled for: how well the
    images show it."""
    k = layout.intrinsics  # the principal point sits at the image centre (_sample_cameras)
    hw = (int(round(2 * k[1, 2] + 1)), int(round(2 * k[0, 2] + 1)))
    owners = [_cast(layout.prims, k, pose, hw)[3] for pose in layout.cam_to_world]
    return np.stack([np.bincount(o[o >= 0], minlength=len(layout.prims)) for o in owners])


# ------------------------------------------------------------------------------------ splits


def _write_one(job) -> str:
    out_dir, name, seed, hw, num_views = job
    final = out_dir / name
    if final.is_dir():
        return str(final)
    tmp = out_dir / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    scannet.write_scene(generate_scene(seed, image_size=hw, num_views=num_views), tmp)
    try:
        os.rename(tmp, final)  # atomic: a scene dir either is complete or does not exist
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def generate_split(out_dir, *, num_scenes: int, seed: int, image_size=(112, 112),
                   num_views: int = 4, workers: int | None = None) -> list[str]:
    """Writes scenes `scene{i:05d}_00` (ScanNet exported-frame layout) under `out_dir` and returns
    their paths in order. Scenes already on disk are kept (resume); `split.json` records the
    settings so a rerun with different ones stops instead of mixing scenes. One process writes a
    split at a time. `workers` processes (default min(2, cpus)); 0 or 1 runs in this process."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hw = _as_hw(image_size)
    settings = {"seed": int(seed), "image_size": list(hw), "num_views": int(num_views),
                "generator": "spatial_distill.synthetic/1"}
    manifest = out / SPLIT_MANIFEST
    if manifest.exists():
        old = {k: v for k, v in json.loads(manifest.read_text()).items() if k != "num_scenes"}
        if old != settings:
            raise ValueError(f"{manifest}: split written with {old}, asked for {settings}; use "
                             "another out_dir or delete this one")
    manifest.write_text(json.dumps({**settings, "num_scenes": int(num_scenes)}, indent=1))
    for stale in out.glob(".tmp-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)

    jobs = [(out, f"scene{i:05d}_00", scene_seed(seed, i), hw, num_views) for i in range(num_scenes)]
    todo = [j for j in jobs if not (out / j[1]).is_dir()]
    bar = tqdm.tqdm(total=num_scenes, initial=num_scenes - len(todo), desc="synthetic scenes",
                    unit="scene")
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            _write_one(job)
            bar.update()
    else:
        # forkserver: the caller may hold JAX/TF threads, which fork() would copy half-locked.
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for _ in pool.map(_write_one, todo, chunksize=max(1, min(16, len(todo) // (8 * workers)))):
                bar.update()
    bar.close()
    return [str(out / j[1]) for j in jobs]


def split_stats(scene_dirs) -> dict:
    """Counts for a written split: scenes, objects per scene, questions and yes-fraction per kind,
    scenes asking each kind, and the valid depth range (read from the depth PNGs)."""
    objects, per_kind, yes, with_kind = [], {}, {}, {}
    dmin, dmax, valid, total = np.inf, 0.0, 0, 0
    for d in scene_dirs:
        meta = json.loads((pathlib.Path(d) / "scene.json").read_text())
        objects.append(len(meta.get("labels", [])))
        for kind in {q["kind"] for q in meta.get("qa", [])}:
            with_kind[kind] = with_kind.get(kind, 0) + 1
        for q in meta.get("qa", []):
            per_kind[q["kind"]] = per_kind.get(q["kind"], 0) + 1
            yes[q["kind"]] = yes.get(q["kind"], 0) + (q["answer"] == "yes")
        for f in meta.get("frame_ids") or scannet.frame_ids_on_disk(d):
            depth = scannet.read_depth_png(pathlib.Path(d) / "depth" / f"{f}.png")
            ok = depth > 0
            valid, total = valid + int(ok.sum()), total + depth.size
            if ok.any():
                dmin, dmax = min(dmin, float(depth[ok].min())), max(dmax, float(depth[ok].max()))
    objects = np.array(objects or [0])
    return {
        "scenes": len(scene_dirs),
        "objects_per_scene": {"min": int(objects.min()), "mean": float(objects.mean()),
                              "max": int(objects.max())},
        "qa_per_kind": dict(sorted(per_kind.items())),
        "scenes_with_kind": dict(sorted(with_kind.items())),
        "yes_fraction": {k: yes[k] / per_kind[k] for k in sorted(per_kind) if k != "describe"},
        "depth_m": {"min": dmin if valid else 0.0, "max": dmax,
                    "valid_fraction": valid / max(total, 1)},
    }
