"""Real scenes in the data stage (data_pipelines/real_scenes.py, prepare.real_scene_dirs): read
once with their box-derived or user questions, split scene-disjointly (or the paper's way), the
oracle answering from boxes; and the main job on a tiny ScanNet-layout fixture end to end."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import student as student_configs
from data_pipelines import real_scenes, scannet, spatial_qa, synthetic
from data_pipelines import splits as splits_lib
from spatial_distill import prepare
from spatial_distill.teacher import oracle

ROOT = Path(__file__).resolve().parents[1]


def write_fixture(root: Path, n: int = 4, size: int = 56, views: int = 3) -> dict:
    """`n` scenes in the ScanNet exported-frame layout with boxes and names but no questions (a
    real export with its boxes in scene.json); returns the written samples by id."""
    out = {}
    for i in range(n):
        s = synthetic.generate_scene(100 + i, image_size=(size, size), num_views=views)
        s = dataclasses.replace(s, sample_id=f"scene{i:04d}_00", qa=())
        scannet.write_scene(s, root / s.sample_id)
        meta = json.loads((root / s.sample_id / "scene.json").read_text())
        meta.pop("format")  # as a user's export: not tagged as written by us
        (root / s.sample_id / "scene.json").write_text(json.dumps(meta))
        out[s.sample_id] = s
    return out


def config(fixture: Path, **data):
    c = student_configs.get_config("tiny")
    c.data.source = "scannet"
    c.data.scannet_dir = str(fixture)
    c.data.image_size = 56
    c.data.num_views = 2
    c.data.split_fractions = (0.5, 0.5, 0.0)
    for k, v in data.items():
        setattr(c.data, k, v)
    return c


def test_scenes_are_read_once_with_box_questions_and_split_by_scene(tmp_path):
    written = write_fixture(tmp_path / "scans")
    c = config(tmp_path / "scans")
    work = tmp_path / "work"
    train = prepare.scene_dirs(c, str(work), "train")
    evals = prepare.scene_dirs(c, str(work), "eval")
    assert len(train) == 2 and len(evals) == 2 and not set(train) & set(evals)
    splits = splits_lib.read_splits(work / "splits.json")
    assert splits.mode == "scene" and sorted(splits.scene_ids()) == sorted(written)
    for folder in train + evals:
        s = scannet.read_scene(folder)
        src = written[s.sample_id]
        assert s.num_views == 2 and s.image_size == (56, 56)
        np.testing.assert_allclose(s.boxes, src.boxes, atol=1e-6)
        # The questions are the box-derived ones, from the scene's own seed.
        want = spatial_qa.generate_box_qa(src.boxes, src.label_names, s.cam_to_world[0],
                                          np.random.default_rng(real_scenes.scene_seed(0, s.sample_id)))
        assert s.qa == want and s.qa
    stamp = os.path.getmtime(Path(train[0]) / "scene.json")
    assert prepare.scene_dirs(c, str(work), "train") == train  # kept, not rewritten
    assert os.path.getmtime(Path(train[0]) / "scene.json") == stamp


def test_the_data_stage_reads_scannet_annotations(tmp_path):
    """The real-layout fixture of test_scannet_real (exported frames, an inf pose, axis
    alignment, mesh + aggregation instances with a labels table, a votenet boxes .npy)."""
    from tests import test_scannet_real as fx

    for s in (0, 1):
        fx.write_export(tmp_path / "export" / f"scene000{s}_00", s)
    scan = tmp_path / "scans" / "scene0000_00"  # found as <scene>/../../scans/<scene_id>
    scan.mkdir(parents=True)
    (scan / "scene0000_00.txt").write_text(
        "axisAlignment = " + " ".join(f"{v:g}" for v in fx.ALIGN.reshape(-1)) + "\n")
    (scan / "scene0000_00_vh_clean_2.ply").write_bytes(fx.ply_bytes(fx.VERTS))
    (scan / "scene0000_00_vh_clean_2.0.010000.segs.json").write_text(json.dumps({"segIndices": fx.SEGS}))
    (scan / "scene0000_00.aggregation.json").write_text(json.dumps({"segGroups": fx.GROUPS}))
    (tmp_path / "scans" / "scene0001_00").mkdir()
    np.save(tmp_path / "scans" / "scene0001_00" / "scene0001_00_bbox.npy", fx.NPY)
    (tmp_path / "labels.tsv").write_text(fx.TSV)
    c = config(tmp_path / "export", scannet_labels_tsv=str(tmp_path / "labels.tsv"))
    dirs = prepare.scene_dirs(c, str(tmp_path / "w"), "train") + prepare.scene_dirs(c, str(tmp_path / "w"), "eval")
    got = {Path(d).name: scannet.read_scene(d) for d in dirs}
    assert sorted(got) == ["scene0000_00", "scene0001_00"]
    mesh = got["scene0000_00"]
    np.testing.assert_allclose(mesh.boxes, np.array(fx.MESH_BOXES, np.float32), atol=1e-5)  # axis-aligned
    assert mesh.label_names == ("chair", "table") and mesh.num_views == 2 and mesh.image_size == (56, 56)
    assert got["scene0001_00"].boxes.shape[0] >= 1


def test_user_questions_and_the_paper_split(tmp_path):
    written = write_fixture(tmp_path / "scans", n=3)
    qa_file = tmp_path / "qa.jsonl"
    with open(qa_file, "w") as f:
        for sid in written:
            for q in range(4):
                f.write(json.dumps({"scene_id": sid, "question": f"Is it {q}?", "answer": "yes",
                                    "kind": "proximity", "subjects": [0, 1]}) + "\n")
    c = config(tmp_path / "scans", qa_file=str(qa_file), split_mode="paper")
    work = tmp_path / "work"
    with pytest.warns(splits_lib.SceneLeakWarning):
        train = prepare.scene_dirs(c, str(work), "train")
    with pytest.warns(splits_lib.SceneLeakWarning):
        evals = prepare.scene_dirs(c, str(work), "eval")
    questions = lambda dirs: {(Path(d).name, q.question) for d in dirs for q in scannet.read_scene_qa(d)}
    got_train, got_eval = questions(train), questions(evals)
    assert got_train and got_eval and not got_train & got_eval  # questions never shared ...
    assert {s for s, _ in got_train} & {s for s, _ in got_eval}  # ... scenes are (the paper's leak)
    assert len(got_train) + len(got_eval) == 12  # a 0.5 / 0.5 / 0 split of all 12 questions


def test_an_empty_split_and_a_missing_directory_are_named(tmp_path):
    write_fixture(tmp_path / "scans", n=1)
    with pytest.raises(ValueError, match=r"the 'val' split is empty \(1 scenes"):
        prepare.scene_dirs(config(tmp_path / "scans"), str(tmp_path / "w"), "eval")
    with pytest.raises(FileNotFoundError, match="the real-scene directory does not exist"):
        prepare.scene_dirs(config(tmp_path / "nowhere"), str(tmp_path / "w2"), "train")


def test_oracle_margins_read_boxes_for_real_scenes():
    boxes = np.array([[0, 0, 0.5, 1, 1, 1, 0], [1.05, 0, 0.5, 1, 1, 1, 0], [0.2, 0, 0.5, 1, 1, 1, 0]], np.float32)
    names = ("bed", "desk", "lamp")
    sample = synthetic.generate_scene(1, image_size=(56, 56), num_views=1)
    from data_pipelines.sample import QA
    s = dataclasses.replace(sample, boxes=boxes, labels=np.array([0, 1, 2], np.int32), label_names=names,
                            qa=(QA("Is the bed near the desk?", "yes", "proximity", (0, 1)),
                                QA("Is the bed touching the lamp?", "yes", "contact", (0, 2))))
    # Gap 0.05 m: 0.10 m from NEAR, 0.10 / 0.10 scale units.
    assert oracle.margin(s, 0, "boxes") == pytest.approx(1.0, abs=1e-5)
    # The bed and lamp boxes overlap by 0.8 m: signed distance -0.8, |-0.8 - 0.01| / 0.02.
    assert oracle.margin(s, 1, "boxes") == pytest.approx(40.5, abs=1e-4)
    with pytest.raises(ValueError, match="oracle geometry 'meshes'"):
        oracle.OracleTeacher(None, geometry="meshes")


@pytest.mark.slow
def test_the_main_job_on_a_tiny_scannet_fixture_end_to_end(tmp_path):
    write_fixture(tmp_path / "scans", n=6)
    flags = [sys.executable, "run.py", "--config=configs/student.py:tiny", f"--workdir={tmp_path / 'w'}",
             "--config.data.source=scannet", f"--config.data.scannet_dir={tmp_path / 'scans'}",
             "--config.data.image_size=56", "--config.data.num_views=2", "--config.model.vision_pool=objects16",
             "--config.data.split_fractions=(0.5,0.5,0.0)", "--config.tokenizer.vocab_size=280",
             "--config.model.decoder.vocab_size=280", "--config.train.steps=2", "--config.teacher.num_shards=2",
             "--config.input.max_prompt_len=48",
             "--config.train.batch_size=2", "--config.eval.report_samples=1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(flags, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "w" / "eval" / "metrics.json").read_text())
    assert any(k.startswith("grounded/") for k in metrics)
    meta = json.loads((tmp_path / "w" / "records" / "teacher_meta.json").read_text())
    assert meta["teacher_id"] == "oracle-boxes"
    assert (tmp_path / "w" / "splits.json").exists()
