"""Real scenes (ScanNet, 3D-FRONT) as the data stage's scene folders: views, boxes, questions.

    folders = real_scenes.materialize(source="scannet", root=SCANS, ids=real_scenes.scene_ids(SCANS),
                                      out_dir=WORKDIR/data/scenes, num_views=4, image_size=(518, 518))

Every later stage (tokenizer, teacher dump, eval) reads scene folders in the ScanNet
exported-frame layout with the questions in `scene.json`, as the synthetic scenes are written.
For a real scene this module reads the user's copy once (`scannet.read_scene` or
`front3d.read_scene`: S views sampled from the seed, resized, boxes axis-aligned and labelled),
attaches its questions — the user's QA file (`user_qa.py`) when one is given, else spatial
questions derived from its 3D boxes (`spatial_qa.generate_box_qa`, the synthetic thresholds, the
first view as the reference camera, a per-scene seed) — and writes `out_dir/<scene_id>` through a
temporary folder. Scenes already written are kept (an interrupted data stage resumes).

Splits (`splits.py`) then name which scenes each stage reads: scene-disjoint by default; with a
`paper` split a scene's questions are divided between the splits (`question_split` writes each
split's copy with its share). A scene that ends with no question is written anyway and counted
(`Stats.without_questions`): it cannot be asked about, but it is never dropped silently.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import shutil
import zlib

import numpy as np

from data_pipelines import front3d, scannet, spatial_qa, user_qa
from data_pipelines import splits as splits_lib
from data_pipelines.sample import Sample

log = logging.getLogger(__name__)
READERS = {"scannet": scannet.read_scene, "front3d": front3d.read_scene}


@dataclasses.dataclass
class Stats:
    written: int = 0
    kept: int = 0  # already on disk from an earlier run
    without_questions: list = dataclasses.field(default_factory=list)


def scene_ids(root) -> list[str]:
    """Scene folder names under `root` (sorted)."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: the real-scene directory does not exist (config.data.scannet_dir "
                                "/ front3d_dir)")
    ids = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not ids:
        raise FileNotFoundError(f"{root}: no scene folders")
    return ids


def scene_seed(seed: int, sample_id: str) -> int:
    """A scene's own seed: its questions do not change when other scenes are added or removed."""
    return (int(seed) * 1_000_003 + zlib.crc32(sample_id.encode())) % 2**32


def with_questions(sample: Sample, *, seed: int, user: dict | None) -> Sample:
    """The scene's questions: the user's (`user_qa.read_qa_file` output) or box-derived."""
    if user is not None:
        return user_qa.attach(sample, user.get(sample.sample_id, ()))
    qa = spatial_qa.generate_box_qa(sample.boxes, sample.label_names, sample.cam_to_world[0],
                                    np.random.default_rng(scene_seed(seed, sample.sample_id)))
    return dataclasses.replace(sample, qa=qa).validate()


def materialize(*, source: str, root, ids, out_dir, num_views: int, image_size: tuple[int, int],
                seed: int = 0, sampling: str = "uniform", qa_file: str | None = None,
                labels_tsv: str | None = None, stats: Stats | None = None) -> list[str]:
    """Writes scenes `ids` of `root` under `out_dir` with all their questions; returns the folders."""
    if source not in READERS:
        raise ValueError(f"config.data.source = {source!r}: real scenes come from {sorted(READERS)}")
    stats = Stats() if stats is None else stats
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".tmp-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    user = user_qa.read_qa_file(qa_file) if qa_file else None
    folders = []
    for sid in ids:
        folder = out / sid
        folders.append(str(folder))
        if folder.is_dir():
            stats.kept += 1
            continue
        kwargs = {"num_views": num_views, "image_size": image_size, "seed": seed}
        if source == "scannet":
            kwargs.update(sampling=sampling, labels_tsv=labels_tsv)
        sample = READERS[source](str(pathlib.Path(root) / sid), **kwargs)
        sample = with_questions(dataclasses.replace(sample, sample_id=sid), seed=seed, user=user)
        if not sample.qa:
            stats.without_questions.append(sid)
            log.warning("scene %s has no question (no two uniquely named objects with a clear relation, "
                        "or none in the QA file); written without questions", sid)
        _write(sample, out)
        stats.written += 1
    return folders


def _write(sample: Sample, out: pathlib.Path) -> None:
    tmp = out / f".tmp-{sample.sample_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    scannet.write_scene(sample, tmp)
    tmp.rename(out / sample.sample_id)


def question_split(splits: splits_lib.Splits, name: str, scenes_dir, out_dir) -> list[str]:
    """A `paper` split's scene folders: each scene of `scenes_dir` holding questions of split
    `name`, written under `out_dir` with only those questions."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    folders = []
    for sid in splits.scene_ids(name):
        folder = out / sid
        if not folder.is_dir():
            sample = splits_lib.select(scannet.read_scene(pathlib.Path(scenes_dir) / sid), splits, name)
            _write(sample, out)
        folders.append(str(folder))
    return folders
