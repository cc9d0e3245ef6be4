"""How well could any decoder answer from what the vision side sees? (issue 10)

For held-out synthetic scenes, each object's attributes are read off the object head
(`models/object_head.py`) as the objectness-weighted mean of the per-patch fields of the patches
that see it (the ground-truth ownership of `losses/objects.py` does the binding, so this is an
upper bound: binding is given), turned back into a solid (class, box, yaw) and every grounded
question is decided on those solids with the dataset's own rules (`data_pipelines/spatial_qa.py`,
without its ambiguity bands; "touching" within `--contact_tol`). A decoder reading the same
fields cannot beat this by much, so below the goal here the vision side is the bottleneck.

    python -m benchmarks.study_vision_ceiling [--checkpoint=W/vision/vggt.safetensors] \
        [--scenes=48] [--views=all|first] [--keep=64] [--image_size=112 [--pos_embed_size=112]]

Prints per-kind accuracy (also by the number of objects in the scene) and the per-object errors
(centre in metres, log-size L1, class accuracy). `--keep=K` reads objects only from the K patches
(over all views) the object head finds objects in most surely: the tokens `vision_pool=objects<K>`
hands the decoder, so a budget too small for crowded scenes shows as a drop there. `--slots=K`
reads each object from the slot `vision_pool=slots<K>` makes of it instead (`models/slots.py`,
the student's radius and thresholds): the slot holding most of it among those it dominates,
none if it dominates no slot; it also prints slot coverage and purity by the number of objects.
`--answers=FILE` writes every grounded question's ceiling answer in the format of the eval
stage's predictions.jsonl ("unseen" where an object was not seen), so `python -m
benchmarks.study_learning overlap` can set a student's errors against the ceiling's.

    python -m benchmarks.study_vision_ceiling --noise_sweep=0,0.02,0.05,0.1,0.15,0.2 [--scenes=200]

answers the converse: how precise must the fields be? No model runs; every object is its exact
solid with isotropic Gaussian noise of sigma metres on the centre (and sigma / 0.5 m on the
log sizes, the shipped fields' ratio of log-size to centre error), decided by the same rules,
beside how many pixels the gaps of the "not touching" questions span in their best view.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import student as student_config
from data_pipelines import spatial_qa, synthetic
from spatial_distill import geometry
from spatial_distill.losses import objects as objects_loss
from spatial_distill.models import object_head, slots
from spatial_distill.train import vision

KINDS = ("proximity", "contact", "size", "orientation")


def decide(name: str, a: spatial_qa.Primitive, b: spatial_qa.Primitive, pose0: np.ndarray,
           contact_tol: float) -> bool:
    """`spatial_qa.relation` without its ambiguity bands (a forced yes/no on predicted solids)."""
    if name in ("near", "touching", "on_top"):
        gap = spatial_qa.surface_gap(a, b)
        if name == "near":
            return gap < spatial_qa.NEAR
        touching = gap <= contact_tol
        return touching if name == "touching" else touching and a.center[2] > b.center[2]
    if name in ("bigger", "smaller"):
        return (a.volume() > b.volume()) == (name == "bigger")
    ca, cb = spatial_qa.camera_centre(a, pose0), spatial_qa.camera_centre(b, pose0)
    if name in ("left", "right"):
        return (ca[0] < cb[0]) == (name == "left")
    return (ca[2] < cb[2]) == (name == "in_front")


def solid(fields: np.ndarray, num_classes: int, pose0: np.ndarray, heading: float) -> spatial_qa.Primitive:
    """One object's mean fields (`ObjectHead.features` layout) -> a world-frame solid."""
    c = num_classes
    kind = spatial_qa.KINDS[int(np.argmax(fields[1:1 + c]))]
    centre, log_size, yaw2 = fields[4 + c:7 + c], fields[7 + c:10 + c], fields[10 + c:12 + c]
    size = np.exp(log_size).astype(np.float64)
    if kind == "sphere":
        size[:] = size.mean()
    elif kind == "cylinder":
        size[:2] = size[:2].mean()
    psi = 0.5 * np.arctan2(yaw2[1], yaw2[0])
    return spatial_qa.Primitive(kind, pose0[:3, :3] @ centre + pose0[:3, 3], size, psi + heading)


