"""RGB-only scenes for LLaVA-3D: VGGT's predictions -> depth, intrinsics, poses -> the 3D path."""

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import synthetic
from data_pipelines import teacher_records as tr
from spatial_distill.models import camera_head, llava3d
from spatial_distill.teacher import dump as dump_lib
from spatial_distill.teacher import llava3d_teacher
from spatial_distill.teacher import vggt_geometry as vg
from tests.test_dump import all_records, tiny_config
from tests.test_teachers import tiny_llava3d

VGGT_TINY = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "vggt" / "tiny"


def _perfect_predictions(sample):
    """What a perfect VGGT would output for a sample: its depth, and pose encodings of the true
    cameras relative to camera 0 with the true focal lengths."""
    T = sample.cam_to_world.astype(np.float64)
    relative = np.linalg.inv(T[0])[None] @ T
    extrinsics = np.linalg.inv(relative)[:, :3, :4]
    h, w = sample.depth.shape[1:]
    pose_enc = camera_head.extri_intri_to_pose_encoding(
        jnp.asarray(extrinsics, jnp.float32), jnp.asarray(sample.intrinsics), (h, w))
    return sample.depth, np.asarray(pose_enc), relative


def test_perfect_predictions_give_the_sensor_geometry_in_camera_0s_level_frame():
    s = synthetic.generate_scene(3, image_size=(56, 56), num_views=3)
    depth, pose_enc, relative = _perfect_predictions(s)
    d, K, c2w = vg.geometry_from_predictions(depth, pose_enc)
    np.testing.assert_array_equal(d, s.depth)
    np.testing.assert_allclose(c2w, vg.LEVEL @ relative, atol=1e-5)
    np.testing.assert_allclose(K[:, [0, 1], [0, 1]], s.intrinsics[:, [0, 1], [0, 1]], rtol=1e-5)
    # VGGT puts the principal point at (w/2, h/2); the renderer at ((w-1)/2, (h-1)/2).
    np.testing.assert_allclose(K[:, :2, 2], s.intrinsics[:, :2, 2] + 0.5, atol=1e-6)
    # Camera 0's forward axis becomes +y and its up (-y) becomes +z.
    np.testing.assert_allclose(c2w[0, :3, :3] @ [0, 0, 1], [0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(c2w[0, :3, :3] @ [0, -1, 0], [0, 0, 1], atol=1e-6)
    d2, _, c2w2 = vg.geometry_from_predictions(depth, pose_enc, median_depth=2 * np.median(depth[depth > 0]))
    np.testing.assert_allclose(d2, 2 * s.depth, rtol=1e-6)
    np.testing.assert_allclose(c2w2[:, :3, 3], 2 * c2w[:, :3, 3], rtol=1e-5, atol=1e-6)


def test_the_teachers_3d_points_from_vggt_match_sensor_points(tmp_path):
    """Same pipeline, geometry from (perfect) VGGT outputs vs the sensors: every patch point agrees
    after the rigid change of frame, within the half-pixel principal-point convention
    (|dx| <= 0.5 z / fx, |dy| <= 0.5 z / fy) plus float32 rounding of the pose encoding."""
    from spatial_distill import prepare

    s = synthetic.generate_scene(5, image_size=(56, 56), num_views=3)
    depth, pose_enc, relative = _perfect_predictions(s)
    tok = prepare.tokenizer(tiny_config(), str(tmp_path))
    model = tiny_llava3d()
    sensor = llava3d_teacher.LLaVA3DTeacher(model, tok, teacher_id="t", revision="0")
    rgb_only = llava3d_teacher.LLaVA3DTeacher(
        model, tok, teacher_id="t", revision="0", geometry="vggt",
        predict_geometry=lambda rgb: vg.geometry_from_predictions(depth, pose_enc))
    a, b = sensor.scene_inputs(s), rgb_only.scene_inputs(s)
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["depths"], b["depths"])
    pa = np.asarray(llava3d.patch_points(a["depths"], a["poses"], a["intrinsics"], 14))[0]
    pb = np.asarray(llava3d.patch_points(b["depths"], b["poses"], b["intrinsics"], 14))[0]
    to_level = vg.LEVEL @ np.linalg.inv(s.cam_to_world[0].astype(np.float64))
    pa_level = pa @ to_level[:3, :3].T + to_level[:3, 3]
    z = a["depths"][0][:, ::14, ::14]
    bound = 0.5 * z / a["intrinsics"][0, :, 0, 0][:, None, None] * np.sqrt(2) + 1e-4
    err = np.linalg.norm(pa_level - pb, axis=-1)
    assert (err <= bound).all(), float((err - bound).max())
    assert err.max() > 1e-3  # the half-pixel offset is real, not hidden by a loose test


def test_dump_with_vggt_geometry_from_official_weights(tmp_path):
    """The RGB-only path end to end: official-format VGGT weights (the tiny fixture) predict
    the geometry that the LLaVA-3D teacher voxelises; the records say which geometry was used."""
    llava3d.save_official(tiny_llava3d(), str(tmp_path / "teacher"))
    c = tiny_config(kind="llava3d", path=str(tmp_path / "teacher"), k=4, max_new_tokens=3,
                    geometry="vggt", vggt_path=str(VGGT_TINY / "state_dict.safetensors"),
                    vggt_config=str(VGGT_TINY / "config.json"), vggt_image_width=56,
                    vggt_median_depth=2.5)
    c.data.num_train_scenes, c.data.num_eval_scenes = 4, 4
    out = dump_lib.dump(c, str(tmp_path / "w"))
    meta = tr.read_meta(out)
    assert meta.calibration["geometry"] == "vggt" and "2.5 m" in meta.calibration["vggt_scale"]
    recs = all_records(out, "train")
    assert len(recs) == 4 and all(np.isfinite(a.logsumexp).all() for r in recs for a in r.answers)
    geometry = vg.VGGTGeometry.from_config(c)
    d, K, c2w = geometry(recs[0].sample.rgb)
    assert d.shape == (4, 56, 56) and np.isclose(np.median(d[d > 0]), 2.5)
    np.testing.assert_allclose(c2w[0], vg.LEVEL, atol=1e-4)  # camera 0 is the (levelled) origin


def test_vggt_geometry_errors(tmp_path):
    with pytest.raises(ValueError, match="needs config.teacher.vggt_path"):
        vg.VGGTGeometry.from_config(tiny_config(geometry="vggt"))
    with pytest.raises(ValueError, match="vggt_image_width=50 must be a multiple of 14"):
        vg.vggt_frames(np.zeros((2, 30, 40, 3), np.uint8), 50)
    frames = vg.vggt_frames(np.full((2, 30, 40, 3), 255, np.uint8), 56)
    assert frames.shape == (2, 3, 42, 56) and frames.max() == 1.0
    assert os.path.exists(VGGT_TINY / "config.json")
