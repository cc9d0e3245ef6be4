"""3D-FRONT rendered views: camera conventions, house boxes, labels, skip counts and errors, on a
tiny hand-made house whose expected values are worked out by hand below."""

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from data_pipelines import front3d
from data_pipelines.front3d import Front3DFormatError

H, W = 16, 20
K = [[10.0, 0.0, 9.5], [0.0, 10.0, 7.5], [0.0, 0.0, 1.0]]
K7 = [[12.0, 0.0, 9.5], [0.0, 12.0, 7.5], [0.0, 0.0, 1.0]]
S45 = math.sqrt(0.5)

# OpenGL cameras in the house's y-up frame.
GL_POSES = {
    # At (1.4, 0.9, 6.1), unrotated: looks along the house's -z.
    0: [[1, 0, 0, 1.4], [0, 1, 0, 0.9], [0, 0, 1, 6.1], [0, 0, 0, 1]],
    # Turned +90 deg about the house's +y, so it looks along -x; at (2, 0.675, 3.6).
    1: [[0, 0, 1, 2.0], [0, 1, 0, 0.675], [-1, 0, 0, 3.6], [0, 0, 0, 1]],
}
# Expected ours = Y_UP_TO_Z_UP @ pose @ diag(1, -1, -1): rows (r0, -r2, r1) of pose @ diag(1,-1,-1).
EXPECTED_POSES = {
    0: [[1, 0, 0, 1.4], [0, 0, 1, -6.1], [0, -1, 0, 0.9], [0, 0, 0, 1]],   # looks along our +y
    1: [[0, 0, -1, 2.0], [1, 0, 0, -3.6], [0, -1, 0, 0.675], [0, 0, 0, 1]],  # looks along our -x
    7: [[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]],  # OpenCV identity, y-up world
}

# Chair: model x [-0.3, 0.1], y [0, 1], z [-0.25, 0.25]; at (1, 0, 2) turned +90 deg about +y.
# Model centre (-0.1, 0.5, 0) -> R_y(90) -> (0, 0.5, 0.1) -> + pos = (1, 0.5, 2.1) (y-up)
# -> (x, -z, y) = (1, -2.1, 0.5). Sizes along model (x, z, y) = (0.4, 0.5, 1.0); yaw +pi/2.
CHAIR_BOX = [1.0, -2.1, 0.5, 0.4, 0.5, 1.0, math.pi / 2]
# Table: model x [-0.5, 0.5], y [0, 1.5], z [-0.3, 0.3]; scale (2, 0.5, 1), at (-1, 0, 3), no turn.
# Scaled x [-1, 1], y [0, 0.75], z [-0.3, 0.3]; centre (-1, 0.375, 3) -> (-1, -3, 0.375).
TABLE_BOX = [-1.0, -3.0, 0.375, 2.0, 0.6, 0.75, 0.0]


def _obj(xs, ys, zs):
    lines = ["# tiny model", "mtllib model.mtl", "vt 0.5 0.5", "vn 0 1 0"]
    lines += [f"v {x} {y} {z}" for x in xs for y in ys for z in zs]
    lines[-1] += " 0.8 0.1 0.1"  # a vertex colour: ignored
    return "\n".join(lines + ["f 1/1/1 2/1/1 3/1/1", ""])


def _house():
    child = lambda ref, iid, pos, rot, scale: {"ref": ref, "instanceid": iid, "pos": pos,
                                               "rot": rot, "scale": scale}
    return {
        "uid": "house-0",
        "furniture": [{"uid": "f-chair", "jid": "chair-1"}, {"uid": "f-table", "jid": "table-1"},
                      {"uid": "f-plant", "jid": "plant-1"}],
        "mesh": [{"uid": "mesh-floor", "type": "Floor"}],
        "scene": {"room": [
            {"type": "LivingRoom", "instanceid": "LivingRoom-1", "pos": [0, 0, 0],
             "rot": [0, 0, 0, 1], "scale": [1, 1, 1], "children": [
                 child("mesh-floor", "mesh/0", [0, 0, 0], [0, 0, 0, 1], [1, 1, 1]),
                 child("f-chair", "furniture/1", [1, 0, 2], [0, S45, 0, S45], [1, 1, 1]),
                 child("f-table", "furniture/2", [-1, 0, 3], [0, 0, 0, 1], [2, 0.5, 1]),
                 child("f-plant", "furniture/3", [0, 0, 0], [0, 0, 0, 1], [1, 1, 1])]},
            {"type": "Bedroom", "instanceid": "Bedroom-2", "children": [
                child("f-chair", "furniture/9", [5, 0, 5], [0, 0, 0, 1], [1, 1, 1])]}]},
    }


