"""Synthetic scenes: determinism, physical layout, exact depth/RGB, cameras, split writing.

Depth and colour are checked against the reference signed distance functions of
tests/test_spatial_qa.py, not against the renderer's own ray intersections.
"""

import json
import os
import pathlib

import numpy as np
import pytest

from data_pipelines import scannet, spatial_qa, synthetic
from tests.test_spatial_qa import ref_sdf, ref_surface

SIZE = (48, 64)


@pytest.fixture(scope="module")
def scenes():
    return [synthetic.generate_scene(seed, image_size=SIZE, num_views=3) for seed in (0, 1, 2)]


def _unproject(depth, k, pose):
    """World points `[H*W, 3]` of every pixel and the unit-z ray directions."""
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w].reshape(2, -1).astype(np.float64)
    k, pose = k.astype(np.float64), pose.astype(np.float64)
    rays = np.stack([(u - k[0, 2]) / k[0, 0], (v - k[1, 2]) / k[1, 1], np.ones_like(u)], 1) @ pose[:3, :3].T
    return pose[:3, 3] + depth.reshape(-1, 1).astype(np.float64) * rays, rays


def _scene_sdf(sample, pts):
    """`[N, M]` signed distances of `pts` to each object."""
    return np.stack([ref_sdf(b.astype(np.float64), lab, pts) for b, lab in zip(sample.boxes, sample.labels)])


