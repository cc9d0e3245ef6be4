"""Spatial questions answered from exact scene geometry (DESIGN.md §3).

A scene is a list of `Primitive`s: boxes (with a yaw about world z), spheres and vertical
cylinders. Every answer is a pure function of their exact shapes, not only of their bounding
boxes, and of the first camera's pose. Questions are asked only where the answer is clear by a
documented margin, so a grounded metric never scores a coin flip.

Thresholds (metres unless noted):
  NEAR = 0.15           "near" iff the minimum surface-to-surface gap is < NEAR.
  NEAR_ASK_MAX = 0.10   proximity is asked only for gaps < NEAR_ASK_MAX ("yes") ...
  FAR_MARGIN = 0.50     ... or gaps > FAR_MARGIN ("no"); the band in between is ambiguous.
  CONTACT_EPS = 1e-3    "touching" iff gap <= CONTACT_EPS; "X on top of Y" iff touching and the
                        lowest point of X is at or above the highest point of Y (within CONTACT_EPS).
  CONTACT_NO_MIN = 0.02 "not touching" is asked only for gaps >= CONTACT_NO_MIN.
  SIZE_RATIO = 1.5      "bigger/smaller" (by volume) asked only when the ratio is > SIZE_RATIO.
  ORIENT_MARGIN = 0.20  left/right compare the centres' x and front/behind their z in the FIRST
                        camera's frame (OpenCV: x right, z forward, "in front of" = closer); asked
                        only when the centres differ by more than ORIENT_MARGIN along that axis,
                        and for left/right only when the image columns (x/z) agree in order.

Balance: every "yes" question is paired with a "no" question of the same template (e.g. "Is the
{a} on top of the {b}?") that asks something else, so each scene, hence each split, asks every kind and
every phrasing exactly as often with either answer; a kind with no clear "yes" or no clear "no"
pair is not asked in that scene. Contact negatives prefer the reversed support pair ("Is the box
on top of the sphere?" when the sphere rests on the box).

Real scenes (`generate_box_qa`: ScanNet, 3D-FRONT). Every object is its yaw-rotated 3D box
(`box_primitives`), which is NOT the object's solid: a chair's box includes the air between its
legs, a table's box the space under its top. So every answer is about the boxes, with the same
thresholds, and:
  * Proximity uses the box gap; boxes that overlap have gap 0, so they are "near" (a chair tucked
    under a table's box is near the table, which it is).
  * Contact uses the signed box distance d: the gap when the boxes are apart, minus their overlap
    depth (`box_overlap_depth`, the shortest translation that separates them) when they
    interpenetrate. "touching" iff -CONTACT_NO_MIN <= d <= CONTACT_EPS (boxes that meet, or overlap
    by at most CONTACT_NO_MIN: annotation noise of a lamp standing on a nightstand); "not touching"
    iff d >= CONTACT_NO_MIN; otherwise not asked: the usual band, and boxes that interpenetrate by
    more than CONTACT_NO_MIN (a chair tucked under a table, a pillow inside the bed's box), where
    box overlap says nothing reliable about whether the objects touch. "X on top of Y" iff X
    touches Y and X's lowest point is at most CONTACT_NO_MIN below Y's highest point (the same
    tolerated overlap). Size compares box volumes, orientation box centres, as above.
  * Referring expressions: the question names an object by its class name (`names[i]`, verbatim:
    "Is the bed near the desk?"), so only objects whose name is unique in the scene (compared
    case- and whitespace-insensitively, counting every box) may be named; classes with several
    instances (two chairs) and the catch-all classes in GENERIC_NAMES ("otherfurniture") are never
    named, with no ordinal or other disambiguation. They still count in "How many objects are in
    the scene?" (all the scene's boxes).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from data_pipelines.sample import QA, QA_KINDS

KINDS = ("box", "sphere", "cylinder")  # class id = index

NEAR = 0.15
NEAR_ASK_MAX = 0.10
FAR_MARGIN = 0.50
CONTACT_EPS = 1e-3
CONTACT_NO_MIN = 0.02
SIZE_RATIO = 1.5
ORIENT_MARGIN = 0.20

# Catch-all classes that do not identify an object ("Is the otherfurniture near the bed?").
GENERIC_NAMES = ("otherfurniture", "otherprop", "otherstructure")

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve")


class GeometryError(ValueError):
    """Boxes/labels that do not describe a primitive (the message names the box and value)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Primitive:
    """One solid. `center` is the centre of its 3D bounding box and `size` its extents
    (dx, dy, dz) in its own frame: a sphere has (d, d, d), a cylinder (d, d, height); `yaw`
    (radians, about world z) only matters for boxes."""

    kind: str
    center: np.ndarray  # [3] float64
    size: np.ndarray  # [3] float64
    yaw: float = 0.0

    @property
    def radius(self) -> float:
        return 0.5 * float(self.size[0])

    @property
    def z_min(self) -> float:
        return float(self.center[2] - 0.5 * self.size[2])

    @property
    def z_max(self) -> float:
        return float(self.center[2] + 0.5 * self.size[2])

    @property
    def label(self) -> int:
        return KINDS.index(self.kind)

    def box(self) -> np.ndarray:
        """`[7]` (cx, cy, cz, dx, dy, dz, yaw); yaw 0 for the rotationally symmetric kinds."""
        yaw = self.yaw if self.kind == "box" else 0.0
        return np.array([*self.center, *self.size, yaw], np.float64)

    def volume(self) -> float:
        dx, _, dz = (float(v) for v in self.size)
        if self.kind == "box":
            return float(np.prod(self.size))
        if self.kind == "sphere":
            return 4.0 / 3.0 * np.pi * (dx / 2) ** 3
        return np.pi * (dx / 2) ** 2 * dz


