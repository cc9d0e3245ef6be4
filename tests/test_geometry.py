"""Camera-0 geometry against independent numpy computations on hand-built and random cameras."""

import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import synthetic
from spatial_distill import geometry


def look_at(eye, target):
    return synthetic.look_at(np.asarray(eye, float), np.asarray(target, float))


def random_cameras(rng, views=3):
    poses = [look_at(rng.uniform(-4, 4, 3) + [0, 0, 3], rng.uniform(-1, 1, 3)) for _ in range(views)]
    return np.stack(poses)[None].astype(np.float32)


def test_box_attributes_known_pose():
    # Camera 0 at (0, -3, 0) looking along +y (heading +90 deg): OpenCV x = world x, y = -z, z = y.
    pose = look_at([0, -3, 0], [0, 0, 0])[None, None].astype(np.float32)
    boxes = np.array([[[1.0, 2.0, 0.5, 0.2, 0.4, 0.8, np.pi / 2 + 0.3]]], np.float32)
    attrs = np.asarray(geometry.box_attributes(jnp.asarray(boxes), jnp.asarray(pose)))[0, 0]
    np.testing.assert_allclose(attrs[:3], [1.0, -0.5, 5.0], atol=1e-5)
    np.testing.assert_allclose(attrs[3:6], np.log([0.2, 0.4, 0.8]), atol=1e-6)
    np.testing.assert_allclose(attrs[6:], [np.cos(0.6), np.sin(0.6)], atol=1e-5)  # psi = 0.3


def test_boxes_in_camera0_frame_known_pose():
    eye = np.array([1.0, 2.0, 1.5])
    looking_along_y = look_at(eye, eye + np.array([0.0, 3.0, -1.0]))  # heading +90°, tilted down
    straight_down = np.eye(4)
    straight_down[:3, :3] = np.stack([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]], axis=1)
    straight_down[:3, 3] = eye  # no horizontal optical axis: image "up" (world +y) is the heading
    boxes = np.array([[1.0, 5.0, 0.5, 0.4, 0.5, 0.6, 0.3],   # 3 m ahead, 1 m down
                      [0.0, 2.0, 1.5, 1.0, 1.0, 1.0, -3.0]], np.float32)  # 1 m to the left
    want = np.array([[3.0, 0.0, -1.0, 0.4, 0.5, 0.6, 0.3 - np.pi / 2],
                     [0.0, 1.0, 0.0, 1.0, 1.0, 1.0, -3.0 - np.pi / 2 + 2 * np.pi]], np.float32)
    for pose in (looking_along_y, straight_down):
        cams = np.stack([pose, np.eye(4)])[None].astype(np.float32)  # view 1 must not matter
        got = geometry.boxes_in_camera0_frame(jnp.asarray(boxes[None]), jnp.asarray(cams))
        np.testing.assert_allclose(np.asarray(got[0]), want, atol=1e-5)


def test_box_orientation_has_the_boxes_half_turn_symmetry():
    pose = jnp.asarray(random_cameras(np.random.default_rng(0)))
    box = np.array([[[0.3, 0.1, 0.2, 0.5, 0.3, 0.4, 0.7]]], np.float32)
    turned = box.copy()
    turned[..., 6] += np.pi
    a, b = (np.asarray(geometry.box_attributes(jnp.asarray(x), pose)) for x in (box, turned))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_camera0_frames_ignore_the_world_origin_and_heading():
    rng = np.random.default_rng(1)
    cams = random_cameras(rng)
    boxes = np.concatenate([rng.uniform(-1, 1, (1, 4, 3)), rng.uniform(0.1, 1, (1, 4, 3)),
                            rng.uniform(-3, 3, (1, 4, 1))], -1).astype(np.float32)
    move = np.eye(4)
    c, s = np.cos(1.1), np.sin(1.1)
    move[:3, :3] = [[c, -s, 0], [s, c, 0], [0, 0, 1]]
    move[:3, 3] = [3.0, -2.0, 0.5]
    moved_cams = (move @ cams[0])[None].astype(np.float32)
    moved_boxes = boxes.copy()
    moved_boxes[..., :3] = boxes[..., :3] @ move[:3, :3].T + move[:3, 3]
    moved_boxes[..., 6] += 1.1
    for fn in (geometry.box_attributes, geometry.boxes_in_camera0_frame):
        a = np.asarray(fn(jnp.asarray(boxes), jnp.asarray(cams)))
        b = np.asarray(fn(jnp.asarray(moved_boxes), jnp.asarray(moved_cams)))
        if fn is geometry.boxes_in_camera0_frame:  # yaw is an angle there: compare it wrapped
            d = (a[..., 6] - b[..., 6] + np.pi) % (2 * np.pi) - np.pi
            np.testing.assert_allclose(d, 0, atol=1e-4)
            a, b = a[..., :6], b[..., :6]
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_relative_extrinsics_map_camera0_points_into_each_view():
    rng = np.random.default_rng(2)
    cams = random_cameras(rng, views=4)
    ext = np.asarray(geometry.relative_extrinsics(jnp.asarray(cams)))[0]
    np.testing.assert_allclose(ext[0], np.eye(4)[:3], atol=1e-5)
    world = rng.normal(size=(5, 3))
    p0 = (world - cams[0, 0, :3, 3]) @ cams[0, 0, :3, :3]  # world -> camera 0
    for s in range(4):
        want = (world - cams[0, s, :3, 3]) @ cams[0, s, :3, :3]
        np.testing.assert_allclose(p0 @ ext[s, :, :3].T + ext[s, :, 3], want, atol=1e-4)


