"""Real ScanNet scenes: both frame layouts, axis alignment, mesh / npy instance boxes, ScanNet18
labels, invalid-pose and unmapped-instance counts, coverage sampling, and bad-input errors.

Every fixture is written here in ScanNet's on-disk formats, with values small enough to check by
hand: colour 8x12 (K_C) over depth 4x6 (K_D, principal point one depth pixel off the scaled
colour one), so colour pixel (v, u) takes depth pixel (floor(v/2 + 0.25), floor(u/2 + 1.25)).
"""

import io
import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from data_pipelines import scannet, scannet_labels
from data_pipelines.scannet import ScanNetFormatError

K_C = np.array([[10.0, 0, 5.5], [0, 10.0, 3.5], [0, 0, 1]])
K_D = np.array([[5.0, 0, 3.5], [0, 5.0, 1.5], [0, 0, 1]])
COLOR_HW, DEPTH_HW = (8, 12), (4, 6)
# axisAlignment: 90 degrees about z, then +(1, 2, 0): (x, y, z) -> (1 - y, x + 2, z).
ALIGN = np.array([[0, -1, 0, 1], [1, 0, 0, 2], [0, 0, 1, 0], [0, 0, 0, 1]], float)
P0 = np.array([[1, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 1.5], [0, 0, 0, 1]])
P2 = np.array([[1, 0, 0, 0], [0, 0, 1, -1], [0, -1, 0, 1.2], [0, 0, 0, 1]])
INF = np.full((4, 4), -np.inf)
# By hand: ALIGN @ P0 and ALIGN @ P2.
P0_ALIGNED = np.array([[0, -1, 0, 1], [1, 0, 0, 2.5], [0, 0, 1, 1.5], [0, 0, 0, 1]])
P2_ALIGNED = np.array([[0, 0, -1, 2], [1, 0, 0, 2], [0, -1, 0, 1.2], [0, 0, 0, 1]])

# Mesh of scene0000_00: vertex -> segment; instances in the aggregation.
VERTS = np.array([[0, 0, 0], [1, 0.5, 0.75],        # segment 0: chair
                  [3, 0, 0], [3, 4, 2.5],           # segment 1: wall
                  [2, 1, 0.25], [2.5, 2, 0.75],     # segments 2, 3: table
                  [0, 3, 0], [0.25, 3.25, 0.25]])   # segment 4: "mystery thing"
SEGS = [0, 0, 1, 1, 2, 3, 4, 4]
GROUPS = [{"id": 0, "objectId": 0, "label": "chair", "segments": [0]},
          {"id": 1, "objectId": 1, "label": "wall", "segments": [1]},
          {"id": 2, "objectId": 2, "label": "table", "segments": [2, 3]},
          {"id": 3, "objectId": 3, "label": "mystery thing", "segments": [4]},
          {"id": 4, "objectId": 4, "label": "chair", "segments": [9]}]  # no vertex has segment 9
# By hand, after ALIGN: chair (0,0,0),(1,.5,.75) -> (1,2,0),(.5,3,.75);
# table (2,1,.25),(2.5,2,.75) -> (0,4,.25),(-1,4.5,.75).
MESH_BOXES = [[0.75, 2.5, 0.375, 0.5, 1.0, 0.75, 0], [-0.5, 4.25, 0.5, 1.0, 0.5, 0.5, 0]]
TSV = ("id\traw_category\tcategory\tcount\tnyu40id\teigen13id\tnyuClass\tnyu40class\n"
       "1\tchair\tchair\t100\t5\t4\tchair\tchair\n"
       "2\twall\twall\t200\t1\t12\twall\twall\n"
       "3\ttable\ttable\t50\t7\t10\ttable\ttable\n"
       "4\tkitchen cabinets\tkitchen cabinet\t30\t3\t6\tcabinet\tcabinet\n")
NPY = np.array([[1, 2, 0.5, 2, 1, 1, 4],         # bed
                [0, 0, 1, 4, 0.1, 2, 1],         # wall: skipped
                [3, 3, 0.5, 1, 1, 1, 39]])       # otherfurniture


