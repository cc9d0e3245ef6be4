"""tf.data input pipeline: teacher-record shards -> padded numpy batches -> global jax.Arrays.

Each process reads its own shards (shard i goes to process i % process_count), decodes PNGs and
raw arrays in tf, pads every per-sample field to static shapes and batches (remainder dropped).
The order within an epoch is a deterministic function of (seed, epoch): the shard order is
permuted and records pass a seeded shuffle buffer. Every process runs the same number of batches
per epoch (the minimum over processes, from the per-shard counts in `teacher_meta.json`), so
hosts stay in step; the records left over (less than a batch, plus any imbalance between
processes) are skipped that epoch, different ones each epoch when shuffling.

A batch is a dict of numpy arrays, b = batch_size // process_count, S = num_views, (H, W) =
image_size, Q = max_questions, Lp = max_prompt_len, La = max_answer_len, K = teacher top-K,
N = max_boxes. Padding: ids 0, floats 0, masks False, labels / qa_kind -1.
  rgb            uint8   [b, S, H, W, 3]
  depth          float32 [b, S, H, W]   metres, 0 = invalid (1 mm resolution)
  intrinsics     float32 [b, S, 3, 3]
  cam_to_world   float32 [b, S, 4, 4]   OpenCV camera -> world (z up)
  boxes          float32 [b, N, 7]      (cx, cy, cz, dx, dy, dz, yaw)
  box_mask       bool    [b, N]
  labels         int32   [b, N]
  question_mask  bool    [b, Q]
  qa_kind        int32   [b, Q]         index into sample.QA_KINDS
  prompt_ids     int32   [b, Q, Lp]     prompt_mask bool [b, Q, Lp]
  answer_ids     int32   [b, Q, La]     answer_mask bool [b, Q, La] (teacher greedy answer, EOS incl.)
  topk_ids       int32   [b, Q, La, K]
  topk_logprobs  float32 [b, Q, La, K]  teacher log-probs at the dump temperature
  logsumexp      float32 [b, Q, La]
  referred       int32   [b, Q, 2]      the objects a question refers to (subject, reference) as
                                        indices into its sample's boxes, -1 where it names fewer

A sample longer than a limit (questions, prompt, answer, boxes) is an error naming the sample,
field, length and limit: answers are never truncated. The images must already have `image_size`
(the pipeline does not resize).

Position: `state()` is a JSON-serialisable dict; `InputPipeline(..., state=s)` or `restore(s)`
continues with exactly the next batch, skipping consumed records before they are decoded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines import teacher_records as tr
from data_pipelines.sample import QA_KINDS, REFERRING_KINDS


class InputError(ValueError):
    """Bad pipeline configuration or a sample that does not fit it; the message says the fix."""


_QUESTION_FEATURES = ("qa_kind", "subjects", "prompt_ids", "answer_ids", "topk_ids", "topk_logprobs",
                      "logsumexp")
MAX_REFERRED = 2  # subject and reference
_REFERRING = [QA_KINDS.index(k) for k in REFERRING_KINDS]
# Columns of the per-sample `_check` vector, compared against the config limits after batching.
_LIMITS = (("qa", "max_questions"), ("prompt_ids", "max_prompt_len"), ("answer_ids", "max_answer_len"),
           ("boxes", "max_boxes"))


class InputPipeline:
    """Iterator over per-process batches (see the module docstring for the keys).

    batch_size is global (per-process batch = batch_size // process_count); num_epochs=None
    repeats forever; process_index/count default to jax's. shuffle_buffer: raw records held for
    shuffling (memory ~ buffer x record size, ~40 KiB-1.6 MiB per 4-view record at 518x518);
    cycle_length: shards read at once. `state` resumes from `InputPipeline.state()`.
    require_referred: every question of a referring kind (`sample.REFERRING_KINDS`) must name
    its objects (the grounding loss needs them); one that does not is an error naming the sample.
    with_sample_ids: batches also hold `sample_id` `[b]` (bytes; pop it before `to_global`).
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, *, batch_size: int, seed: int,
                 shuffle: bool = True, num_epochs: int | None = None, image_size: Sequence[int],
                 max_questions: int, max_prompt_len: int, max_answer_len: int, max_boxes: int,
                 process_index: int | None = None, process_count: int | None = None,
                 state: dict | None = None, shuffle_buffer: int = 128, cycle_length: int = 8,
                 require_referred: bool = False, with_sample_ids: bool = False):
        self.data_dir, self.split, self.seed, self.shuffle = str(data_dir), split, int(seed), shuffle
        self.num_epochs, self.batch_size = num_epochs, int(batch_size)
        self.image_size = tuple(int(x) for x in image_size)
        self.max_questions, self.max_prompt_len = max_questions, max_prompt_len
        self.max_answer_len, self.max_boxes = max_answer_len, max_boxes
        self.process_index = jax.process_index() if process_index is None else int(process_index)
        self.process_count = jax.process_count() if process_count is None else int(process_count)
        self.shuffle_buffer, self.cycle_length = shuffle_buffer, cycle_length
        self.require_referred, self.with_sample_ids = require_referred, with_sample_ids
        self.meta = meta = tr.read_meta(data_dir)
        where = f"{data_dir}/{tr.META_FILE}"

        if meta.image_size != self.image_size:
            raise InputError(f"{where}: records hold {meta.image_size} frames but image_size="
                             f"{self.image_size}; set image_size={meta.image_size} (no resizing here)")
        if split not in meta.splits:
            raise InputError(f"{where}: no split {split!r} (have {sorted(meta.splits)})")
        info = meta.splits[split]
        n = int(info["num_shards"])
        if n % self.process_count:
            raise InputError(f"split {split!r} has {n} shards, not a multiple of process_count="
                             f"{self.process_count}; re-dump with a multiple of the host count")
        if batch_size % self.process_count:
            raise InputError(f"batch_size={batch_size} is not divisible by process_count={self.process_count}")
        if not 0 <= self.process_index < self.process_count:
            raise InputError(f"process_index={self.process_index} outside [0, {self.process_count})")
        files = tr.finished_shards(data_dir, split, n)
        counts = info.get("shard_records") or [None] * n
        if len(files) != n or len(counts) != n or None in counts:
            raise InputError(f"{where}: split {split!r} has {len(files)} of {n} shards written and "
                             f"record counts for {n - list(counts).count(None)}; finish the dump and "
                             "rerun write_meta")
        self.local_batch = batch_size // self.process_count
        self._files = [str(f) for f in files[self.process_index::self.process_count]]
        per_process = [sum(counts[p::self.process_count]) for p in range(self.process_count)]
        self.batches_per_epoch = min(per_process) // self.local_batch
        if self.batches_per_epoch == 0:
            raise InputError(f"split {split!r}: a process gets only {min(per_process)} records, fewer "
                             f"than one per-process batch of {self.local_batch}; lower batch_size")
        self._epoch, self._batch, self._it = 0, 0, None
        # Traced once per pipeline (tracing the ragged ops costs ~1 s), reused by every restore.
        self._parse_fn = tf.function(self._parse, input_signature=[tf.TensorSpec([], tf.string)],
                                     autograph=False)
        if state is not None:
            self.restore(state)

    # -- position -------------------------------------------------------------------------------

    def state(self) -> dict:
        """Position of the next batch: JSON-serialisable, saved with every checkpoint."""
        return {"epoch": self._epoch, "batch": self._batch, "seed": self.seed, "split": self.split,
                "batch_size": self.batch_size, "process_index": self.process_index,
                "process_count": self.process_count}

    def restore(self, state: dict) -> None:
        for key in ("epoch", "batch", "seed", "split", "batch_size", "process_index", "process_count"):
            if key not in state:
                raise InputError(f"cannot restore input position: state {state} lacks '{key}'; "
                                 "pass a dict from InputPipeline.state()")
            if key not in ("epoch", "batch") and state[key] != getattr(self, key):
                raise InputError(f"cannot restore input position: state has {key}={state[key]!r} but "
                                 f"the pipeline has {getattr(self, key)!r}; the order would differ")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if not 0 <= batch <= self.batches_per_epoch:
            raise InputError(f"cannot restore input position: batch {batch} outside the "
                             f"{self.batches_per_epoch} batches of an epoch (different data or batch size?)")
        self._epoch, self._batch = (epoch + 1, 0) if batch == self.batches_per_epoch else (epoch, batch)
        self._it = None

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> InputPipeline:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            if self.num_epochs is not None and self._epoch >= self.num_epochs:
                raise StopIteration
            self._it = self._dataset(self._epoch, self._batch * self.local_batch).as_numpy_iterator()
        try:
            raw = next(self._it)
        except tf.errors.OpError as e:
            self._it = None
            raise self._locate(e) from None
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        return self._check(raw)

    def _dataset(self, start_epoch: int, skip: int) -> tf.data.Dataset:
        """Records of every epoch from `start_epoch` on, the first `skip` of them dropped."""
        files, n = tf.constant(self._files), len(self._files)
        per_epoch = self.batches_per_epoch * self.local_batch

        def epoch_records(epoch):
            ds_files, shuffle_seed = files, None
            if self.shuffle:
                draw = tf.random.stateless_uniform(
                    [n + 1], seed=tf.stack([tf.constant(self.seed, tf.int64), epoch]),
                    minval=0, maxval=2**62, dtype=tf.int64, alg="philox")
                ds_files, shuffle_seed = tf.gather(files, tf.argsort(draw[:n])), draw[n]
            ds = tf.data.Dataset.from_tensor_slices(ds_files).interleave(
                tf.data.TFRecordDataset, cycle_length=min(self.cycle_length, n), block_length=1)
            if self.shuffle:
                ds = ds.shuffle(self.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
            # Skipping raw records before the map means a resumed run decodes nothing twice.
            return ds.take(per_epoch).skip(tf.where(epoch == start_epoch, tf.constant(skip, tf.int64), 0))

        end = np.iinfo(np.int64).max if self.num_epochs is None else self.num_epochs
        # One dataset across epochs (not one per epoch): tracing `_parse` and building an iterator
        # costs far more than an epoch of a small split.
        ds = tf.data.Dataset.range(start_epoch, end).flat_map(epoch_records)
        ds = ds.map(self._parse_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(self.local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options)

    def _parse(self, raw: tf.Tensor) -> dict[str, tf.Tensor]:
        m = self.meta
        s, (h, w), k = m.num_views, self.image_size, m.k
        qn, lp, la, nb = self.max_questions, self.max_prompt_len, self.max_answer_len, self.max_boxes
        ids_dt = tf.as_dtype(m.topk_ids_dtype)
        spec = {"sample_id": tf.io.FixedLenFeature([], tf.string),
                "frames": tf.io.FixedLenFeature([s], tf.string),
                "depth": tf.io.FixedLenFeature([s], tf.string),
                **{x: tf.io.FixedLenFeature([], tf.string) for x in
                   ("intrinsics", "cam_to_world", "boxes", "labels", "k", "vocab_size", "topk_ids_dtype")},
                **{x: tf.io.VarLenFeature(tf.string) for x in _QUESTION_FEATURES}}
        f = tf.io.parse_single_example(raw, spec)
        q = {x: f[x].values for x in _QUESTION_FEATURES}

        def flat(strings, dtype):  # one decode_raw over the joined per-question byte strings
            return tf.io.decode_raw(tf.strings.reduce_join(strings), dtype)

        def pad_vec(x, fill, size):  # pads (or cuts, flagged by _check) a vector to `size`
            return tf.concat([x, tf.fill([size], tf.cast(fill, x.dtype))], 0)[:size]

        prompt = tf.RaggedTensor.from_row_lengths(
            tf.cast(flat(q["prompt_ids"], ids_dt), tf.int32),
            tf.strings.length(q["prompt_ids"]) // ids_dt.size)
        answer = tf.RaggedTensor.from_row_lengths(
            tf.cast(flat(q["answer_ids"], ids_dt), tf.int32),
            tf.strings.length(q["answer_ids"]) // ids_dt.size)
        alen = answer.row_lengths()
        topk = tf.RaggedTensor.from_row_lengths(
            tf.reshape(tf.cast(flat(q["topk_ids"], ids_dt), tf.int32), [-1, k]), alen)
        logprobs = tf.RaggedTensor.from_row_lengths(
            tf.reshape(tf.cast(flat(q["topk_logprobs"], tf.float16), tf.float32), [-1, k]), alen)
        lse = tf.RaggedTensor.from_row_lengths(flat(q["logsumexp"], tf.float32), alen)
        subjects = tf.RaggedTensor.from_row_lengths(flat(q["subjects"], tf.int32),
                                                    tf.strings.length(q["subjects"]) // 4)
        match = tf.equal(q["qa_kind"][:, None], tf.constant(QA_KINDS)[None, :])
        known = tf.reduce_any(match, axis=1)
        kind = tf.where(known, tf.argmax(tf.cast(match, tf.int32), axis=1, output_type=tf.int32), -1)
        nq = tf.shape(q["qa_kind"])[0]

        frames = [tf.io.decode_png(f["frames"][i], channels=3) for i in range(s)]
        mm = [tf.io.decode_png(f["depth"][i], channels=1, dtype=tf.uint16)[..., 0] for i in range(s)]
        boxes = tf.reshape(tf.io.decode_raw(f["boxes"], tf.float32), [-1, 7])
        labels = tf.io.decode_raw(f["labels"], tf.int32)
        nboxes = tf.shape(boxes)[0]

        def longest(r):
            return tf.cast(tf.reduce_max(tf.concat([r.row_lengths(), [0]], 0)), tf.int32)

        header = tf.stack([tf.io.decode_raw(f["k"], tf.int32)[0], tf.io.decode_raw(f["vocab_size"], tf.int32)[0],
                           tf.cast(tf.equal(f["topk_ids_dtype"], m.topk_ids_dtype), tf.int32)])
        return {
            "rgb": tf.ensure_shape(tf.stack(frames), [s, h, w, 3]),
            "depth": tf.ensure_shape(tf.cast(tf.stack(mm), tf.float32) / 1000.0, [s, h, w]),
            "intrinsics": tf.reshape(tf.io.decode_raw(f["intrinsics"], tf.float32), [s, 3, 3]),
            "cam_to_world": tf.reshape(tf.io.decode_raw(f["cam_to_world"], tf.float32), [s, 4, 4]),
            "boxes": tf.concat([boxes, tf.zeros([nb, 7])], 0)[:nb],
            "box_mask": tf.range(nb) < nboxes,
            "labels": pad_vec(labels, -1, nb),
            "question_mask": tf.range(qn) < nq,
            "qa_kind": pad_vec(kind, -1, qn),
            "prompt_ids": prompt.to_tensor(0, shape=[qn, lp]),
            "prompt_mask": tf.sequence_mask(pad_vec(prompt.row_lengths(), 0, qn), lp),
            "answer_ids": answer.to_tensor(0, shape=[qn, la]),
            "answer_mask": tf.sequence_mask(pad_vec(alen, 0, qn), la),
            "topk_ids": topk.to_tensor(0, shape=[qn, la, k]),
            "topk_logprobs": logprobs.to_tensor(0.0, shape=[qn, la, k]),
            "logsumexp": lse.to_tensor(0.0, shape=[qn, la]),
            "referred": subjects.to_tensor(-1, shape=[qn, MAX_REFERRED]),
            "_sample_id": f["sample_id"],
            "_check": tf.concat([tf.stack([nq, longest(prompt), longest(answer), nboxes,
                                           tf.cast(tf.reduce_all(known), tf.int32)]), header,
                                 [longest(subjects)]], 0),
        }

    def _check(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Raises on samples that were cut to fit the static shapes; strips the private keys."""
        sids, check = batch.pop("_sample_id"), batch.pop("_check")
        if self.with_sample_ids:
            batch["sample_id"] = sids
        for col, (field, limit_name) in enumerate(_LIMITS):
            limit = getattr(self, limit_name)
            over = np.flatnonzero(check[:, col] > limit)
            if over.size:
                r = over[0]
                raise InputError(f"sample {sids[r].decode()!r}: field '{field}' has length "
                                 f"{check[r, col]} > {limit_name}={limit}; raise {limit_name} "
                                 "(answers are never truncated)")
        m = self.meta
        for r in range(check.shape[0]):
            sid = sids[r].decode()
            if not check[r, 4]:
                raise InputError(f"sample {sid!r}: field 'qa_kind' holds a kind outside {QA_KINDS}")
            for field, got, want in (("k", check[r, 5], m.k), ("vocab_size", check[r, 6], m.vocab_size)):
                if got != want:
                    raise InputError(f"sample {sid!r}: field '{field}': record has {got} but "
                                     f"{tr.META_FILE} says {want}")
            if not check[r, 7]:
                raise InputError(f"sample {sid!r}: field 'topk_ids_dtype' differs from "
                                 f"{tr.META_FILE}'s {m.topk_ids_dtype!r}")
            if self.require_referred:
                kinds = batch["qa_kind"][r]
                missing = np.flatnonzero(batch["question_mask"][r] & np.isin(kinds, _REFERRING)
                                         & (batch["referred"][r, :, 0] < 0))
                if missing.size:
                    q = int(missing[0])
                    raise InputError(
                        f"sample {sid!r}: question {q} ({QA_KINDS[kinds[q]]}) has no referred object "
                        "ids (field 'subjects' of the teacher records), which the grounding loss "
                        "needs: re-dump the records from data that store them, or set "
                        "config.loss.grounding=False")
            if check[r, 8] > MAX_REFERRED:
                raise InputError(f"sample {sid!r}: field 'subjects' names {check[r, 8]} objects in "
                                 f"one question; at most {MAX_REFERRED} (subject, reference) are read")
        return batch

    def _locate(self, err: tf.errors.OpError) -> Exception:
        """tf.data errors name neither file nor record: rescan this process's shards to find it."""
        for path in self._files:
            try:
                for _ in tr.read_shard(path, self.meta, validate=False):
                    pass
            except tr.RecordError as e:
                return e
        return InputError(f"reading split {self.split!r} failed ({err.message}) and a rescan of "
                          f"{self._files} found no bad record")


def to_global(batch: dict[str, np.ndarray], mesh: Mesh,
              batch_axes: Sequence[str] = ("data", "fsdp")) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global jax.Arrays sharded on the leading (batch) dim over
    `batch_axes` (global batch = per-process batch x process_count)."""
    sharding = NamedSharding(mesh, PartitionSpec(tuple(batch_axes)))
    ways = int(np.prod([mesh.shape[a] for a in batch_axes]))
    global_batch = next(iter(batch.values())).shape[0] * jax.process_count()
    if global_batch % ways:
        raise InputError(f"global batch {global_batch} is not divisible by the {ways} devices of mesh axes "
                         f"{tuple(batch_axes)}; pick a batch size that is a multiple of {ways}")
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
