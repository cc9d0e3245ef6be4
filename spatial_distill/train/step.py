"""The loss over a batch, the optimizer, and the train/eval steps (pure functions for `jax.jit`).

A batch is the input pipeline's dict (`data_pipelines/input_pipeline.py`) as global arrays. Per
step the student runs once on `rgb / 255` and every question of the sample, and the enabled tasks
are combined by `config.loss.weighting`:

  text     `kd_loss` on the answer tokens of real questions (`answer_mask & question_mask`)
  ground   the grounding head's attributes of the objects each question refers to
           (`losses/grounding.py`), targets in camera 0's frame (`geometry.py`)
  objects  the object head's dense per-patch objects and VGGT's camera loss
  camera   (`losses/objects.py`), while the vision side trains (the vision stage)
  depth    confidence-weighted L1 + gradient loss against the GT depth (when `loss.depth` and
           the depth head is enabled)
  det      Hungarian-matched 3D box loss (when `loss.detection` and the detection head is
           enabled), GT boxes in camera 0's gravity-aligned frame (`boxes_in_camera0_frame`)

The train state is a pytree (`TrainState`): params `{"student": ..., "kendall": ...}` as plain
nested dicts (the nnx state's pure form: orbax and optax see ordinary trees), the optax state, the
step, an RNG key, the DWA loss history and the non-finite counters. The NaN/inf guard lives in the
step: a non-finite loss or gradient norm keeps params and optimizer state as they were and only
advances `step` and the counters; the loop decides when to stop.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from spatial_distill import sharding
from spatial_distill.geometry import box_attributes, boxes_in_camera0_frame
from spatial_distill.losses import weighting
from spatial_distill.losses.depth import depth_loss
from spatial_distill.losses.detection import detection_loss
from spatial_distill.losses.distill import kd_loss
from spatial_distill.losses.grounding import grounding_loss, relation_loss, resolve_relations
from spatial_distill.losses.objects import camera_loss, object_loss, object_targets
from spatial_distill.models import llama as llama_lib
from spatial_distill.models.llama import LlamaConfig
from spatial_distill.models.object_head import cameras as object_cameras
from spatial_distill.models.state_dict import StateDict, load_tensors
from spatial_distill.sharding import constrain

WEIGHTINGS = ("kendall", "static", "dwa")
# The paper's static ablation weights (text 1, depth regression .15, detection .35); the tasks it
# does not have get 1 (grounding, objects, camera).
STATIC_WEIGHTS = {"text": 1.0, "depth": 0.15, "det": 0.35, "ground": 1.0, "objects": 1.0,
                  "camera": 1.0}
# Clamp of the Kendall log-variances s_i: weights exp(-s) stay within ~[0.02, 55].
KENDALL_RANGE = (-4.0, 4.0)
DWA_TEMPERATURE = 2.0
TASKS = tuple(STATIC_WEIGHTS)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Static loss settings (hashable: part of the jitted step's closure)."""

    tasks: tuple[str, ...]
    weighting: str
    alpha: float
    temperature: float
    tail: str
    chunked: bool
    chunk_size: int
    kendall_range: tuple[float, float] = KENDALL_RANGE
    static_weights: tuple[tuple[str, float], ...] = tuple(STATIC_WEIGHTS.items())
    dwa_temperature: float = DWA_TEMPERATURE
    # Object ownership (losses/objects.py): pixel stride, box margin (m), patch fraction.
    object_stride: int = 2
    object_margin: float = 0.02
    object_min_fraction: float = 0.02
    # (token ids, axis, sign, offset) per relation word (`grounding.resolve_relations`); () : no relation
    # readout.
    relations: tuple[tuple[tuple[int, ...], str, float, float], ...] = ()
    relation_weight: float = 1.0  # x the relation MSE inside the `ground` task

    @property
    def needs_object_targets(self) -> bool:
        return "objects" in self.tasks or "ground" in self.tasks

    @property
    def runs_decoder(self) -> bool:
        return "text" in self.tasks or "ground" in self.tasks


