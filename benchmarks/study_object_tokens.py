"""Learnability probe: can the student's decoder learn the relations from *perfect* object tokens?

  python -m benchmarks.study_object_tokens --workdir=W --steps=1000   # W: a main-job workdir

Takes vision out of the question. Each scene becomes one token per object holding its exact
attributes (colour and shape one-hot, 3D box centre and size, yaw as cos/sin), projected to the
decoder width and followed by the question; the decoder is the configured preset's (`tiny` by
default), trained from scratch with cross-entropy on the yes/no answer (AdamW, warmup then
constant). Every `--eval_every` steps it prints the held-out scenes' accuracy per kind, scored as
`logit(yes) > logit(no)` at the answer position. If this probe stays at the text prior, no
vision encoder, pooling or view count can make the student learn the relations in that many
steps: the bottleneck is the decoder learning to bind "the red box" to one object token.

Reads the scenes (`W/data/{train,eval}`) and tokenizer (`W/tokenizer`) the main job wrote.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs import student as student_configs
from data_pipelines import scannet, synthetic
from data_pipelines.spatial_qa import KINDS as SHAPES
from spatial_distill import geometry
from spatial_distill import tokenizer as tokenizer_lib
from spatial_distill.models import student as student_lib
from spatial_distill.models.llama import Llama

COLOURS = tuple(synthetic.PALETTE)
BINARY_KINDS = ("proximity", "contact", "size", "orientation")


def num_features(colour: str) -> int:
    return (len(COLOURS) if colour == "onehot" else 3) + len(SHAPES) + 3 + 3 + 2


def object_tokens(scene, max_objects: int, *, frame: str = "world", colour: str = "onehot") -> np.ndarray:
    """`[max_objects, F]` exact attributes of each object (zero rows pad): colour (palette one-hot,
    or its RGB albedo), shape one-hot, centre, size, (cos, sin) of yaw; centre and yaw in the world
    frame or camera 0's (`geometry.box_attributes`: OpenCV centre, yaw as cos/sin 2ψ)."""
    out = np.zeros((max_objects, num_features(colour)), np.float32)
    if len(scene.boxes) > max_objects:
        raise ValueError(f"{scene.sample_id}: {len(scene.boxes)} objects > --max_objects {max_objects}")
    cam0 = np.asarray(geometry.box_attributes(jnp.asarray(scene.boxes)[None],
                                              jnp.asarray(scene.cam_to_world)[None]))[0]
    for i, (box, label, name) in enumerate(zip(scene.boxes, scene.labels, scene.label_names)):
        c = COLOURS.index(name.split()[0])
        col = np.eye(len(COLOURS))[c] if colour == "onehot" else np.asarray(synthetic.PALETTE[COLOURS[c]])
        shape = np.eye(len(SHAPES))[int(label)]
        if frame == "camera0":
            geo = np.concatenate([cam0[i, :3], box[3:6], cam0[i, 6:8]])
        else:
            geo = np.concatenate([box[:3], box[3:6], [np.cos(box[6]), np.sin(box[6])]])
        out[i] = np.concatenate([col, shape, geo])
    return out


def load_split(root: str, tok, *, max_objects: int, max_questions: int, max_len: int,
               frame: str = "world", colour: str = "onehot"):
    """Object tokens `[N, O, F]`, question ids/mask `[N, Q, L]`, answers `[N, Q]` (1 = yes), kind
    index `[N, Q]` (-1 = no question) and the (subject, reference) object ids `[N, Q, 2]` for
    every scene under `root`."""
    scenes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    objs = np.zeros((len(scenes), max_objects, num_features(colour)), np.float32)
    ids = np.zeros((len(scenes), max_questions, max_len), np.int32)
    mask = np.zeros((len(scenes), max_questions, max_len), bool)
    kind = np.full((len(scenes), max_questions), -1, np.int32)
    yes = np.zeros((len(scenes), max_questions), bool)
    subjects = np.zeros((len(scenes), max_questions, 2), np.int32)
    for n, name in enumerate(scenes):
        scene = scannet.read_scene(os.path.join(root, name), num_views=1)
        objs[n] = object_tokens(scene, max_objects, frame=frame, colour=colour)
        qas = [qa for qa in scene.qa if qa.kind in BINARY_KINDS][:max_questions]
        for q, qa in enumerate(qas):
            t = tok.encode(qa.question)[:max_len]
            ids[n, q, :len(t)], mask[n, q, :len(t)] = t, True
            kind[n, q] = BINARY_KINDS.index(qa.kind)
            yes[n, q] = qa.answer == "yes"
            subjects[n, q] = qa.subjects[:2]
    return objs, ids, mask, yes, kind, subjects


