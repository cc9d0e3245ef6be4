"""Spatial QA: every answer re-derived from the geometry by an independent implementation.

The reference here uses exact signed distance functions and dense surface sampling, not the
module's prism decomposition, and reads the scene only through `Sample`-style boxes and labels.
"""

import collections
import re

import numpy as np
import pytest

from data_pipelines import spatial_qa, synthetic
from data_pipelines.spatial_qa import Primitive

AMBIGUOUS_NEAR = (0.10, 0.50)


def ref_sdf(box, label, pts):
    """Exact signed distance from points `[M, 3]` to the solid of `box` (cx..dz, yaw)."""
    c, size, yaw = box[:3], box[3:6], box[6]
    rel = np.asarray(pts, np.float64) - c
    if label == 1:
        return np.linalg.norm(rel, axis=1) - size[0] / 2
    if label == 2:
        q = np.stack([np.linalg.norm(rel[:, :2], axis=1) - size[0] / 2,
                      np.abs(rel[:, 2]) - size[2] / 2], 1)
    else:
        cy, sy = np.cos(yaw), np.sin(yaw)
        local = np.stack([cy * rel[:, 0] + sy * rel[:, 1], -sy * rel[:, 0] + cy * rel[:, 1], rel[:, 2]], 1)
        q = np.abs(local) - size / 2
    return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(1), 0)


def _grid(half, spacing):
    n = int(np.ceil(half / spacing))
    return np.linspace(-half, half, 2 * n + 1)  # odd: includes the centre


def ref_surface(box, label, spacing):
    """Surface points no further than `spacing` apart (face centres, poles, cap centres included)."""
    c, size, yaw = np.asarray(box[:3], np.float64), np.asarray(box[3:6], np.float64), box[6]
    r = size[0] / 2
    if label == 1:
        n = int(np.ceil(4 * np.pi * r * r / spacing ** 2)) + 2
        z = np.linspace(-1, 1, n)
        phi = np.arange(n) * np.pi * (3 - np.sqrt(5))
        rho = np.sqrt(1 - z * z)
        return c + r * np.stack([rho * np.cos(phi), rho * np.sin(phi), z], 1)
    if label == 2:
        zs = _grid(size[2] / 2, spacing)
        ang = np.linspace(0, 2 * np.pi, int(np.ceil(2 * np.pi * r / spacing)) + 1)[:-1]
        side = np.stack(np.broadcast_arrays(r * np.cos(ang)[:, None], r * np.sin(ang)[:, None],
                                            zs[None]), -1).reshape(-1, 3)
        caps = [np.zeros((1, 2))]
        for rad in np.linspace(0, r, int(np.ceil(r / spacing)) + 1)[1:]:
            a = np.linspace(0, 2 * np.pi, int(np.ceil(2 * np.pi * rad / spacing)) + 1)[:-1]
            caps.append(rad * np.stack([np.cos(a), np.sin(a)], 1))
        caps = np.concatenate(caps)
        cap_pts = [np.concatenate([caps, np.full((len(caps), 1), s * size[2] / 2)], 1) for s in (-1, 1)]
        return c + np.concatenate([side, *cap_pts])
    faces = []
    for axis in range(3):
        o1, o2 = [a for a in range(3) if a != axis]
        g1, g2 = np.meshgrid(_grid(size[o1] / 2, spacing), _grid(size[o2] / 2, spacing))
        for sign in (-1, 1):
            f = np.zeros((g1.size, 3))
            f[:, o1], f[:, o2], f[:, axis] = g1.ravel(), g2.ravel(), sign * size[axis] / 2
            faces.append(f)
    local = np.concatenate(faces)
    cy, sy = np.cos(yaw), np.sin(yaw)
    return c + local @ np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]]).T


def ref_gap(bi, li, bj, lj, spacing=0.01):
    """Surface gap: exact when a sphere is involved, else an upper bound within `spacing`."""
    if li == 1:
        return max(float(ref_sdf(bj, lj, bi[None, :3])[0]) - bi[3] / 2, 0.0)
    if lj == 1:
        return ref_gap(bj, lj, bi, li, spacing)
    return max(float(min(ref_sdf(bj, lj, ref_surface(bi, li, spacing)).min(),
                         ref_sdf(bi, li, ref_surface(bj, lj, spacing)).min())), 0.0)