def slot_objects(weights: np.ndarray, objectness: np.ndarray, owner: np.ndarray, num_objects: int):
    """Which slot stands for which object.

    weights `[k, P]` slot membership (`slots.group`, rows sum to 1 or 0), objectness `[P]`, owner
    `[P]` the object each patch sees (-1: none). A slot belongs to the object holding most of its
    weight (background counts as a rival); an object is read from the slot, of those it
    dominates, that holds most of its objectness (its main piece, not a one-patch fragment).
    Returns (slot per object `[num_objects]`, -1 where it dominates none; purity per non-empty
    slot: its owner's share of its weight).
    """
    held = (weights > 0) * objectness  # [k, P]: the objectness each slot took from each patch
    mass = np.stack([held[:, owner == o].sum(-1) for o in range(num_objects)]
                    + [held[:, owner < 0].sum(-1)], -1)  # [k, num_objects + 1]; last: background
    used = weights.sum(-1) > 0
    top = np.argmax(mass, -1)
    best = np.full(num_objects, -1)
    for o in range(num_objects):
        mine = np.flatnonzero(used & (top == o))
        if mine.size:
            best[o] = mine[np.argmax(mass[mine, o])]
    return best, mass[used].max(-1) / mass[used].sum(-1)


def noisy_ceiling(layouts, sigma: float, contact_tol: float, seed: int = 0) -> dict[str, float]:
    """Per-kind accuracy when each object is its exact solid with N(0, sigma) on every centre
    coordinate and N(0, sigma / 0.5) on every log size (kind and yaw exact)."""
    rng = np.random.default_rng(seed)
    right = {k: [] for k in KINDS}
    for lay, qa in layouts:
        noisy = [spatial_qa.Primitive(p.kind, p.center + rng.normal(0, sigma, 3),
                                      p.size * np.exp(rng.normal(0, sigma / 0.5, 3)), p.yaw)
                 for p in lay.prims]
        for p in noisy:  # keep the kinds' shape constraints
            if p.kind == "sphere":
                p.size[:] = p.size.mean()
            elif p.kind == "cylinder":
                p.size[:2] = p.size[:2].mean()
        for q in qa:
            if q.kind in right:
                s, r = q.subjects
                yes = decide(relation_name(q, lay.names), noisy[s], noisy[r], lay.cam_to_world[0], contact_tol)
                right[q.kind].append(float(yes == (q.answer == "yes")))
    return {k: float(np.mean(v)) for k, v in right.items()}


def relation_name(qa, names) -> str:
    s, r = qa.subjects
    return next(k for k, (_, template, _) in spatial_qa.RELATIONS.items()
                if template.format(a=names[s], b=names[r]) == qa.question)


def gap_pixels(layouts) -> np.ndarray:
    """For every "not touching" question: its surface gap in pixels in the view that shows it
    widest (focal length x gap / depth of the nearer object's centre)."""
    px = []
    for lay, qa in layouts:
        f = float(lay.intrinsics[0, 0])
        for q in qa:
            if q.kind == "contact" and q.answer == "no" and relation_name(q, lay.names) == "touching":
                a, b = (lay.prims[i] for i in q.subjects)
                gap = spatial_qa.surface_gap(a, b)
                depth = [min(spatial_qa.camera_centre(a, pose)[2], spatial_qa.camera_centre(b, pose)[2])
                         for pose in lay.cam_to_world]
                px.append(f * gap / max(min(depth), 1e-3))
    return np.array(px)


