"""ScanNet exported-frame layout: exact round trip, frame selection, depth registration, errors."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from data_pipelines import scannet, synthetic
from data_pipelines.sample import Sample
from data_pipelines.scannet import ScanNetFormatError

SIZE = (40, 56)


@pytest.fixture(scope="module")
def sample():
    return synthetic.generate_scene(21, image_size=SIZE, num_views=3)


@pytest.fixture
def scene(tmp_path, sample):
    d = tmp_path / "scene0021_00"
    scannet.write_scene(sample, d)
    return d


def test_round_trip_is_exact(scene, sample):
    got = scannet.read_scene(scene)
    np.testing.assert_array_equal(got.rgb, sample.rgb)
    assert np.abs(got.depth - sample.depth).max() <= 5e-4 + 1e-6  # 1 mm quantisation
    np.testing.assert_array_equal(got.depth > 0, sample.depth > 0)
    np.testing.assert_array_equal(got.intrinsics, sample.intrinsics)
    np.testing.assert_array_equal(got.cam_to_world, sample.cam_to_world)
    np.testing.assert_array_equal(got.boxes, sample.boxes)
    np.testing.assert_array_equal(got.labels, sample.labels)
    assert got.label_names == sample.label_names and got.qa == sample.qa
    assert got.sample_id == sample.sample_id


def test_files_follow_the_exporter_format(scene, sample):
    assert sorted(p.name for p in (scene / "color").iterdir()) == ["0.png", "1.png", "2.png"]
    rows = (scene / "pose" / "1.txt").read_text().strip().split("\n")
    assert len(rows) == 4 and all(len(r.split()) == 4 for r in rows)
    np.testing.assert_array_equal(np.loadtxt(scene / "pose" / "1.txt").astype(np.float32),
                                  sample.cam_to_world[1])
    k4 = np.loadtxt(scene / "intrinsic" / "intrinsic_color.txt")
    np.testing.assert_array_equal(k4[3], [0, 0, 0, 1])
    np.testing.assert_array_equal(k4[:3, :3].astype(np.float32), sample.intrinsics[0])
    depth = Image.open(scene / "depth" / "2.png")
    assert depth.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(depth), np.round(sample.depth[2].astype(np.float64) * 1000))
    meta = json.loads((scene / "scene.json").read_text())
    assert meta["frame_ids"] == [0, 1, 2] and len(meta["boxes"]) == len(sample.boxes)


def test_reads_jpeg_colour(scene, sample):
    Image.open(scene / "color" / "1.png").save(scene / "color" / "1.jpg", quality=95)
    (scene / "color" / "1.png").unlink()
    got = scannet.read_scene(scene)
    assert np.abs(got.rgb[1].astype(int) - sample.rgb[1]).mean() < 4  # lossy but the same image
    np.testing.assert_array_equal(got.rgb[0], sample.rgb[0])


def test_picks_frames_evenly_by_numeric_id_and_skips_invalid_poses(tmp_path):
    many = synthetic.generate_scene(5, image_size=(16, 16), num_views=11)
    d = tmp_path / "scene0005_00"
    scannet.write_scene(many, d)
    (d / "scene.json").unlink()  # a bare export: ids come from color/
    for i in reversed(range(11)):  # ScanNet exports every 10th frame: 0, 10, ..., 100
        for sub, ext in (("color", "png"), ("depth", "png"), ("pose", "txt")):
            (d / sub / f"{i}.{ext}").rename(d / sub / f"{10 * i}.{ext}")
    assert scannet.frame_ids_on_disk(d) == [10 * i for i in range(11)]  # 100 after 90, not after 10
    got = scannet.read_scene(d, num_views=3)
    np.testing.assert_array_equal(got.cam_to_world, many.cam_to_world[[0, 5, 10]])
    assert got.sample_id == "scene0005_00" and got.boxes.shape == (0, 7) and got.qa == ()
    assert got.labels.shape == (0,) and got.label_names == ()

    (d / "pose" / "100.txt").write_text("-inf -inf -inf -inf\n" * 4)  # tracking lost
    got = scannet.read_scene(d, num_views=3)  # 10 frames remain: positions 0, 4.5 -> 4, 9
    np.testing.assert_array_equal(got.cam_to_world, many.cam_to_world[[0, 4, 9]])
    assert scannet.read_scene(d).num_views == 10
    with pytest.raises(ScanNetFormatError, match=r"pose/100.txt: pose is not finite"):
        scannet.read_scene(d, frame_ids=[0, 100])
    np.testing.assert_array_equal(scannet.read_scene(d, frame_ids=[30, 20]).cam_to_world,
                                  many.cam_to_world[[3, 2]])
    with pytest.raises(ScanNetFormatError, match="num_views=11 but it has 10 frames"):
        scannet.read_scene(d, num_views=11)
    with pytest.raises(ScanNetFormatError, match="num_views=2 contradicts the 3 frame_ids"):
        scannet.read_scene(d, frame_ids=[0, 10, 20], num_views=2)
    (d / "color" / "40.png").unlink()
    with pytest.raises(ScanNetFormatError, match=r"missing frame file .*color/40.png \(nor 40.jpg\)"):
        scannet.read_scene(d, frame_ids=[40])


def _write_depth(path, depth_m):
    Image.fromarray(np.round(depth_m * 1000).astype(np.uint16)).save(path)


def _k4(k):
    m = np.eye(4)
    m[:3, :3] = k
    return "\n".join(" ".join(f"{v:f}" for v in row) for row in m) + "\n"  # the exporter's %f


def test_half_resolution_depth_is_upsampled_nearest(tmp_path):
    layout = synthetic.sample_layout(8, image_size=(48, 64), num_views=1)
    hi = synthetic.generate_scene(8, image_size=(48, 64), num_views=1)
    k_half = layout.intrinsics.copy()
    k_half[:2, :2] /= 2
    k_half[:2, 2] = (k_half[:2, 2] + 0.5) / 2 - 0.5  # the same camera on a 2x coarser grid
    _, depth_half = synthetic.render_view(layout.prims, layout.albedo, k_half, layout.cam_to_world[0], (24, 32))
    d = tmp_path / "scene"
    scannet.write_scene(hi, d)
    _write_depth(d / "depth" / "0.png", depth_half)
    (d / "intrinsic" / "intrinsic_depth.txt").write_text(_k4(k_half))
    got = scannet.read_scene(d)
    want = np.repeat(np.repeat(np.round(depth_half * 1000) / 1000, 2, 0), 2, 1)
    np.testing.assert_allclose(got.depth[0], want, atol=1e-6)
    np.testing.assert_array_equal(got.intrinsics[0], hi.intrinsics[0])
    # Without intrinsic_depth.txt the depth camera is assumed to be the colour one, rescaled.
    (d / "intrinsic" / "intrinsic_depth.txt").unlink()
    np.testing.assert_allclose(scannet.read_scene(d).depth[0], want, atol=1e-6)


def test_scannet_sized_depth_registers_to_colour_through_both_intrinsics(tmp_path):
    # ScanNet colour 1296x968 / depth 640x480 scaled by 1/8; the depth principal point sits
    # 3 depth pixels off the scaled colour one, so resizing alone would misalign them.
    color_hw, depth_hw = (121, 162), (60, 80)
    k_c = np.array([[146.27, 0, 80.97], [0, 146.27, 60.47], [0, 0, 1]])
    k_d = np.array([[72.20, 0, 39.86 + 3], [0, 72.20, 30.34 - 3], [0, 0, 1]])
    layout = synthetic.sample_layout(9, image_size=color_hw, num_views=1)
    pose = layout.cam_to_world[0]
    rgb, depth_c = synthetic.render_view(layout.prims, layout.albedo, k_c, pose, color_hw)
    _, depth_d = synthetic.render_view(layout.prims, layout.albedo, k_d, pose, depth_hw)
    s = Sample("scannet-like", rgb[None], depth_c[None], k_c[None].astype(np.float32),
               pose[None].astype(np.float32), np.zeros((0, 7), np.float32), np.zeros(0, np.int32))
    d = tmp_path / "scene"
    scannet.write_scene(s, d)
    _write_depth(d / "depth" / "0.png", depth_d)
    (d / "intrinsic" / "intrinsic_depth.txt").write_text(_k4(k_d))
    got = scannet.read_scene(d)
    assert got.depth.shape == (1, *color_hw)
    np.testing.assert_allclose(got.intrinsics[0], k_c, rtol=1e-6)
    # Each colour pixel takes the depth pixel whose centre is nearest its ray, at most about one
    # colour pixel away, so its value lies within its 3x3 neighbourhood of the true depth.
    win = np.lib.stride_tricks.sliding_window_view(np.pad(depth_c, 1, mode="edge"), (3, 3))
    lo, hi = win.min((2, 3)) - 1e-3, win.max((2, 3)) + 1e-3

    def registered(depth):
        valid = (depth > 0) & (depth_c > 0)
        return valid.mean(), ((depth >= lo) & (depth <= hi))[valid].mean()

    covered, within = registered(got.depth[0])
    assert covered > 0.9 and within > 0.98, (covered, within)
    naive = np.asarray(Image.fromarray(depth_d).resize(color_hw[::-1], Image.NEAREST))
    assert registered(naive)[1] < 0.5  # resizing alone misregisters


def test_image_size_resizes_and_scales_intrinsics(scene, sample):
    got = scannet.read_scene(scene, image_size=(20, 28))
    assert got.rgb.shape == (3, 20, 28, 3)
    k = sample.intrinsics[0].astype(np.float64)
    np.testing.assert_allclose(got.intrinsics[0], [[k[0, 0] / 2, 0, (k[0, 2] + 0.5) / 2 - 0.5],
                                                   [0, k[1, 1] / 2, (k[1, 2] + 0.5) / 2 - 0.5],
                                                   [0, 0, 1]], rtol=1e-6)
    # Pixel (u, v) of the half-size grid is centred on full-size pixel (2u + 0.5, 2v + 0.5):
    # nearest is (2u + 1, 2v + 1).
    np.testing.assert_allclose(got.depth, np.round(sample.depth[:, 1::2, 1::2] * 1000) / 1000, atol=1e-6)
    assert abs(got.rgb.mean() - sample.rgb.mean()) < 3


def test_errors_name_the_file(scene, sample, tmp_path):
    (scene / "depth" / "1.png").unlink()
    with pytest.raises(ScanNetFormatError, match=r"missing frame file .*depth/1.png"):
        scannet.read_scene(scene)
    (scene / "depth" / "1.png").write_bytes(b"not a png at all")
    with pytest.raises(ScanNetFormatError, match=r"unreadable image .*depth/1.png"):
        scannet.read_scene(scene)
    Image.fromarray(np.zeros(SIZE, np.uint8)).save(scene / "depth" / "1.png")
    with pytest.raises(ScanNetFormatError, match=r"depth/1.png: depth must be a 16-bit PNG"):
        scannet.read_scene(scene)
    _write_depth(scene / "depth" / "1.png", sample.depth[1])
    (scene / "pose" / "2.txt").write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n")
    with pytest.raises(ScanNetFormatError, match=r"pose/2.txt: expected a 4x4 matrix \(16 numbers\), got 12"):
        scannet.read_scene(scene)
    (scene / "pose" / "2.txt").write_text("2 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    with pytest.raises(ScanNetFormatError, match=r"pose/2.txt: not a rigid cam_to_world"):
        scannet.read_scene(scene)
    (scene / "pose" / "2.txt").write_text("1 0 0 x\n" * 4)
    with pytest.raises(ScanNetFormatError, match=r"pose/2.txt: not a whitespace-separated list"):
        scannet.read_scene(scene)
    with pytest.raises(ScanNetFormatError, match="scene folder .*nowhere does not exist"):
        scannet.read_scene(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ScanNetFormatError, match=r"missing folder .*empty/color"):
        scannet.read_scene(empty)
    shutil.copytree(scene, tmp_path / "bad_json")
    (tmp_path / "bad_json" / "scene.json").write_text("{")
    with pytest.raises(ScanNetFormatError, match=r"bad_json/scene.json: not valid JSON"):
        scannet.read_scene(tmp_path / "bad_json")


def test_writer_rejects_what_the_layout_cannot_hold(sample, tmp_path):
    k = sample.intrinsics.copy()
    k[1, 0, 0] *= 1.1
    with pytest.raises(ScanNetFormatError, match="one intrinsic matrix per scene"):
        scannet.write_scene(Sample(**{**sample.__dict__, "intrinsics": k}), tmp_path / "a")
    depth = sample.depth.copy()
    depth[2, 3, 4] = 70.0
    with pytest.raises(ScanNetFormatError, match="view 2 has depth 70.000 m, beyond the 65.535 m"):
        scannet.write_scene(Sample(**{**sample.__dict__, "depth": depth}), tmp_path / "b")