def ref_volume(box, label):
    dx, dy, dz = box[3:6]
    return dx * dy * dz if label == 0 else np.pi / 6 * dx ** 3 if label == 1 else np.pi / 4 * dx * dx * dz


def _boxes(prims):
    return np.stack([p.box() for p in prims]), np.array([p.label for p in prims])


def _prim(kind, center, size, yaw=0.0):
    return Primitive(kind, np.array(center, float), np.array(size, float), yaw)


PATTERNS = [(re.compile(rf"Is the (.+) {words} the (.+)\?"), name) for words, name in [
    ("near", "near"), ("touching", "touching"), ("on top of", "on_top"), ("bigger than", "bigger"),
    ("smaller than", "smaller"), ("to the left of", "left"), ("to the right of", "right"),
    ("in front of", "in_front"), ("behind", "behind")]]


def check_answer(q, boxes, labels, names, cam_to_world):
    """Re-derives one QA's answer from boxes, labels and the first camera; asserts it is clear."""
    if q.kind == "describe":
        assert q.question == "How many objects are in the scene?"
        assert q.answer == spatial_qa.NUMBER_WORDS[len(boxes)]
        return
    rel = next((name, m) for pat, name in PATTERNS if (m := pat.fullmatch(q.question)))
    name, m = rel
    i, j = names.index(m.group(1)), names.index(m.group(2))
    assert q.subjects == (i, j), q
    assert q.answer in ("yes", "no")
    yes = q.answer == "yes"
    bi, bj = boxes[i].astype(np.float64), boxes[j].astype(np.float64)
    if name in ("near", "touching", "on_top"):
        g = ref_gap(bi, labels[i], bj, labels[j])
        if name == "near":
            assert q.kind == "proximity"
            assert (g < AMBIGUOUS_NEAR[0] - 1e-6) if yes else (g > AMBIGUOUS_NEAR[1]), (q, g)
            return
        assert q.kind == "contact"
        touching = g <= 1e-3
        assert touching or g >= 0.02 - 1e-9, (q, g)  # never in the ambiguous band
        above = bi[2] - bi[5] / 2 >= bj[2] + bj[5] / 2 - 1e-3
        assert yes == (touching if name == "touching" else touching and above), (q, g)
        return
    if name in ("bigger", "smaller"):
        vi, vj = ref_volume(bi, labels[i]), ref_volume(bj, labels[j])
        assert q.kind == "size" and max(vi, vj) > 1.5 * min(vi, vj), (q, vi, vj)
        assert yes == ((vi > vj) == (name == "bigger")), (q, vi, vj)
        return
    assert q.kind == "orientation"
    world_to_cam = np.linalg.inv(np.asarray(cam_to_world, np.float64))
    ci, cj = ((world_to_cam @ np.append(b[:3], 1.0))[:3] for b in (bi, bj))
    axis = 0 if name in ("left", "right") else 2
    assert abs(ci[axis] - cj[axis]) > 0.2, (q, ci, cj)
    if axis == 0:
        assert (ci[0] < cj[0]) == (ci[0] / ci[2] < cj[0] / cj[2]), q  # image order agrees
    first = ci[axis] < cj[axis]  # i is left of / in front of j
    assert yes == (first == (name in ("left", "in_front"))), (q, ci, cj)


# --------------------------------------------------------------------------------------- tests


