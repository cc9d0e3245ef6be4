"""Teacher records: the files between the teacher dump and student training (DESIGN.md §3).

One `tf.train.Example` per sample holds the sample (frames + ground truth) and the teacher's output
for every one of its questions. Every feature is a bytes feature; numbers are raw little-endian
array bytes, never float/int64 lists (those hold no fp16 or uint16, so top-K would cost 4 bytes per
log-prob and a varint per id instead of 2 + 2).

  header   sample_id (utf-8), content_hash (hex sha256, see `content_hash`), and int32 scalars
           num_views S, height H, width W, num_boxes N, num_questions Q, k K, vocab_size; dtype
           names topk_ids_dtype, logprobs_dtype, logsumexp_dtype (so a record that disagrees with
           `teacher_meta.json` is caught by name, not by a reshape error).
  frames   S PNG-encoded RGB images.
  depth    S 16-bit grayscale PNGs in millimetres: 1 mm quantisation (round to nearest), 0 = invalid,
           ceiling 65535 mm = 65.535 m (larger values are an error, never clipped). A depth in
           (0, 0.5 mm) rounds to 0 and so becomes invalid.
  GT       intrinsics float32 [S,3,3], cam_to_world float32 [S,4,4], boxes float32 [N,7],
           labels int32 [N], label_names N utf-8 strings.
  per question q (bytes lists, one entry per question, in `sample.qa` order)
           qa_kind, question, gt_answer (utf-8), subjects int32 [n_q],
           prompt_ids [Lp_q] and answer_ids [La_q] (teacher greedy answer, EOS included) in the
           token-id dtype, topk_ids [La_q, K] in the token-id dtype, topk_logprobs [La_q, K] float16
           (log-probs at the dump temperature, sorted descending), logsumexp [La_q] float32 (the raw
           logsumexp of the teacher's logits / T, so the tail mass 1 - sum(exp(lp_k)) is exact).
           Lengths follow from the byte counts; K from the header.

Token ids (prompt, answer and top-K) use `uint16` when the vocabulary fits (<= 65535), else int32.
In memory, decoded `prompt_ids`/`answer_ids` are int32; `topk_ids` keep the stored dtype.

Shards are `teacher-{split}-{i:05d}-of-{n:05d}.tfrecord` beside `teacher_meta.json`. Each shard is
written to a hidden temp file, fsynced and renamed into place, so a shard either holds all its
records or does not exist, and a rerun skips the finished ones.

CLI: `python -m data_pipelines.teacher_records verify DIR [--split train]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from data_pipelines.sample import QA, Sample, SampleError

FORMAT_VERSION = 1
META_FILE = "teacher_meta.json"
# Per split in `teacher_meta.json`, scanned from the finished shards by `write_meta`: totals, then
# the longest record (questions) and question (prompt and answer tokens, BOS/EOS included).
COUNT_FIELDS = ("num_records", "num_questions", "num_answer_tokens", "max_questions", "max_prompt_len",
                "max_answer_len")
MAX_DEPTH_MM = 65535
SHARD_RE = re.compile(r"^teacher-(?P<split>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.tfrecord$")
# fp16 rounds a log-prob by at most ~2^-11 relative, so the stored top-K mass may exceed 1 by this.
_MASS_SLACK = 2e-3
# Log-probs computed in fp32 can come out a hair above 0 for a near-certain token.
_POSITIVE_LOGPROB_SLACK = 1e-3


class RecordError(ValueError):
    """A bad record, shard or meta file. The message names the file, record index and field."""

    def __init__(self, what: str, *, field: str | None = None, path: str | os.PathLike | None = None,
                 index: int | None = None, sample_id: str | None = None):
        self.what, self.field, self.path, self.index, self.sample_id = what, field, path, index, sample_id
        where = [str(path)] if path is not None else []
        where += [f"record {index}"] if index is not None else []
        where += [f"sample {sample_id!r}"] if sample_id else []
        where += [f"field '{field}'"] if field else []
        super().__init__(": ".join(where + [what]))

    def at(self, path, index: int) -> RecordError:
        return RecordError(self.what, field=self.field, path=path, index=index, sample_id=self.sample_id)


def ids_dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "int32"


@dataclasses.dataclass(frozen=True)
class TeacherMeta:
    """Contents of `teacher_meta.json`: what produced the records and how they are encoded.

    `splits` maps a split name to {num_shards, `COUNT_FIELDS`..., shard_records} (filled in from
    the shards by `write_meta`; shard_records[i] is None for a shard not written yet). The
    maxima (questions per record, prompt and answer tokens per question) size the input
    pipeline's padded batch when `config.input` leaves them unset. `calibration` is free-form
    (the oracle teacher stores its settings there).
    """

    teacher_id: str
    vocab_size: int
    k: int
    temperature: float
    image_size: tuple[int, int]  # (H, W) of every frame
    num_views: int
    teacher_revision: str = ""
    tokenizer_hash: str = ""
    prompt_template: str = ""
    topk_ids_dtype: str = ""  # "" picks `ids_dtype_for_vocab(vocab_size)`
    logprobs_dtype: str = "float16"
    logsumexp_dtype: str = "float32"
    splits: dict = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    calibration: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not self.topk_ids_dtype:
            object.__setattr__(self, "topk_ids_dtype", ids_dtype_for_vocab(int(self.vocab_size)))
        object.__setattr__(self, "image_size", tuple(int(x) for x in self.image_size))
        self.validate()

    def validate(self) -> None:
        def fail(field, msg):
            raise RecordError(msg, field=field, path=META_FILE)

        if not self.teacher_id:
            fail("teacher_id", "must be a non-empty string")
        if int(self.vocab_size) < 1:
            fail("vocab_size", f"must be >= 1, got {self.vocab_size}")
        if not 1 <= int(self.k) <= int(self.vocab_size):
            fail("k", f"must satisfy 1 <= k <= vocab_size={self.vocab_size}, got {self.k}")
        want = ids_dtype_for_vocab(int(self.vocab_size))
        if self.topk_ids_dtype != want:
            fail("topk_ids_dtype", f"is {self.topk_ids_dtype!r} but vocab_size={self.vocab_size} "
                                   f"needs {want!r} (uint16 when vocab <= 65535, else int32)")
        if self.logprobs_dtype != "float16":
            fail("logprobs_dtype", f"must be 'float16', got {self.logprobs_dtype!r}")
        if self.logsumexp_dtype != "float32":
            fail("logsumexp_dtype", f"must be 'float32', got {self.logsumexp_dtype!r}")
        if not float(self.temperature) > 0:
            fail("temperature", f"must be > 0, got {self.temperature}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            fail("image_size", f"must be (H, W) with positive sizes, got {self.image_size}")
        if int(self.num_views) < 1:
            fail("num_views", f"must be >= 1, got {self.num_views}")
        if self.format_version != FORMAT_VERSION:
            fail("format_version", f"is {self.format_version}; this code reads version "
                                   f"{FORMAT_VERSION}: re-dump the records or use matching code")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TeacherMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RecordError(f"unknown keys {unknown}; known keys are {sorted(names)}", path=META_FILE)
        return cls(**d)


def read_meta(data_dir: str | os.PathLike) -> TeacherMeta:
    path = Path(data_dir) / META_FILE
    if not path.exists():
        raise RecordError("not found; the teacher dump writes it with write_meta() next to the "
                          "shards", path=path)
    try:
        return TeacherMeta.from_json(json.loads(path.read_text()))
    except (RecordError, TypeError, json.JSONDecodeError) as e:
        raise RecordError(getattr(e, "what", str(e)), field=getattr(e, "field", None), path=path) from None


@dataclasses.dataclass(frozen=True)
class TeacherAnswer:
    """The teacher's output for one question (La answer tokens, K top-K entries per token).

    prompt_ids int [Lp]; answer_ids int [La] (greedy, EOS included); topk_ids [La, K] in the
    meta's token-id dtype; topk_logprobs float16 [La, K] sorted descending; logsumexp float32 [La].
    """

    prompt_ids: np.ndarray
    answer_ids: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    logsumexp: np.ndarray
    kind: str
    gt_answer: str

    @classmethod
    def build(cls, meta: TeacherMeta, *, prompt_ids, answer_ids, topk_ids, topk_logprobs, logsumexp,
              kind: str, gt_answer: str) -> TeacherAnswer:
        """Casts teacher outputs (any int/float arrays) to the stored dtypes, refusing ids that
        would wrap and clamping only fp32 rounding noise above log-prob 0."""
        topk_ids = np.asarray(topk_ids)
        for name, ids in (("prompt_ids", prompt_ids), ("answer_ids", answer_ids), ("topk_ids", topk_ids)):
            ids = np.asarray(ids)
            if ids.size and (ids.min() < 0 or ids.max() >= meta.vocab_size):
                raise RecordError(f"token ids must lie in [0, {meta.vocab_size}), got range "
                                  f"[{ids.min()}, {ids.max()}]", field=name)
        lp = np.asarray(topk_logprobs, np.float32)
        lp = np.where((lp > 0) & (lp <= _POSITIVE_LOGPROB_SLACK), np.float32(0), lp)
        lp = np.maximum(lp, np.finfo(np.float16).min)  # below fp16 range: keep finite, ~zero mass
        return cls(np.asarray(prompt_ids, np.int32), np.asarray(answer_ids, np.int32),
                   topk_ids.astype(meta.topk_ids_dtype), lp.astype(np.float16),
                   np.asarray(logsumexp, np.float32), str(kind), str(gt_answer))


@dataclasses.dataclass(frozen=True)
class TeacherRecord:
    """A sample with the teacher's answer to each of its questions (`answers[i]` ↔ `sample.qa[i]`).

    `content_hash` is None for a record built in memory; `decode` fills in the stored hash, which
    `validate_record` then checks against the content.
    """

    sample: Sample
    answers: tuple[TeacherAnswer, ...]
    content_hash: str | None = None


def depth_to_mm(depth: np.ndarray, sample_id: str = "") -> np.ndarray:
    """Metres -> uint16 millimetres (round to nearest); errors on values above 65.535 m."""
    mm = np.rint(np.asarray(depth, np.float64) * 1000.0)
    if mm.size and mm.max() > MAX_DEPTH_MM:
        bad = tuple(int(i) for i in np.unravel_index(int(np.argmax(mm)), mm.shape))
        raise RecordError(f"value {float(depth[bad]):.4f} m at view {bad[0]}, pixel {list(bad[1:])} "
                          f"exceeds the 16-bit PNG ceiling of {MAX_DEPTH_MM / 1000} m (1 mm units); "
                          "mark such pixels invalid (0) or rescale the scene", field="depth",
                          sample_id=sample_id)
    return mm.astype(np.uint16)


def mm_to_depth(mm: np.ndarray) -> np.ndarray:
    return mm.astype(np.float32) / np.float32(1000.0)


def content_hash(sample: Sample, answers: Sequence[TeacherAnswer], teacher_id: str) -> str:
    """sha256 of what the teacher was shown: sample id, frames, depth (mm), intrinsics, poses, every
    prompt's token ids, and the teacher id. Hashes decoded pixels, not PNG bytes, so re-encoding with
    another zlib still validates and a decoded record can be checked."""
    h = hashlib.sha256()

    def put(tag: str, data: bytes):
        h.update(tag.encode())
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    put("sample_id", sample.sample_id.encode())
    put(f"rgb{sample.rgb.shape}", np.ascontiguousarray(sample.rgb, np.uint8).tobytes())
    put(f"depth_mm{sample.depth.shape}", depth_to_mm(sample.depth, sample.sample_id).astype("<u2").tobytes())
    put(f"intrinsics{sample.intrinsics.shape}", sample.intrinsics.astype("<f4").tobytes())
    put(f"cam_to_world{sample.cam_to_world.shape}", sample.cam_to_world.astype("<f4").tobytes())
    for a in answers:
        put("prompt_ids", np.asarray(a.prompt_ids).astype("<i4").tobytes())
    put("teacher_id", teacher_id.encode())
    return h.hexdigest()


def validate_record(rec: TeacherRecord, meta: TeacherMeta) -> None:
    """Checks a record against the meta; raises RecordError naming the sample and the field."""
    s = rec.sample
    sid = s.sample_id

    def fail(field, msg):
        raise RecordError(msg, field=field, sample_id=sid)

    try:
        s.validate()
    except SampleError as e:
        raise RecordError(str(e), sample_id=sid) from None
    if s.num_views != meta.num_views:
        fail("num_views", f"record has {s.num_views} views but {META_FILE} says {meta.num_views}")
    if s.image_size != meta.image_size:
        fail("image_size", f"record has {s.image_size} but {META_FILE} says {meta.image_size}")
    if len(rec.answers) != len(s.qa):
        fail("answers", f"{len(rec.answers)} teacher answers for {len(s.qa)} questions")
    ids_dt = np.dtype(meta.topk_ids_dtype)
    for q, (a, qa) in enumerate(zip(rec.answers, s.qa)):
        if a.kind != qa.kind or a.gt_answer != qa.answer:
            fail(f"qa_kind[{q}]", f"answer ({a.kind!r}, {a.gt_answer!r}) does not match question "
                                  f"({qa.kind!r}, {qa.answer!r})")
        for name in ("prompt_ids", "answer_ids"):
            ids = getattr(a, name)
            if ids.ndim != 1 or ids.dtype.kind not in "iu" or ids.size == 0:
                fail(f"{name}[{q}]", f"must be a non-empty 1-D integer array, got {ids.dtype} {list(ids.shape)}")
        la = a.answer_ids.shape[0]
        if a.topk_ids.ndim != 2 or a.topk_ids.shape[0] != la:
            fail(f"topk_ids[{q}]", f"must have shape [len(answer_ids)={la}, K], got {list(a.topk_ids.shape)}")
        if a.topk_ids.shape[1] != meta.k:
            fail("k", f"question {q}: record has K={a.topk_ids.shape[1]} but {META_FILE} says {meta.k}")
        if a.topk_ids.dtype != ids_dt:
            fail("topk_ids_dtype", f"question {q}: record has {a.topk_ids.dtype.name} but "
                                   f"{META_FILE} says {meta.topk_ids_dtype}")
        if a.topk_logprobs.dtype != np.float16 or a.topk_logprobs.shape != a.topk_ids.shape:
            fail(f"topk_logprobs[{q}]", f"must be float16 {list(a.topk_ids.shape)}, got "
                                        f"{a.topk_logprobs.dtype.name} {list(a.topk_logprobs.shape)}")
        if a.logsumexp.dtype != np.float32 or a.logsumexp.shape != (la,):
            fail(f"logsumexp[{q}]", f"must be float32 [len(answer_ids)={la}], got "
                                    f"{a.logsumexp.dtype.name} {list(a.logsumexp.shape)}")
        for name in ("prompt_ids", "answer_ids", "topk_ids"):
            ids = getattr(a, name).astype(np.int64)
            if ids.min() < 0 or ids.max() >= meta.vocab_size:
                fail(f"{name}[{q}]", f"token id {ids.max() if ids.max() >= meta.vocab_size else ids.min()} "
                                     f"outside [0, vocab_size={meta.vocab_size})")
        lp = a.topk_logprobs.astype(np.float32)
        if not np.isfinite(lp).all() or (lp > 0).any():
            bad = np.argwhere(~np.isfinite(lp) | (lp > 0))[0].tolist()
            fail(f"topk_logprobs[{q}]", f"log-prob {lp[tuple(bad)]} at [token, k]={bad} must be finite and <= 0")
        if (np.diff(lp, axis=1) > 0).any():
            t = int(np.argwhere(np.diff(lp, axis=1) > 0)[0, 0])
            fail(f"topk_logprobs[{q}]", f"token {t}: log-probs must be sorted descending, got {lp[t].tolist()}")
        mass = np.exp(lp.astype(np.float64)).sum(axis=1)
        if (mass > 1 + _MASS_SLACK).any():
            t = int(np.argmax(mass))
            fail(f"topk_logprobs[{q}]", f"token {t}: top-K probability mass {mass[t]:.5f} exceeds 1")
        if not np.isfinite(a.logsumexp).all():
            fail(f"logsumexp[{q}]", f"must be finite, got {a.logsumexp.tolist()}")
    if rec.content_hash is not None:
        digest = content_hash(s, rec.answers, meta.teacher_id)
        if digest != rec.content_hash:
            fail("content_hash", f"stored {rec.content_hash} != {digest} computed from the frames, "
                                 f"depth, poses, prompts and teacher id {meta.teacher_id!r}: the record "
                                 "was altered or belongs to another teacher; re-dump it")


def _bytes(*values: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _le(arr, dtype) -> bytes:
    return np.ascontiguousarray(arr, np.dtype(dtype).newbyteorder("<")).tobytes()


def _i32(x: int) -> bytes:
    return _le(np.int32(x), np.int32)


def encode(record: TeacherRecord, meta: TeacherMeta) -> bytes:
    """Serialises a record (validated against `meta`) to `tf.train.Example` bytes."""
    validate_record(record, meta)
    s, answers = record.sample, record.answers
    mm = depth_to_mm(s.depth, s.sample_id)
    ids_dt = meta.topk_ids_dtype
    f = {
        "sample_id": _bytes(s.sample_id.encode()),
        "content_hash": _bytes(content_hash(s, answers, meta.teacher_id).encode()),
        "num_views": _bytes(_i32(s.num_views)), "height": _bytes(_i32(s.image_size[0])),
        "width": _bytes(_i32(s.image_size[1])), "num_boxes": _bytes(_i32(s.boxes.shape[0])),
        "num_questions": _bytes(_i32(len(answers))), "k": _bytes(_i32(meta.k)),
        "vocab_size": _bytes(_i32(meta.vocab_size)),
        "topk_ids_dtype": _bytes(ids_dt.encode()), "logprobs_dtype": _bytes(meta.logprobs_dtype.encode()),
        "logsumexp_dtype": _bytes(meta.logsumexp_dtype.encode()),
        "frames": _bytes(*(tf.io.encode_png(v).numpy() for v in s.rgb)),
        "depth": _bytes(*(tf.io.encode_png(v[..., None]).numpy() for v in mm)),
        "intrinsics": _bytes(_le(s.intrinsics, np.float32)),
        "cam_to_world": _bytes(_le(s.cam_to_world, np.float32)),
        "boxes": _bytes(_le(s.boxes, np.float32)), "labels": _bytes(_le(s.labels, np.int32)),
        "label_names": _bytes(*(n.encode() for n in s.label_names)),
        "qa_kind": _bytes(*(qa.kind.encode() for qa in s.qa)),
        "question": _bytes(*(qa.question.encode() for qa in s.qa)),
        "gt_answer": _bytes(*(qa.answer.encode() for qa in s.qa)),
        "subjects": _bytes(*(_le(np.asarray(qa.subjects, np.int32), np.int32) for qa in s.qa)),
        "prompt_ids": _bytes(*(_le(a.prompt_ids, ids_dt) for a in answers)),
        "answer_ids": _bytes(*(_le(a.answer_ids, ids_dt) for a in answers)),
        "topk_ids": _bytes(*(_le(a.topk_ids, ids_dt) for a in answers)),
        "topk_logprobs": _bytes(*(_le(a.topk_logprobs, np.float16) for a in answers)),
        "logsumexp": _bytes(*(_le(a.logsumexp, np.float32) for a in answers)),
    }
    example = tf.train.Example(features=tf.train.Features(feature=f))
    return example.SerializeToString(deterministic=True)


def decode(data: bytes, meta: TeacherMeta) -> TeacherRecord:
    """Parses record bytes; checks the header and byte counts against `meta` (not the content:
    call `validate_record` for that, as `read_shard` does)."""
    try:
        feats = tf.train.Example.FromString(data).features.feature
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError type
        raise RecordError(f"not a tf.train.Example ({e})") from None
    sid = None

    def fail(field, msg):
        raise RecordError(msg, field=field, sample_id=sid)

    def many(name, count=None) -> list[bytes]:
        if name not in feats:
            fail(name, "missing")
        values = list(feats[name].bytes_list.value)
        if count is not None and len(values) != count:
            fail(name, f"has {len(values)} entries, expected {count}")
        return values

    def one(name) -> bytes:
        return many(name, 1)[0]

    def scalar(name) -> int:
        return int(array(name, one(name), np.int32, ()))

    def array(name, raw: bytes, dtype, shape) -> np.ndarray:
        dt = np.dtype(dtype)
        if shape is None:  # 1-D, length from the byte count
            if len(raw) % dt.itemsize:
                fail(name, f"holds {len(raw)} bytes, not a multiple of {dt.name}'s {dt.itemsize}")
            shape = (len(raw) // dt.itemsize,)
        elif shape and shape[0] == -1:  # leading dim from the byte count
            row = int(np.prod(shape[1:])) * dt.itemsize
            if len(raw) % row:
                fail(name, f"holds {len(raw)} bytes, not a whole number of {list(shape[1:])} {dt.name} rows")
            shape = (len(raw) // row, *shape[1:])
        if len(raw) != int(np.prod(shape)) * dt.itemsize:
            fail(name, f"holds {len(raw)} bytes, expected {list(shape)} {dt.name}")
        return np.frombuffer(raw, dt.newbyteorder("<")).astype(dt).reshape(shape)

    sid = one("sample_id").decode()
    for field, want in (("k", meta.k), ("vocab_size", meta.vocab_size)):
        got = scalar(field)
        if got != want:
            fail(field, f"record has {got} but {META_FILE} says {want}")
    for field in ("topk_ids_dtype", "logprobs_dtype", "logsumexp_dtype"):
        got, want = one(field).decode(), getattr(meta, field)
        if got != want:
            fail(field, f"record has {got!r} but {META_FILE} says {want!r}")
    s, h, w, n, nq = (scalar(x) for x in ("num_views", "height", "width", "num_boxes", "num_questions"))
    ids_dt, k = meta.topk_ids_dtype, meta.k

    def png(name, raw, channels, dtype, shape):
        try:
            img = tf.io.decode_png(raw, channels=channels, dtype=dtype).numpy()
        except tf.errors.OpError as e:
            fail(name, f"PNG does not decode: {e.message}")
        if img.shape != shape:
            fail(name, f"PNG has shape {list(img.shape)}, header says {list(shape)}")
        return img

    rgb = np.stack([png(f"frames[{i}]", b, 3, tf.uint8, (h, w, 3)) for i, b in enumerate(many("frames", s))])
    mm = np.stack([png(f"depth[{i}]", b, 1, tf.uint16, (h, w, 1)) for i, b in enumerate(many("depth", s))])
    per_q = {name: many(name, nq) for name in ("qa_kind", "question", "gt_answer", "subjects", "prompt_ids",
                                               "answer_ids", "topk_ids", "topk_logprobs", "logsumexp")}
    text = {name: [b.decode() for b in per_q[name]] for name in ("qa_kind", "question", "gt_answer")}
    qa = tuple(QA(text["question"][q], text["gt_answer"][q], text["qa_kind"][q],
                  tuple(int(x) for x in array(f"subjects[{q}]", per_q["subjects"][q], np.int32, None)))
               for q in range(nq))
    answers = tuple(TeacherAnswer(
        prompt_ids=array(f"prompt_ids[{q}]", per_q["prompt_ids"][q], ids_dt, None).astype(np.int32),
        answer_ids=array(f"answer_ids[{q}]", per_q["answer_ids"][q], ids_dt, None).astype(np.int32),
        topk_ids=array(f"topk_ids[{q}]", per_q["topk_ids"][q], ids_dt, (-1, k)),
        topk_logprobs=array(f"topk_logprobs[{q}]", per_q["topk_logprobs"][q], np.float16, (-1, k)),
        logsumexp=array(f"logsumexp[{q}]", per_q["logsumexp"][q], np.float32, None),
        kind=text["qa_kind"][q], gt_answer=text["gt_answer"][q]) for q in range(nq))
    sample = Sample(
        sample_id=sid, rgb=rgb, depth=mm_to_depth(mm[..., 0]),
        intrinsics=array("intrinsics", one("intrinsics"), np.float32, (s, 3, 3)),
        cam_to_world=array("cam_to_world", one("cam_to_world"), np.float32, (s, 4, 4)),
        boxes=array("boxes", one("boxes"), np.float32, (n, 7)),
        labels=array("labels", one("labels"), np.int32, (n,)),
        label_names=tuple(b.decode() for b in many("label_names")), qa=qa)
    return TeacherRecord(sample, answers, one("content_hash").decode())


# ---------------------------------------------------------------------------------------------
# Shards: naming, atomic writing, reading.


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"teacher-{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def shard_assignment(num_samples: int, num_shards: int) -> list[range]:
    """Contiguous, deterministic sample-index ranges, one per shard, sizes differing by at most 1."""
    if num_shards < 1 or num_samples < 0:
        raise ValueError(f"shard_assignment: need num_shards >= 1 and num_samples >= 0, "
                         f"got num_samples={num_samples}, num_shards={num_shards}")
    base, extra = divmod(num_samples, num_shards)
    starts = [i * base + min(i, extra) for i in range(num_shards + 1)]
    return [range(starts[i], starts[i + 1]) for i in range(num_shards)]


def _shards_on_disk(out_dir: Path) -> dict[str, dict[int, tuple[int, Path]]]:
    """split -> {index: (num_shards, path)} for every finished shard file in `out_dir`."""
    found: dict[str, dict[int, tuple[int, Path]]] = {}
    for p in sorted(out_dir.glob("teacher-*.tfrecord")) if out_dir.is_dir() else ():
        m = SHARD_RE.match(p.name)
        if m:
            found.setdefault(m["split"], {})[int(m["index"])] = (int(m["count"]), p)
    return found


def finished_shards(out_dir: str | os.PathLike, split: str, num_shards: int) -> list[Path]:
    """The complete shards of `split` (atomic writes: a shard file that exists is complete)."""
    shards = _shards_on_disk(Path(out_dir)).get(split, {})
    other = sorted({n for n, _ in shards.values()} - {num_shards})
    if other:
        raise RecordError(f"holds shards of split {split!r} written with num_shards={other[0]} but "
                          f"num_shards={num_shards} was asked for; delete the old shards or keep "
                          f"num_shards={other[0]}", path=out_dir)
    return [shards[i][1] for i in sorted(shards)]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Context manager writing one shard atomically: a temp file in the same directory, fsynced and
    `os.replace`d into place on a clean exit, deleted if the block raises."""

    def __init__(self, out_dir, split: str, shard_index: int, num_shards: int, meta: TeacherMeta):
        if not split or "/" in split or not 0 <= shard_index < num_shards:
            raise ValueError(f"ShardWriter: bad split {split!r} or shard {shard_index} of {num_shards}")
        self.meta = meta
        self.path = Path(out_dir) / shard_name(split, shard_index, num_shards)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._writer = None
        self.num_records = 0

    def __enter__(self) -> ShardWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = tf.io.TFRecordWriter(str(self._tmp))
        return self

    def write(self, record: TeacherRecord) -> None:
        self._writer.write(encode(record, self.meta))
        self.num_records += 1

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._writer.close()
        if exc_type is not None:
            self._tmp.unlink(missing_ok=True)
            return False
        _fsync(self._tmp)
        os.replace(self._tmp, self.path)
        _fsync(self.path.parent)  # makes the rename itself durable
        return False