def primitives_from_boxes(boxes: np.ndarray, labels: np.ndarray) -> list[Primitive]:
    """Rebuilds the exact shapes from `boxes [N,7]` and class ids `labels [N]` (0 box, 1 sphere,
    2 cylinder): for these kinds the bounding box determines the solid."""
    out = []
    for i, (b, lab) in enumerate(zip(np.asarray(boxes, np.float64), np.asarray(labels))):
        if not 0 <= int(lab) < len(KINDS):
            raise GeometryError(f"box {i}: label {int(lab)} is not a primitive class id "
                                f"(0 box, 1 sphere, 2 cylinder)")
        kind = KINDS[int(lab)]
        size = b[3:6]
        same = [0, 1, 2] if kind == "sphere" else [0, 1] if kind == "cylinder" else [0]
        if np.ptp(size[same]) > 1e-5 * size.max():
            raise GeometryError(f"box {i}: a {kind} needs equal extents on axes {same}, got "
                                f"{size.tolist()}")
        out.append(Primitive(kind, b[:3].copy(), size.copy(), float(b[6])))
    return out


def _rot2(yaw: float) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s], [s, c]])


def footprint_distance(p: Primitive, xy: np.ndarray) -> np.ndarray:
    """Distance from points `xy [..., 2]` to the horizontal cross-section of a box or cylinder
    (0 inside)."""
    d = np.asarray(xy, np.float64) - p.center[:2]
    if p.kind == "box":
        q = np.abs(d @ _rot2(p.yaw)) - 0.5 * p.size[:2]  # row vectors: d @ R = (R^T d)^T
        return np.linalg.norm(np.maximum(q, 0.0), axis=-1)
    return np.maximum(np.linalg.norm(d, axis=-1) - p.radius, 0.0)


def _prism_point_distance(p: Primitive, point: np.ndarray) -> float:
    """Boxes and vertical cylinders are (cross-section) x [z_min, z_max], so the distance to a
    point splits into a horizontal and a vertical part."""
    dz = max(p.z_min - point[2], point[2] - p.z_max, 0.0)
    return float(np.hypot(footprint_distance(p, point[:2]), dz))


def _corners2(p: Primitive) -> np.ndarray:
    h = 0.5 * p.size[:2]
    local = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * h
    return p.center[:2] + local @ _rot2(p.yaw).T


def _rects_overlap(a: Primitive, b: Primitive) -> bool:
    ca, cb = _corners2(a), _corners2(b)
    for axis in np.concatenate([_rot2(a.yaw).T, _rot2(b.yaw).T]):  # the 4 edge normals
        pa, pb = ca @ axis, cb @ axis
        if pa.max() < pb.min() or pb.max() < pa.min():
            return False
    return True