class Probe(nnx.Module):
    def __init__(self, decoder_cfg, features: int, *, rngs: nnx.Rngs):
        self.proj = nnx.Linear(features, decoder_cfg.hidden_size, rngs=rngs)
        self.decoder = Llama(decoder_cfg, rngs=rngs)
        # The readout: the answer position's hidden state -> (subject, reference) attributes.
        self.readout = nnx.Linear(decoder_cfg.hidden_size, 2 * features, rngs=rngs)

    def __call__(self, objs, ids, mask):
        """objs `[B, O, F]`, ids/mask `[B, Q, L]` -> next-token logits after each question
        `[B, Q, V]` and the readout `[B, Q, 2, F]`."""
        b, q, length = ids.shape
        o, d = objs.shape[1], self.decoder.config.hidden_size
        prefix = jnp.broadcast_to(self.proj(objs)[:, None], (b, q, o, d)).reshape(b * q, o, d)
        x = jnp.concatenate([prefix, self.decoder.embed(ids.reshape(b * q, length))], axis=1)
        valid = jnp.concatenate([jnp.ones((b * q, o), bool), mask.reshape(b * q, length)], axis=1)
        positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
        h, _ = self.decoder.hidden(x, positions=positions, segment_ids=valid.astype(jnp.int32))
        last = o + mask.reshape(b * q, length).sum(-1) - 1
        h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
        return (self.decoder.logits(h_last[:, None])[:, 0].reshape(b, q, -1),
                self.readout(h_last).reshape(b, q, 2, objs.shape[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="main-job workdir (data/ and tokenizer/)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--max_len", type=int, default=14, help="question tokens kept (the probe cuts longer ones)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--eval_every", type=int, default=200)
    p.add_argument("--max_objects", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frame", choices=("world", "camera0"), default="world")
    p.add_argument("--colour", choices=("onehot", "rgb"), default="onehot")
    p.add_argument("--readout", type=float, default=0.0,
                   help="weight of the readout loss: MSE of the referred objects' attributes")
    a = p.parse_args()

    tok = tokenizer_lib.load_tokenizer(os.path.join(a.workdir, "tokenizer"))
    yes_id, no_id = tok.encode("yes")[0], tok.encode("no")[0]
    config = student_configs.get_config(a.preset)
    decoder_cfg = student_lib.config_from(config.model, config.data.image_size, tok).decoder
    tokenizer_lib.check_vocab(tok, decoder_cfg.vocab_size, what=f"{a.preset} decoder")
    limits = dict(max_objects=a.max_objects, max_questions=16, max_len=a.max_len,
                  frame=a.frame, colour=a.colour)
    train = load_split(os.path.join(a.workdir, "data", "train"), tok, **limits)
    held_out = load_split(os.path.join(a.workdir, "data", "eval"), tok, **limits)
    print(f"{len(train[0])} train / {len(held_out[0])} held-out scenes; decoder "
          f"{decoder_cfg.num_layers} x {decoder_cfg.hidden_size}, lr {a.learning_rate}, "
          f"{a.frame} frame, {a.colour} colour, readout weight {a.readout}")

    model = Probe(decoder_cfg, train[0].shape[-1], rngs=nnx.Rngs(a.seed))
    schedule = optax.join_schedules([optax.linear_schedule(0.0, a.learning_rate, 30),
                                     optax.constant_schedule(a.learning_rate)], [30])
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def targets(yes):
        return jnp.where(yes, yes_id, no_id)

    @nnx.jit
    def step(model, optimizer, objs, ids, mask, yes, kind, subjects):
        def loss_fn(model):
            logits, readout = model(objs, ids, mask)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets(yes))
            real = kind >= 0
            want = jnp.take_along_axis(objs[:, None], subjects[..., None], axis=2)  # [B, Q, 2, F]
            mse = ((readout - want) ** 2).sum((-1, -2))
            return ((ce + a.readout * mse) * real).sum() / real.sum()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def says_yes(model, objs, ids, mask):
        logits = model(objs, ids, mask)[0]
        return logits[..., yes_id] > logits[..., no_id]

    def accuracy() -> dict[str, float]:
        objs, ids, mask, yes, kind, _ = held_out
        pred = np.concatenate([np.asarray(says_yes(model, objs[i:i + 50], ids[i:i + 50], mask[i:i + 50]))
                               for i in range(0, len(objs), 50)])
        ok = pred == yes
        return {k: round(float(ok[kind == i].mean()), 3) for i, k in enumerate(BINARY_KINDS)}

    rng = np.random.default_rng(a.seed)
    losses, start = [], time.perf_counter()
    for i in range(1, a.steps + 1):
        pick = rng.choice(len(train[0]), a.batch_size, replace=False)
        losses.append(float(step(model, optimizer, *(x[pick] for x in train))))
        if i % a.eval_every == 0 or i == a.steps:
            print(f"step {i:5d}  {time.perf_counter() - start:6.0f} s  train loss "
                  f"{np.mean(losses[-a.eval_every:]):.3f}  held-out {accuracy()}", flush=True)


if __name__ == "__main__":
    jax.config.update("jax_threefry_partitionable", True)
    main()