def write_shard(out_dir, split: str, shard_index: int, num_shards: int,
                records: Iterable[TeacherRecord], meta: TeacherMeta) -> Path:
    with ShardWriter(out_dir, split, shard_index, num_shards, meta) as w:
        for r in records:
            w.write(r)
    return w.path


def iter_raw(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """(index, serialized record) pairs; a truncated or CRC-corrupted record raises RecordError."""
    it = tf.data.TFRecordDataset(str(path)).as_numpy_iterator()
    index = 0
    while True:
        try:
            raw = next(it)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            raise RecordError(f"cannot be read (truncated file or CRC mismatch): {e.message}; "
                              "re-dump this shard", path=path, index=index) from None
        yield index, raw
        index += 1


def read_shard(path: str | os.PathLike, meta: TeacherMeta, *, validate: bool = True) -> Iterator[TeacherRecord]:
    for index, raw in iter_raw(path):
        try:
            rec = decode(raw, meta)
            if validate:
                validate_record(rec, meta)
        except RecordError as e:
            raise e.at(path, index) from None
        yield rec


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _counts(path: Path) -> np.ndarray:
    """One shard's `COUNT_FIELDS`, from the raw features (no PNG decode)."""
    counts = np.zeros(len(COUNT_FIELDS), np.int64)
    for index, raw in iter_raw(path):
        feats = tf.train.Example.FromString(raw).features.feature
        try:
            itemsize = np.dtype(feats["topk_ids_dtype"].bytes_list.value[0].decode()).itemsize
            answers = [len(b) // itemsize for b in feats["answer_ids"].bytes_list.value]
            prompts = [len(b) // itemsize for b in feats["prompt_ids"].bytes_list.value]
        except (KeyError, IndexError, TypeError) as e:
            raise RecordError(f"malformed header ({e})", path=path, index=index) from None
        counts[:3] += (1, len(answers), sum(answers))
        counts[3:] = np.maximum(counts[3:], (len(answers), max(prompts, default=0), max(answers, default=0)))
    return counts


def write_meta(out_dir: str | os.PathLike, meta: TeacherMeta) -> TeacherMeta:
    """Writes `teacher_meta.json` atomically with split counts scanned from the finished shards.

    Splits declared in `meta.splits` without shards keep their num_shards with zero counts. Returns
    the meta as written. Cost: one read of every shard (no image decode).
    """
    out_dir = Path(out_dir)
    splits = {name: dict(v) for name, v in meta.splits.items()}
    for split, shards in _shards_on_disk(out_dir).items():
        counts = {n for n, _ in shards.values()}
        if len(counts) > 1:
            raise RecordError(f"split {split!r} has shards with different totals {sorted(counts)}; "
                              "delete the stale ones", path=out_dir)
        n = counts.pop()
        per_shard: list[int | None] = [None] * n
        totals = np.zeros(len(COUNT_FIELDS), np.int64)
        for i, (_, path) in shards.items():
            c = _counts(path)
            per_shard[i] = int(c[0])
            totals[:3] += c[:3]
            totals[3:] = np.maximum(totals[3:], c[3:])
        splits[split] = {"num_shards": n, **dict(zip(COUNT_FIELDS, map(int, totals))),
                         "shard_records": per_shard}
    for split, v in splits.items():
        if "shard_records" not in v:
            n = int(v["num_shards"])
            splits[split] = {"num_shards": n, **dict.fromkeys(COUNT_FIELDS, 0), "shard_records": [None] * n}
    meta = dataclasses.replace(meta, splits=splits)
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out_dir / META_FILE, json.dumps(meta.to_json(), indent=2, sort_keys=True) + "\n")
    return meta


# ---------------------------------------------------------------------------------------------
# verify CLI


def verify(data_dir: str | os.PathLike, splits: Sequence[str] | None = None, out=sys.stdout) -> int:
    """Scans every shard, prints counts and sizes, lists every problem; returns the problem count."""
    data_dir = Path(data_dir)
    problems: list[str] = []
    try:
        meta = read_meta(data_dir)
    except RecordError as e:
        print(f"BAD {e}", file=out)
        return 1
    on_disk = _shards_on_disk(data_dir)
    for split in splits or sorted(set(meta.splits) | set(on_disk)):
        declared = meta.splits.get(split, {})
        n = int(declared.get("num_shards") or max((c for c, _ in on_disk.get(split, {}).values()), default=0))
        if n == 0:
            problems.append(f"{data_dir}: split {split!r}: no shards and no entry in {META_FILE}")
            continue
        try:
            shards = {int(SHARD_RE.match(p.name)["index"]): p for p in finished_shards(data_dir, split, n)}
        except RecordError as e:
            problems.append(str(e))
            continue
        records = questions = tokens = teacher_bytes = record_bytes = 0
        longest = dict.fromkeys(COUNT_FIELDS[3:], 0)
        before = len(problems)
        for i in range(n):
            if i not in shards:
                problems.append(f"{data_dir / shard_name(split, i, n)}: missing (shard not written; rerun the dump)")
                continue
            try:
                for index, raw in iter_raw(shards[i]):
                    try:
                        rec = decode(raw, meta)
                        validate_record(rec, meta)
                    except RecordError as e:
                        problems.append(str(e.at(shards[i], index)))
                        continue
                    records += 1
                    record_bytes += len(raw)
                    longest["max_questions"] = max(longest["max_questions"], len(rec.answers))
                    for a in rec.answers:
                        questions += 1
                        tokens += a.answer_ids.size
                        longest["max_prompt_len"] = max(longest["max_prompt_len"], a.prompt_ids.size)
                        longest["max_answer_len"] = max(longest["max_answer_len"], a.answer_ids.size)
                        teacher_bytes += (a.topk_ids.nbytes + a.topk_logprobs.nbytes + a.logsumexp.nbytes
                                          + a.answer_ids.size * np.dtype(meta.topk_ids_dtype).itemsize)
            except RecordError as e:
                problems.append(str(e))
        print(f"split {split!r}: {len(shards)}/{n} shards, {records} records, {questions} questions, "
              f"{tokens} answer tokens, K={meta.k}, vocab={meta.vocab_size}", file=out)
        if tokens:
            print(f"  teacher outputs: {teacher_bytes / tokens:.1f} bytes per answer token "
                  f"(top-K ids {meta.topk_ids_dtype} + log-probs float16 + logsumexp float32 + answer id)",
                  file=out)
        if records:
            print(f"  records: {record_bytes / records:.0f} bytes per sample (frames included)", file=out)
        got_counts = {"num_records": records, "num_questions": questions, "num_answer_tokens": tokens, **longest}
        for key, got in got_counts.items():
            if key in declared and declared[key] != got and len(problems) == before:
                problems.append(f"{data_dir / META_FILE}: split {split!r}: field '{key}' says "
                                f"{declared[key]} but the shards hold {got}; rerun write_meta")
    stale = sorted(p.name for p in data_dir.glob(".teacher-*.tmp-*"))
    if stale:
        print(f"note: {len(stale)} temp files from interrupted writes (safe to delete): {stale[:3]}", file=out)
    for p in problems:
        print(f"BAD {p}", file=out)
    print(f"{len(problems)} problem(s)", file=out)
    return len(problems)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.teacher_records")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="scan shards, print counts and sizes, list bad records")
    v.add_argument("data_dir")
    v.add_argument("--split", action="append", help="split to check (repeatable; default: all)")
    args = parser.parse_args(argv)
    return 1 if verify(args.data_dir, args.split) else 0


if __name__ == "__main__":
    sys.exit(main())