def _footprint_gap(a: Primitive, b: Primitive) -> float:
    if a.kind == "cylinder" and b.kind == "cylinder":
        return max(float(np.linalg.norm(a.center[:2] - b.center[:2])) - a.radius - b.radius, 0.0)
    if a.kind == "cylinder" or b.kind == "cylinder":
        rect, disk = (b, a) if a.kind == "cylinder" else (a, b)
        return max(float(footprint_distance(rect, disk.center[:2])) - disk.radius, 0.0)
    if _rects_overlap(a, b):
        return 0.0
    # Two disjoint convex polygons are closest at a vertex of one of them.
    return float(min(footprint_distance(b, _corners2(a)).min(),
                     footprint_distance(a, _corners2(b)).min()))


def surface_gap(a: Primitive, b: Primitive) -> float:
    """Exact minimum surface-to-surface distance in metres; 0 when the solids touch or overlap."""
    if a.kind == "sphere" and b.kind == "sphere":
        return max(float(np.linalg.norm(a.center - b.center)) - a.radius - b.radius, 0.0)
    if a.kind == "sphere" or b.kind == "sphere":
        ball, prism = (a, b) if a.kind == "sphere" else (b, a)
        return max(_prism_point_distance(prism, ball.center) - ball.radius, 0.0)
    dz = max(a.z_min - b.z_max, b.z_min - a.z_max, 0.0)
    return float(np.hypot(_footprint_gap(a, b), dz))


def camera_centre(p: Primitive, cam_to_world: np.ndarray) -> np.ndarray:
    """`[3]` centre of `p` in the camera frame of `cam_to_world [4, 4]` (OpenCV)."""
    pose = np.asarray(cam_to_world, np.float64)
    return (p.center - pose[:3, 3]) @ pose[:3, :3]


# relation -> (kind, question template, key family). Relations in the same family ask the same
# thing about an unordered pair ("A left of B" = "B right of A"); "on_top" is directional.
RELATIONS = {
    "near": ("proximity", "Is the {a} near the {b}?", "near"),
    "touching": ("contact", "Is the {a} touching the {b}?", "touching"),
    "on_top": ("contact", "Is the {a} on top of the {b}?", None),
    "bigger": ("size", "Is the {a} bigger than the {b}?", "size"),
    "smaller": ("size", "Is the {a} smaller than the {b}?", "size"),
    "left": ("orientation", "Is the {a} to the left of the {b}?", "x"),
    "right": ("orientation", "Is the {a} to the right of the {b}?", "x"),
    "in_front": ("orientation", "Is the {a} in front of the {b}?", "z"),
    "behind": ("orientation", "Is the {a} behind the {b}?", "z"),
}


def relation(name: str, a: Primitive, b: Primitive, cam_to_world: np.ndarray,
             gap: float | None = None) -> bool | None:
    """Whether `a` <name> `b` holds (True/False), or None where the module's margins call it
    ambiguous and it is never asked. `cam_to_world` `[4, 4]` is the first camera (orientation
    only); `gap` may pass a precomputed `surface_gap(a, b)`."""
    if name in ("near", "touching", "on_top"):
        gap = surface_gap(a, b) if gap is None else gap
        if name == "near":
            return None if NEAR_ASK_MAX <= gap <= FAR_MARGIN else bool(gap < NEAR)
        if CONTACT_EPS < gap < CONTACT_NO_MIN:
            return None
        touching = bool(gap <= CONTACT_EPS)
        return touching if name == "touching" else touching and a.z_min >= b.z_max - CONTACT_EPS
    if name in ("bigger", "smaller"):
        va, vb = a.volume(), b.volume()
        if max(va, vb) <= SIZE_RATIO * min(va, vb):
            return None
        return bool(va > vb) == (name == "bigger")
    if name not in RELATIONS:
        raise ValueError(f"unknown relation {name!r}; expected one of {list(RELATIONS)}")
    ca, cb = camera_centre(a, cam_to_world), camera_centre(b, cam_to_world)
    if name in ("left", "right"):
        # Camera x and image column (x / z) must agree, or the answer depends on the reading.
        if abs(ca[0] - cb[0]) <= ORIENT_MARGIN or (ca[0] < cb[0]) != (ca[0] / ca[2] < cb[0] / cb[2]):
            return None
        return bool(ca[0] < cb[0]) == (name == "left")
    if abs(ca[2] - cb[2]) <= ORIENT_MARGIN:
        return None
    return bool(ca[2] < cb[2]) == (name == "in_front")


@dataclasses.dataclass(frozen=True)
class _Item:
    template: str
    question: str
    answer: str
    subjects: tuple[int, int]
    key: tuple  # items sharing a key ask the same thing; at most one of them is kept


