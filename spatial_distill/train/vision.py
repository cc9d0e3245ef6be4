"""The vision stage: pretrain the student's VGGT on the training scenes, as the paper's student
starts from a pretrained VGGT (`config.mode=vision`).

    python run.py --config=configs/student.py:tiny --workdir=W --config.mode=vision

What trains: the aggregator, VGGT's camera head and the object head (`models/object_head.py`),
with VGGT's camera loss and the dense object loss (`losses/objects.py`: which object each patch
sees, its class, colour and box in camera 0's frame). The decoder is not run. The data are the
teacher records' *train* split (frames, depth, cameras and boxes; the data and dump stages run
first when their outputs are missing), so the held-out scenes are never seen; the eval split
gives the held-out figures.

With `config.vision.init_checkpoint` (an earlier export) the stage starts from those weights
instead of random ones and trains on with its own schedule.

It is the train stage with `config.vision.*` in place of `config.train.*` and only the vision
tasks on (`stage_config`), so it resumes, checkpoints and logs like it, under `W/vision/`.
At the end `export` writes

  W/vision/vggt.safetensors  aggregator, camera_head (official VGGT key names and layouts) and
                             object_head keys: what `model.vision.checkpoint` loads
  W/vision/vggt.json         provenance: command, seed, data, steps, wall time, held-out
                             metrics, sha256 of the weights file (and of the one it
                             started from)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np
import safetensors.numpy
from flax import nnx

from data_pipelines import synthetic
from spatial_distill import prepare
from spatial_distill.models import student as student_lib
from spatial_distill.teacher import dump
from spatial_distill.train import checkpoint as ckpt_lib
from spatial_distill.train import metrics as metrics_lib
from spatial_distill.train import step as step_lib
from spatial_distill.train import trainer

SUBDIR = "vision"
WEIGHTS = "vggt.safetensors"
RECORD = "vggt.json"


def stage_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The train-stage config that pretrains the vision side (module doc)."""
    c = copy.deepcopy(config)
    c.mode = "train"
    for field in ("steps", "batch_size", "learning_rate", "warmup_steps", "schedule", "eval_every"):
        c.train[field] = config.vision[field]
    c.train.vision_lr_scale = 1.0  # a student-training knob; the stage's own rate is vision.learning_rate
    c.loss.text = c.loss.grounding = False
    c.loss.objects = True
    c.loss.depth = c.loss.detection = False
    m = c.model
    # From scratch (the DINO grid of config.data.image_size), or on from an earlier export (a
    # longer schedule, more scenes): its aggregator, camera and object heads load at step 0.
    init = config.vision.get("init_checkpoint")
    m.vision.checkpoint = init or None
    m.vision.pos_embed_size = config.model.vision.pos_embed_size if init else None
    m.vision.frozen = False
    m.object_head.enabled = True
    m.object_head.frozen = False
    m.grounding = False
    m.object_words.enabled = False  # no decoder
    # The stage never pools tokens for a decoder; fixed, so that a preset's pooling choice
    # changing later cannot make a half-trained stage unresumable.
    m.vision_pool = "patch"
    m.depth_head.enabled = m.det_head.enabled = False
    # The stage runs in W/vision but reads the records and tokenizer of W.
    c.teacher.records_dir = dump.records_dir(config, workdir)
    if not c.tokenizer.path:
        c.tokenizer.path = os.path.join(workdir, "tokenizer")
    return c


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Runs the stage (resumable) and exports the weights; returns the weights file's path."""
    prepare.prepare_data(config, workdir)
    dump.dump(config, workdir)
    cfg = stage_config(config, workdir)
    out = os.path.join(workdir, SUBDIR)
    t0 = time.time()
    trainer.train_and_evaluate(cfg, out)
    return export(cfg, out, wall_s=time.time() - t0)


NUM_REFERENCE_SCENES = 8


def reference_scenes(cfg: ml_collections.ConfigDict) -> list:
    """The first held-out synthetic scenes, regenerated from their seeds (no records needed)."""
    if cfg.data.source != "synthetic":
        return []
    seed = prepare.split_seed(cfg, "eval")
    size = (cfg.data.image_size, cfg.data.image_size)
    return [synthetic.generate_scene(synthetic.scene_seed(seed, i), image_size=size,
                                     num_views=cfg.data.num_views) for i in range(NUM_REFERENCE_SCENES)]


def scene_batch(scenes, num_boxes: int | None = None) -> dict[str, np.ndarray]:
    """Canonical samples -> the vision keys of a batch (rgb, depth quantised to millimetres as
    the records store it, cameras, boxes padded to `num_boxes` or the most in `scenes`)."""
    n = num_boxes or max(len(s.boxes) for s in scenes)
    return {
        "rgb": np.stack([s.rgb for s in scenes]),
        "depth": np.stack([np.round(s.depth * 1000.0) / 1000.0 for s in scenes]).astype(np.float32),
        "intrinsics": np.stack([s.intrinsics for s in scenes]),
        "cam_to_world": np.stack([s.cam_to_world for s in scenes]),
        "boxes": np.stack([np.pad(s.boxes, ((0, n - len(s.boxes)), (0, 0))) for s in scenes]),
        "box_mask": np.stack([np.arange(n) < len(s.boxes) for s in scenes]),
        "labels": np.stack([np.pad(s.labels, (0, n - len(s.labels)), constant_values=-1) for s in scenes]),
    }


