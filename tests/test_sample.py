import dataclasses

import numpy as np
import pytest

from data_pipelines.sample import QA, Sample, SampleError


def _rot_z(a):
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def make_sample(s=2, h=4, w=6, n=2):
    pose = np.tile(np.eye(4, dtype=np.float32), (s, 1, 1))
    pose[:, :3, :3] = _rot_z(0.3)
    k = np.tile(np.array([[5, 0, 3], [0, 5, 2], [0, 0, 1]], np.float32), (s, 1, 1))
    return Sample(
        sample_id="scene0", rgb=np.zeros((s, h, w, 3), np.uint8),
        depth=np.ones((s, h, w), np.float32), intrinsics=k, cam_to_world=pose,
        boxes=np.tile(np.array([0, 0, 0.5, 1, 1, 1, 0], np.float32), (n, 1)),
        labels=np.zeros((n,), np.int32), label_names=("red box", "blue box")[:n],
        qa=(QA("Is the red box touching the blue box?", "yes", "contact", (0, 1)),),
    )


def test_valid_sample_passes():
    s = make_sample().validate()
    assert s.num_views == 2 and s.image_size == (4, 6)
    assert QA.from_json(s.qa[0].to_json()) == s.qa[0]


@pytest.mark.parametrize("change,msg", [
    (dict(rgb=np.zeros((2, 4, 6, 3), np.float32)), "field 'rgb' must have dtype uint8, got float32"),
    (dict(rgb=np.zeros((2, 4, 6), np.uint8)), r"field 'rgb' must have shape \[\*, \*, \*, 3\], got \[2, 4, 6\]"),
    (dict(depth=np.ones((2, 4, 5), np.float32)), r"field 'depth' must have shape \[2, 4, 6\]"),
    (dict(depth=-np.ones((2, 4, 6), np.float32)), r"field 'depth' must be >= 0 metres .* got -1.0"),
    (dict(depth=np.full((2, 4, 6), np.nan, np.float32)), "field 'depth' holds a non-finite value nan at index"),
    (dict(boxes=np.array([[0, 0, 0, 1, 0, 1, 0]] * 2, np.float32)), "box 0 has a non-positive size 0.0"),
    (dict(labels=np.zeros((3,), np.int32)), "field 'labels' must have 2 entries"),
    (dict(qa=(QA("q?", "yes", "colour"),)), r"field 'qa\[0\].kind' must be one of"),
    (dict(qa=(QA("q?", "yes", "contact", (0, 5)),)), r"field 'qa\[0\].subjects' refers to object id 5, which is not one of the scene's 2 boxes \(question 'q\?'\)"),
])
def test_bad_fields_are_named(change, msg):
    with pytest.raises(SampleError, match=msg):
        dataclasses.replace(make_sample(), **change).validate()


def test_non_orthonormal_rotation():
    s = make_sample()
    pose = s.cam_to_world.copy()
    pose[1, :3, :3] *= 1.1
    with pytest.raises(SampleError, match=r"cam_to_world' view 1: rotation is not orthonormal"):
        dataclasses.replace(s, cam_to_world=pose).validate()
    pose = s.cam_to_world.copy()
    pose[0, :3, 0] *= -1  # a reflection: orthogonal but det -1
    with pytest.raises(SampleError, match=r"det = -1.0000"):
        dataclasses.replace(s, cam_to_world=pose).validate()