@pytest.fixture
def scene(tmp_path):
    future = tmp_path / "3D-FUTURE-model"
    for jid, bounds in (("chair-1", ([-0.3, 0.1], [0, 1], [-0.25, 0.25])),
                        ("table-1", ([-0.5, 0.5], [0, 1.5], [-0.3, 0.3]))):
        (future / jid).mkdir(parents=True)
        (future / jid / "raw_model.obj").write_text(_obj(*bounds))
    # plant-1 has no model folder at all: an unknown category needs no mesh.
    (future / "model_info.json").write_text(json.dumps([
        {"model_id": "chair-1", "category": "Dining Chair", "super-category": "Chair"},
        {"model_id": "table-1", "category": "Coffee Table", "super-category": "Table"},
        {"model_id": "plant-1", "category": None, "super-category": "Others"}]))
    (tmp_path / "house-0.json").write_text(json.dumps(_house()))

    d = tmp_path / "house-0_LivingRoom-1"
    (d / "rgb").mkdir(parents=True)
    (d / "depth").mkdir()
    for i, fid in enumerate((0, 1, 7)):
        rgb = np.zeros((H, W, 4), np.uint8)  # RGBA, as Blender may write it
        rgb[..., i] = 200
        rgb[..., 3] = 255
        rgb[2, 3] = [1, 2, 3, 255]
        Image.fromarray(rgb).save(d / "rgb" / f"{fid:04d}.png")
    mm = np.zeros((H, W), np.uint16)
    mm[8, 8], mm[0, 0] = 4000, 2500
    Image.fromarray(mm).save(d / "depth" / "0000.png")
    Image.fromarray(np.full((H, W), 3000, np.uint16)).save(d / "depth" / "0001.png")
    metres = np.full((H, W), 1.25, np.float32)
    metres[2, 3], metres[3, 3] = np.inf, 1e10
    np.save(d / "depth" / "0007.npy", metres)
    (d / "cameras.json").write_text(json.dumps({
        "convention": "opengl", "world_up": "y", "intrinsics": K, "depth_invalid_above": 100.0,
        "frames": [{"id": 0, "cam_to_world": GL_POSES[0]},
                   {"id": 7, "cam_to_world": np.eye(4).tolist(), "convention": "opencv",
                    "intrinsics": K7},
                   {"id": 1, "cam_to_world": GL_POSES[1]}]}))
    (d / "scene.json").write_text(json.dumps({
        "house_json": "../house-0.json", "room_id": "LivingRoom-1",
        "future_dir": "../3D-FUTURE-model"}))
    return d


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_views_cameras_and_depth(scene):
    stats = {}
    s = front3d.read_scene(scene, stats=stats)
    assert s.sample_id == "house-0_LivingRoom-1" and stats["frame_ids"] == [0, 1, 7]
    for v, fid in enumerate((0, 1, 7)):
        np.testing.assert_allclose(s.cam_to_world[v], EXPECTED_POSES[fid], atol=1e-6)
        want = np.zeros((H, W, 3), np.uint8)
        want[..., v] = 200
        want[2, 3] = [1, 2, 3]
        np.testing.assert_array_equal(s.rgb[v], want)
    np.testing.assert_array_equal(s.intrinsics, np.array([K, K, K7], np.float32))
    assert s.depth.dtype == np.float32 and s.depth.shape == (3, H, W)
    assert s.depth[0, 8, 8] == np.float32(4.0) and s.depth[0, 0, 0] == np.float32(2.5)
    assert s.depth[0, 5, 5] == 0 and (s.depth[1] == np.float32(3.0)).all()
    assert s.depth[2, 2, 3] == 0 and s.depth[2, 3, 3] == 0  # inf and beyond depth_invalid_above
    assert s.depth[2, 0, 0] == np.float32(1.25)


