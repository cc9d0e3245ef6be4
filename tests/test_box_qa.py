"""Spatial QA on real scenes from 3D boxes (`spatial_qa.generate_box_qa`).

Answers are re-derived by an independent axis-aligned box reference (per-axis separations), not
by the module's geometry.
"""

import collections
import re

import numpy as np
import pytest

from data_pipelines import spatial_qa
from data_pipelines.sample import QA
from data_pipelines.synthetic import look_at

# Camera at the origin looking along world +y: camera x = world x, camera z = world y.
CAM = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], float)

PATTERNS = [(re.compile(rf"Is the (.+) {words} the (.+)\?"), name) for words, name in [
    ("near", "near"), ("touching", "touching"), ("on top of", "on_top"), ("bigger than", "bigger"),
    ("smaller than", "smaller"), ("to the left of", "left"), ("to the right of", "right"),
    ("in front of", "in_front"), ("behind", "behind")]]


def box(center, size, yaw=0.0):
    return [*center, *size, yaw]


def on_floor(x, y, size):
    return box([x, y, size[2] / 2], size)


def prims(*boxes):
    return spatial_qa.box_primitives(np.array(boxes, float))


def ref_signed(bi, bj):
    """Signed distance of two axis-aligned boxes: the gap, or minus the overlap depth."""
    lo_i, hi_i = bi[:3] - bi[3:6] / 2, bi[:3] + bi[3:6] / 2
    lo_j, hi_j = bj[:3] - bj[3:6] / 2, bj[:3] + bj[3:6] / 2
    sep = np.maximum(lo_i - hi_j, lo_j - hi_i)
    return float(np.linalg.norm(np.maximum(sep, 0))) if (sep > 0).any() else float(sep.max())


def check_answer(q, boxes, names, cam):
    """Asserts one box QA is clear by the documented margins and right (yaw-0 boxes)."""
    if q.kind == "describe":
        assert q.question == "How many objects are in the scene?"
        assert q.answer == spatial_qa.NUMBER_WORDS[len(boxes)] and q.subjects == ()
        return
    name, m = next((name, m) for pat, name in PATTERNS if (m := pat.fullmatch(q.question)))
    i, j = q.subjects
    assert (names[i], names[j]) == (m.group(1), m.group(2)), q
    keys = [n.lower() for n in names]
    assert keys.count(keys[i]) == 1 and keys.count(keys[j]) == 1, q  # names identify the objects
    yes = q.answer == "yes"
    assert q.answer in ("yes", "no")
    bi, bj = np.asarray(boxes[i], float), np.asarray(boxes[j], float)
    d = ref_signed(bi, bj)
    if name == "near":
        assert q.kind == "proximity"
        assert (d < 0.10) if yes else (d > 0.50), (q, d)
    elif name in ("touching", "on_top"):
        assert q.kind == "contact"
        assert -0.02 <= d <= 1e-3 or d >= 0.02, (q, d)  # never ambiguous, never a deep overlap
        touching = d <= 1e-3
        above = bi[2] - bi[5] / 2 >= bj[2] + bj[5] / 2 - 0.02
        assert yes == (touching if name == "touching" else touching and above), (q, d)
    elif name in ("bigger", "smaller"):
        vi, vj = np.prod(bi[3:6]), np.prod(bj[3:6])
        assert q.kind == "size" and max(vi, vj) > 1.5 * min(vi, vj), (q, vi, vj)
        assert yes == ((vi > vj) == (name == "bigger")), q
    else:
        assert q.kind == "orientation"
        w2c = np.linalg.inv(cam)
        ci, cj = ((w2c @ np.append(b[:3], 1.0))[:3] for b in (bi, bj))
        axis = 0 if name in ("left", "right") else 2
        assert abs(ci[axis] - cj[axis]) > 0.2, q
        first = ci[axis] < cj[axis]
        assert yes == (first == (name in ("left", "in_front"))), q


