"""LLaVA-3D as a dump teacher (`config.teacher.kind = "llava3d"`): the Flax port, batched.

Per sample, the scene is encoded once (3D mode: every view with its depth, intrinsics and pose)
and its voxel tokens are shared by all of the sample's questions, which run as one batch:

    prompts   llava_v1 template, <image> first, chunk-wise tokenized        [Q, Lp] (+ padding)
    answer    spliced, left-padded, greedy with the KV cache (generate.py)   [Q, <= max_new]
    score     prompt + answer teacher-forced, logits at the answer positions [Q, La, V]

Shapes are bucketed (questions to `batch_size`, lengths to multiples of `length_bucket`) so the
jitted steps compile a few times, not once per sample. The records keep the student's own prompt
ids (BOS + question); the teacher's template is recorded in `calibration()`.

Geometry (`geometry`): `sensor` feeds the sample's depth, intrinsics and poses; `vggt` replaces
them with what VGGT predicts from the RGB views alone (`vggt_geometry.py`), for scenes without
sensors.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.sample import Sample
from spatial_distill import generate, sharding
from spatial_distill.models import llava3d
from spatial_distill.teacher import llava3d_inputs as inputs_lib
from spatial_distill.tokenizer import Tokenizer, check_vocab

GEOMETRIES = ("sensor", "vggt")
MODES = ("3d", "2d")


def _bucket(n: int, size: int) -> int:
    return max(size, -(-n // size) * size)


def checkpoint_revision(path: str) -> str:
    """A short content id of a checkpoint directory: sha256 over its config.json and the names
    and sizes of its weight files (hashing 14 GB of weights per dump would cost minutes)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == "config.json" or name.endswith(".index.json"):
            with open(full, "rb") as f:
                h.update(name.encode() + f.read())
        elif name.endswith((".safetensors", ".bin")):
            h.update(f"{name}:{os.path.getsize(full)}".encode())
    return h.hexdigest()[:16]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_scene(graphdef, state, images, depths, poses, intrinsics):
    model = nnx.merge(graphdef, state)
    return model.encode_scene(images, depths, poses, intrinsics)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_image(graphdef, state, images):
    return nnx.merge(graphdef, state).encode_images(images)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _splice(graphdef, state, ids, mask, tokens, counts):
    model = nnx.merge(graphdef, state)
    return model.splice(ids, llava3d.SceneTokens(tokens, counts), attention_mask=mask)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _answer_logits(graphdef, state, spliced, rows):
    """Logits `[Q, A, V]` at spliced positions `rows` `[Q, A]` (the answer tokens' predecessors)."""
    model = nnx.merge(graphdef, state)
    h, _ = model.llm.hidden(spliced.embeds, positions=spliced.positions,
                            segment_ids=spliced.segment_ids)
    return model.llm.logits(jnp.take_along_axis(h, rows[:, :, None], axis=1))


def left_pad(spliced: llava3d.Spliced) -> tuple[jax.Array, jax.Array]:
    """Right-padded spliced embeddings -> left-padded (`generate`'s layout): (`[Q, L, D]`,
    mask `[Q, L]` bool)."""
    Q, L = spliced.segment_ids.shape
    i = jnp.arange(L)[None]
    shift = L - spliced.lengths[:, None]
    mask = i >= shift
    src = jnp.where(mask, i - shift, 0)
    embeds = jnp.take_along_axis(spliced.embeds, src[:, :, None], axis=1)
    return jnp.where(mask[:, :, None], embeds, 0), mask


