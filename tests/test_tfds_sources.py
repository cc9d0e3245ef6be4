"""TFDS builders (data_pipelines/tfds_sources.py): offline builds, exact round trips to the
canonical Sample, `tfds build` from the command line, and the data stage reading a prepared
dataset (`data.source=tfds`)."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from data_pipelines import scannet, synthetic  # noqa: E402
from data_pipelines import tfds_sources as ts  # noqa: E402

FIELDS = ("rgb", "depth", "intrinsics", "cam_to_world", "boxes", "labels", "label_names", "qa", "sample_id")


def assert_same_sample(a, b):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), f
        else:
            assert x == y, f


@pytest.fixture(scope="module")
def synthetic_tfds(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    cfg = ts.SyntheticConfig(name="t56", image_size=56, num_views=2, num_train_scenes=3, num_eval_scenes=2, seed=1)
    builder = ts.SpatialSynthetic(config=cfg, data_dir=data_dir)
    builder.download_and_prepare()
    return builder, data_dir


def test_synthetic_builder_yields_the_data_stage_scenes_exactly(synthetic_tfds):
    builder, _ = synthetic_tfds
    assert builder.name == "spatial_synthetic" and sorted(builder.info.splits) == ["eval", "train"]
    for split, offset, num in (("train", 0, 3), ("eval", 1, 2)):
        got = sorted((ts.from_example(ex) for ex in tfds.as_numpy(builder.as_dataset(split=split))),
                     key=lambda s: s.sample_id)
        assert len(got) == num
        for i, sample in enumerate(got):
            # The data stage's seed stream for this split (prepare.split_seed: 2 * seed + offset).
            want = synthetic.generate_scene(synthetic.scene_seed(2 * 1 + offset, i), image_size=(56, 56), num_views=2)
            assert_same_sample(sample, dataclasses.replace(want, sample_id=f"scene{i:05d}_00"))
            assert sample.qa and all(q.subjects for q in sample.qa if q.kind != "describe")


def test_materialize_writes_scene_folders_once(synthetic_tfds, tmp_path):
    builder, data_dir = synthetic_tfds
    name = "spatial_synthetic/t56"
    folders = ts.materialize(name, "train", data_dir, str(tmp_path / "train"))
    assert [Path(f).name for f in folders] == [f"scene{i:05d}_00" for i in range(3)]
    by_id = {ts.from_example(ex).sample_id: ts.from_example(ex)
             for ex in tfds.as_numpy(builder.as_dataset(split="train"))}
    for f in folders:
        got = scannet.read_scene(f)
        want = by_id[got.sample_id]
        assert np.array_equal(got.rgb, want.rgb) and got.qa == want.qa
        np.testing.assert_allclose(got.depth, want.depth, atol=5e-4)  # stored as millimetres
    stamp = os.path.getmtime(Path(folders[0]) / "scene.json")
    assert ts.materialize(name, "train", data_dir, str(tmp_path / "train")) == folders
    assert os.path.getmtime(Path(folders[0]) / "scene.json") == stamp  # kept, not rewritten
    with pytest.raises(FileNotFoundError, match="is not prepared .*python -m data_pipelines.tfds_build spatial_synthetic/tiny"):
        ts.materialize("spatial_synthetic/tiny", "train", str(tmp_path / "empty"), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="'no_such_dataset': not a registered TFDS dataset"):
        ts.materialize("no_such_dataset", "train", data_dir, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="no 'test' split"):
        ts.materialize(name, "test", data_dir, str(tmp_path / "x"))


def test_tfds_build_command_reads_local_scannet_scenes(tmp_path):
    """TFDS's build command (`python -m data_pipelines.tfds_build`), offline, on a manual_dir
    of ScanNet-layout scenes."""
    manual = tmp_path / "manual"
    written = {}
    for split, seeds in (("train", (3, 4)), ("eval", (5,))):
        for seed in seeds:
            sample = synthetic.generate_scene(seed, image_size=(112, 112), num_views=4)
            folder = manual / split / f"scene{seed:04d}_00"
            scannet.write_scene(dataclasses.replace(sample, sample_id=folder.name), folder)
            written[folder.name] = scannet.read_scene(folder, num_views=4, image_size=(112, 112))
    data_dir = tmp_path / "tfds"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "data_pipelines.tfds_build",
                        "scannet_scenes/112px_4views", f"--manual_dir={manual}", f"--data_dir={data_dir}"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ds = tfds.load("scannet_scenes/112px_4views", split="train", data_dir=str(data_dir), download=False)
    got = [ts.from_example(ex) for ex in tfds.as_numpy(ds)]
    assert sorted(s.sample_id for s in got) == ["scene0003_00", "scene0004_00"]
    for s in got:
        assert_same_sample(s, written[s.sample_id])


def test_data_stage_reads_a_prepared_tfds_dataset(synthetic_tfds, tmp_path):
    from configs import student as student_configs
    from spatial_distill import prepare

    _, data_dir = synthetic_tfds
    c = student_configs.get_config("tiny")
    c.data.source = "tfds"
    c.data.tfds_name = "spatial_synthetic/t56"
    c.data.tfds_dir = data_dir
    dirs = prepare.scene_dirs(c, str(tmp_path), "eval")
    assert [Path(d).name for d in dirs] == ["scene00000_00", "scene00001_00"]
    assert Path(dirs[0]).parent == tmp_path / "data" / "eval"


def test_config_names_a_missing_tfds_dataset():
    from configs import common
    from configs import student as student_configs

    c = student_configs.get_config("tiny")
    c.data.source = "tfds"
    with pytest.raises(ValueError, match="config.data.tfds_name = None: must name a prepared TFDS dataset"):
        common.validate(c)
    c.data.tfds_name = "scannet_scenes/112px_4views"
    with pytest.raises(ValueError, match="the oracle needs scenes whose geometry it knows how to read"):
        common.validate(c)
    c.data.tfds_name = "spatial_synthetic/tiny"
    common.validate(c)