def random_room(rng, n):
    """A ScanNet-like room: class names with repeats, boxes on the floor, some stacked with a
    small gap or overlap, some overlapping deeply (a chair under a table)."""
    classes = ["bed", "chair", "table", "desk", "sofa", "cabinet", "sink", "toilet", "lamp",
               "bookshelf", "otherfurniture", "door"]
    names, boxes = [], []
    for k in range(n):
        names.append(str(rng.choice(classes)))
        size = rng.uniform(0.2, 1.6, 3)
        if boxes and rng.random() < 0.3:  # stacked on a previous object
            b = boxes[rng.integers(len(boxes))]
            size[:2] = np.minimum(size[:2], b[3:5])
            z = b[2] + b[5] / 2 + rng.choice([-0.03, -0.015, -0.005, 0.0, 0.0005, 0.01, 0.05])
            boxes.append(np.array(box([b[0] + rng.uniform(-0.1, 0.1), b[1], z + size[2] / 2], size)))
        else:
            boxes.append(np.array(on_floor(*rng.uniform(0.0, 5.0, 2), size)))
    return np.stack(boxes), names


# --------------------------------------------------------------------------------------- tests


def test_box_primitives_and_errors():
    b = np.array([box([1, 2, 0.5], [1, 2, 1], 0.3), box([0, 0, 0.1], [0.2, 0.2, 0.2])], np.float32)
    ps = spatial_qa.box_primitives(b)
    assert [p.kind for p in ps] == ["box", "box"]
    np.testing.assert_allclose(ps[0].box(), b[0], atol=1e-6)
    assert ps[0].volume() == pytest.approx(2.0)
    with pytest.raises(spatial_qa.GeometryError, match=r"shape \[N, 7\]"):
        spatial_qa.box_primitives(np.zeros((2, 6)))
    with pytest.raises(spatial_qa.GeometryError, match="box 1: needs finite values and sizes > 0"):
        spatial_qa.box_primitives(np.array([b[0], box([0, 0, 0], [0.2, 0, 0.2])]))


def test_box_overlap_depth():
    a = prims(box([0, 0, 0.5], [1, 1, 1]))[0]
    for other, depth in [(box([1.0, 0, 0.5], [1, 1, 1]), 0.0),  # faces meet
                         (box([1.2, 0, 0.5], [1, 1, 1]), 0.0),  # apart
                         (box([0.97, 0, 0.5], [1, 1, 1]), 0.03),
                         (box([0.3, 0.2, 1.4], [1, 1, 1]), 0.1),  # z is the shallowest axis
                         (box([0, 0, 0.5], [0.2, 0.2, 0.2]), 0.6)]:  # inside: 0.5 + 0.1 out
        assert spatial_qa.box_overlap_depth(a, prims(other)[0]) == pytest.approx(depth, abs=1e-12)
    # A unit square turned 45 degrees whose left corner pokes 0.01 into a's right face.
    d = 0.01
    diamond = prims(box([0.5 + np.sqrt(0.5) - d, 0, 0.5], [1, 1, 1], np.pi / 4))[0]
    assert spatial_qa.box_overlap_depth(a, diamond) == pytest.approx(d, abs=1e-12)
    assert spatial_qa.box_relation("touching", a, diamond, CAM) is True
    with pytest.raises(ValueError, match="needs two boxes"):
        spatial_qa.box_overlap_depth(a, spatial_qa.Primitive("sphere", np.zeros(3), np.ones(3)))


