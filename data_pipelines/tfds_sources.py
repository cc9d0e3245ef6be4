"""TFDS builders for every scene source: `tfds build` offline, `tfds.load` into the data stage.

    tfds build --imports=data_pipelines.tfds_sources spatial_synthetic/tiny --data_dir=DIR
    tfds build --imports=data_pipelines.tfds_sources scannet_scenes --manual_dir=SCANS --data_dir=DIR
    python run.py ... --config.data.source=tfds --config.data.tfds_name=spatial_synthetic/tiny \\
        --config.data.tfds_dir=DIR

Each example is one canonical `Sample` (data_pipelines/sample.py); `to_example` and
`from_example` convert both ways, exactly (images and depth are zlib-compressed tensors, so
nothing is re-encoded lossily). Nothing is downloaded: the synthetic builder renders its scenes
from seeds (the same seed streams as the data stage, so `spatial_synthetic` equals the scenes
`data.source=synthetic` writes), and the real-data builders read the user's local copy under
`manual_dir` (`--manual_dir`, or `<data_dir>/downloads/manual/`), with the splits the readers
define:

  scannet_scenes   manual_dir/{train,eval}/<scene>/ in a layout `scannet.read_scene` reads
  front3d_scenes   manual_dir/{train,eval}/<scene>/ rendered views (`front3d.read_scene`)

A real-data builder samples `num_views` views per scene at `image_size` (its builder config).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import front3d, scannet, synthetic
from data_pipelines.sample import QA, Sample

SPLITS = ("train", "eval")
SPLIT_SEED_OFFSET = {"train": 0, "eval": 1}  # as spatial_distill.prepare.split_seed


def features() -> tfds.features.FeaturesDict:
    """The canonical sample as TFDS features (views, boxes and questions vary per scene)."""
    tensor = tfds.features.Tensor
    zlib = tfds.features.Encoding.ZLIB
    return tfds.features.FeaturesDict({
        "sample_id": tfds.features.Text(),
        "rgb": tensor(shape=(None, None, None, 3), dtype=np.uint8, encoding=zlib),
        "depth": tensor(shape=(None, None, None), dtype=np.float32, encoding=zlib),
        "intrinsics": tensor(shape=(None, 3, 3), dtype=np.float32),
        "cam_to_world": tensor(shape=(None, 4, 4), dtype=np.float32),
        "boxes": tensor(shape=(None, 7), dtype=np.float32),
        "labels": tensor(shape=(None,), dtype=np.int32),
        "label_names": tfds.features.Sequence(tfds.features.Text()),
        "qa": tfds.features.Sequence({
            "question": tfds.features.Text(), "answer": tfds.features.Text(),
            "kind": tfds.features.Text(), "subjects": tfds.features.Sequence(np.int32)}),
    })


def to_example(sample: Sample) -> dict:
    sample.validate()
    return {"sample_id": sample.sample_id, "rgb": sample.rgb, "depth": sample.depth,
            "intrinsics": sample.intrinsics, "cam_to_world": sample.cam_to_world,
            "boxes": sample.boxes, "labels": sample.labels, "label_names": list(sample.label_names),
            "qa": {"question": [q.question for q in sample.qa], "answer": [q.answer for q in sample.qa],
                   "kind": [q.kind for q in sample.qa],
                   "subjects": [np.asarray(q.subjects, np.int32) for q in sample.qa]}}


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def from_example(ex: dict) -> Sample:
    """A `tfds.as_numpy` example back to a validated `Sample`."""
    qa = ex["qa"]
    return Sample(
        sample_id=_text(ex["sample_id"]), rgb=np.asarray(ex["rgb"], np.uint8),
        depth=np.asarray(ex["depth"], np.float32), intrinsics=np.asarray(ex["intrinsics"], np.float32),
        cam_to_world=np.asarray(ex["cam_to_world"], np.float32),
        boxes=np.asarray(ex["boxes"], np.float32).reshape(-1, 7),
        labels=np.asarray(ex["labels"], np.int32).reshape(-1),
        label_names=tuple(_text(n) for n in ex["label_names"]),
        qa=tuple(QA(_text(q), _text(a), _text(k), tuple(int(s) for s in subj))
                 for q, a, k, subj in zip(qa["question"], qa["answer"], qa["kind"], qa["subjects"])),
    ).validate()


# -- synthetic ----------------------------------------------------------------------------------
@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
    image_size: int = 112
    num_views: int = 4
    num_train_scenes: int = 1000
    num_eval_scenes: int = 200
    seed: int = 0  # config.seed of the data stage: split seeds 2 * seed + {0, 1}


class SpatialSynthetic(tfds.core.GeneratorBasedBuilder):
    """The built-in synthetic scenes with grounded spatial QA (data_pipelines/synthetic.py)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Scenes of spatial_distill.synthetic/1."}
    BUILDER_CONFIGS = [
        SyntheticConfig(name="tiny", description="112 px, 4 views, 1,000 + 200 scenes (the tiny preset)"),
        SyntheticConfig(name="small", description="224 px, 4 views, 4,000 + 500 scenes", image_size=224,
                        num_train_scenes=4000, num_eval_scenes=500),
        SyntheticConfig(name="paper", description="518 px, 4 views, 4,000 + 500 scenes", image_size=518,
                        num_train_scenes=4000, num_eval_scenes=500),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=features(), description=self.__doc__)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        c = self.builder_config
        num = c.num_train_scenes if split == "train" else c.num_eval_scenes
        seed = 2 * c.seed + SPLIT_SEED_OFFSET[split]
        for i in range(num):
            sample = synthetic.generate_scene(synthetic.scene_seed(seed, i), image_size=(c.image_size,) * 2,
                                              num_views=c.num_views)
            yield f"scene{i:05d}_00", to_example(dataclasses.replace(sample, sample_id=f"scene{i:05d}_00"))


