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

from data_pipelines import scannet, synthetic
from spatial_distill import tokenizer as tokenizer_lib

SPLIT_SEED_OFFSET = {"train": 0, "eval": 1}


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.data.dir or os.path.join(workdir, "data")


def split_seed(config: ml_collections.ConfigDict, split: str) -> int:
    """Seed of a split's scene stream: train and eval never share a scene."""
    return 2 * config.seed + SPLIT_SEED_OFFSET[split]


def scene_dirs(config: ml_collections.ConfigDict, workdir: str, split: str) -> list[str]:
    """The split's scene folders (generating missing synthetic scenes; resumable)."""
    d = config.data
    if d.source == "scannet":
        root = os.path.join(d.scannet_dir, split)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: data.scannet_dir must hold '{split}/<scene>' folders")
        return sorted(os.path.join(root, s) for s in os.listdir(root))
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