def test_conversion_matrices():
    a = front3d.Y_UP_TO_Z_UP
    np.testing.assert_array_equal(a @ [0, 1, 0], [0, 0, 1])  # house up -> our up
    assert np.linalg.det(a) == 1
    got = front3d.convert_cam_to_world(GL_POSES[1], convention="opengl", world_up="y")
    np.testing.assert_allclose(got, EXPECTED_POSES[1], atol=1e-12)
    # A z-up world is taken as is; an OpenCV camera is not flipped.
    got = front3d.convert_cam_to_world(EXPECTED_POSES[1], convention="opencv", world_up="z")
    np.testing.assert_array_equal(got, EXPECTED_POSES[1])


def test_boxes_labels_and_counts(scene):
    stats = {}
    s = front3d.read_scene(scene, stats=stats)
    np.testing.assert_allclose(s.boxes, np.array([CHAIR_BOX, TABLE_BOX], np.float32), atol=1e-6)
    np.testing.assert_array_equal(s.labels, [2, 3])
    assert front3d.CLASSES[2] == "chair" and front3d.CLASSES[3] == "table"
    assert s.label_names == ("dining chair", "coffee table")
    # The chair and the table stand on the floor (the model's y = 0 is its base).
    np.testing.assert_allclose(s.boxes[:, 2] - s.boxes[:, 5] / 2, 0, atol=1e-6)
    assert stats["box_source"] == "house"
    assert stats["instances"] == 3 and stats["non_furniture"] == 1 and stats["boxes"] == 2
    assert stats["skipped_unknown_category"] == {"Others": 1}
    assert stats["skipped_bad_instance"] == []


def test_box_centres_project_into_views(scene):
    """Camera conversion and box conversion agree: a box centre lands on the hand-computed pixel.
    View 0 sees the chair 4 m ahead, 0.4 m left of and 0.4 m below the camera: u = 9.5 - 10 * 0.1,
    v = 7.5 + 10 * 0.1. View 1 sees the table 3 m ahead, 0.6 m right, 0.3 m below."""
    s = front3d.read_scene(scene, stats={})
    for view, box, want in ((0, 0, (8.5, 8.5, 4.0)), (1, 1, (11.5, 8.5, 3.0))):
        centre = np.append(s.boxes[box, :3].astype(np.float64), 1.0)
        cam = np.linalg.inv(s.cam_to_world[view].astype(np.float64)) @ centre
        uvw = s.intrinsics[view].astype(np.float64) @ cam[:3]
        np.testing.assert_allclose([uvw[0] / uvw[2], uvw[1] / uvw[2], cam[2]], want, atol=1e-4)


def test_unknown_category_warns_without_stats(scene):
    with pytest.warns(UserWarning, match=r"1 furniture instance\(s\) of unknown category.*Others"):
        front3d.read_scene(scene)


def test_instance_box_yaw_and_rotation():
    lo, hi = [-1, 0, -0.5], [1, 1, 0.5]
    for deg in (-90, 45, 180):
        t = math.radians(deg) / 2
        box, tilt = front3d.instance_box(lo, hi, pos=[0, 0, 0], rot=[0, math.sin(t), 0, math.cos(t)],
                                         scale=[1, 1, 1])
        assert tilt < 1e-6 and math.isclose(box[6], math.radians(deg), abs_tol=1e-9)
        np.testing.assert_allclose(box[3:6], [2, 1, 1])
    r = front3d.quaternion_to_matrix([0, S45, 0, S45])
    np.testing.assert_allclose(r, [[0, 0, 1], [0, 1, 0], [-1, 0, 0]], atol=1e-12)
    _, tilt = front3d.instance_box(lo, hi, pos=[0, 0, 0], rot=[math.sin(0.25), 0, 0, math.cos(0.25)],
                                   scale=[1, 1, 1])
    assert math.isclose(tilt, math.degrees(0.5))