def test_surface_gap_matches_sampled_geometry():
    rng = np.random.default_rng(0)
    kinds = spatial_qa.KINDS
    for trial in range(36):
        pair = []
        for k in (kinds[trial % 3], kinds[(trial // 3) % 3]):
            d = rng.uniform(0.15, 0.5)
            size = [d, d, d] if k == "sphere" else [d, d, rng.uniform(0.15, 0.6)] if k == "cylinder" \
                else rng.uniform(0.15, 0.6, 3)
            centre = [*rng.uniform(-0.5, 0.5, 2), rng.uniform(0, 0.6)]
            pair.append(_prim(k, centre, size, rng.uniform(-np.pi, np.pi)))
        (bi, bj), (li, lj) = _boxes(pair)
        got = spatial_qa.surface_gap(*pair)
        ref = ref_gap(bi, li, bj, lj, spacing=0.004)
        assert got == pytest.approx(spatial_qa.surface_gap(pair[1], pair[0]), abs=1e-12)
        if 1 in (li, lj):
            assert got == pytest.approx(ref, abs=1e-9), (trial, pair)
        else:  # the sampled reference over-estimates by at most the sample spacing
            assert -1e-9 <= ref - got <= 0.004, (trial, got, ref)
    # Separated along a face: known exactly.
    a, b = _prim("box", [0, 0, 0.2], [0.4, 0.4, 0.4]), _prim("box", [0.73, 0, 0.1], [0.5, 0.3, 0.2])
    assert spatial_qa.surface_gap(a, b) == pytest.approx(0.28, abs=1e-12)
    c = _prim("cylinder", [0, 0, 0.9], [0.2, 0.2, 0.2])  # 0.6 above the box's top, centred
    assert spatial_qa.surface_gap(a, c) == pytest.approx(0.4, abs=1e-12)
    s = _prim("sphere", [0.5, 0.5, 0.6], [0.2, 0.2, 0.2])  # nearest box point is its top corner
    # A plus sign: the footprints cross although no corner of either lies inside the other.
    bar, cross = _prim("box", [0, 0, 0.1], [1.0, 0.1, 0.2]), _prim("box", [0, 0, 0.3], [1.0, 0.1, 0.2], np.pi / 2)
    assert spatial_qa.surface_gap(bar, cross) == 0.0
    lifted = _prim("box", [0, 0, 0.35], [1.0, 0.1, 0.2], np.pi / 2)
    assert spatial_qa.surface_gap(bar, lifted) == pytest.approx(0.05, abs=1e-12)
    assert spatial_qa.surface_gap(a, s) == pytest.approx(np.sqrt(0.3 ** 2 + 0.3 ** 2 + 0.2 ** 2) - 0.1, abs=1e-12)


def test_sphere_resting_on_box_and_moved_far():
    box = _prim("box", [0, 0, 0.2], [0.4, 0.5, 0.4], 0.3)
    sphere = _prim("sphere", [0.05, -0.04, 0.5], [0.2, 0.2, 0.2])  # bottom at z = 0.4 = box top
    far = _prim("cylinder", [2.0, 0.5, 0.25], [0.3, 0.3, 0.5])
    cam = synthetic.look_at(np.array([0.0, -4.0, 2.5]), np.array([0.5, 0.0, 0.2]))
    assert spatial_qa.surface_gap(box, sphere) == pytest.approx(0.0, abs=1e-12)
    assert spatial_qa.relation("touching", sphere, box, cam) is True
    assert spatial_qa.relation("on_top", sphere, box, cam) is True
    assert spatial_qa.relation("on_top", box, sphere, cam) is False
    assert spatial_qa.relation("near", box, sphere, cam) is True
    names = ["red box", "green sphere", "blue cylinder"]
    qa = spatial_qa.generate_qa([box, sphere, far], names, cam, np.random.default_rng(0))
    asked = {(q.question, q.answer) for q in qa}
    assert ({("Is the red box touching the green sphere?", "yes"),
             ("Is the green sphere touching the red box?", "yes")} & asked)
    assert ("Is the green sphere on top of the red box?", "yes") in asked
    assert ("Is the red box on top of the green sphere?", "no") in asked  # the hard negative
    assert sum(q.kind == "proximity" and set(q.subjects) == {0, 1} and q.answer == "yes" for q in qa) == 1

    moved = _prim("sphere", [-1.5, 1.5, 0.1], [0.2, 0.2, 0.2])  # on the floor, far away
    assert spatial_qa.relation("near", box, moved, cam) is False
    assert spatial_qa.relation("touching", box, moved, cam) is False
    assert spatial_qa.relation("on_top", moved, box, cam) is False


def test_thresholds_leave_ambiguous_pairs_unasked():
    cam = np.eye(4)
    a = _prim("box", [0, 0, 0.2], [0.4, 0.4, 0.4])
    for gap, near, touching in [(0.0, True, True), (0.005, True, None), (0.05, True, False),
                                (0.12, None, False), (0.3, None, False), (0.6, False, False)]:
        b = _prim("box", [0.4 + gap, 0, 0.1], [0.4, 0.4, 0.2])
        assert spatial_qa.surface_gap(a, b) == pytest.approx(gap, abs=1e-12)
        assert spatial_qa.relation("near", a, b, cam) is near, gap
        assert spatial_qa.relation("touching", a, b, cam) is touching, gap
    unit = _prim("box", [0, 0, 0.5], [1, 1, 1])
    assert spatial_qa.relation("bigger", unit, _prim("sphere", [3, 0, 0.5], [1, 1, 1]), cam) is True
    assert spatial_qa.relation("smaller", unit, _prim("sphere", [3, 0, 0.5], [1, 1, 1]), cam) is False
    same = _prim("cylinder", [3, 0, 0.5], [2 / np.sqrt(np.pi), 2 / np.sqrt(np.pi), 1])  # volume 1
    assert same.volume() == pytest.approx(1.0)
    assert spatial_qa.relation("bigger", unit, same, cam) is None
    # A camera looking along world +y: camera x = world x, camera z = world y.
    cam = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], float)
    left, right = _prim("box", [-0.5, 3, 0], [0.2] * 3), _prim("box", [0.5, 3.5, 0], [0.2] * 3)
    assert spatial_qa.relation("left", left, right, cam) is True
    assert spatial_qa.relation("right", left, right, cam) is False
    assert spatial_qa.relation("in_front", left, right, cam) is True
    assert spatial_qa.relation("behind", right, left, cam) is True
    assert spatial_qa.relation("in_front", left, _prim("box", [0.5, 3.1, 0], [0.2] * 3), cam) is None
    # Camera x says "left" but the image columns (x / z) disagree: not asked.
    far_left, near_mid = _prim("box", [-0.5, 5, 0], [0.2] * 3), _prim("box", [-0.25, 1, 0], [0.2] * 3)
    assert spatial_qa.relation("left", far_left, near_mid, cam) is None


def test_volumes():
    rng = np.random.default_rng(3)
    for label, kind in enumerate(spatial_qa.KINDS):
        d, h = rng.uniform(0.3, 0.65, 2)
        size = [d, d, d] if kind == "sphere" else [d, d, h] if kind == "cylinder" else [d, h, 0.3]
        p = _prim(kind, [0, 0, 1], size, 0.4)
        assert p.volume() == pytest.approx(ref_volume(p.box(), label), rel=1e-12)
        # The solid's volume, measured by counting grid points inside it.
        g = np.stack(np.meshgrid(*[np.linspace(-0.35, 0.35, 141)] * 3), -1).reshape(-1, 3) + [0, 0, 1]
        inside = (ref_sdf(p.box(), label, g) <= 0).mean() * 0.7 ** 3
        assert p.volume() == pytest.approx(inside, rel=0.03)


def test_every_answer_matches_geometry():
    kinds_seen = collections.Counter()
    for seed in range(30):
        layout = synthetic.sample_layout(seed)
        boxes, labels = _boxes(layout.prims)
        qa = spatial_qa.generate_qa(layout.prims, layout.names, layout.cam_to_world[0], layout.qa_rng)
        for q in qa:
            check_answer(q, boxes.astype(np.float32), labels, layout.names, layout.cam_to_world[0])
            kinds_seen[q.kind] += 1
    assert set(kinds_seen) == {"proximity", "contact", "size", "orientation", "describe"}


def test_generated_scene_qa_is_grounded_in_its_sample():
    sample = synthetic.generate_scene(11, image_size=(24, 32), num_views=2)
    assert len(sample.qa) >= 9
    for q in sample.qa:
        check_answer(q, sample.boxes, sample.labels, list(sample.label_names), sample.cam_to_world[0])


def test_mirror_image_swaps_left_and_right():
    swapped = 0
    for seed in range(12):
        layout = synthetic.sample_layout(seed)
        cam = layout.cam_to_world[0]
        n, origin = cam[:3, 0], cam[:3, 3]  # the camera's x axis is horizontal
        assert abs(n[2]) < 1e-9
        phi = np.arctan2(n[1], n[0])
        mirrored = [Primitive(p.kind, p.center - 2 * ((p.center - origin) @ n) * n, p.size, 2 * phi - p.yaw)
                    for p in layout.prims]
        for i, j in ((i, j) for i in range(len(mirrored)) for j in range(len(mirrored)) if i != j):
            a, b, ma, mb = layout.prims[i], layout.prims[j], mirrored[i], mirrored[j]
            assert spatial_qa.surface_gap(ma, mb) == pytest.approx(spatial_qa.surface_gap(a, b), abs=1e-9)
            for name, mirror in [("left", "right"), ("right", "left"), ("in_front", "in_front"),
                                 ("behind", "behind"), ("bigger", "bigger"), ("on_top", "on_top")]:
                assert spatial_qa.relation(mirror, ma, mb, cam) == spatial_qa.relation(name, a, b, cam)
            swapped += spatial_qa.relation("left", a, b, cam) is not None
        # Every generated left/right question flips its answer in the mirrored scene.
        qa = spatial_qa.generate_qa(layout.prims, layout.names, cam, layout.qa_rng)
        for q in qa:
            side = "left" if "to the left of" in q.question else "right" if "to the right of" in q.question else None
            if side:
                assert spatial_qa.relation(side, mirrored[q.subjects[0]], mirrored[q.subjects[1]],
                                           cam) is (q.answer == "no")
    assert swapped > 20


def test_yes_no_balance_over_200_scenes():
    count, yes, scenes = collections.Counter(), collections.Counter(), collections.Counter()
    for seed in range(200):
        layout = synthetic.sample_layout(synthetic.scene_seed(1234, seed))
        qa = spatial_qa.generate_qa(layout.prims, layout.names, layout.cam_to_world[0], layout.qa_rng)
        for kind in {q.kind for q in qa}:
            scenes[kind] += 1
        for q in qa:
            template = re.sub(r"the \w+ (box|sphere|cylinder)", "X", q.question)
            count[q.kind] += 1
            count[template] += 1
            yes[q.kind] += q.answer == "yes"
            yes[template] += q.answer == "yes"
    for kind in ("proximity", "contact", "size", "orientation"):
        assert 0.45 <= yes[kind] / count[kind] <= 0.55, (kind, yes[kind], count[kind])
        assert scenes[kind] >= 160, (kind, scenes[kind])  # asked in most scenes
    templates = [t for t in count if t.startswith("Is X")]
    assert len(templates) == 9
    for t in templates:  # balanced per phrasing too, so no template predicts its answer
        assert 0.45 <= yes[t] / count[t] <= 0.55, (t, yes[t], count[t])
    assert scenes["describe"] == 200


def test_primitives_from_boxes_round_trip_and_errors():
    layout = synthetic.sample_layout(5)
    boxes, labels = _boxes(layout.prims)
    rebuilt = spatial_qa.primitives_from_boxes(boxes.astype(np.float32), labels)
    for p, r in zip(layout.prims, rebuilt):
        assert p.kind == r.kind
        np.testing.assert_allclose(r.box(), p.box(), atol=1e-6)
    with pytest.raises(spatial_qa.GeometryError, match="box 0: a sphere needs equal extents"):
        spatial_qa.primitives_from_boxes(np.array([[0, 0, 0, 0.2, 0.3, 0.2, 0]]), np.array([1]))
    with pytest.raises(spatial_qa.GeometryError, match="box 0: label 7"):
        spatial_qa.primitives_from_boxes(np.array([[0, 0, 0, 0.2, 0.2, 0.2, 0]]), np.array([7]))
    with pytest.raises(ValueError, match="unknown relation 'above'"):
        spatial_qa.relation("above", layout.prims[0], layout.prims[1], np.eye(4))
    with pytest.raises(ValueError, match="names must be unique"):
        spatial_qa.generate_qa(layout.prims[:2], ["red box", "red box"], np.eye(4), np.random.default_rng(0))