def loss_spec(config: ml_collections.ConfigDict, tokenizer=None) -> LossSpec:
    """The tasks the config enables and how they are weighted.

    `tokenizer` (the decoder's) finds the ids of `loss.relations`' words; without it the
    relation readout is off (shape and unit work).

    Tasks: `text` (KD + CE, `loss.text`), `ground` (`loss.grounding`, needs the grounding head),
    `objects` and `camera` (`loss.objects`, need the object head, and only while it trains: with
    `model.object_head.frozen` they would only measure), `depth`, `det`.
    """
    lc, m = config.loss, config.model
    if lc.weighting not in WEIGHTINGS:
        raise ValueError(f"config.loss.weighting = {lc.weighting!r}: must be one of {WEIGHTINGS}")
    lo, hi = (float(x) for x in lc.kendall_range)
    if not lo < hi:
        raise ValueError(f"config.loss.kendall_range = {tuple(lc.kendall_range)}: needs min < max "
                         "(bounds of the learned log-variances)")
    static = {t: float(w) for t, w in lc.static_weights.items()}
    unknown = sorted(set(static) - set(TASKS))
    if unknown or min(static.values(), default=0) < 0:
        raise ValueError(f"config.loss.static_weights = {static}: weights must be >= 0 and keyed by "
                         f"tasks among {list(TASKS)} (unknown: {unknown})")
    if not lc.dwa_temperature > 0:
        raise ValueError(f"config.loss.dwa_temperature = {lc.dwa_temperature}: must be > 0")
    tasks = ["text"] if lc.text else []
    if lc.grounding:
        if not m.grounding:
            raise ValueError("config.loss.grounding = True needs the grounding head: set "
                             "config.model.grounding = True (or loss.grounding = False)")
        tasks.append("ground")
    if lc.objects and m.object_head.enabled and not m.object_head.frozen:
        tasks += ["objects", "camera"]
    if lc.depth and m.depth_head.enabled:
        tasks.append("depth")
    if lc.detection and m.det_head.enabled:
        tasks.append("det")
    if not tasks:
        raise ValueError("config.loss enables no task that the model can train (text, grounding, "
                         "objects with an unfrozen object head, depth, detection)")
    weights = {t: static.get(t, STATIC_WEIGHTS[t]) for t in tasks}
    stride = int(lc.object_stride)
    if stride < 1 or 14 % stride:
        raise ValueError(f"config.loss.object_stride = {stride}: must divide the VGGT patch size 14")
    relations = ()
    if not lc.relation_weight >= 0:
        raise ValueError(f"config.loss.relation_weight = {lc.relation_weight}: must be >= 0")
    if "ground" in tasks and tokenizer is not None and lc.relations:
        relations = resolve_relations(tokenizer, dict(lc.relations), m.decoder.vocab_size)
    return LossSpec(tasks=tuple(sorted(tasks)), weighting=lc.weighting, alpha=float(lc.alpha),
                    relations=relations, relation_weight=float(lc.relation_weight),
                    temperature=float(lc.temperature), tail=lc.tail, chunked=bool(lc.chunked),
                    chunk_size=int(lc.chunk_size), kendall_range=(lo, hi),
                    static_weights=tuple(sorted(weights.items())),
                    dwa_temperature=float(lc.dwa_temperature), object_stride=stride,
                    object_margin=float(lc.object_margin),
                    object_min_fraction=float(lc.object_min_fraction))


# ---------------------------------------------------------------------------------------------
# The loss over a batch.


# What `frozen_outputs` reads of the pipeline's batch.
FROZEN_INPUTS = ("rgb", "depth", "intrinsics", "cam_to_world", "boxes", "box_mask")