def _mat(m):
    return "".join(" ".join(f"{v:f}" for v in row) + "\n" for row in np.asarray(m))


def _depth_mm(frame):
    v, u = np.mgrid[0:DEPTH_HW[0], 0:DEPTH_HW[1]]
    return (1000 * (frame + 1) + 10 * v + u).astype(np.uint16)


def _jpeg(frame):
    rgb = np.random.default_rng(frame).integers(0, 256, (*COLOR_HW, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _frames(scene):
    if scene == 0:
        return {0: P0, 1: INF, 2: P2}  # frame 1: tracking lost
    return {0: P0, 1: P2, 2: P0 @ P2}


def write_export(d, scene):
    for sub in ("color", "depth", "pose", "intrinsic"):
        (d / sub).mkdir(parents=True)
    for i, pose in _frames(scene).items():
        (d / "color" / f"{i}.jpg").write_bytes(_jpeg(10 * scene + i))
        Image.fromarray(_depth_mm(i)).save(d / "depth" / f"{i}.png")
        (d / "pose" / f"{i}.txt").write_text(_mat(pose))
    (d / "intrinsic" / "intrinsic_color.txt").write_text(_mat(np.pad(K_C, ((0, 1), (0, 1))) + np.diag([0, 0, 0, 1])))
    (d / "intrinsic" / "intrinsic_depth.txt").write_text(_mat(np.pad(K_D, ((0, 1), (0, 1))) + np.diag([0, 0, 0, 1])))


def write_posed(d, scene):
    d.mkdir(parents=True)
    for i, pose in _frames(scene).items():
        (d / f"{i:05d}.jpg").write_bytes(_jpeg(10 * scene + i))
        Image.fromarray(_depth_mm(i)).save(d / f"{i:05d}.png")
        (d / f"{i:05d}.txt").write_text(_mat(pose))
    (d / "intrinsic.txt").write_text(_mat(np.pad(K_C, ((0, 1), (0, 1))) + np.diag([0, 0, 0, 1])))
    (d / "depth_intrinsic.txt").write_text(_mat(np.pad(K_D, ((0, 1), (0, 1))) + np.diag([0, 0, 0, 1])))


def ply_bytes(verts, fmt="binary_little_endian"):
    head = (f"ply\nformat {fmt} 1.0\ncomment made by hand\nelement vertex {len(verts)}\n"
            "property float x\nproperty float y\nproperty float z\nproperty uchar red\n"
            "property uchar green\nproperty uchar blue\nelement face 2\n"
            "property list uchar int vertex_indices\nend_header\n")
    if fmt == "ascii":
        body = "".join(f"{x} {y} {z} 10 20 30\n" for x, y, z in verts) + "3 0 1 2\n3 2 3 4\n"
        return (head + body).encode()
    order = "<" if fmt == "binary_little_endian" else ">"
    dt = np.dtype([("x", order + "f4"), ("y", order + "f4"), ("z", order + "f4"),
                   ("r", "u1"), ("g", "u1"), ("b", "u1")])
    v = np.zeros(len(verts), dt)
    v["x"], v["y"], v["z"] = np.asarray(verts).T
    faces = b"".join(bytes([3]) + np.array(f, order + "i4").tobytes() for f in ((0, 1, 2), (2, 3, 4)))
    return head.encode() + v.tobytes() + faces


@pytest.fixture
def root(tmp_path):
    """tmp/export/scene000{0,1}_00 (exported frames), tmp/posed_images/scene0000_00, and
    tmp/scans/<scene> with ScanNet's scan files (scene0001_00 has no axis alignment)."""
    for s in (0, 1):
        write_export(tmp_path / "export" / f"scene000{s}_00", s)
    write_posed(tmp_path / "posed_images" / "scene0000_00", 0)
    scan = tmp_path / "scans" / "scene0000_00"
    scan.mkdir(parents=True)
    (scan / "scene0000_00.txt").write_text(
        "colorHeight = 968\ncolorWidth = 1296\naxisAlignment = "
        + " ".join(f"{v:g}" for v in ALIGN.reshape(-1)) + "\nsceneType = Bedroom\n")
    (scan / "scene0000_00_vh_clean_2.ply").write_bytes(ply_bytes(VERTS))
    (scan / "scene0000_00_vh_clean_2.0.010000.segs.json").write_text(
        json.dumps({"sceneId": "scene0000_00", "segIndices": SEGS}))
    (scan / "scene0000_00.aggregation.json").write_text(
        json.dumps({"sceneId": "scene0000_00", "segGroups": GROUPS}))
    scan1 = tmp_path / "scans" / "scene0001_00"
    scan1.mkdir()
    np.save(scan1 / "scene0001_00_bbox.npy", NPY)
    (tmp_path / "labels.tsv").write_text(TSV)
    return tmp_path


def test_export_reads_aligned_poses_intrinsics_and_registered_depth(root):
    sample, stats = scannet.read_scene_with_stats(root / "export" / "scene0000_00",
                                                  labels_tsv=root / "labels.tsv")
    assert sample.sample_id == "scene0000_00" and stats.layout == "export"
    assert stats.frame_ids == [0, 2] and stats.invalid_pose_ids == [1] and stats.invalid_poses == 1
    assert stats.candidate_frames == 3
    assert stats.axis_alignment == str(root / "scans" / "scene0000_00" / "scene0000_00.txt")
    np.testing.assert_allclose(sample.cam_to_world, [P0_ALIGNED, P2_ALIGNED], atol=1e-6)
    np.testing.assert_array_equal(sample.intrinsics, np.float32([K_C, K_C]))
    assert sample.rgb.shape == (2, *COLOR_HW, 3) and sample.depth.shape == (2, *COLOR_HW)
    jpg = root / "export" / "scene0000_00" / "color" / "2.jpg"
    np.testing.assert_array_equal(sample.rgb[1], np.asarray(Image.open(jpg).convert("RGB")))
    # colour (v, u) <- depth (floor(v/2 + .25), floor(u/2 + 1.25)); frame i has 1000(i+1) + 10v + u mm
    for view, frame in ((0, 0), (1, 2)):
        base = 1000 * (frame + 1)
        assert sample.depth[view, 0, 0] == np.float32((base + 1) / 1000)    # depth (0, 1)
        assert sample.depth[view, 5, 3] == np.float32((base + 22) / 1000)   # depth (2, 2)
        assert sample.depth[view, 7, 9] == np.float32((base + 35) / 1000)   # depth (3, 5)
        assert sample.depth[view, 0, 10] == 0 and sample.depth[view, 3, 11] == 0  # beyond depth
    # A requested frame with an invalid pose is an error naming the file.
    with pytest.raises(ScanNetFormatError, match=r"pose/1.txt: pose is not finite"):
        scannet.read_scene(root / "export" / "scene0000_00", frame_ids=[0, 1])


def test_mesh_instance_boxes_are_axis_aligned_and_labelled(root, caplog):
    caplog.set_level(logging.INFO, logger="data_pipelines.scannet")
    sample, stats = scannet.read_scene_with_stats(root / "export" / "scene0000_00",
                                                  labels_tsv=root / "labels.tsv")
    assert stats.box_source == "mesh" and stats.instances == 5
    np.testing.assert_array_equal(sample.boxes, np.float32(MESH_BOXES))
    np.testing.assert_array_equal(sample.labels, [2, 4])  # ScanNet18: chair, table
    assert sample.label_names == ("chair", "table")
    assert stats.skipped_instances == [
        (1, "wall", "nyu40 id 1 (wall) is not a ScanNet18 class"),
        (3, "mystery thing", "raw label 'mystery thing' is not in the labels table"),
        (4, "chair", "no mesh vertex lies in its segments")]
    assert stats.skipped_instance_count == 3
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 1 of 3 frames for an invalid pose [1] and 3 of 5 mesh instances" in logged
    # Without the alignment (an identity given explicitly), the boxes are the raw vertex boxes.
    raw = scannet.read_scene(root / "export" / "scene0000_00", labels_tsv=root / "labels.tsv",
                             axis_align=np.eye(4))
    np.testing.assert_array_equal(raw.boxes, np.float32([[0.5, 0.25, 0.375, 1, 0.5, 0.75, 0],
                                                         [2.25, 1.5, 0.5, 0.5, 1, 0.5, 0]]))
    np.testing.assert_allclose(raw.cam_to_world, [P0, P2], atol=1e-6)


def test_posed_images_layout_reads_the_same_sample(root):
    a, sa = scannet.read_scene_with_stats(root / "export" / "scene0000_00",
                                          labels_tsv=root / "labels.tsv")
    b, sb = scannet.read_scene_with_stats(root / "posed_images" / "scene0000_00",
                                          labels_tsv=root / "labels.tsv")
    assert sb.layout == "posed_images" and scannet.detect_layout(root / "posed_images" / "scene0000_00") == "posed_images"
    for f in ("rgb", "depth", "intrinsics", "cam_to_world", "boxes", "labels"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert (a.sample_id, a.label_names, a.qa) == (b.sample_id, b.label_names, b.qa)
    assert (sa.frame_ids, sa.invalid_pose_ids, sa.skipped_instances, sa.axis_alignment) == \
        (sb.frame_ids, sb.invalid_pose_ids, sb.skipped_instances, sb.axis_alignment)
    assert scannet.frame_ids_on_disk(root / "posed_images" / "scene0000_00") == [0, 1, 2]
    # image_size halves the grid: K scaled; K_D's grid is then this one shifted by one pixel.
    half = scannet.read_scene(root / "posed_images" / "scene0000_00", image_size=(4, 6),
                              labels_tsv=root / "labels.tsv")
    np.testing.assert_allclose(half.intrinsics[0], [[5, 0, 2.5], [0, 5, 1.5], [0, 0, 1]])
    want = np.zeros(DEPTH_HW, np.float32)
    want[:, :5] = _depth_mm(0)[:, 1:] / np.float32(1000)
    np.testing.assert_array_equal(half.depth[0], want)
    # Without depth_intrinsic.txt depth shares the colour camera (K scaled to the depth size).
    (root / "posed_images" / "scene0000_00" / "depth_intrinsic.txt").unlink()
    shared = scannet.read_scene(root / "posed_images" / "scene0000_00", image_size=(4, 6),
                               box_source="none")
    np.testing.assert_array_equal(shared.depth[0], _depth_mm(0) / np.float32(1000))


def test_npy_boxes_and_a_missing_axis_alignment_warns_once(root, caplog):
    caplog.set_level(logging.INFO, logger="data_pipelines.scannet")
    d = root / "export" / "scene0001_00"
    sample, stats = scannet.read_scene_with_stats(d)
    again = scannet.read_scene(d)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "scene0001_00.txt does not exist" in warnings[0]
    assert "identity" in warnings[0] and stats.axis_alignment is None
    np.testing.assert_allclose(sample.cam_to_world, [P0, P2, P0 @ P2], atol=1e-6)
    assert stats.invalid_poses == 0 and stats.frame_ids == [0, 1, 2]
    assert stats.box_source == "npy" and stats.instances == 3
    np.testing.assert_array_equal(sample.boxes, np.float32([[1, 2, 0.5, 2, 1, 1, 0],
                                                            [3, 3, 0.5, 1, 1, 1, 0]]))
    np.testing.assert_array_equal(sample.labels, [1, 17])
    assert sample.label_names == ("bed", "otherfurniture")
    assert stats.skipped_instances == [(1, "wall", "nyu40 id 1 (wall) is not a ScanNet18 class")]
    np.testing.assert_array_equal(again.boxes, sample.boxes)
    # The npy is taken as is even when the scene has an axis alignment (it is aligned already).
    shutil.copy(root / "scans" / "scene0000_00" / "scene0000_00.txt", root / "align.txt")
    aligned = scannet.read_scene(d, axis_align=root / "align.txt")
    np.testing.assert_array_equal(aligned.boxes, sample.boxes)
    np.testing.assert_allclose(aligned.cam_to_world[0], P0_ALIGNED, atol=1e-6)
    # box_source picks explicitly; "none" reads no boxes.
    assert scannet.read_scene(d, box_source="none").boxes.shape == (0, 7)


def test_mesh_or_npy_chosen_by_what_exists_or_by_argument(root):
    d, scan = root / "export" / "scene0000_00", root / "scans" / "scene0000_00"
    np.save(scan / "scene0000_00_bbox.npy", NPY)
    # With the labels table the mesh wins; without it the npy (which needs none) does.
    assert scannet.read_scene_with_stats(d, labels_tsv=root / "labels.tsv")[1].box_source == "mesh"
    s, st = scannet.read_scene_with_stats(d)
    assert st.box_source == "npy" and s.label_names == ("bed", "otherfurniture")
    s = scannet.read_scene(d, box_source="npy", labels_tsv=root / "labels.tsv")
    assert s.label_names == ("bed", "otherfurniture")
    # scene_dir-independent scan folder and boxes file arguments.
    moved = root / "elsewhere"
    shutil.copytree(scan, moved)
    shutil.rmtree(scan)
    s, st = scannet.read_scene_with_stats(d, scan_dir=moved, labels_tsv=root / "labels.tsv")
    assert st.box_source == "mesh" and st.axis_alignment == str(moved / "scene0000_00.txt")
    np.testing.assert_array_equal(s.boxes, np.float32(MESH_BOXES))
    s = scannet.read_scene(d, boxes_npy=moved / "scene0000_00_bbox.npy", axis_align=np.eye(4))
    assert s.label_names == ("bed", "otherfurniture")


def test_ply_reader_takes_ascii_and_binary(tmp_path):
    for fmt in ("ascii", "binary_little_endian", "binary_big_endian"):
        (tmp_path / f"{fmt}.ply").write_bytes(ply_bytes(VERTS, fmt))
        np.testing.assert_array_equal(scannet.read_ply_vertices(tmp_path / f"{fmt}.ply"), VERTS)
    (tmp_path / "bad.ply").write_bytes(b"solid cube\n")
    with pytest.raises(ScanNetFormatError, match=r"bad.ply: not a PLY file"):
        scannet.read_ply_vertices(tmp_path / "bad.ply")
    (tmp_path / "short.ply").write_bytes(ply_bytes(VERTS)[:-60])
    with pytest.raises(ScanNetFormatError, match=r"short.ply: truncated; the header promises 8 vertices"):
        scannet.read_ply_vertices(tmp_path / "short.ply")


def test_label_tables():
    assert len(scannet_labels.SCANNET18_CLASSES) == len(scannet_labels.SCANNET18_NYU40_IDS) == 18
    assert all(scannet_labels.NYU40_CLASSES[n - 1] == c for n, c in
               zip(scannet_labels.SCANNET18_NYU40_IDS, scannet_labels.SCANNET18_CLASSES))
    assert scannet_labels.nyu40_to_scannet18(39) == 17 and scannet_labels.nyu40_to_scannet18(2) is None
    table = {"kitchen cabinets": 3, "floor": 2}
    assert scannet_labels.raw_to_scannet18("kitchen cabinets", table) == (0, "")
    assert scannet_labels.raw_to_scannet18("floor", table) == (None, "nyu40 id 2 (floor) is not a ScanNet18 class")


def _coverage_scene(d):
    """Frames 0, 1, 3 identical (looking +z at a 2 m wall), frame 2 looking the other way,
    frame 4 with a lost pose."""
    for sub in ("color", "depth", "pose", "intrinsic"):
        (d / sub).mkdir(parents=True)
    back = np.diag([-1.0, 1, -1, 1])  # 180 degrees about y
    for i, pose in enumerate((np.eye(4), np.eye(4), back, np.eye(4), INF)):
        Image.fromarray(np.full((*COLOR_HW, 3), 40 * i, np.uint8)).save(d / "color" / f"{i}.png")
        Image.fromarray(np.full(COLOR_HW, 2000, np.uint16)).save(d / "depth" / f"{i}.png")
        (d / "pose" / f"{i}.txt").write_text(_mat(pose))
    (d / "intrinsic" / "intrinsic_color.txt").write_text(_mat(np.pad(K_C, ((0, 1), (0, 1))) + np.diag([0, 0, 0, 1])))


def test_frame_sampling_uniform_and_coverage_are_seed_deterministic(tmp_path):
    d = tmp_path / "scene0007_00"
    _coverage_scene(d)
    _, st = scannet.read_scene_with_stats(d, num_views=2)
    assert st.frame_ids == [0, 3] and st.invalid_pose_ids == [4]  # uniform over 0, 1, 2, 3
    picks = {}
    for seed in range(8):
        sample, st = scannet.read_scene_with_stats(d, num_views=2, sampling="coverage", seed=seed)
        assert 2 in st.frame_ids and st.frame_ids == sorted(st.frame_ids)
        assert st.invalid_pose_ids == [4]
        again = scannet.read_scene_with_stats(d, num_views=2, sampling="coverage", seed=seed)[1]
        assert again.frame_ids == st.frame_ids
        np.testing.assert_array_equal(sample.rgb[:, 0, 0, 0], [40 * i for i in st.frame_ids])
        picks[seed] = st.frame_ids
    # The seed breaks the tie between the identical frames 0, 1, 3.
    assert len({tuple(p) for p in picks.values()}) > 1
    assert scannet.read_scene_with_stats(d, num_views=4, sampling="coverage")[1].frame_ids == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="sampling must be one of"):
        scannet.read_scene(d, num_views=2, sampling="random")


def test_bad_input_errors_name_the_path_and_fix(root, tmp_path):
    exp, posed = root / "export" / "scene0000_00", root / "posed_images" / "scene0000_00"
    tsv = root / "labels.tsv"
    scan = root / "scans" / "scene0000_00"

    (exp / "depth" / "2.png").unlink()
    with pytest.raises(ScanNetFormatError, match=r"missing frame file \S*depth/2.png; the frame files "
                       r"of \S*scene0000_00 do not match \(color/ 3, depth/ 2, pose/ 3 frames\): "
                       r"depth/ lacks ids \[2\]; re-export"):
        scannet.read_scene(exp, labels_tsv=tsv)
    with pytest.raises(ScanNetFormatError, match=r"of the requested frames, depth/ lacks ids \[2\]"):
        scannet.read_scene(exp, frame_ids=[0, 2])

    (posed / "00007.txt").write_text(_mat(P0))
    with pytest.raises(ScanNetFormatError, match=r"missing frame file \S*00007.jpg; .*\*.jpg \(colour\) "
                       r"lacks ids \[7\]; \*.png \(depth\) lacks ids \[7\]"):
        scannet.read_scene(posed, labels_tsv=tsv)
    (posed / "00007.txt").rename(posed / "7.txt")
    with pytest.raises(ScanNetFormatError, match=r"7.txt: posed_images frames are named .* rename it to 00007.txt"):
        scannet.read_scene(posed, labels_tsv=tsv)
    (posed / "7.txt").unlink()
    Image.fromarray(np.zeros(DEPTH_HW, np.uint8)).save(posed / "00000.png")
    with pytest.raises(ScanNetFormatError, match=r"00000.png: depth must be a 16-bit PNG"):
        scannet.read_scene(posed, labels_tsv=tsv)

    p2 = root / "other" / "scene0000_00"  # a fresh copy; its scan files are in `scan`
    write_posed(p2, 0)
    with pytest.raises(ScanNetFormatError, match=r"scene0000_00.aggregation.json: mesh instances "
                       r"carry raw ScanNet labels; pass labels_tsv="):
        scannet.read_scene(p2, scan_dir=scan)
    (tmp_path / "no_nyu.tsv").write_text("id\traw_category\tcategory\n1\tchair\tchair\n")
    with pytest.raises(ScanNetFormatError, match=r"no_nyu.tsv: header lacks column\(s\) \['nyu40id'\]"):
        scannet.read_scene(p2, scan_dir=scan, labels_tsv=tmp_path / "no_nyu.tsv")
    (scan / "scene0000_00_vh_clean_2.0.010000.segs.json").write_text(json.dumps({"segIndices": SEGS[:7]}))
    with pytest.raises(ScanNetFormatError, match=r"segs.json: 7 segIndices but \S*_vh_clean_2.ply has 8 "
                       "vertices"):
        scannet.read_scene(p2, scan_dir=scan, labels_tsv=tsv)
    (scan / "scene0000_00_vh_clean_2.ply").unlink()
    with pytest.raises(ScanNetFormatError, match=r"missing annotation file \S*scene0000_00_vh_clean_2.ply"):
        scannet.read_scene(p2, scan_dir=scan, labels_tsv=tsv)
    with pytest.raises(ScanNetFormatError, match=r"missing boxes file \S*scene0000_00_bbox.npy"):
        scannet.read_scene(p2, box_source="npy", axis_align=np.eye(4))
    (scan / "scene0000_00.txt").write_text("axisAlignment = " + " 0" * 15 + "\n")
    with pytest.raises(ScanNetFormatError, match=r"scene0000_00.txt: axisAlignment must hold 16 numbers "
                       r"\(a row-major 4x4\), got 15"):
        scannet.read_scene(p2, scan_dir=scan, box_source="none")
    (scan / "scene0000_00.txt").write_text("axisAlignment = " + " 2 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1" + "\n")
    with pytest.raises(ScanNetFormatError, match=r"scene0000_00.txt: axis alignment is not a rigid"):
        scannet.read_scene(p2, scan_dir=scan, box_source="none")
    with pytest.raises(ScanNetFormatError, match=r"missing axis-alignment file \S*nowhere.txt"):
        scannet.read_scene(p2, axis_align=tmp_path / "nowhere.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ScanNetFormatError, match=r"missing folder \S*empty/color; is \S*empty a ScanNet scene"):
        scannet.read_scene(empty)


def test_scene_json_boxes_follow_the_axis_alignment(root):
    d = root / "export" / "scene0000_00"
    (d / "scene.json").write_text(json.dumps({
        "frame_ids": [2, 0], "boxes": [[1, 0, 0.5, 1, 2, 1, 0.25]], "labels": [3],
        "label_names": ["sofa"],
        "qa": [{"question": "Is there a sofa?", "answer": "yes", "kind": "describe"}]}))
    sample, stats = scannet.read_scene_with_stats(d, labels_tsv=root / "labels.tsv")
    assert stats.box_source == "scene.json" and stats.frame_ids == [2, 0]
    # (x, y, z) -> (1 - y, x + 2, z); yaw turns by 90 degrees; sizes stay.
    np.testing.assert_allclose(sample.boxes, [[1, 3, 0.5, 1, 2, 1, 0.25 + np.pi / 2]], atol=1e-6)
    np.testing.assert_allclose(sample.cam_to_world, [P2_ALIGNED, P0_ALIGNED], atol=1e-6)
    assert sample.label_names == ("sofa",) and sample.labels.tolist() == [3] and len(sample.qa) == 1
    (d / "scene.json").write_text(json.dumps({"frame_ids": [0, 1, 2]}))  # 1 has a lost pose
    assert scannet.read_scene_with_stats(d, box_source="none")[1].invalid_pose_ids == [1]