def test_project_then_unproject_returns_the_camera0_position():
    rng = np.random.default_rng(3)
    cams = random_cameras(rng, views=3)
    k = np.array([[[[90.0, 0, 55.5], [0, 95.0, 50.0], [0, 0, 1]]] * 3], np.float32)
    world = rng.uniform(-1, 1, (1, 6, 3)).astype(np.float32)
    uvz = np.asarray(geometry.project(jnp.asarray(world), jnp.asarray(cams), jnp.asarray(k)))
    # numpy: camera coordinates, then the pinhole.
    for s in range(3):
        cam = (world[0] - cams[0, s, :3, 3]) @ cams[0, s, :3, :3]
        np.testing.assert_allclose(uvz[0, s, :, 0], 90 * cam[:, 0] / cam[:, 2] + 55.5, rtol=1e-4)
        np.testing.assert_allclose(uvz[0, s, :, 2], cam[:, 2], rtol=1e-5)
    back = geometry.unproject_to_camera0(jnp.asarray(uvz[..., :2]), jnp.asarray(uvz[..., 2]),
                                         geometry.relative_extrinsics(jnp.asarray(cams)), jnp.asarray(k))
    want = np.asarray(geometry.world_to_camera0(jnp.asarray(world), jnp.asarray(cams)))
    for s in range(3):
        np.testing.assert_allclose(np.asarray(back)[0, s], want[0], atol=1e-4)


def test_pixel_points_and_box_distance_on_a_rendered_scene():
    scene = synthetic.generate_scene(synthetic.scene_seed(0, 3), image_size=(28, 28), num_views=2)
    pts = np.asarray(geometry.pixel_points(jnp.asarray(scene.depth[None]), jnp.asarray(scene.intrinsics[None]),
                                           jnp.asarray(scene.cam_to_world[None])))[0]
    v, u = 9, 17
    z = scene.depth[1, v, u]
    k, pose = scene.intrinsics[1].astype(float), scene.cam_to_world[1].astype(float)
    cam = np.array([(u - k[0, 2]) / k[0, 0] * z, (v - k[1, 2]) / k[1, 1] * z, z])
    np.testing.assert_allclose(pts[1, v, u], pose[:3, :3] @ cam + pose[:3, 3], atol=1e-4)
    # Every valid pixel lies on the floor (z = 0) or on the surface of some box.
    d = np.asarray(geometry.inside_box_distance(jnp.asarray(pts[None]), jnp.asarray(scene.boxes[None])))[0]
    valid = scene.depth > 0
    on_object = d.min(-1) < 5e-3
    on_floor = np.abs(pts[..., 2]) < 5e-3
    assert (on_object | on_floor)[valid].all()
    assert on_object[valid].mean() > 0.05


def test_inside_box_distance_rotated_box():
    box = jnp.asarray([[[1.0, 0.0, 0.5, 2.0, 1.0, 1.0, np.pi / 2]]])  # long axis along world y
    points = jnp.asarray([[[1.0, 0.9, 0.5], [1.0, 1.5, 0.5], [2.0, 0.0, 0.5], [1.0, 0.0, 2.0]]])
    d = np.asarray(geometry.inside_box_distance(points, box))[0, :, 0]
    np.testing.assert_allclose(d, [0.0, 0.5, 0.5, 1.0], atol=1e-6)


def test_patch_centres_follow_the_pixel_centre_convention():
    c = geometry.patch_centres(2, 3, 14)
    np.testing.assert_allclose(c[:4], [[6.5, 6.5], [20.5, 6.5], [34.5, 6.5], [6.5, 20.5]])


@pytest.mark.parametrize("flat", [False, True])
def test_heading_of_a_camera_looking_straight_down(flat):
    eye, target = ([0, 0, 3.0], [0, 0, 0.0]) if flat else ([0, 0, 3.0], [1.0, 1.0, 0.0])
    if flat:  # look_at cannot build a vertical camera: x = world x, y = world -y... image up = +y
        pose = np.eye(4)
        pose[:3, :3] = [[1, 0, 0], [0, -1, 0], [0, 0, -1]]
        pose[:3, 3] = eye
    else:
        pose = look_at(eye, target)
    h = float(geometry.camera0_heading(jnp.asarray(pose[None, None], jnp.float32))[0])
    assert h == pytest.approx(np.pi / 2 if flat else np.pi / 4, abs=1e-5)


def test_boxes_from_camera0_frame_inverts_the_forward_map():
    r = np.random.default_rng(3)
    s = synthetic.generate_scene(11, image_size=(56, 56), num_views=2)
    boxes = np.concatenate([r.normal(size=(1, 5, 3)) * 3, r.uniform(0.2, 1, (1, 5, 3)),
                            r.uniform(-np.pi, np.pi, (1, 5, 1))], -1).astype(np.float32)
    cams = s.cam_to_world[None]
    there = geometry.boxes_in_camera0_frame(jnp.asarray(boxes), jnp.asarray(cams))
    back = np.asarray(geometry.boxes_from_camera0_frame(there, jnp.asarray(cams)))
    np.testing.assert_allclose(back[..., :6], boxes[..., :6], atol=1e-5)
    np.testing.assert_allclose(np.angle(np.exp(1j * (back[..., 6] - boxes[..., 6]))), 0, atol=1e-5)