def test_box_relations_known_answers():
    rel = spatial_qa.box_relation
    night = on_floor(0, 3, [0.5, 0.5, 0.5])  # top at z = 0.5
    lamp = box([0, 3, 0.49 + 0.2], [0.2, 0.2, 0.4])  # its box sinks 1 cm into the nightstand's
    ns, lp = prims(night, lamp)
    assert spatial_qa.surface_gap(lp, ns) == 0.0
    assert rel("near", lp, ns, CAM) is True
    assert rel("touching", lp, ns, CAM) is True and rel("touching", ns, lp, CAM) is True
    assert rel("on_top", lp, ns, CAM) is True
    assert rel("on_top", ns, lp, CAM) is False
    # Contact: exact, small gaps (ambiguous band), clear gaps, shallow and deep overlaps.
    for bottom, touching in [(0.5, True), (0.5005, True), (0.505, None), (0.515, None),
                             (0.52, False), (0.6, False), (0.485, True), (0.4805, True),
                             (0.47, None), (0.2, None)]:
        top = prims(box([0, 3, bottom + 0.2], [0.2, 0.2, 0.4]))[0]
        assert rel("touching", top, ns, CAM) is touching, bottom
        assert rel("on_top", top, ns, CAM) is touching, bottom
    # A chair tucked under a table: the boxes overlap deeply, so contact is not asked.
    table = on_floor(2, 3, [1.2, 0.8, 0.75])
    chair = on_floor(2, 2.8, [0.45, 0.5, 0.9])
    tb, ch = prims(table, chair)
    assert rel("near", ch, tb, CAM) is True
    assert rel("touching", ch, tb, CAM) is None and rel("on_top", ch, tb, CAM) is None
    # Side by side, boxes overlapping 1 cm: touching, neither on top of the other.
    side = prims(on_floor(0.25 + 0.25 - 0.01, 3, [0.5, 0.5, 0.8]))[0]
    assert rel("touching", side, ns, CAM) is True
    assert rel("on_top", side, ns, CAM) is False and rel("on_top", ns, side, CAM) is False
    # Proximity by the box gap, with the ambiguous band.
    for gap, near in [(0.05, True), (0.12, None), (0.3, None), (0.6, False)]:
        other = prims(on_floor(0.5 + gap, 3, [0.5, 0.5, 0.5]))[0]
        assert rel("near", other, ns, CAM) is near, gap
    # Size by box volume (ratio > 1.5).
    big, small, similar = prims(on_floor(5, 3, [1, 1, 1]), on_floor(7, 3, [1, 1, 0.5]),
                                on_floor(9, 3, [1, 1, 0.7]))
    assert rel("bigger", big, small, CAM) is True and rel("smaller", big, small, CAM) is False
    assert rel("smaller", small, big, CAM) is True
    assert rel("bigger", big, similar, CAM) is None
    # Orientation in the first camera's frame (x right, z forward; "in front of" = closer).
    left, right = prims(on_floor(-1, 3, [0.4] * 3), on_floor(1, 4, [0.4] * 3))
    assert rel("left", left, right, CAM) is True and rel("right", left, right, CAM) is False
    assert rel("right", right, left, CAM) is True
    assert rel("in_front", left, right, CAM) is True and rel("behind", right, left, CAM) is True
    assert rel("behind", left, right, CAM) is False
    assert rel("in_front", left, prims(on_floor(1, 3.1, [0.4] * 3))[0], CAM) is None


def test_generated_questions_answers_and_subjects():
    boxes = np.array([on_floor(0, 3, [0.5, 0.5, 0.5]),  # 0 nightstand
                      box([0, 3, 0.69], [0.2, 0.2, 0.4]),  # 1 lamp, on the nightstand
                      on_floor(3, 3, [2.0, 1.6, 0.6])])  # 2 bed, far to the right
    names = ["nightstand", "lamp", "bed"]
    qa = spatial_qa.generate_box_qa(boxes, names, CAM, np.random.default_rng(0))
    for q in qa:
        check_answer(q, boxes, names, CAM)
    asked = {(q.question, q.answer, q.kind, q.subjects) for q in qa}
    assert ("Is the lamp on top of the nightstand?", "yes", "contact", (1, 0)) in asked
    assert ("Is the nightstand on top of the lamp?", "no", "contact", (0, 1)) in asked  # hard no
    touch = {q for q in qa if q.question.split()[3:4] == ["touching"]}
    assert {(q.answer, frozenset(q.subjects)) for q in touch} in (
        {("yes", frozenset({0, 1})), ("no", frozenset({0, 2}))},
        {("yes", frozenset({0, 1})), ("no", frozenset({1, 2}))})
    prox = sorted((q.answer, frozenset(q.subjects)) for q in qa if q.kind == "proximity")
    assert prox[1] == ("yes", frozenset({0, 1})) and prox[0][0] == "no" and 2 in prox[0][1]
    # The bed is right of both (x differs); depth is equal (all at y = 3): no front/behind.
    orient = [q for q in qa if q.kind == "orientation"]
    assert orient and all(2 in q.subjects and "front" not in q.question and "behind" not in q.question
                          for q in orient)
    assert QA("How many objects are in the scene?", "three", "describe") in qa
    # Three objects give three unordered pairs; a yes/no pair uses two: one pair of size and of
    # orientation questions, two pairs of contact ones (touching, on top of).
    assert collections.Counter(q.kind for q in qa) == {"proximity": 2, "contact": 4, "size": 2,
                                                       "orientation": 2, "describe": 1}
    # Deterministic given the rng.
    assert spatial_qa.generate_box_qa(boxes, names, CAM, np.random.default_rng(0)) == qa