def test_deterministic_per_seed_and_independent_of_resolution():
    a = synthetic.generate_scene(42, image_size=SIZE, num_views=2)
    b = synthetic.generate_scene(42, image_size=SIZE, num_views=2)
    for field in ("rgb", "depth", "intrinsics", "cam_to_world", "boxes", "labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.qa == b.qa and a.label_names == b.label_names and a.sample_id == "synthetic-42"
    other = synthetic.generate_scene(43, image_size=SIZE, num_views=2)
    assert not np.array_equal(a.rgb, other.rgb)
    big = synthetic.generate_scene(42, image_size=(96, 96), num_views=5)  # same objects
    np.testing.assert_array_equal(big.boxes, a.boxes)
    assert big.label_names == a.label_names and big.rgb.shape == (5, 96, 96, 3)
    seeds = {synthetic.scene_seed(7, i) for i in range(500)}
    assert len(seeds) == 500 and synthetic.scene_seed(7, 3) != synthetic.scene_seed(8, 3)


def test_layout_is_physical_and_named():
    for seed in range(25):
        stacked = 0
        layout = synthetic.sample_layout(seed)
        prims, names = layout.prims, layout.names
        assert 3 <= len(prims) <= 8
        colours = [n.split()[0] for n in names]
        assert len(set(colours)) == len(colours) and set(colours) <= set(synthetic.PALETTE)
        assert [n.split()[1] for n in names] == [p.kind for p in prims]
        boxes = np.stack([p.box() for p in prims])
        labels = [p.label for p in prims]
        surfaces = [ref_surface(b, lab, 0.01) for b, lab in zip(boxes, labels)]
        support = {}  # i -> the object i rests on
        for i, p in enumerate(prims):
            assert p.z_min >= -1e-12
            below = [j for j, q in enumerate(prims) if j != i and abs(p.z_min - q.z_max) < 1e-9
                     and ref_sdf(boxes[j], labels[j], [[*p.center[:2], q.z_max - 1e-6]])[0] <= 0]
            assert abs(p.z_min) < 1e-9 or below, f"seed {seed}: {names[i]} floats"
            if below:
                assert prims[below[0]].kind in ("box", "cylinder")  # flat top
                support[i] = below[0]
        stacked += len(support)
        for i in range(len(prims)):
            for j in range(len(prims)):
                if j == i:
                    continue
                # No interpenetration: no surface point of one lies inside the other.
                assert ref_sdf(boxes[j], labels[j], surfaces[i]).min() > -1e-6, (seed, names[i], names[j])
                if support.get(i) != j and support.get(j) != i:
                    assert spatial_qa.surface_gap(prims[i], prims[j]) >= synthetic.MIN_GAP - 1e-9
        assert stacked, f"seed {seed}: no object rests on another"


def test_depth_is_the_nearest_surface(scenes):
    rng, sky = np.random.default_rng(0), 0
    for sample in scenes:
        for v in range(sample.num_views):
            depth = sample.depth[v]
            pts, rays = _unproject(depth, sample.intrinsics[v], sample.cam_to_world[v])
            valid = depth.reshape(-1) > 0
            assert valid.mean() > 0.5
            sky += int((~valid).sum())
            on_floor = (np.abs(pts[:, :2]) <= synthetic.FLOOR_HALF).all(1)
            dist = np.minimum(np.abs(_scene_sdf(sample, pts[valid])).min(0),
                              np.where(on_floor[valid], np.abs(pts[valid, 2]), np.inf))
            assert dist.max() < 1e-4, dist.max()  # every depth lands on a surface
            # ... and on the first one along the ray: nothing solid in front of it.
            idx = rng.choice(len(depth.reshape(-1)), 600, replace=False)
            t = np.linspace(0, 1, 400)[:, None]
            end = np.where(valid[idx], depth.reshape(-1)[idx] * (1 - 1e-3), 25.0)
            cam = sample.cam_to_world[v, :3, 3].astype(np.float64)
            march = (cam + (t * end)[..., None] * rays[idx][None]).reshape(-1, 3)
            assert _scene_sdf(sample, march).min() > -2e-3
            inside_square = (np.abs(march[:, :2]) <= synthetic.FLOOR_HALF).all(1)
            assert march[inside_square, 2].min() > -1e-3  # sky rays never cross the floor
    assert sky > 0


def test_colour_is_shaded_albedo_of_the_surface_hit(scenes):
    amb, light = synthetic.AMBIENT, synthetic.LIGHT
    checked = 0
    for sample in scenes:
        albedo = np.array([synthetic.PALETTE[n.split()[0]] for n in sample.label_names])
        pts, rays = _unproject(sample.depth[0], sample.intrinsics[0], sample.cam_to_world[0])
        rgb = sample.rgb[0].reshape(-1, 3).astype(np.float64) / 255
        valid = sample.depth[0].reshape(-1) > 0
        sdf = np.abs(_scene_sdf(sample, pts))
        owner = np.where(valid & (sdf.min(0) < 1e-4), sdf.argmin(0), -1)
        floor = valid & (owner < 0)
        for k in range(len(albedo)):
            on = owner == k
            if not on.any():
                continue
            s = rgb[on] @ albedo[k] / (albedo[k] @ albedo[k])  # best brightness factor
            assert np.abs(rgb[on] - s[:, None] * albedo[k]).max() <= 1.0 / 255 + 1e-9
            assert s.min() >= amb - 0.01 and s.max() <= 1.01
            # Lambert with the surface normal (the reference SDF's gradient), or in shadow.
            box, eps = sample.boxes[k].astype(np.float64), 1e-5
            n = np.stack([ref_sdf(box, sample.labels[k], pts[on] + eps * e)
                          - ref_sdf(box, sample.labels[k], pts[on] - eps * e) for e in np.eye(3)], 1) / (2 * eps)
            lit = amb + (1 - amb) * np.maximum(n @ light, 0)
            shaded = np.minimum(np.abs(s - lit), np.abs(s - amb)) < 0.02
            assert shaded.mean() > 0.95, (sample.label_names[k], shaded.mean())  # edges excepted
            checked += on.sum()
        s = rgb[floor] @ synthetic.FLOOR_RGB / (synthetic.FLOOR_RGB @ synthetic.FLOOR_RGB)
        levels = np.array([f * b for f in (0.94, 1.06) for b in (amb, amb + (1 - amb) * light[2])])
        assert np.abs(s[:, None] - levels).min(1).max() < 0.01
        shadowed = np.abs(s[:, None] - levels[[0, 2]]).min(1) < 0.01
        assert 0 < shadowed.mean() < 0.5  # objects cast shadows on the floor
        # A floor pixel is dark exactly when the way to the light is blocked.
        fpts = pts[floor]
        pick = np.random.default_rng(1).choice(len(fpts), 300, replace=False)
        march = fpts[pick][:, None] + np.linspace(0.002, 4, 800)[None, :, None] * light
        blocked = _scene_sdf(sample, march.reshape(-1, 3)).min(0).reshape(300, 800).min(1)
        assert (blocked[shadowed[pick]] < 0.006).all() and (blocked[~shadowed[pick]] > -0.006).all()
        assert (rgb[~valid][:, 2] > rgb[~valid][:, 0]).all()  # sky is blue
    assert checked > 500


def test_cameras_frame_every_object(scenes):
    for sample in scenes:
        corners = np.concatenate([ref_surface(b.astype(np.float64), lab, 1.0)
                                  for b, lab in zip(sample.boxes, sample.labels)])
        np.testing.assert_array_equal(sample.intrinsics, np.repeat(sample.intrinsics[:1], 3, 0))
        k = sample.intrinsics[0].astype(np.float64)
        for pose in sample.cam_to_world.astype(np.float64):
            assert abs(pose[2, 0]) < 1e-6 and pose[2, 1] < 0  # x horizontal, y points down
            assert pose[2, 3] > 0.5 and pose[2, 2] < 0  # above the floor, looking down
            cam = (corners - pose[:3, 3]) @ pose[:3, :3]
            assert cam[:, 2].min() > 0.5
            uv = cam[:, :2] / cam[:, 2:] * [k[0, 0], k[1, 1]] + k[:2, 2]
            assert (uv >= 0).all() and (uv[:, 0] <= SIZE[1] - 1).all() and (uv[:, 1] <= SIZE[0] - 1).all()


def test_mirrored_scene_renders_mirrored_depth():
    layout = synthetic.sample_layout(0, image_size=SIZE, num_views=1)  # three boxes, yawed
    pose = layout.cam_to_world[0]
    n, origin = pose[:3, 0], pose[:3, 3]
    phi = np.arctan2(n[1], n[0])
    mirrored = [spatial_qa.Primitive(p.kind, p.center - 2 * ((p.center - origin) @ n) * n, p.size,
                                     2 * phi - p.yaw) for p in layout.prims]
    _, depth = synthetic.render_view(layout.prims, layout.albedo, layout.intrinsics, pose, SIZE)
    _, flipped = synthetic.render_view(mirrored, layout.albedo, layout.intrinsics, pose, SIZE)
    # Compare where the original ray lands on an object: the floor square is not symmetric
    # about this plane, and silhouette pixels may flip between object and floor.
    pts, _ = _unproject(depth, layout.intrinsics, pose)
    on_obj = np.stack([np.abs(ref_sdf(p.box(), p.label, pts)) for p in layout.prims]).min(0) < 1e-4
    same = (np.abs(depth - flipped[:, ::-1]) < 1e-4).reshape(-1)
    assert on_obj.sum() > 100 and same[on_obj].mean() > 0.98, same[on_obj].mean()


def test_generate_split_writes_resumes_and_refuses_other_settings(tmp_path):
    out = tmp_path / "train"
    kwargs = dict(num_scenes=5, seed=3, image_size=(24, 32), num_views=2)
    dirs = synthetic.generate_split(out, workers=2, **kwargs)
    assert [pathlib.Path(d).name for d in dirs] == [f"scene{i:05d}_00" for i in range(5)]
    for i, d in enumerate(dirs):
        got = scannet.read_scene(d)
        want = synthetic.generate_scene(synthetic.scene_seed(3, i), image_size=(24, 32), num_views=2)
        np.testing.assert_array_equal(got.rgb, want.rgb)
        assert np.abs(got.depth - want.depth).max() <= 5e-4 + 1e-6
        assert got.qa == want.qa and got.sample_id == want.sample_id

    # Interrupted run: scene 2 missing, a half-written temp dir left behind.
    stamps = {d: os.stat(pathlib.Path(d) / "scene.json").st_mtime_ns for d in dirs}
    for f in sorted((out / "scene00002_00").rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    (out / "scene00002_00").rmdir()
    (out / ".tmp-scene00002_00-999").mkdir()
    (out / ".tmp-scene00002_00-999" / "color").mkdir()
    again = synthetic.generate_split(out, workers=1, **kwargs)
    assert again == dirs and not list(out.glob(".tmp-*"))
    for d in dirs:
        if not d.endswith("scene00002_00"):
            assert os.stat(pathlib.Path(d) / "scene.json").st_mtime_ns == stamps[d]
    np.testing.assert_array_equal(scannet.read_scene(dirs[2]).rgb,
                                  synthetic.generate_scene(synthetic.scene_seed(3, 2), image_size=(24, 32),
                                                           num_views=2).rgb)
    more = synthetic.generate_split(out, workers=1, **{**kwargs, "num_scenes": 6})  # extend
    assert more[:5] == dirs and len(more) == 6
    with pytest.raises(ValueError, match="split.json.*use another out_dir"):
        synthetic.generate_split(out, workers=1, **{**kwargs, "image_size": (32, 32)})

    stats = synthetic.split_stats(more)
    metas = [json.loads((pathlib.Path(d) / "scene.json").read_text()) for d in more]
    assert stats["scenes"] == 6
    assert stats["objects_per_scene"]["max"] == max(len(m["labels"]) for m in metas)
    assert sum(stats["qa_per_kind"].values()) == sum(len(m["qa"]) for m in metas)
    assert stats["qa_per_kind"]["describe"] == 6
    assert all(f == 0.5 for f in stats["yes_fraction"].values())
    assert 0.5 < stats["depth_m"]["min"] < stats["depth_m"]["max"] < 20
    assert 0.5 < stats["depth_m"]["valid_fraction"] < 1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="image_size must be"):
        synthetic.generate_scene(0, image_size=(0, 32))
    with pytest.raises(ValueError, match="num_views must be >= 1"):
        synthetic.generate_scene(0, num_views=0)


def test_view_of_no_object_sees_floor_and_sky():
    layout = synthetic.sample_layout(0, image_size=(32, 32), num_views=1)
    pose = synthetic.look_at(np.array([0.0, -3.0, 1.5]), np.array([0.0, -6.0, 0.0]))  # away from all
    rgb, depth = synthetic.render_view(layout.prims, layout.albedo, layout.intrinsics, pose, (32, 32))
    pts, _ = _unproject(depth, layout.intrinsics, pose)
    floor = depth.reshape(-1) > 0
    assert 0.2 < floor.mean() < 0.8
    assert np.abs(pts[floor, 2]).max() < 1e-6  # every hit is on the floor plane (float32 depth)
    assert (rgb.reshape(-1, 3)[~floor, 2] > rgb.reshape(-1, 3)[~floor, 0]).all()


def test_visible_pixels_are_where_objects_change_the_depth():
    hw = (40, 48)
    layout = synthetic.sample_layout(3, image_size=hw, num_views=2)
    seen = synthetic.visible_pixels(layout)
    assert seen.shape == (2, len(layout.prims)) and (seen.sum(0) > 0).all()

    def depth(prims, pose):
        return synthetic.render_view(prims, layout.albedo[:len(prims)], layout.intrinsics, pose, hw)[1]

    for view, pose in enumerate(layout.cam_to_world):
        empty = depth([], pose)  # floor and sky only
        # Alone, an object shows wherever it moves the depth off the floor/sky; in the scene it
        # shows there minus what the others hide, so every object together is the scene's change.
        alone = synthetic.visible_pixels(layout._replace(prims=layout.prims[:1], cam_to_world=pose[None]))
        assert alone[0, 0] == np.sum(depth(layout.prims[:1], pose) != empty) >= seen[view, 0]
        assert seen[view].sum() == np.sum(depth(layout.prims, pose) != empty)