def _balanced(kind: str, yes: list[_Item], no: list[_Item], hard_no: list[_Item], cap: int,
              rng) -> list[QA]:
    """Pairs each "yes" item with a "no" item of the same template and an unused key, so every
    template is asked exactly as often with either answer. `hard_no` items are offered first."""
    perm = lambda items: [items[i] for i in rng.permutation(len(items))]
    yes, no = perm(yes), perm(hard_no) + perm(no)
    picked, used = [], set()
    for y in yes:
        if len(picked) + 2 > cap:
            break
        if y.key in used:
            continue
        match = next((n for n in no if n.template == y.template and n.key not in used | {y.key}), None)
        if match is not None:
            picked += [y, match]
            used |= {y.key, match.key}
    order = rng.permutation(len(picked))
    return [QA(picked[i].question, picked[i].answer, kind, picked[i].subjects) for i in order]


def _pools(names: list[str], eligible: list[int], holds, hard) -> dict:
    """Candidate questions per kind: (yes, no, hard no) lists of `_Item`s over the ordered pairs of
    `eligible` objects. `holds(relation, i, j)` is True/False/None (not asked); `hard(i, j)` says
    whether a "no" goes to the hard negatives offered first."""
    pools = {kind: ([], [], []) for kind in QA_KINDS}  # yes, no, hard no
    for i, j in itertools.permutations(eligible, 2):
        for name, (kind, template, family) in RELATIONS.items():
            answer = holds(name, i, j)
            if answer is None:
                continue
            key = (name, i, j) if family is None else (family, min(i, j), max(i, j))
            item = _Item(template, template.format(a=names[i], b=names[j]),
                         "yes" if answer else "no", (i, j), key)
            yes, no, hard_no = pools[kind]
            (yes if answer else hard_no if hard(i, j) else no).append(item)
    return pools


def _ask(pools: dict, num_objects: int, max_per_kind: int, rng) -> tuple[QA, ...]:
    out: list[QA] = []
    for kind in ("proximity", "contact", "size", "orientation"):
        out += _balanced(kind, *pools[kind], max_per_kind - max_per_kind % 2, rng)
    if num_objects < len(NUMBER_WORDS):
        out.append(QA("How many objects are in the scene?", NUMBER_WORDS[num_objects], "describe"))
    return tuple(out)


def generate_qa(prims: list[Primitive], names: list[str], cam_to_world: np.ndarray, rng, *,
                max_per_kind: int = 4) -> tuple[QA, ...]:
    """Grounded, balanced yes/no questions plus one "describe" question.

    Args:
      prims: the scene's solids; `names[i]` (e.g. "red box") must be unique.
      cam_to_world: `[4, 4]` pose of the first camera (orientation questions use its frame).
      rng: `numpy.random.Generator` choosing which questions are asked.
      max_per_kind: at most this many questions per kind (rounded down to even).
    """
    if len(set(names)) != len(names):
        raise ValueError(f"object names must be unique so questions are unambiguous, got {names}")
    gaps = {}
    for i, j in itertools.combinations(range(len(prims)), 2):
        gaps[i, j] = gaps[j, i] = surface_gap(prims[i], prims[j])
    holds = lambda name, i, j: relation(name, prims[i], prims[j], cam_to_world, gaps[i, j])
    # The reversed support pair is the informative "no" for "on top of".
    pools = _pools(names, list(range(len(prims))), holds, lambda i, j: gaps[i, j] <= CONTACT_EPS)
    return _ask(pools, len(prims), max_per_kind, rng)


# ------------------------------------------------------------------------- real scenes (boxes)


def box_primitives(boxes: np.ndarray) -> list[Primitive]:
    """Every object of a real scene as a box `Primitive` from `boxes [N, 7]` (cx, cy, cz, dx, dy,
    dz, yaw), whatever its class (the oracle's geometry for ScanNet / 3D-FRONT samples)."""
    arr = np.asarray(boxes, np.float64)
    if arr.ndim != 2 or arr.shape[1] != 7:
        raise GeometryError(f"boxes must have shape [N, 7] (cx, cy, cz, dx, dy, dz, yaw), got "
                            f"{list(arr.shape)}")
    out = []
    for i, b in enumerate(arr):
        if not np.isfinite(b).all() or (b[3:6] <= 0).any():
            raise GeometryError(f"box {i}: needs finite values and sizes > 0, got {b.tolist()}")
        out.append(Primitive("box", b[:3].copy(), b[3:6].copy(), float(b[6])))
    return out