def noise_sweep(a) -> None:
    layouts = []
    for i in range(a.scenes):
        lay = synthetic.sample_layout(synthetic.scene_seed(a.split_seed, i))
        layouts.append((lay, spatial_qa.generate_qa(lay.prims, lay.names, lay.cam_to_world[0], lay.qa_rng)))
    print(f"precision needed: exact solids + centre noise sigma, {a.scenes} held-out scenes "
          f"(split seed {a.split_seed}), 'touching' within {a.contact_tol} m")
    for sigma in (float(s) for s in a.noise_sweep.split(",")):
        acc = noisy_ceiling(layouts, sigma, a.contact_tol)
        print(f"  sigma {sigma:.3f} m (mean centre err {sigma * 1.596:.3f} m)  "
              + "  ".join(f"{k} {acc[k]:.3f}" for k in KINDS))
    px = gap_pixels(layouts)
    print(f"  'not touching' gaps in their best view: p10 {np.percentile(px, 10):.1f} px, "
          f"median {np.median(px):.1f} px, under 2 px {np.mean(px < 2):.3f} ({len(px)} questions)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=student_config.TINY_VISION_CHECKPOINT)
    p.add_argument("--scenes", type=int, default=48)
    p.add_argument("--split_seed", type=int, default=1, help="held-out scenes (the eval split's seed)")
    p.add_argument("--views", choices=("all", "first"), default="all",
                   help="read each object from the patches of every view or of view 0 only")
    p.add_argument("--keep", type=int, default=0,
                   help="read objects only from the K most object-like patches (0: all), as objects<K>")
    p.add_argument("--slots", type=int, default=0,
                   help="read each object from its slot of vision_pool=slots<K> (0: from its patches)")
    p.add_argument("--image_size", type=int, default=0,
                   help="render the scenes at this size (0: the tiny preset's)")
    p.add_argument("--pos_embed_size", type=int, default=0,
                   help="the image size the checkpoint's position embeddings were made for "
                        "(0: --image_size; 112 for a stage continued from the shipped weights)")
    p.add_argument("--answers", default="", help="write each question's ceiling answer here (jsonl)")
    p.add_argument("--contact_tol", type=float, default=0.05, help="metres of gap still 'touching'")
    p.add_argument("--noise_sweep", default="",
                   help="comma-separated centre noise sigmas (m): exact solids plus noise, no model")
    a = p.parse_args()
    if a.noise_sweep:
        return noise_sweep(a)

    if a.keep and a.slots:
        p.error("--keep and --slots are two different poolings; pass one")
    config = student_config.get_config("tiny")
    if a.image_size:  # scenes rendered larger or smaller than the preset's
        config.data.image_size = a.image_size
    # The checkpoint's position-embedding grid is the size it was first trained at; a stage
    # continued at another size keeps it (interpolated at run time).
    config.model.vision.pos_embed_size = a.pos_embed_size or config.data.image_size
    size = config.data.image_size
    model = vision.student_with_vision(config, a.checkpoint)
    patch = model.cfg.aggregator.patch_size
    num_classes = model.cfg.object_head.num_classes

    @nnx.jit
    def read(model, batch):
        seen = model.see(batch["rgb"].astype(jnp.float32) / 255.0, project=False)
        fields = model.object_head.features(seen["object_raw"], seen["pose_enc_list"][-1], (size, size), patch)
        t = objects_loss.object_targets(batch, patch=patch, stride=config.loss.object_stride,
                                        margin=config.loss.object_margin,
                                        min_fraction=config.loss.object_min_fraction)
        weights = jnp.zeros((0,))
        if a.slots:
            flat = fields.reshape(fields.shape[0], -1, fields.shape[-1])
            f = object_head.split_features(flat, num_classes)
            weights = slots.group(f["objectness"], f["centre"], f["colour"], f["class_probs"], a.slots,
                                  radius=model.cfg.slot_radius, colour_scale=model.cfg.slot_colour_scale,
                                  min_objectness=model.cfg.slot_min_objectness)
        return fields, t["patch_owner"], t["attributes"], weights

    scenes = [synthetic.generate_scene(synthetic.scene_seed(a.split_seed, i), image_size=(size, size))
              for i in range(a.scenes)]
    right = {k: [] for k in KINDS}
    by_count = {}  # objects in the scene -> proximity right/wrong
    centre_err, size_err, class_ok = [], [], []
    answers = []  # predictions.jsonl rows
    slot_stats = {}  # objects in the scene -> [objects covered, objects, slots used, purities]
    n = max(len(s.boxes) for s in scenes)
    for start in range(0, len(scenes), 8):
        chunk = scenes[start:start + 8]
        batch = vision.scene_batch(chunk, n)
        fields, owner, attrs, weights = map(np.asarray, read(model, {k: jnp.asarray(v) for k, v in batch.items()}))
        for i, scene in enumerate(chunk):
            kept = np.ones(owner[i].shape, bool)
            if a.keep:  # top-k objectness over every view's patches, as the student's pooling
                flat = fields[i][..., 0].reshape(-1)
                kept = np.zeros(flat.shape, bool)
                kept[np.argsort(-flat, kind="stable")[:a.keep]] = True
                kept = kept.reshape(owner[i].shape)
            pose0 = scene.cam_to_world[0].astype(np.float64)
            heading = float(geometry.camera0_heading(jnp.asarray(scene.cam_to_world[None]))[0])
            solids = []
            if a.slots:
                flat = fields[i].reshape(-1, fields.shape[-1])
                slot_of, purity = slot_objects(weights[i], flat[:, 0], owner[i].reshape(-1), len(scene.boxes))
                st = slot_stats.setdefault(len(scene.boxes), [0, 0, 0, []])
                st[0] += int((slot_of >= 0).sum())
                st[1] += len(scene.boxes)
                st[2] += len(purity)
                st[3].extend(purity.tolist())
            for o in range(len(scene.boxes)):
                if a.slots:
                    if slot_of[o] < 0:
                        solids.append(None)
                        continue
                    mean = weights[i][slot_of[o]] @ flat
                else:
                    mine = (owner[i] == o) & kept
                    if a.views == "first":
                        mine[1:] = False
                    if not mine.any():
                        solids.append(None)
                        continue
                    w = fields[i][..., 0][mine]
                    mean = (fields[i][mine] * w[:, None]).sum(0) / max(w.sum(), 1e-6)
                c = num_classes
                centre_err.append(np.linalg.norm(mean[4 + c:7 + c] - attrs[i, o, :3]))
                size_err.append(np.abs(mean[7 + c:10 + c] - attrs[i, o, 3:6]).mean())
                class_ok.append(int(np.argmax(mean[1:1 + c])) == int(scene.labels[o]))
                solids.append(solid(mean, num_classes, pose0, heading))
            for qa in scene.qa:
                if qa.kind not in right:
                    continue
                s, r = qa.subjects
                if solids[s] is None or solids[r] is None:  # an unseen object: a coin flip
                    ok, said = 0.5, "unseen"
                else:
                    yes = decide(relation_name(qa, scene.label_names), solids[s], solids[r], pose0, a.contact_tol)
                    ok, said = float(yes == (qa.answer == "yes")), "yes" if yes else "no"
                answers.append({"sample_id": scene.sample_id, "kind": qa.kind, "question": qa.question,
                                "answer": said, "gt": qa.answer})
                right[qa.kind].append(ok)
                if qa.kind == "proximity":
                    by_count.setdefault(len(scene.boxes), []).append(ok)
    print(f"vision ceiling: {a.checkpoint}, {a.scenes} held-out scenes (split seed {a.split_seed}), "
          f"objects read from {a.views} views" + (f", {a.keep} most object-like patches" if a.keep else "")
          + (f", their slots of slots{a.slots}" if a.slots else "")
          + ", binding given")
    print("  accuracy  " + "  ".join(f"{k} {np.mean(right[k]):.3f}" for k in KINDS))
    print("  proximity by objects in the scene  " + "  ".join(
        f"{n}: {np.mean(v):.3f} ({len(v)})" for n, v in sorted(by_count.items())))
    print(f"  objects   centre err {np.mean(centre_err):.3f} m, log-size L1 {np.mean(size_err):.3f}, "
          f"class acc {np.mean(class_ok):.3f} ({len(centre_err)} seen objects)")
    if a.answers:
        with open(a.answers, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in answers)
        print(f"  answers: {a.answers} ({len(answers)} questions)")
    if a.slots:
        print("  slots by objects in the scene (objects with a slot of their own / slots used per scene "
              "/ mean purity)  " + "  ".join(
                  f"{n}: {c / t:.3f} / {u / (t / n):.1f} / {np.mean(pu):.2f}"
                  for n, (c, t, u, pu) in sorted(slot_stats.items())))


if __name__ == "__main__":
    main()