def reference_figures(model, scenes) -> dict[str, float]:
    """Held-out object and camera metrics of `model`'s vision side on `scenes` (canonical
    samples, depth quantised to millimetres as the records store it): `objects/*`, `camera/*`."""
    if not scenes:
        return {}
    batch = scene_batch(scenes)
    q = np.zeros((len(scenes), 1, 1), np.int32)
    batch.update(prompt_ids=q, prompt_mask=q > 0, answer_ids=q, answer_mask=q > 0)
    _, metrics = _reference_losses(model, batch)
    return {k: float(v) for k, v in metrics.items()}


_REFERENCE_SPEC = step_lib.LossSpec(tasks=("camera", "objects"), weighting="static", alpha=0.0,
                                    temperature=1.0, tail="bucket", chunked=False, chunk_size=1)


@nnx.jit  # one compile per model structure: a rerun's export and the tests reuse it
def _reference_losses(model, batch):
    return step_lib.task_losses(model, batch, _REFERENCE_SPEC)


def student_with_vision(config: ml_collections.ConfigDict, path: str, seed: int = 0, tokenizer=None):
    """A Student of `config` whose vision side (aggregator, camera and object heads) comes from
    the weights file `path`; the rest keeps its random initialisation. Without `tokenizer` the
    word tags (`model.object_words`, which need its ids) are off: a vision-side model."""
    model = config.model
    if tokenizer is None and model.object_words.enabled:
        model = copy.deepcopy(model)
        model.object_words.enabled = False
    model_cfg = student_lib.config_from(model, config.data.image_size, tokenizer)
    model = student_lib.create(model_cfg, seed)
    loaded = step_lib.vggt_weights(lambda key: student_lib.Student(model_cfg, rngs=nnx.Rngs(params=key)),
                                   path, depth_head=False)
    state = nnx.state(model)
    pure = state.to_pure_dict()
    pure.update(loaded)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _provenance(path: str | None) -> dict | None:
    """Path, sha256 and own record (when it has one beside it) of the weights a stage started from."""
    if not path:
        return None
    out = {"path": path, "sha256": _sha256(path)}
    record = os.path.splitext(path)[0] + ".json"
    if os.path.exists(record):
        with open(record) as f:
            prior = json.load(f)
        out.update({k: prior.get(k) for k in ("command", "steps", "data")})
    return out


def export(cfg: ml_collections.ConfigDict, out: str, *, wall_s: float | None = None) -> str:
    """Writes `vggt.safetensors` and `vggt.json` from the latest checkpoint in `out`."""
    model_cfg = student_lib.config_from(cfg.model, cfg.data.image_size)
    graphdef, abstract_state = nnx.split(student_lib.create(model_cfg, abstract=True))
    place = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"student": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place), abstract_state.to_pure_dict())}
    ckpt_dir = os.path.join(out, "checkpoints")
    step = ckpt_lib.Checkpointer(ckpt_dir, keep=1, create=False).latest_step()
    params = ckpt_lib.load_params(ckpt_dir, abstract, step)
    model = step_lib.student_from(graphdef, abstract_state, params["student"])
    tensors = model.aggregator.export_torch("aggregator")
    tensors.update(model.camera_head.export_torch("camera_head"))
    tensors.update(model.object_head.export_torch("object_head"))
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    path = os.path.join(out, WEIGHTS)
    tmp = path + ".tmp"
    safetensors.numpy.save_file(tensors, tmp, metadata={"format": "pt", "producer": "spatial_distill vision stage"})
    os.replace(tmp, path)
    digest = _sha256(path)

    scenes = reference_scenes(cfg)
    reference = {"split_seed": prepare.split_seed(cfg, "eval"), "indices": list(range(len(scenes))),
                 "metrics": reference_figures(model, scenes)}

    rows = metrics_lib.read_jsonl(os.path.join(out, "metrics.jsonl"))
    held_out = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
    train_rows = [r for r in rows if "perf/step_time_s" in r]
    record = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "seed": int(cfg.seed),
        "data": {"source": cfg.data.source, "records": cfg.teacher.records_dir, "split": "train",
                 "num_train_scenes": int(cfg.data.num_train_scenes),
                 "image_size": int(cfg.data.image_size), "num_views": int(cfg.data.num_views)},
        "steps": int(step), "batch_size": int(cfg.train.batch_size),
        "learning_rate": float(cfg.train.learning_rate),
        "init_checkpoint": _provenance(cfg.model.vision.checkpoint),
        "mean_step_time_s": float(np.mean([r["perf/step_time_s"] for r in train_rows])) if train_rows else None,
        "wall_s_this_run": wall_s,
        "held_out": held_out,
        # Recomputed by tests/test_vision.py from the scenes regenerated by their seeds.
        "reference": reference,
        "parameters": int(sum(v.size for v in tensors.values())),
        "sha256": digest,
        "code": ckpt_lib.code_version(),
        "model": ckpt_lib.config_dict(cfg)["model"],
    }
    if cfg.data.source != "synthetic":
        record.pop("reference")
    with open(os.path.join(out, RECORD), "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    print(f"vision weights: {path} (sha256 {digest[:16]}...), record {os.path.join(out, RECORD)}")
    return path
