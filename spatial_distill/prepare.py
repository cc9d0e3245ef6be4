"""The data stage: scenes on disk, the tokenizer, and the statistics a user checks first.

Synthetic scenes are generated (or found complete from an earlier run) under
`WORKDIR/data/{train,eval}` in the ScanNet exported-frame layout (`data.source=tfds` writes a
prepared TFDS dataset's splits there instead: data_pipelines/tfds_sources.py); the eval split comes from a
different seed stream, so its scenes are never seen in training. Without a configured teacher
tokenizer, a byte-level BPE is trained on the training split's QA and saved to
`WORKDIR/tokenizer/tokenizer.json`. Statistics go to stdout and `WORKDIR/data_stats.json`.
"""

from __future__ import annotations

import json
import os

import ml_collections

from data_pipelines import real_scenes, scannet, synthetic
from data_pipelines import splits as splits_lib
from spatial_distill import tokenizer as tokenizer_lib

SPLIT_SEED_OFFSET = {"train": 0, "eval": 1}


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.data.dir or os.path.join(workdir, "data")


def split_seed(config: ml_collections.ConfigDict, split: str) -> int:
    """Seed of a split's scene stream: train and eval never share a scene."""
    return 2 * config.seed + SPLIT_SEED_OFFSET[split]


def real_scene_dirs(config: ml_collections.ConfigDict, workdir: str, split: str) -> list[str]:
    """A real source's scenes of `split` ("train", or "eval": `data.eval_split`), read once into
    `data/scenes` with their questions; the splits from `data.splits_file` or made once from
    `config.seed` into WORKDIR/splits.json."""
    d = config.data
    root = d.scannet_dir if d.source == "scannet" else d.front3d_dir
    ids = real_scenes.scene_ids(root)
    scenes = os.path.join(data_dir(config, workdir), "scenes")
    folders = real_scenes.materialize(source=d.source, root=root, ids=ids, out_dir=scenes,
                                      num_views=d.num_views, image_size=(d.image_size, d.image_size),
                                      seed=config.seed, sampling=d.frame_sampling, qa_file=d.qa_file,
                                      labels_tsv=d.scannet_labels_tsv)
    # A paper split divides questions: scenes without any take no part in it.
    questions = {sid: len(scannet.read_scene_qa(f)) for sid, f in zip(ids, folders)}
    asked = [sid for sid in ids if questions[sid]]
    path = d.splits_file or os.path.join(workdir, "splits.json")
    if os.path.exists(path):
        mode = splits_lib.read_splits(path).mode
        splits = splits_lib.read_splits(path, scene_ids=ids if mode == "scene" else asked)
    else:
        paper = d.split_mode == "paper"
        splits = splits_lib.make_splits(asked if paper else ids, mode=d.split_mode, seed=config.seed,
                                        fractions=tuple(d.split_fractions),
                                        num_questions={s: questions[s] for s in asked} if paper else None)
        splits_lib.write_splits(splits, path)
    name = "train" if split == "train" else d.eval_split
    if not splits.scene_ids(name):
        raise ValueError(f"{path}: the {name!r} split is empty ({len(ids)} scenes, fractions "
                         f"{tuple(d.split_fractions)}); add scenes or change data.split_fractions")
    if splits.mode == "paper":
        return real_scenes.question_split(splits, name, scenes, os.path.join(data_dir(config, workdir), name))
    return [os.path.join(scenes, sid) for sid in splits.scene_ids(name)]


def scene_dirs(config: ml_collections.ConfigDict, workdir: str, split: str) -> list[str]:
    """The split's scene folders (generating missing synthetic scenes; resumable)."""
    d = config.data
    if d.source in real_scenes.READERS:
        return real_scene_dirs(config, workdir, split)
    if d.source == "tfds":
        from data_pipelines import tfds_sources  # registers the builders

        return tfds_sources.materialize(d.tfds_name, split, d.tfds_dir,
                                        os.path.join(data_dir(config, workdir), split))
    num = d.num_train_scenes if split == "train" else d.num_eval_scenes
    return synthetic.generate_split(
        os.path.join(data_dir(config, workdir), split), num_scenes=num,
        seed=split_seed(config, split), image_size=(d.image_size, d.image_size),
        num_views=d.num_views, workers=d.workers)


def qa_corpus(dirs: list[str]):
    for sd in dirs:
        for qa in scannet.read_scene_qa(sd):
            yield qa.question
            yield qa.answer


def tokenizer(config: ml_collections.ConfigDict, workdir: str,
              train_dirs: list[str] | None = None) -> tokenizer_lib.Tokenizer:
    """The configured teacher tokenizer, or the built-in BPE (trained once, then reloaded)."""
    vocab = config.model.decoder.vocab_size
    if config.tokenizer.path:
        tok = tokenizer_lib.load_tokenizer(config.tokenizer.path)
    else:
        path = os.path.join(workdir, "tokenizer")
        if os.path.exists(os.path.join(path, tokenizer_lib.BPE_FILE)):
            tok = tokenizer_lib.load_tokenizer(path)
        else:
            if train_dirs is None:
                train_dirs = scene_dirs(config, workdir, "train")
            tok = tokenizer_lib.train_bpe(qa_corpus(train_dirs), config.tokenizer.vocab_size, path)
    tokenizer_lib.check_vocab(tok, vocab, what="model (config.model.decoder.vocab_size)")
    return tok


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> dict:
    os.makedirs(workdir, exist_ok=True)
    dirs = {split: scene_dirs(config, workdir, split) for split in ("train", "eval")}
    tok = tokenizer(config, workdir, dirs["train"])
    stats = {split: synthetic.split_stats(ds) for split, ds in dirs.items()}
    lengths = {"question": [], "answer": []}
    for qa in (qa for sd in dirs["train"] for qa in scannet.read_scene_qa(sd)):
        lengths["question"].append(len(tok.encode(qa.question)))
        lengths["answer"].append(len(tok.encode(qa.answer, add_eos=True)))
    stats["tokenizer"] = {
        "path": tok.path, "backend": tok.backend, "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id, "sha256": tok.sha256,
        "max_question_tokens": max(lengths["question"], default=0),
        "max_answer_tokens": max(lengths["answer"], default=0),
    }
    path = os.path.join(workdir, "data_stats.json")
    with open(path, "w") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
    for split in ("train", "eval"):
        st = stats[split]
        o = st["objects_per_scene"]
        print(f"  {split:<5} {st['scenes']} scenes, {o['min']}-{o['max']} objects (mean "
              f"{o['mean']:.1f}), {sum(st['qa_per_kind'].values())} questions "
              f"({', '.join(f'{k} {v}' for k, v in st['qa_per_kind'].items())})")
    print(f"  tokenizer: {tok.backend}, vocabulary {tok.vocab_size}; statistics in {path}")
    return stats
