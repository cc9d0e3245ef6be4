"""Config pieces shared by every stage, and the checks run before any stage starts.

Configs are data (`ml_collections.ConfigDict`, locked so a misspelt override such as
`--config.train.stpes=10` is an error naming the key). `validate(config)` catches bad values early,
naming the field, the value and what would be valid.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

MODES = ("pipeline", "data", "dump", "train", "eval", "vision", "aot", "export")


def data_config(*, image_size: int, num_train_scenes: int, num_eval_scenes: int,
                num_views: int = 4) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.source = "synthetic"  # synthetic | scannet | front3d | tfds
    c.dir = config_dict.placeholder(str)  # where scenes are written/read; None -> WORKDIR/data
    # Real scenes (data_pipelines/real_scenes.py): one folder per scene under the directory, read
    # once into WORKDIR/data/scenes with S views at image_size and their questions.
    c.scannet_dir = config_dict.placeholder(str)  # source=scannet: exported or posed_images scenes
    c.front3d_dir = config_dict.placeholder(str)  # source=front3d: rendered rooms (front3d.py layout)
    c.frame_sampling = "uniform"  # scannet: uniform | coverage (scannet.read_scene), from config.seed
    # scannet: ScanNet's scannetv2-labels.combined.tsv, to label instance boxes from the mesh
    # annotations (raw category -> NYU40 -> ScanNet18); not needed for boxes in scene.json / .npy.
    c.scannet_labels_tsv = config_dict.placeholder(str)
    # Questions of real scenes: a JSON-lines file (data_pipelines/user_qa.py), or None to derive
    # them from the 3D boxes (spatial_qa.generate_box_qa).
    c.qa_file = config_dict.placeholder(str)
    # Splits of real scenes (data_pipelines/splits.py): read from splits_file, else made once from
    # config.seed and stored in WORKDIR/splits.json. scene: scene-disjoint; paper: the paper's
    # random per-question split (leaks scenes between splits; for comparison only).
    c.splits_file = config_dict.placeholder(str)
    c.split_mode = "scene"
    c.split_fractions = (0.8, 0.1, 0.1)  # train / val / test
    c.eval_split = "val"  # the split the eval stage reads (val | test)
    # source=tfds: a dataset of data_pipelines/tfds_sources.py (e.g. spatial_synthetic/tiny),
    # prepared offline with `tfds build` in tfds_dir (None: TFDS's default data dir).
    c.tfds_name = config_dict.placeholder(str)
    c.tfds_dir = config_dict.placeholder(str)
    c.num_train_scenes = num_train_scenes  # synthetic scenes for training
    c.num_eval_scenes = num_eval_scenes  # held-out synthetic scenes (never seen in training)
    c.image_size = image_size  # square frames, a multiple of the 14-pixel VGGT patch
    c.num_views = num_views  # S, frames per scene
    c.workers = 2  # processes for scene generation
    return c


def validate(config: ml_collections.ConfigDict, *, num_devices: int | None = None) -> None:
    """Raises ValueError naming the first bad field. `num_devices` enables the mesh check."""

    def bad(field, value, why):
        raise ValueError(f"config.{field} = {value!r}: {why}")

    if config.mode not in MODES:
        bad("mode", config.mode, f"must be one of {MODES}")
    if config.seed < 0:
        bad("seed", config.seed, "must be >= 0")
    d = config.data
    if d.source not in ("synthetic", "scannet", "front3d", "tfds"):
        bad("data.source", d.source, "must be 'synthetic', 'scannet', 'front3d' or 'tfds'")
    if d.source == "scannet" and not d.scannet_dir:
        bad("data.scannet_dir", d.scannet_dir, "must point at exported ScanNet scenes when data.source='scannet'")
    if d.source == "front3d" and not d.front3d_dir:
        bad("data.front3d_dir", d.front3d_dir, "must point at rendered 3D-FRONT rooms when data.source='front3d'")
    if d.split_mode not in ("scene", "paper"):
        bad("data.split_mode", d.split_mode, "must be 'scene' or 'paper'")
    if d.eval_split not in ("val", "test"):
        bad("data.eval_split", d.eval_split, "must be 'val' or 'test'")
    if d.frame_sampling not in ("uniform", "coverage"):
        bad("data.frame_sampling", d.frame_sampling, "must be 'uniform' or 'coverage'")
    if d.source == "tfds" and not d.tfds_name:
        bad("data.tfds_name", d.tfds_name, "must name a prepared TFDS dataset (e.g. spatial_synthetic/tiny) "
            "when data.source='tfds'")
    for f in ("num_train_scenes", "num_eval_scenes", "num_views", "workers"):
        if d[f] < 1:
            bad(f"data.{f}", d[f], "must be >= 1")
    if d.image_size < 14 or d.image_size % 14:
        bad("data.image_size", d.image_size, "must be a positive multiple of the VGGT patch size 14")
    if config.train.steps < 0:
        bad("train.steps", config.train.steps, "must be >= 0")
    if config.train.batch_size < 1:
        bad("train.batch_size", config.train.batch_size, "must be >= 1")
    vocab = config.model.decoder.vocab_size
    if vocab < 1:
        bad("model.decoder.vocab_size", vocab, "must be >= 1")
    if not 1 <= config.teacher.k <= vocab:
        bad("teacher.k", config.teacher.k,
            f"must be between 1 and the vocabulary size {vocab} (model.decoder.vocab_size)")
    from spatial_distill.kernels import attention

    try:
        attention.parse(config.model.attention)
    except ValueError:
        bad("model.attention", config.model.attention,
            f"choose one of {attention.IMPLEMENTATIONS}, optionally with kernel block sizes "
            "as kind:BQxBK (e.g. pallas:256x128)")
    t = config.teacher
    if t.kind not in ("oracle", "llava3d", "hf"):
        bad("teacher.kind", t.kind, "choose oracle (synthetic data), llava3d (the Flax LLaVA-3D "
            "port) or hf (a transformers model)")
    if t.kind != "oracle" and not t.path:
        bad("teacher.path", t.path, f"teacher.kind={t.kind!r} needs a local checkpoint directory")
    if t.geometry not in ("sensor", "vggt"):
        bad("teacher.geometry", t.geometry, "choose sensor or vggt")
    if t.kind == "llava3d" and t.geometry == "vggt" and t.llava_mode == "3d" and not t.vggt_path:
        bad("teacher.vggt_path", t.vggt_path, "teacher.geometry=vggt needs VGGT weights on a local path")
    if t.llava_mode not in ("3d", "2d"):
        bad("teacher.llava_mode", t.llava_mode, "choose 3d or 2d")
    if t.dtype not in ("float32", "bfloat16", "float16"):
        bad("teacher.dtype", t.dtype, "choose float32, bfloat16 or float16")
    for field in ("batch_size", "max_new_tokens"):
        if t[field] < 1:
            bad(f"teacher.{field}", t[field], "must be >= 1")
    if len(tuple(t.mesh)) != 3:
        bad("teacher.mesh", t.mesh, "a (data, fsdp, tensor) triple, one entry may be -1")
    if config.teacher.kind == "oracle" and d.source == "tfds" and not str(d.tfds_name).startswith("spatial_synthetic"):
        bad("teacher.kind", config.teacher.kind, "the oracle needs scenes whose geometry it knows how to read: "
            "synthetic solids or real scenes' boxes (data.source=scannet / front3d), not another TFDS dataset")
    if config.teacher.temperature <= 0:
        bad("teacher.temperature", config.teacher.temperature, "must be > 0")
    if config.tokenizer.path is None and config.tokenizer.vocab_size != vocab:
        bad("tokenizer.vocab_size", config.tokenizer.vocab_size,
            f"the built-in BPE must have the model's vocabulary size {vocab}")
    shape = tuple(config.mesh.shape)
    if num_devices is not None:
        from spatial_distill.sharding import mesh_shape

        try:
            filled = mesh_shape(shape, num_devices)
        except ValueError as e:
            bad("mesh.shape", shape, str(e))
        data_ways = filled[0] * filled[1]
        if config.train.batch_size % data_ways:
            bad("train.batch_size", config.train.batch_size,
                f"must divide across the data and fsdp mesh axes ({filled[0]} x {filled[1]} = "
                f"{data_ways} ways)")
