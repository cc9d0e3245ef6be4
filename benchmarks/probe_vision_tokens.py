"""Do the student's vision tokens carry object positions? A linear probe on held-out scenes.

  python -m benchmarks.probe_vision_tokens [--checkpoint=PATH] [--train=400] [--eval=100]

For each patch token that sees an object (ownership from GT depth and boxes, as the object loss
defines it), a ridge regression from the token to that object's centre in camera 0's frame is
fitted on training scenes and scored (R² per axis, mean error in metres) on held-out scenes.
Token variants: the aggregator's patch features of a randomly initialised VGGT, of the
pretrained one (`--checkpoint`, default the tiny preset's), and the pretrained features with the
object head's fields appended (what the tiny student's decoder reads). Scenes are generated from
the train / eval seed streams of config seed 0 (the eval stream is never trained on).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import student as student_configs
from data_pipelines import synthetic
from spatial_distill.losses import objects as ol
from spatial_distill.models import student as st
from spatial_distill.models import word_tags
from spatial_distill.train import vision


def scenes(split_seed: int, n: int, size: int):
    return [synthetic.generate_scene(synthetic.scene_seed(split_seed, i), image_size=(size, size))
            for i in range(n)]


def tokens_and_targets(model, samples, batch: int = 16):
    """(tokens `[M, D]`, fields `[M, F]` or None, centres `[M, 3]`) over object-owned patches."""
    see = nnx.jit(lambda m, x: m.see(x))
    feats, fields, centres = [], [], []
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        n = max(len(s.boxes) for s in chunk)
        b = {"rgb": np.stack([s.rgb for s in chunk]), "depth": np.stack([s.depth for s in chunk]),
             "intrinsics": np.stack([s.intrinsics for s in chunk]),
             "cam_to_world": np.stack([s.cam_to_world for s in chunk]),
             "boxes": np.stack([np.pad(s.boxes, ((0, n - len(s.boxes)), (0, 0))) for s in chunk]),
             "box_mask": np.stack([np.arange(n) < len(s.boxes) for s in chunk])}
        out = see(model, jnp.asarray(b["rgb"], jnp.float32) / 255.0)
        t = ol.object_targets({k: jnp.asarray(v) for k, v in {**b, "labels": np.zeros((len(chunk), n), np.int32)}.items()},
                              patch=14, stride=2, margin=0.02, min_fraction=0.02)
        owner = np.asarray(t["patch_owner"])
        keep = owner >= 0
        attrs = np.asarray(t["attributes"])
        centres.append(np.take_along_axis(attrs[:, None], np.maximum(owner, 0)[..., None], 2)[keep][:, :3])
        feats.append(np.asarray(out["patches"])[keep])
        if model.object_head is not None:
            p = model.cfg.aggregator.patch_size
            f = model.object_head.features(out["object_raw"], out["pose_enc_list"][-1], b["rgb"].shape[2:4], p)
            fields.append(np.asarray(f)[keep])
    return np.concatenate(feats), (np.concatenate(fields) if fields else None), np.concatenate(centres)


def ridge(x_train, y_train, x_eval, y_eval, lam: float = 1e-2) -> dict:
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a = np.c_[(x_train - mu) / sd, np.ones(len(x_train))]
    w = np.linalg.solve(a.T @ a + lam * len(a) * np.eye(a.shape[1]), a.T @ y_train)
    pred = np.c_[(x_eval - mu) / sd, np.ones(len(x_eval))] @ w
    r2 = 1 - ((pred - y_eval) ** 2).sum(0) / ((y_eval - y_eval.mean(0)) ** 2).sum(0)
    return {"r2_xyz": [round(float(v), 3) for v in r2],
            "mean_err_m": round(float(np.linalg.norm(pred - y_eval, axis=1).mean()), 3),
            "patches": int(len(y_eval))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=student_configs.TINY_VISION_CHECKPOINT)
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--eval", type=int, default=100)
    a = p.parse_args()
    config = student_configs.get_config("tiny")
    size = config.data.image_size
    train, held_out = scenes(0, a.train, size), scenes(1, a.eval, size)
    random_cfg = st.config_from(config.model, size, word_tags.StandInIds())
    models = {"random VGGT, patch features": st.create(random_cfg, 0),
              "pretrained VGGT, patch features": vision.student_with_vision(config, a.checkpoint)}
    results = {}
    for name, model in models.items():
        f_tr, o_tr, y_tr = tokens_and_targets(model, train)
        f_ev, o_ev, y_ev = tokens_and_targets(model, held_out)
        results[name] = ridge(f_tr, y_tr, f_ev, y_ev)
        if name.startswith("pretrained"):
            results["pretrained VGGT, features + object fields"] = ridge(
                np.c_[f_tr, o_tr], y_tr, np.c_[f_ev, o_ev], y_ev)
            # The object fields' own centre channels, read directly (no fit).
            err = np.linalg.norm(o_ev[:, 7:10] - y_ev, axis=1)
            results["object head's composed centres (no probe)"] = {"mean_err_m": round(float(err.mean()), 3)}
    baseline = float(np.linalg.norm(y_ev - y_tr.mean(0), axis=1).mean())
    results["predict the training mean"] = {"mean_err_m": round(baseline, 3)}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    jax.config.update("jax_threefry_partitionable", True)
    main()
