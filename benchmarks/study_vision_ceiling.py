"""How well could any decoder answer from what the vision side sees? (issue 10)

For held-out synthetic scenes, each object's attributes are read off the object head
(`models/object_head.py`) as the objectness-weighted mean of the per-patch fields of the patches
that see it (the ground-truth ownership of `losses/objects.py` does the binding, so this is an
upper bound: binding is given), turned back into a solid (class, box, yaw) and every grounded
question is decided on those solids with the dataset's own rules (`data_pipelines/spatial_qa.py`,
without its ambiguity bands; "touching" within `--contact_tol`). A decoder reading the same
fields cannot beat this by much, so below the goal here the vision side is the bottleneck.

    python -m benchmarks.study_vision_ceiling [--checkpoint=W/vision/vggt.safetensors] \
        [--scenes=48] [--views=all|first] [--keep=64]

Prints per-kind accuracy (also by the number of objects in the scene) and the per-object errors
(centre in metres, log-size L1, class accuracy). `--keep=K` reads objects only from the K patches
(over all views) the object head finds objects in most surely: the tokens `vision_pool=objects<K>`
hands the decoder, so a budget too small for crowded scenes shows as a drop there.

    python -m benchmarks.study_vision_ceiling --noise_sweep=0,0.02,0.05,0.1,0.15,0.2 [--scenes=200]

answers the converse: how precise must the fields be? No model runs; every object is its exact
solid with isotropic Gaussian noise of sigma metres on the centre (and sigma / 0.5 m on the
log sizes, the shipped fields' ratio of log-size to centre error), decided by the same rules,
beside how many pixels the gaps of the "not touching" questions span in their best view.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import student as student_config
from data_pipelines import spatial_qa, synthetic
from spatial_distill import geometry
from spatial_distill.losses import objects as objects_loss
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
    p.add_argument("--contact_tol", type=float, default=0.05, help="metres of gap still 'touching'")
    p.add_argument("--noise_sweep", default="",
                   help="comma-separated centre noise sigmas (m): exact solids plus noise, no model")
    a = p.parse_args()
    if a.noise_sweep:
        return noise_sweep(a)

    config = student_config.get_config("tiny")
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
        return fields, t["patch_owner"], t["attributes"]

    scenes = [synthetic.generate_scene(synthetic.scene_seed(a.split_seed, i), image_size=(size, size))
              for i in range(a.scenes)]
    right = {k: [] for k in KINDS}
    by_count = {}  # objects in the scene -> proximity right/wrong
    centre_err, size_err, class_ok = [], [], []
    n = max(len(s.boxes) for s in scenes)
    for start in range(0, len(scenes), 8):
        chunk = scenes[start:start + 8]
        batch = vision.scene_batch(chunk, n)
        fields, owner, attrs = map(np.asarray, read(model, {k: jnp.asarray(v) for k, v in batch.items()}))
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
            for o in range(len(scene.boxes)):
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
                    ok = 0.5
                else:
                    yes = decide(relation_name(qa, scene.label_names), solids[s], solids[r], pose0, a.contact_tol)
                    ok = float(yes == (qa.answer == "yes"))
                right[qa.kind].append(ok)
                if qa.kind == "proximity":
                    by_count.setdefault(len(scene.boxes), []).append(ok)
    print(f"vision ceiling: {a.checkpoint}, {a.scenes} held-out scenes (split seed {a.split_seed}), "
          f"objects read from {a.views} views" + (f", {a.keep} most object-like patches" if a.keep else "")
          + ", binding given")
    print("  accuracy  " + "  ".join(f"{k} {np.mean(right[k]):.3f}" for k in KINDS))
    print("  proximity by objects in the scene  " + "  ".join(
        f"{n}: {np.mean(v):.3f} ({len(v)})" for n, v in sorted(by_count.items())))
    print(f"  objects   centre err {np.mean(centre_err):.3f} m, log-size L1 {np.mean(size_err):.3f}, "
          f"class acc {np.mean(class_ok):.3f} ({len(centre_err)} seen objects)")


if __name__ == "__main__":
    main()