def frozen_outputs(model, batch: Mapping[str, jax.Array], spec: LossSpec) -> dict[str, jax.Array]:
    """The part of the step that is a fixed function of a sample while the vision side and the
    object head are frozen, for the trainer to compute once per sample (`train/vision_cache.py`):
    `vision_inputs [B, Nv, C']` and, with the grounding loss, its pixel-level targets
    `target_colours [B, N, 3]` and `target_seen [B, N]` (`losses/objects.object_targets`).
    `task_losses` reads them from the batch in place of computing them."""
    out = {"vision_inputs": model.see(batch["rgb"].astype(jnp.float32) / 255.0,
                                      project=False)["vision_inputs"]}
    if "ground" in spec.tasks:
        t = _object_targets(model, batch, spec)
        out.update(target_colours=t["colours"], target_seen=t["seen"])
    return out


def _object_targets(model, batch, spec: LossSpec) -> dict:
    return object_targets(batch, patch=model.cfg.aggregator.patch_size, stride=spec.object_stride,
                          margin=spec.object_margin, min_fraction=spec.object_min_fraction)


def task_losses(model, batch: Mapping[str, jax.Array], spec: LossSpec):
    """Per-task losses (scalars) and their diagnostic metrics for one (micro-)batch.

    model: a `Student`; batch: the input pipeline's keys (rgb uint8 `[B, S, H, W, 3]`, ...).
    """
    images = batch["rgb"].astype(jnp.float32) / 255.0
    out = model(images, batch["prompt_ids"], batch["prompt_mask"], batch["answer_ids"],
                batch["answer_mask"], text=spec.runs_decoder,
                vision_inputs=batch.get("vision_inputs"))  # the trainer's frozen-vision cache
    losses, metrics = {}, {}
    if "text" in spec.tasks:
        mask = batch["answer_mask"] & batch["question_mask"][..., None]
        losses["text"], m = kd_loss(
            out["answer_hidden"], model.decoder.lm_head_kernel(), batch["topk_ids"],
            batch["topk_logprobs"], batch["answer_ids"], mask, alpha=spec.alpha,
            temperature=spec.temperature, tail=spec.tail, chunked=spec.chunked,
            chunk_size=spec.chunk_size)
        metrics.update(m, **{"aux/text": losses["text"]})
    patch = model.cfg.aggregator.patch_size
    targets = None
    if "target_colours" in batch:  # cached by the trainer (`frozen_outputs`)
        if "objects" in spec.tasks:
            raise ValueError("the batch holds cached grounding targets but the object head trains: "
                             "its per-patch targets are not cached (turn train.cache_vision off)")
        targets = {"colours": batch["target_colours"], "seen": batch["target_seen"],
                   "attributes": box_attributes(batch["boxes"].astype(jnp.float32), batch["cam_to_world"])}
    elif spec.needs_object_targets:
        targets = _object_targets(model, batch, spec)
    if "ground" in spec.tasks:
        losses["ground"], m = grounding_loss(
            out["grounding"], batch["referred"], batch["question_mask"], targets["attributes"],
            targets["colours"], targets["seen"], batch["labels"])
        if spec.relations:
            rel, m2 = relation_loss(out["relation"], batch["prompt_ids"], batch["referred"],
                                    batch["question_mask"], targets["attributes"], spec.relations,
                                    boxes=batch["boxes"])
            losses["ground"] = losses["ground"] + spec.relation_weight * rel
            m = {**m, **m2, "ground/relation_mse": rel}
        metrics.update(m, **{"aux/ground": losses["ground"]})
    if "objects" in spec.tasks:
        hw = images.shape[2:4]
        extrinsics, intrinsics = object_cameras(out["pose_enc_list"][-1], hw)
        raw = out["object_raw"]
        grid = (hw[0] // patch, hw[1] // patch)
        # The per-view offsets and depths have their own targets; the composed centre teaches
        # the cameras only (a wrong camera must not pull the per-view geometry off its target).
        centres = model.object_head.centres(raw, extrinsics, intrinsics, grid, patch, train_views=False)
        losses["objects"], m = object_loss(model.object_head.split(raw), centres, targets,
                                           batch["labels"], patch=patch, grid_hw=grid)
        metrics.update(m, **{"aux/objects": losses["objects"]})
        losses["camera"], m = camera_loss(out["pose_enc_list"], batch["cam_to_world"],
                                          batch["intrinsics"], hw)
        metrics.update(m, **{"aux/camera": losses["camera"]})
    if "depth" in spec.tasks:
        losses["depth"], m = depth_loss(out["depth"], out["depth_conf"], batch["depth"])
        metrics.update(m, **{"aux/depth": losses["depth"]})
    if "det" in spec.tasks:
        gt = boxes_in_camera0_frame(batch["boxes"], batch["cam_to_world"])
        losses["det"], m = detection_loss(out["det_logits"], out["det_boxes"], gt, batch["labels"],
                                          batch["box_mask"])
        metrics.update(m, **{"aux/det": losses["det"]})
    return losses, metrics


def combine(losses, kendall_params, dwa_state, spec: LossSpec):
    """Weighted total, `weights/<task>` metrics and the DWA state after this step."""
    if spec.weighting == "kendall":
        s = kendall_params["log_vars"]
        total, m = weighting.kendall(
            losses, {t: s[i] for i, t in enumerate(spec.tasks)},
            forms={t: weighting.DEFAULT_FORMS[t] for t in spec.tasks},
            s_min=spec.kendall_range[0], s_max=spec.kendall_range[1])
        return total, m, dwa_state
    if spec.weighting == "static":
        weights = dict(spec.static_weights)
        total, m = weighting.static(losses, {t: weights[t] for t in spec.tasks})
        return total, m, dwa_state
    total, m, new_state = weighting.dwa(losses, dwa_state, temperature=spec.dwa_temperature)
    return total, m, new_state


# ---------------------------------------------------------------------------------------------
# Train state and optimizer.


class TrainState(struct.PyTreeNode):
    step: jax.Array  # int32 []: batches consumed (updates applied + non-finite steps skipped)
    params: dict  # {"student": nnx pure dict, "kendall": {"log_vars": [tasks]}} (kendall only)
    opt_state: optax.OptState
    rng: jax.Array  # uint32 [2] key; the student has no stochastic layer, so it is carried as is
    dwa: weighting.DWAState | None
    nonfinite_run: jax.Array  # int32 []: consecutive non-finite steps ending at `step`
    nonfinite_total: jax.Array  # int32 []: all skipped steps

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


SCHEDULES = ("cosine", "wsd")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to `train.learning_rate` over `warmup_steps`, then to 0 at
    `train.steps`: `cosine`, or `wsd` (warmup-stable-decay: constant, then linear to 0 over the
    last `decay_fraction` of the steps). A run shorter than its warmup only warms up."""
    t = config.train
    if t.schedule not in SCHEDULES:
        raise ValueError(f"config.train.schedule = {t.schedule!r}: must be one of {SCHEDULES}")
    if not 0 < t.decay_fraction <= 1:
        raise ValueError(f"config.train.decay_fraction = {t.decay_fraction}: must be in (0, 1]")
    warmup = max(int(t.warmup_steps), 0)
    rest = max(int(t.steps) - warmup, 1)
    if t.schedule == "cosine":
        decay = optax.cosine_decay_schedule(t.learning_rate, rest)
    else:
        tail = min(max(round(t.decay_fraction * int(t.steps)), 1), rest)
        decay = optax.join_schedules([optax.constant_schedule(t.learning_rate),
                                      optax.linear_schedule(t.learning_rate, 0.0, tail)], [rest - tail])
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, t.learning_rate, warmup), decay], [warmup])


VISION_TRUNK = ("aggregator",)
VISION_HEADS = ("camera_head", "object_head")
# The parts a vision checkpoint (official VGGT or the vision stage's export) initialises.
PRETRAINED_VISION = VISION_TRUNK + VISION_HEADS


def _student_part(path) -> str | None:
    """The Student submodule a params-tree leaf belongs to (None outside `student`)."""
    keys = [getattr(k, "key", None) for k in path]
    return keys[1] if keys[0] == "student" else None


def param_labels(params: dict, *, frozen_vision: bool, frozen_objects: bool = False) -> dict:
    """"frozen" for the VGGT aggregator when `model.vision.frozen` and for the camera and object
    heads when `model.object_head.frozen`, "train" elsewhere."""
    frozen = (VISION_TRUNK if frozen_vision else ()) + (VISION_HEADS if frozen_objects else ())
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if _student_part(path) in frozen else "train", params)


def _pretrained_vision_mask(params: dict) -> dict:
    # Fine-tuned at the decoder's learning rate, the pretrained vision side loses what it was
    # pretrained to see (docs/learning.md), so `train.vision_lr_scale` scales its updates.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _student_part(path) in PRETRAINED_VISION, params)


def _decay_mask(params: dict) -> dict:
    # Weight decay on matrices only: pulling norm scales, biases, the latent tokens or the Kendall
    # log-variances towards 0 would bias them, not regularise them.
    def decays(path, x):
        keys = [getattr(k, "key", None) for k in path]
        return keys[0] == "student" and x.ndim >= 2 and keys[-1] not in ("latents",)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict, params: dict):
    """(optax transform, lr schedule): global-norm clipping, AdamW, frozen vision masked out,
    the pretrained vision side's updates scaled by `train.vision_lr_scale` when it trains.

    params: the (abstract) params tree, for the masks.
    """
    t = config.train
    schedule = learning_rate_schedule(config)
    adamw = optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(schedule, weight_decay=t.weight_decay, mask=_decay_mask(params)))
    scale = float(t.vision_lr_scale)
    if not scale > 0:
        raise ValueError(f"config.train.vision_lr_scale = {t.vision_lr_scale}: must be > 0 "
                         "(freeze the vision side with model.vision.frozen instead)")
    if scale != 1.0:  # AdamW's update is linear in lr, so scaling it scales lr (and decay) there
        adamw = optax.chain(adamw, optax.masked(optax.scale(scale), _pretrained_vision_mask))
    tx = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()},
                               param_labels(params, frozen_vision=bool(config.model.vision.frozen),
                                            frozen_objects=bool(config.model.object_head.frozen)))
    return tx, schedule


def init_state(key: jax.Array, tx, spec: LossSpec, build_model) -> TrainState:
    """A fresh train state. `build_model(key)` builds the Student (inside jit: sharded init)."""
    model = build_model(key)
    student = nnx.state(model).to_pure_dict()
    params = {"student": student}
    if spec.weighting == "kendall":
        params["kendall"] = {"log_vars": jnp.zeros((len(spec.tasks),), jnp.float32)}
    dwa = weighting.dwa_init(spec.tasks) if spec.weighting == "dwa" else None
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params),
                      rng=jax.random.fold_in(key, 1), dwa=dwa, nonfinite_run=zero,
                      nonfinite_total=zero)


def vggt_weights(build_model, path: str, *, depth_head: bool) -> dict:
    """VGGT weights for the student's vision side: `{"aggregator": pure dict, ...}` of numpy
    arrays, with `depth_head` (when `depth_head`, the student has one and the checkpoint holds
    its keys, as official VGGT does; the vision stage's export has none), `camera_head` (when the
    student has one) and `object_head` (when the student has one and the checkpoint holds its
    `object_head.*` keys, as the vision stage's export does; an official VGGT checkpoint has
    none, and the head then starts from random weights). Keys of other parts (point and track
    heads) are ignored; a missing, unexpected or mis-shaped key inside a loaded part is reported,
    all in one `CheckpointMismatchError`. `build_model(key)` builds the Student (only
    abstractly: no random weights are drawn)."""
    model = nnx.eval_shape(lambda: build_model(jax.random.PRNGKey(0)))
    tensors, source = load_tensors(path)
    sd = StateDict(tensors, source)
    model.aggregator.load_torch(sd, "aggregator")
    parts = ["aggregator"]
    # The vision stage's export has no depth head: the student's then starts from random weights.
    if depth_head and model.depth_head is not None and any(k.startswith("depth_head.") for k in tensors):
        model.depth_head.load_torch(sd, "depth_head")
        parts.append("depth_head")
    if model.camera_head is not None:
        model.camera_head.load_torch(sd, "camera_head")
        parts.append("camera_head")
    if model.object_head is not None and any(k.startswith("object_head.") for k in tensors):
        model.object_head.load_torch(sd, "object_head")
        parts.append("object_head")
    loaded = tuple(f"{p}." for p in parts)
    sd.finish(ignore_unused=[k for k in tensors if not k.startswith(loaded)],
              what=f"student's VGGT {' + '.join(parts)} (config.model.vision.checkpoint)")
    state = nnx.state(model).to_pure_dict()
    return {p: state[p] for p in parts}


# Fields of the student's decoder that a pretrained checkpoint must share (the rest, like dtypes,
# scanning and remat, describe how it runs).
DECODER_ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                       "num_kv_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps",
                       "rope_theta", "rope_scaling")


class DecoderMismatchError(ValueError):
    """A pretrained decoder that does not fit `config.model.decoder`; names both values."""


def decoder_weights(student_decoder: LlamaConfig, path: str) -> dict:
    """A local Hugging Face Llama-family directory (config.json + safetensors or
    pytorch_model*.bin) as the pure params dict of the student's decoder.

    Every architecture field the student's decoder has (`DECODER_ARCH_FIELDS`) must equal the
    checkpoint's, else `DecoderMismatchError` names the field and both numbers; the weights then
    go through `llama.from_hf` (every missing, unexpected or mis-shaped key in one error).
    """
    config_json = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.isfile(config_json):
        raise FileNotFoundError(f"config.model.decoder.checkpoint = {path!r}: needs a local Hugging "
                                "Face model directory with config.json and its weights")
    theirs = LlamaConfig.from_hf(config_json)
    for field in DECODER_ARCH_FIELDS:
        a, b = getattr(theirs, field), getattr(student_decoder, field)
        if a != b:
            what = "vocabulary" if field == "vocab_size" else field
            raise DecoderMismatchError(
                f"{config_json}: the pretrained decoder's {what} is {a} but config.model.decoder "
                f"has {b}; set config.model.decoder to the checkpoint's architecture (and use its "
                "tokenizer: config.tokenizer.path)" if field == "vocab_size" else
                f"{config_json}: the pretrained decoder has {field} = {a} but config.model.decoder "
                f"has {b}; set config.model.decoder to the checkpoint's architecture")
    model = llama_lib.from_hf(path, dtype=student_decoder.dtype,
                              param_dtype=student_decoder.param_dtype,
                              scan_layers=student_decoder.scan_layers,
                              remat_policy=student_decoder.remat_policy,
                              attention_impl=student_decoder.attention_impl)
    return nnx.state(model).to_pure_dict()


def state_shardings(abstract: TrainState, abstract_model_state: nnx.State, mesh, rules) -> TrainState:
    """NamedShardings for every leaf of the train state, from the parameters' logical names
    (`sharding.state_shardings`): an optimizer leaf whose key path ends with a parameter's path
    (Adam's `mu`/`nu`) gets that parameter's sharding; the rest (step, RNG, counters, Adam's
    count, Kendall log-variances, DWA history) is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = {"student": sharding.state_shardings(abstract_model_state, mesh, rules).to_pure_dict()}
    if "kendall" in abstract.params:
        params["kendall"] = jax.tree.map(lambda _: replicated, abstract.params["kendall"])

    def dict_keys(path):
        return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))

    by_path = {dict_keys(p): sh for p, sh in jax.tree_util.tree_leaves_with_path(params)}

    def for_opt_leaf(path, leaf):
        keys = dict_keys(path)
        for i in range(len(keys)):  # longest suffix first: ("train", "student", ...) -> ("student", ...)
            sh = by_path.get(keys[i:])
            if sh is not None and len(sh.spec) <= len(leaf.shape):
                return sh
        return replicated

    opt = jax.tree_util.tree_map_with_path(for_opt_leaf, abstract.opt_state)
    rest = jax.tree.map(lambda _: replicated, abstract.replace(params=None, opt_state=None))
    return rest.replace(params=params, opt_state=opt)


