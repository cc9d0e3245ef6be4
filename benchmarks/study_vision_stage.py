"""Does the vision side generalise? Train it from scratch, score held-out scenes (issue 10).

  python -m benchmarks.study_vision_stage --records=W/records --steps=400 [--lr=2e-3]
      [--dense_depth=1] [--box_yaw_only] [--class_weight=3] [--only_class] [--overfit]
  python -m benchmarks.study_vision_stage --records=W/records --pixel_mlp --steps=600

Trains what the vision stage (`--config.mode=vision`) trains, the tiny preset's aggregator with
the camera and object heads, on the records' training scenes (a new batch every step;
`--overfit`: one fixed batch), with the object and camera losses (`losses/objects.py`) summed
with weight 1, AdamW with warmup and cosine decay, and every 100 steps scores the first 16
held-out scenes. It also prints the baselines a model must beat to have learned anything: the
constant log-depth predictor and the class prior over object patches.

Options that change the objective, to find what makes it generalise:
  --dense_depth W   a linear head on every patch token regresses the mean log depth of its 2x2
                    sub-patches (floor included: the floor's tiles carry the metric scale), weight W
  --box_yaw_only    the yaw term only on boxes (a sphere's or cylinder's yaw is not observable)
  --class_weight K  the class cross-entropy weighted K instead of 1
  --only_class      the class cross-entropy alone
  --pixel_mlp       not the VGGT: an MLP on each patch's 3x3 neighbourhood of pixels (half
                    resolution) learns the class alone, a baseline for how hard the labels are
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs import student as student_configs
from data_pipelines import teacher_records as tr
from data_pipelines.input_pipeline import InputPipeline
from spatial_distill.losses.objects import camera_loss, object_loss, object_targets
from spatial_distill.models import student as student_lib
from spatial_distill.models.object_head import cameras as object_cameras
from spatial_distill.teacher import dump
from spatial_distill.train import vision

KEYS = ("class_acc", "log_z", "centre_err_view0_m", "colour", "log_size", "offset")
SCENE_KEYS = ("rgb", "depth", "intrinsics", "cam_to_world", "boxes", "box_mask", "labels")


class VisionSide(nnx.Module):
    """The student (only its vision side runs) and the optional dense depth head."""

    def __init__(self, student, token_dim: int):
        self.student = student
        self.dense = nnx.Linear(token_dim, 4, rngs=nnx.Rngs(0))


class PixelMLP(nnx.Module):
    def __init__(self):
        r = nnx.Rngs(0)
        self.l1, self.l2, self.l3 = (nnx.Linear(21 * 21 * 3, 256, rngs=r), nnx.Linear(256, 256, rngs=r),
                                     nnx.Linear(256, 3, rngs=r))

    def __call__(self, images):
        """images `[B, S, 112, 112, 3]` in [0, 1] -> class logits `[B, S, 64, 3]`."""
        b, s = images.shape[:2]
        pad = jnp.pad(images - 0.5, ((0, 0), (0, 0), (14, 14), (14, 14), (0, 0)))
        x = jnp.stack([pad[:, :, y * 14:y * 14 + 42:2, x * 14:x * 14 + 42:2]
                       for y in range(8) for x in range(8)], 2).reshape(b, s, 64, -1)
        return self.l3(jax.nn.gelu(self.l2(jax.nn.gelu(self.l1(x)))))


def patch_classes(targets, labels):
    owner = targets["patch_owner"]
    cls = jnp.take_along_axis(jnp.broadcast_to(jnp.maximum(labels, 0)[:, None], owner.shape[:2] + labels.shape[1:]),
                              jnp.maximum(owner, 0), axis=2)
    return cls, owner >= 0


def masked_mean(x, mask):
    return jnp.where(mask, x, 0.0).sum() / jnp.maximum(mask.sum(), 1)


def losses_of(model, batch, a, image_hw, patch):
    images = batch["rgb"].astype(jnp.float32) / 255.0
    t = object_targets(batch, patch=patch, stride=2, margin=0.02, min_fraction=0.02)
    cls, is_obj = patch_classes(t, batch["labels"])
    if a.pixel_mlp:
        logits = model(images)
        ce = masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits, cls), is_obj)
        return ce, {"objects/class_acc": masked_mean(jnp.argmax(logits, -1) == cls, is_obj)}
    student = model.student
    grid = (image_hw[0] // patch, image_hw[1] // patch)
    out = student.see(images, project=False)
    raw = out["object_raw"]
    extrinsics, intrinsics = object_cameras(out["pose_enc_list"][-1], image_hw)
    centres = student.object_head.centres(raw, extrinsics, intrinsics, grid, patch, train_views=False)
    parts = student.object_head.split(raw)
    loss_obj, metrics = object_loss(parts, centres, t, batch["labels"], patch=patch, grid_hw=grid)
    loss_cam, m = camera_loss(out["pose_enc_list"], batch["cam_to_world"], batch["intrinsics"], image_hw)
    metrics.update(m)
    ce = masked_mean(optax.softmax_cross_entropy_with_integer_labels(parts["class_logits"], cls), is_obj)
    if a.only_class:
        return ce, metrics
    total = loss_obj + loss_cam + (a.class_weight - 1.0) * ce
    if a.box_yaw_only:  # replace the yaw term by its boxes-only version
        attrs = jnp.take_along_axis(t["attributes"][:, None], jnp.maximum(t["patch_owner"], 0)[..., None], axis=2)
        err = jnp.abs(parts["yaw2"] - attrs[..., 6:8]).sum(-1)
        n = jnp.maximum(is_obj.sum(), 1)
        total += (jnp.where(is_obj & (cls == 0), err, 0.0).sum() - jnp.where(is_obj, err, 0.0).sum()) / n
    if a.dense_depth:
        b, s, hh, ww = batch["depth"].shape
        d = batch["depth"].reshape(b, s, grid[0], 2, patch // 2, grid[1], 2, patch // 2)
        d = d.transpose(0, 1, 2, 5, 3, 6, 4, 7).reshape(b, s, grid[0] * grid[1], 4, -1)
        valid = d > 0
        target = jnp.where(valid, jnp.log(jnp.maximum(d, 1e-3)), 0.0).sum(-1) / jnp.maximum(valid.sum(-1), 1)
        ok = valid.any(-1)
        dense = masked_mean(jnp.abs(model.dense(out["patches"]) - target), ok)
        metrics["objects/dense_log_depth"] = dense
        total += a.dense_depth * dense
    return total, metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", required=True, help="a workdir's records (train and eval splits)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--overfit", action="store_true")
    p.add_argument("--dense_depth", type=float, default=0.0)
    p.add_argument("--box_yaw_only", action="store_true")
    p.add_argument("--class_weight", type=float, default=1.0)
    p.add_argument("--only_class", action="store_true")
    p.add_argument("--pixel_mlp", action="store_true")
    a = p.parse_args()

    config = dump.with_record_lengths(student_configs.get_config("tiny"), tr.read_meta(a.records), a.records)
    size = config.data.image_size
    cfg = vision.stage_config(config, "unused")
    student = student_lib.create(student_lib.config_from(cfg.model, size), 0)
    patch = student.cfg.aggregator.patch_size
    model = PixelMLP() if a.pixel_mlp else VisionSide(student, 2 * cfg.model.vision.embed_dim)
    shapes = dict(image_size=(size, size), max_questions=config.input.max_questions,
                  max_prompt_len=config.input.max_prompt_len, max_answer_len=config.input.max_answer_len,
                  max_boxes=config.input.max_boxes)
    train = InputPipeline(a.records, "train", batch_size=a.batch, seed=0, **shapes)
    held = next(InputPipeline(a.records, "eval", batch_size=16, seed=0, shuffle=False, num_epochs=1, **shapes))
    held = {k: jnp.asarray(held[k]) for k in SCENE_KEYS}
    fixed = {k: jnp.asarray(v) for k, v in next(train).items() if k in SCENE_KEYS}

    # Baselines on the held-out patches: the median training log depth, the majority class.
    base = [{k: jnp.asarray(v) for k, v in next(train).items() if k in SCENE_KEYS} for _ in range(8)]

    def patch_log_z_and_class(b):
        t = object_targets(b, patch=patch, stride=2, margin=0.02, min_fraction=0.02)
        cls, is_obj = patch_classes(t, b["labels"])
        z = jnp.take_along_axis(t["uvz"][..., 2], jnp.maximum(t["patch_owner"], 0), axis=2)
        return np.log(np.asarray(z))[np.asarray(is_obj)], np.asarray(cls)[np.asarray(is_obj)]
    tz, tc = map(np.concatenate, zip(*map(patch_log_z_and_class, base)))
    hz, hc = patch_log_z_and_class(held)
    print(f"baselines on held-out object patches: constant log depth L1 {np.abs(hz - np.median(tz)).mean():.3f}, "
          f"class prior accuracy {(hc == np.bincount(tc).argmax()).mean():.3f}", flush=True)

    warmup = min(a.warmup, a.steps // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, a.lr, warmup, a.steps)
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0),
                                                 optax.adamw(schedule, weight_decay=0.01)), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, batch):
        (loss, metrics), grads = nnx.value_and_grad(
            lambda m: losses_of(m, batch, a, (size, size), patch), has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, metrics

    @nnx.jit
    def evaluate(model, batch):
        return losses_of(model, batch, a, (size, size), patch)[1]

    def show(metrics):
        return "  ".join(f"{k} {float(metrics['objects/' + k]):.3f}" for k in KEYS if "objects/" + k in metrics)

    t0 = time.time()
    for step in range(1, a.steps + 1):
        batch = fixed if a.overfit else {k: jnp.asarray(v) for k, v in next(train).items() if k in SCENE_KEYS}
        loss, metrics = train_step(model, optimizer, batch)
        if step % 100 == 0 or step == a.steps:
            print(f"step {step:5d} ({time.time() - t0:4.0f} s) loss {float(loss):.3f}\n"
                  f"  train     {show(metrics)}\n  held-out  {show(evaluate(model, held))}", flush=True)


if __name__ == "__main__":
    main()