# -- real scenes from local files -----------------------------------------------------------------
@dataclasses.dataclass
class ScenesConfig(tfds.core.BuilderConfig):
    image_size: int = 112
    num_views: int = 4


def _scene_folders(manual_dir, split: str, what: str) -> list:
    root = manual_dir / split
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: the {what} builder reads manual_dir/{{train,eval}}/<scene>/ "
                                "folders; pass --manual_dir=<that directory>")
    scenes = sorted(p for p in root.iterdir() if p.is_dir())
    if not scenes:
        raise FileNotFoundError(f"{root}: no scene folders")
    return scenes


class _LocalScenes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Scenes read from manual_dir/{train,eval}/<scene>/ by `read_scene(folder, num_views=,
    image_size=)` (a subclass's reader)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [ScenesConfig(name=f"{px}px_{v}views", image_size=px, num_views=v)
                       for px, v in ((112, 4), (224, 4), (518, 4), (518, 8))]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=features(), description=self.__doc__)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(_scene_folders(dl_manager.manual_dir, split, self.name))
                for split in SPLITS}

    def _generate_examples(self, folders):
        c = self.builder_config
        for folder in folders:
            sample = type(self).read_scene(os.fspath(folder), num_views=c.num_views,
                                           image_size=(c.image_size, c.image_size))
            yield sample.sample_id, to_example(sample)


class ScannetScenes(_LocalScenes):
    """ScanNet scenes from a local export (data_pipelines/scannet.py layouts)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Place ScanNet scenes (exported frames, or posed_images) as "
                                    "manual_dir/train/<scene>/ and manual_dir/eval/<scene>/.")
    read_scene = staticmethod(scannet.read_scene)


class Front3dScenes(_LocalScenes):
    """3D-FRONT rooms rendered to views (data_pipelines/front3d.py layout)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Render 3D-FRONT rooms in the layout of data_pipelines/front3d.py and "
                                    "place them as manual_dir/train/<scene>/ and manual_dir/eval/<scene>/.")
    read_scene = staticmethod(front3d.read_scene)


def materialize(name: str, split: str, data_dir: str | None, out_dir: str) -> list[str]:
    """The prepared TFDS dataset `name`'s `split` as scene folders under `out_dir` (the layout
    every later stage reads: `scannet.write_scene`); folders already there are kept (resume).
    Never builds or downloads: an unprepared dataset is an error saying how to build it."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - tfds raises several registry errors
        raise ValueError(f"config.data.tfds_name = {name!r}: not a registered TFDS dataset ({e}); the "
                         "built-in ones are spatial_synthetic/<tiny|small|paper>, scannet_scenes/<config>, "
                         "front3d_scenes/<config>") from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}; build it first: "
            f"python -m data_pipelines.tfds_build {name} --data_dir={data_dir or '~/tensorflow_datasets'}"
            " [--manual_dir=<local scenes>]")
    if split not in builder.info.splits:
        raise ValueError(f"TFDS dataset {name!r} has no {split!r} split (has {sorted(builder.info.splits)})")
    for stale in out.glob(".tmp-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    folders = []
    for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
        sid = _text(ex["sample_id"])
        folder = out / sid
        if not folder.is_dir():
            tmp = out / f".tmp-{sid}"
            scannet.write_scene(from_example(ex), tmp)
            tmp.rename(folder)
        folders.append(str(folder))
    return sorted(folders)