def student_from(graphdef, abstract_state: nnx.State, pure: dict):
    """The `Student` module for a pure params dict (cheap: runs at trace time)."""
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------
# Steps.


def _split_micro(batch: Mapping[str, jax.Array], accum: int) -> dict:
    """`[B, ...]` -> `[accum, B / accum, ...]`; micro-batch i takes rows i, i + accum, ..., so
    every device holds an equal share of every micro-batch (rows are sharded contiguously)."""
    def split(x):
        x = jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)
        return constrain(x, (None, "activation_batch") + (None,) * (x.ndim - 2))

    return {k: split(v) for k, v in batch.items()}


def accumulate(fn, params, batch: Mapping[str, jax.Array], accum_steps: int):
    """`fn(params, micro_batch) -> tree` (values and gradients) averaged over `accum_steps`
    micro-batches of `batch` (`_split_micro`), scanned so one micro-batch is live at a time."""
    if accum_steps == 1:
        return fn(params, batch)
    micro = _split_micro(batch, accum_steps)
    shapes = jax.eval_shape(fn, params, jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def body(carry, mb):
        return jax.tree.map(jnp.add, carry, fn(params, mb)), None

    summed, _ = jax.lax.scan(body, zeros, micro)
    return jax.tree.map(lambda x: x / accum_steps, summed)


def loss_and_grads(params: dict, batch, dwa_state, *, graphdef, abstract_state, spec: LossSpec,
                   accum_steps: int = 1):
    """(total loss, metrics, task losses, grads), averaged over `accum_steps` micro-batches
    (each loss is a mean within its micro-batch, so the result is a mean of means)."""
    def loss_fn(p, mb):
        model = student_from(graphdef, abstract_state, p["student"])
        losses, metrics = task_losses(model, mb, spec)
        total, wm, _ = combine(losses, p.get("kendall"), dwa_state, spec)
        return total, (metrics | wm, losses)

    def value_and_grad(p, mb):
        (total, (metrics, losses)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, mb)
        return total, metrics, losses, grads

    return accumulate(value_and_grad, params, batch, accum_steps)


def train_step(state: TrainState, batch, *, graphdef, abstract_state, tx, schedule,
               spec: LossSpec, accum_steps: int = 1):
    """One update (or a skipped one, when the loss or gradient is not finite).

    Returns (new state, metrics dict of scalars): `learning/*`, `distill/*`, `aux/*`,
    `weights/<task>`, `depth/*`, `det/*`.
    """
    total, metrics, losses, grads = loss_and_grads(
        state.params, batch, state.dwa, graphdef=graphdef, abstract_state=abstract_state,
        spec=spec, accum_steps=accum_steps)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    def keep(new, old):
        return jnp.where(finite, new, old)

    dwa = state.dwa
    if dwa is not None:
        dwa = jax.tree.map(keep, weighting.dwa_update(dwa, losses), dwa)
    applied = state.step - state.nonfinite_total  # updates applied so far = the optimizer's count
    bad = (~finite).astype(jnp.int32)
    new = TrainState(
        step=state.step + 1,
        params=jax.tree.map(keep, params, state.params),
        opt_state=jax.tree.map(keep, opt_state, state.opt_state),
        rng=state.rng, dwa=dwa,
        nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
        nonfinite_total=state.nonfinite_total + bad)
    metrics = dict(metrics)
    metrics.update({
        "learning/loss": total,
        "learning/grad_norm": grad_norm,
        "learning/lr": jnp.asarray(schedule(applied), jnp.float32),
        "learning/nonfinite_steps": new.nonfinite_total,
        "learning/nonfinite_run": new.nonfinite_run,
    })
    return new, metrics


def eval_step(params: dict, dwa_state, batch, *, graphdef, abstract_state, spec: LossSpec):
    """Loss metrics of one batch without gradients (`learning/loss` = the weighted total)."""
    model = student_from(graphdef, abstract_state, params["student"])
    losses, metrics = task_losses(model, batch, spec)
    total, wm, _ = combine(losses, params.get("kendall"), dwa_state, spec)
    return {**metrics, **wm, "learning/loss": total}