def test_bbox_json_takes_precedence_over_obj(scene, tmp_path):
    (tmp_path / "3D-FUTURE-model" / "table-1" / "bbox.json").write_text(
        json.dumps({"min": [-1, 0, -0.2], "max": [1, 1, 0.2]}))
    s = front3d.read_scene(scene, stats={})
    # Scaled by (2, 0.5, 1): x [-2, 2], y [0, 0.5], z [-0.2, 0.2]; centre (-1, 0.25, 3).
    np.testing.assert_allclose(s.boxes[1], [-1, -3, 0.25, 4, 0.4, 0.5, 0], atol=1e-6)
    np.testing.assert_allclose(s.boxes[0], CHAIR_BOX, atol=1e-6)  # the chair still from its OBJ


def test_whole_house_and_embedded_house(scene, tmp_path):
    meta = json.loads((scene / "scene.json").read_text())
    del meta["house_json"], meta["room_id"]
    meta["house"] = _house()
    (scene / "scene.json").write_text(json.dumps(meta))
    stats = {}
    s = front3d.read_scene(scene, stats=stats)
    assert len(s.boxes) == 3 and stats["instances"] == 4  # the bedroom's chair joins
    np.testing.assert_allclose(s.boxes[2, :3], [4.9, -5, 0.5], atol=1e-6)


def test_boxes_given_directly(scene):
    meta = {"sample_id": "direct", "boxes": [CHAIR_BOX], "labels": [2], "label_names": ["chair"],
            "qa": [{"question": "Is the chair near?", "answer": "yes", "kind": "proximity",
                    "subjects": [0]}]}
    (scene / "scene.json").write_text(json.dumps(meta))
    stats = {}
    s = front3d.read_scene(scene, stats=stats)
    assert s.sample_id == "direct" and stats["box_source"] == "scene.json"
    np.testing.assert_array_equal(s.boxes, np.array([CHAIR_BOX], np.float32))
    assert s.label_names == ("chair",) and s.qa[0].subjects == (0,)
    (scene / "scene.json").unlink()
    s = front3d.read_scene(scene, stats=stats)
    assert s.boxes.shape == (0, 7) and stats["box_source"] == "none"


def test_frame_selection_and_resize(scene):
    a = front3d.read_scene(scene, num_views=2, seed=3, stats={})
    b = front3d.read_scene(scene, num_views=2, seed=3, stats={})
    stats = {}
    front3d.read_scene(scene, num_views=2, seed=3, stats=stats)
    ids = stats["frame_ids"]
    assert len(ids) == 2 and ids == sorted(ids) and set(ids) <= {0, 1, 7}
    np.testing.assert_array_equal(a.rgb, b.rgb)
    s = front3d.read_scene(scene, frame_ids=[7, 0], image_size=(8, 10), stats={})
    np.testing.assert_allclose(s.cam_to_world, [EXPECTED_POSES[7], EXPECTED_POSES[0]], atol=1e-6)
    assert s.rgb.shape == (2, 8, 10, 3) and s.depth.shape == (2, 8, 10)
    # Half size: f / 2, c' = (c + 0.5) / 2 - 0.5.
    np.testing.assert_allclose(s.intrinsics[1], [[5, 0, 4.5], [0, 5, 3.5], [0, 0, 1]])
    np.testing.assert_allclose(s.intrinsics[0], [[6, 0, 4.5], [0, 6, 3.5], [0, 0, 1]])
    # Nearest: output (i, j) samples input (2i + 1, 2j + 1), so (1, 1) is the invalid (3, 3).
    assert s.depth[0, 0, 0] == np.float32(1.25) and s.depth[0, 1, 1] == 0
    with pytest.raises(Front3DFormatError, match="not frames of cameras.json"):
        front3d.read_scene(scene, frame_ids=[2])
    with pytest.raises(Front3DFormatError, match="num_views=4"):
        front3d.read_scene(scene, num_views=4)