def test_only_unique_names_are_named():
    boxes = np.array([on_floor(0, 3, [0.5, 0.5, 0.9]), on_floor(0.5, 3, [0.5, 0.5, 0.9]),  # chairs
                      on_floor(0.25, 3.6, [1.2, 0.6, 0.75]),  # table
                      on_floor(3, 5, [2, 1.6, 0.6]),  # bed
                      on_floor(-2, 4, [2, 0.9, 0.8]),  # sofa
                      on_floor(-2, 2, [0.6, 0.6, 1.8]),  # otherfurniture
                      on_floor(2, 2, [0.4, 0.4, 0.4]), on_floor(2, 2.8, [0.4, 0.4, 0.4])])  # Lamp, lamp
    names = ["chair", "chair", "table", "bed", "sofa", "otherfurniture", "Lamp", "lamp "]
    assert spatial_qa.referable(names) == [2, 3, 4]
    assert spatial_qa.referable(["chair", ""]) == [0]
    seen = set()
    for seed in range(20):
        qa = spatial_qa.generate_box_qa(boxes, names, CAM, np.random.default_rng(seed),
                                        max_per_kind=8)
        for q in qa:
            check_answer(q, boxes, names, CAM)
            assert not re.search(r"chair|lamp|otherfurniture", q.question, re.I), q
            assert set(q.subjects) <= {2, 3, 4}
            seen |= set(q.subjects)
        assert QA("How many objects are in the scene?", "eight", "describe") in qa
    assert seen == {2, 3, 4}
    # Only one nameable object: no pair questions at all.
    one = spatial_qa.generate_box_qa(boxes[:3], names[:3], CAM, np.random.default_rng(0))
    assert one == (QA("How many objects are in the scene?", "three", "describe"),)
    with pytest.raises(ValueError, match="one name per box: 3 boxes, 2 names"):
        spatial_qa.generate_box_qa(boxes[:3], names[:2], CAM, np.random.default_rng(0))


def test_ambiguous_gap_is_never_asked():
    # sofa-bed gap 0.3 m (ambiguous for "near"), bed-desk 0.05 (near), sofa-desk far.
    boxes = np.array([on_floor(0, 3, [1, 1, 0.6]), on_floor(1.3, 3, [1, 1, 0.5]),
                      on_floor(2.0, 4.05, [1, 1, 1.0])])
    names = ["sofa", "bed", "desk"]
    ps = spatial_qa.box_primitives(boxes)
    assert spatial_qa.surface_gap(ps[0], ps[1]) == pytest.approx(0.3)
    asked = set()
    for seed in range(30):
        for q in spatial_qa.generate_box_qa(boxes, names, CAM, np.random.default_rng(seed)):
            check_answer(q, boxes, names, CAM)
            if q.kind == "proximity":
                assert set(q.subjects) != {0, 1}, q
                asked.add((frozenset(q.subjects), q.answer))
            assert q.kind != "contact", q  # nothing touches: no "yes" to balance a "no"
    assert asked == {(frozenset({1, 2}), "yes"), (frozenset({0, 2}), "no")}


def test_every_answer_and_balance_on_random_rooms():
    count, yes, templates = collections.Counter(), collections.Counter(), collections.Counter()
    for seed in range(60):
        rng = np.random.default_rng(seed)
        boxes, names = random_room(rng, int(rng.integers(4, 16)))
        cam = look_at(np.array([2.5, -1.5, 1.6]), np.array([2.5, 2.5, 0.5]))
        qa = spatial_qa.generate_box_qa(boxes, names, cam, rng, max_per_kind=6)
        per_scene = collections.Counter()
        for q in qa:
            check_answer(q, boxes, names, cam)
            template = next(name for pat, name in PATTERNS if pat.fullmatch(q.question)) \
                if q.kind != "describe" else "describe"
            count[q.kind] += 1
            yes[q.kind] += q.answer == "yes"
            per_scene[q.kind, q.answer] += 1
            per_scene[template, q.answer] += 1
            templates[template] += 1
        for key in {k for k, _ in per_scene}:  # balanced in each scene, per kind and phrasing
            if key != "describe":
                assert per_scene[key, "yes"] == per_scene[key, "no"], (seed, key)
        assert sum(q.kind == "describe" for q in qa) == (len(boxes) < 13)
    for kind in ("proximity", "contact", "size", "orientation"):
        assert count[kind] >= 20 and yes[kind] * 2 == count[kind], kind
    assert set(templates) == {name for _, name in PATTERNS} | {"describe"}