def box_overlap_depth(a: Primitive, b: Primitive) -> float:
    """How deep two boxes interpenetrate: the length of the shortest translation that separates
    them (separating-axis test over the footprints' edge normals and z); 0 when they are apart or
    merely touch."""
    if a.kind != "box" or b.kind != "box":
        raise ValueError(f"box_overlap_depth needs two boxes, got {a.kind} and {b.kind}")
    # Along each axis: how far either box must move to clear the other (containment included).
    depth = min(a.z_max - b.z_min, b.z_max - a.z_min)
    ca, cb = _corners2(a), _corners2(b)
    for axis in np.concatenate([_rot2(a.yaw).T, _rot2(b.yaw).T]):  # the 4 edge normals
        pa, pb = ca @ axis, cb @ axis
        depth = min(depth, pa.max() - pb.min(), pb.max() - pa.min())
    return max(float(depth), 0.0)


def box_relation(name: str, a: Primitive, b: Primitive, cam_to_world: np.ndarray,
                 gap: float | None = None) -> bool | None:
    """`relation` for real-scene boxes (module docstring): contact and "on top of" tolerate an
    overlap of up to CONTACT_NO_MIN and are not asked for boxes that overlap more deeply; every
    other relation is `relation`'s."""
    if name not in ("touching", "on_top"):
        return relation(name, a, b, cam_to_world, gap)
    gap = surface_gap(a, b) if gap is None else gap
    signed = gap if gap > 0 else -box_overlap_depth(a, b)
    if signed < -CONTACT_NO_MIN or CONTACT_EPS < signed < CONTACT_NO_MIN:
        return None
    touching = bool(signed <= CONTACT_EPS)
    return touching if name == "touching" else touching and a.z_min >= b.z_max - CONTACT_NO_MIN


def _name_key(name: str) -> str:
    return " ".join(str(name).lower().split())


def referable(names, generic_names=GENERIC_NAMES) -> list[int]:
    """Indices of the objects a question may name: their name is non-empty, not a catch-all
    class, and held by no other object of the scene (case- and whitespace-insensitive)."""
    keys = [_name_key(n) for n in names]
    counts = {k: keys.count(k) for k in set(keys)}
    generic = {_name_key(n) for n in generic_names}
    return [i for i, k in enumerate(keys) if k and counts[k] == 1 and k not in generic]


def generate_box_qa(boxes: np.ndarray, names, cam_to_world: np.ndarray, rng, *,
                    max_per_kind: int = 4, generic_names=GENERIC_NAMES) -> tuple[QA, ...]:
    """`generate_qa` for a real scene, every object a box (module docstring: box contact rules
    and which objects may be named).

    Args:
      boxes: `[N, 7]` world boxes (cx, cy, cz, dx, dy, dz, yaw), metres / radians, z up.
      names: `[N]` class names ("bed", "chair"); the questions use them verbatim.
      cam_to_world: `[4, 4]` pose of the first view (OpenCV camera; orientation questions).
      rng: `numpy.random.Generator` choosing which questions are asked.
      max_per_kind: at most this many questions per kind (rounded down to even).
      generic_names: class names never used to refer to an object.

    Returns:
      Balanced yes/no questions whose `subjects` index `boxes` in template order, plus "How many
      objects are in the scene?" (all N boxes) when N < len(NUMBER_WORDS).
    """
    prims = box_primitives(boxes)
    names = [str(n) for n in names]
    if len(names) != len(prims):
        raise ValueError(f"need one name per box: {len(prims)} boxes, {len(names)} names")
    pose = np.asarray(cam_to_world, np.float64)
    if pose.shape != (4, 4) or not np.isfinite(pose).all():
        raise ValueError(f"cam_to_world must be a finite [4, 4] pose, got shape {list(pose.shape)}")
    eligible = referable(names, generic_names)
    gaps, touching = {}, {}
    for i, j in itertools.combinations(eligible, 2):
        gaps[i, j] = gaps[j, i] = surface_gap(prims[i], prims[j])
        touching[i, j] = touching[j, i] = box_relation("touching", prims[i], prims[j], pose,
                                                       gaps[i, j]) is True
    holds = lambda name, i, j: box_relation(name, prims[i], prims[j], pose, gaps[i, j])
    pools = _pools(names, eligible, holds, lambda i, j: touching[i, j])
    return _ask(pools, len(prims), max_per_kind, rng)