def _break(scene, tmp_path, what):
    """Applies one defect; returns the text its error must contain."""
    if what == "no cameras":
        (scene / "cameras.json").unlink()
        return "missing .*cameras.json"
    if what == "extra rgb":
        shutil.copy(scene / "rgb" / "0000.png", scene / "rgb" / "0003.png")
        return r"frames \[3\] are in rgb/ but not in cameras.json"
    if what == "missing depth":
        (scene / "depth" / "0001.png").unlink()
        return r"frames \[1\] of cameras.json have no file in depth/"
    if what == "8-bit depth":
        Image.fromarray(np.full((H, W), 3, np.uint8)).save(scene / "depth" / "0001.png")
        return "0001.png: depth must be a 16-bit PNG"
    if what == "png and npy":
        np.save(scene / "depth" / "0001.npy", np.ones((H, W), np.float32))
        return "frame 1 has both 0001.png and 0001.npy"
    if what == "no convention":
        cams = json.loads((scene / "cameras.json").read_text())
        del cams["convention"]
        (scene / "cameras.json").write_text(json.dumps(cams))
        return "cameras.json .*missing 'convention'"
    if what == "bad world_up":
        _edit_json(scene / "cameras.json", world_up="x")
        return "'world_up' must be one of"
    if what == "depth size":
        Image.fromarray(np.zeros((H, W - 1), np.uint16)).save(scene / "depth" / "0001.png")
        return "write depth at the RGB size"
    if what == "missing model":
        shutil.rmtree(tmp_path / "3D-FUTURE-model" / "chair-1")
        return r"'furniture/1' \(jid 'chair-1'\).*missing 3D-FUTURE model .*chair-1"
    if what == "tilted":
        house = _house()
        house["scene"]["room"][0]["children"][2]["rot"] = [math.sin(0.25), 0, 0, math.cos(0.25)]
        (tmp_path / "house-0.json").write_text(json.dumps(house))
        return r"'furniture/2'.*tilts the model's up axis by 28.65 deg"
    if what == "room transform":
        house = _house()
        house["scene"]["room"][0]["pos"] = [1, 0, 0]
        (tmp_path / "house-0.json").write_text(json.dumps(house))
        return "room 'pos' is .* not the identity"
    if what == "unknown room":
        _edit_json(scene / "scene.json", room_id="Kitchen-9")
        return "no room with instanceid 'Kitchen-9'"
    if what == "house and boxes":
        _edit_json(scene / "scene.json", boxes=[CHAIR_BOX])
        return "both a house and 'boxes'"
    if what == "no model_info":
        (tmp_path / "3D-FUTURE-model" / "model_info.json").unlink()
        return "missing .*model_info.json"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["no cameras", "extra rgb", "missing depth", "8-bit depth",
                                  "png and npy", "no convention", "bad world_up", "depth size",
                                  "missing model", "tilted", "room transform", "unknown room",
                                  "house and boxes", "no model_info"])
def test_bad_input_names_the_problem(scene, tmp_path, what):
    pattern = _break(scene, tmp_path, what)
    with pytest.raises(Front3DFormatError, match=pattern):
        front3d.read_scene(scene, stats={})


@pytest.mark.parametrize("what", ["missing model", "tilted"])
def test_bad_instances_can_be_skipped_and_counted(scene, tmp_path, what):
    _break(scene, tmp_path, what)
    stats = {}
    s = front3d.read_scene(scene, on_bad_instance="skip", stats=stats)
    assert len(s.boxes) == 1 and stats["boxes"] == 1 and len(stats["skipped_bad_instance"]) == 1
    kept = TABLE_BOX if what == "missing model" else CHAIR_BOX
    np.testing.assert_allclose(s.boxes[0], kept, atol=1e-6)
    assert stats["skipped_unknown_category"] == {"Others": 1}