def sample_geometry(sample: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sample's sensor geometry: depth `[S, H, W]` m, K `[S, 4, 4]`, camera-to-world `[S, 4, 4]`."""
    S = sample.num_views
    K = np.tile(np.eye(4, dtype=np.float64), (S, 1, 1))
    K[:, :3, :3] = sample.intrinsics
    return np.asarray(sample.depth, np.float32), K, np.asarray(sample.cam_to_world, np.float64)


class LLaVA3DTeacher:
    """Implements `spatial_distill.teacher.base.Teacher` with the Flax LLaVA-3D port."""

    def __init__(self, model: llava3d.LLaVA3D, tokenizer: Tokenizer, *, teacher_id: str,
                 revision: str, max_new_tokens: int = 32, batch_size: int = 8,
                 length_bucket: int = 32, geometry: str = "sensor",
                 predict_geometry: Callable[[np.ndarray], tuple] | None = None,
                 mesh: jax.sharding.Mesh | None = None, mode: str = "3d"):
        check_vocab(tokenizer, model.config.llama.vocab_size, what=f"teacher {teacher_id}")
        if geometry not in GEOMETRIES:
            raise ValueError(f"config.teacher.geometry={geometry!r}: choose one of {GEOMETRIES}")
        if mode not in MODES:
            raise ValueError(f"config.teacher.llava_mode={mode!r}: choose one of {MODES}")
        if geometry == "vggt" and mode == "3d" and predict_geometry is None:
            raise ValueError("teacher.geometry='vggt' needs a VGGT predictor (config.teacher.vggt_path)")
        if max_new_tokens < 1 or batch_size < 1 or length_bucket < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}, batch_size={batch_size}, "
                             f"length_bucket={length_bucket} must be positive")
        self.model, self.tokenizer = model, tokenizer
        self.teacher_id, self.revision = teacher_id, revision
        self.max_new_tokens, self.batch_size, self.length_bucket = max_new_tokens, batch_size, length_bucket
        self.geometry, self.predict_geometry, self.mode = geometry, predict_geometry, mode
        self.graphdef, self.state = nnx.split(model)
        self.mesh = mesh
        if mesh is not None:  # parameters laid out by their logical axes (the 7B over a host's chips)
            shardings = sharding.state_shardings(self.state, mesh, sharding.DEFAULT_RULES)
            self.state.replace_by_pure_dict(jax.device_put(self.state.to_pure_dict(),
                                                           shardings.to_pure_dict()))
            model = nnx.merge(self.graphdef, self.state)
            self.model = model
        self._scene_cache: tuple[str, llava3d.SceneTokens] | None = None

    def calibration(self) -> dict:
        c = self.model.config
        return {"kind": "LLaVA-3D (Flax port), greedy answers, teacher-forced logits",
                "teacher_template": inputs_lib.TEMPLATE, "system": inputs_lib.SYSTEM,
                "voxel_cap_rule": llava3d.VOXEL_CAP_RULE, "max_voxel_tokens": c.max_voxel_tokens,
                "voxel_size": c.voxel_size, "mode": self.mode,
                "geometry": self.geometry if self.mode == "3d" else "none (2D: view 0 only)",
                "geometry_dtype": "float32 (upstream: the model dtype, bf16 by default)",
                "image_size": c.clip.image_size, "dtype": str(jnp.dtype(c.dtype)),
                "max_new_tokens": self.max_new_tokens,
                **(self.predict_geometry.describe() if hasattr(self.predict_geometry, "describe") else {})}

    def _rules(self):
        return sharding.axis_rules(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    # -- inputs ------------------------------------------------------------------------------------
    def scene_inputs(self, sample: Sample) -> dict[str, np.ndarray]:
        """The model's 3D inputs `[1, V, ...]` for a sample (preprocessed as upstream does)."""
        if self.geometry == "vggt":
            depth, K, poses = self.predict_geometry(np.asarray(sample.rgb))
        else:
            depth, K, poses = sample_geometry(sample)
            empty = [i for i in range(len(depth)) if not (depth[i] > 0).any()]
            if empty:
                raise ValueError(f"sample {sample.sample_id!r}: views {empty} have no valid depth; "
                                 "LLaVA-3D's 3D mode needs depth and poses: set "
                                 "config.teacher.geometry=vggt (predicted from RGB) or "
                                 "config.teacher.llava_mode=2d (view 0 as one image)")
        h, w = depth.shape[1:]
        s = inputs_lib.scene(list(sample.rgb), list(depth), K, poses, size=self.model.config.clip.image_size,
                             depth_scale=1.0, intrinsic_size=(w, h))
        return {k: v[None] for k, v in s.items()}

    def _scene_tokens(self, sample: Sample) -> llava3d.SceneTokens:
        if self._scene_cache is None or self._scene_cache[0] != sample.sample_id:
            c = self.model.config
            with self._rules():
                if self.mode == "2d":
                    image = inputs_lib.image_2d(np.asarray(sample.rgb[0]), c.image_aspect_ratio,
                                                c.clip.image_size)
                    tokens = _encode_image(self.graphdef, self.state, image[None])
                else:
                    x = self.scene_inputs(sample)
                    tokens = _encode_scene(self.graphdef, self.state, x["images"], x["depths"],
                                           x["poses"], x["intrinsics"])
            self._scene_cache = (sample.sample_id, tokens)
        return self._scene_cache[1]

    def prompt_ids(self, question: str) -> list[int]:
        query, click = inputs_lib.extract_click(question)
        if click is not None:
            raise ValueError(f"question {question!r} holds a click [x, y, z]; click prompts need "
                             "`clicks` per question, which the dump does not pass yet")
        return inputs_lib.tokenize(inputs_lib.prompt(query),
                                   lambda t: self.tokenizer.encode(t, add_bos=True),
                                   self.tokenizer.bos_id)

    def _spliced(self, sample: Sample, rows: Sequence[Sequence[int]]) -> llava3d.Spliced:
        visual = self._scene_tokens(sample)
        Q = _bucket(len(rows), self.batch_size)
        L = _bucket(max(len(r) for r in rows), self.length_bucket)
        ids = np.zeros((Q, L), np.int32)
        mask = np.zeros((Q, L), np.int32)
        ids[:, 0], mask[:, 0] = self.tokenizer.bos_id, 1  # padding questions: BOS alone
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        tile = lambda x: jnp.repeat(x, Q, axis=0)
        with self._rules():
            return _splice(self.graphdef, self.state, ids, mask, tile(visual.tokens), tile(visual.counts))

    # -- Teacher -----------------------------------------------------------------------------------
    def answer(self, sample: Sample, prompts) -> list[list[int]]:
        rows = [self.prompt_ids(qa.question) for qa in sample.qa]
        spliced = self._spliced(sample, rows)
        embeds, mask = left_pad(spliced)
        with self._rules():
            tokens, lengths = generate.generate(
                self.model.llm, embeds, mask, max_new_tokens=self.max_new_tokens,
                eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id)
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        return [tokens[i, : lengths[i]].tolist() for i in range(len(rows))]

    def score(self, sample: Sample, prompts, answers) -> list[np.ndarray]:
        rows = [self.prompt_ids(qa.question) + list(a) for qa, a in zip(sample.qa, answers)]
        spliced = self._spliced(sample, rows)
        A = _bucket(max(len(a) for a in answers), 8)
        lengths = np.asarray(spliced.lengths)
        pos = np.zeros((spliced.lengths.shape[0], A), np.int32)
        for i, a in enumerate(answers):
            start = lengths[i] - len(a)  # first answer token; its logits sit one before
            pos[i, : len(a)] = np.arange(start - 1, start - 1 + len(a))
        with self._rules():
            logits = np.asarray(_answer_logits(self.graphdef, self.state, spliced, jnp.asarray(pos)))
        return [logits[i, : len(a)] for i, a in enumerate(answers)]


def check_same_tokenizer(teacher_tok: Tokenizer, student_tok: Tokenizer, corpus: Sequence[str]) -> int:
    """Id-level equality of two tokenizers on `corpus` (questions, answers, the template);
    raises naming the first text they split differently. Returns the texts checked."""
    if teacher_tok.vocab_size != student_tok.vocab_size:
        raise ValueError(f"the teacher's tokenizer ({teacher_tok.path}) has {teacher_tok.vocab_size} "
                         f"tokens, the student's ({student_tok.path}) {student_tok.vocab_size}; the "
                         "student must share the teacher's tokenizer (config.tokenizer.path)")
    for text in corpus:
        a, b = teacher_tok.encode(text, add_bos=True), student_tok.encode(text, add_bos=True)
        if a != b:
            raise ValueError(f"teacher and student tokenizers differ on {text[:60]!r}: teacher "
                             f"{a[:12]}..., student {b[:12]}...; point config.tokenizer.path at the "
                             "teacher's tokenizer")
    return len(corpus)


def load(config, tokenizer: Tokenizer) -> LLaVA3DTeacher:
    """The teacher a config names (`teacher.path`, `teacher.clip_path`, `teacher.dtype`, ...)."""
    t = config.teacher
    if not t.path:
        raise ValueError("config.teacher.kind='llava3d' needs config.teacher.path: a local "
                         "LLaVA-3D checkpoint directory (config.json + safetensors)")
    if not os.path.isdir(t.path):
        raise FileNotFoundError(f"config.teacher.path={t.path!r} is not a directory")
    model = llava3d.load_official(t.path, dtype=jnp.dtype(t.dtype), clip=t.clip_path or None,
                                  attention=config.model.attention)
    with open(os.path.join(t.path, "config.json")) as f:
        name = json.load(f).get("_name_or_path") or os.path.basename(os.path.normpath(t.path))
    predict = None
    if t.geometry == "vggt" and t.llava_mode == "3d":
        from spatial_distill.teacher import vggt_geometry

        predict = vggt_geometry.VGGTGeometry.from_config(config)
    # Each process dumps its own shards: the mesh spans this process's devices only.
    mesh = sharding.make_mesh(tuple(t.mesh), jax.local_devices())
    return LLaVA3DTeacher(model, tokenizer, teacher_id=f"llava3d:{name}",
                          revision=checkpoint_revision(t.path), max_new_tokens=t.max_new_tokens,
                          batch_size=t.batch_size, geometry=t.geometry, predict_geometry=predict,
                          mesh=mesh, mode=t.llava_mode)


__all__ = ["GEOMETRIES", "LLaVA3DTeacher", "MODES", "check_same_tokenizer", "checkpoint_revision", "left_pad",
           "load", "sample_geometry"]
