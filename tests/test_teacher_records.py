"""Teacher-record schema: exact round trip, validation, atomic shards, meta counts, verify CLI."""

import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from data_pipelines import teacher_records as tr
from data_pipelines.sample import QA, QA_KINDS, Sample

ROOT = Path(__file__).resolve().parents[1]
EOS = 2


# ------------------------------------------------------------------ hand-built records (shared)


def make_meta(vocab=100, k=4, size=(12, 16), views=2, teacher_id="oracle-test", **kw):
    return tr.TeacherMeta(teacher_id=teacher_id, vocab_size=vocab, k=k, temperature=2.0,
                          image_size=size, num_views=views, **kw)


def _rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def make_sample(rng, sid, *, views=2, size=(12, 16), num_boxes=3, num_questions=3):
    h, w = size
    poses = np.zeros((views, 4, 4), np.float32)
    poses[:, 3, 3] = 1
    for v in range(views):
        poses[v, :3, :3] = _rotation(rng)
        poses[v, :3, 3] = rng.uniform(-3, 3, 3)
    depth = rng.uniform(0.3, 8.0, (views, h, w)).astype(np.float32)
    depth[rng.random(depth.shape) < 0.1] = 0  # invalid pixels
    k = np.array([[20.0, 0, w / 2], [0, 21.0, h / 2], [0, 0, 1]], np.float32)
    boxes = np.concatenate([rng.uniform(-2, 2, (num_boxes, 3)), rng.uniform(0.1, 1, (num_boxes, 3)),
                            rng.uniform(-np.pi, np.pi, (num_boxes, 1))], axis=1).astype(np.float32)
    qa = tuple(QA(f"question {i} about {sid}?", ["yes", "no", "the red box"][i % 3],
                  QA_KINDS[(i + len(sid)) % len(QA_KINDS)], tuple(range(min(num_boxes, i % 3))))
               for i in range(num_questions))
    return Sample(sid, rng.integers(0, 256, (views, h, w, 3), dtype=np.uint8), depth,
                  np.repeat(k[None], views, 0), poses, boxes,
                  rng.integers(0, 10, num_boxes).astype(np.int32),
                  tuple(f"object {i}" for i in range(num_boxes)), qa)


def make_answer(rng, meta, qa, *, prompt_len=5, answer_len=3):
    logits = rng.normal(0, 3, (answer_len, meta.vocab_size))
    logits[-1, EOS] = 50.0  # the greedy answer ends with EOS
    z = logits / meta.temperature
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    lp = z - lse[:, None]
    top = np.argsort(-lp, axis=1, kind="stable")[:, :meta.k]
    return tr.TeacherAnswer.build(
        meta, prompt_ids=rng.integers(3, meta.vocab_size, prompt_len), answer_ids=top[:, 0],
        topk_ids=top, topk_logprobs=np.take_along_axis(lp, top, 1), logsumexp=lse,
        kind=qa.kind, gt_answer=qa.answer)


def make_record(rng, meta, sid, *, num_boxes=3, num_questions=3, prompt_lens=None, answer_lens=None):
    s = make_sample(rng, sid, views=meta.num_views, size=meta.image_size, num_boxes=num_boxes,
                    num_questions=num_questions)
    prompt_lens = prompt_lens or [5] * num_questions
    answer_lens = answer_lens or [3] * num_questions
    return tr.TeacherRecord(s, tuple(make_answer(rng, meta, qa, prompt_len=p, answer_len=a)
                                     for qa, p, a in zip(s.qa, prompt_lens, answer_lens)))


def varied_records(meta, num, seed=0):
    """Records with 1-3 questions, prompts of 1-7 and answers of 1-4 tokens, 0-3 boxes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        nq = 1 + i % 3
        out.append(make_record(rng, meta, f"scene{i:03d}", num_boxes=i % 4, num_questions=nq,
                               prompt_lens=[1 + (i + j) % 7 for j in range(nq)],
                               answer_lens=[1 + (i * 2 + j) % 4 for j in range(nq)]))
    return out


def write_dataset(out_dir, meta, records, num_shards, split="train"):
    for i, r in enumerate(tr.shard_assignment(len(records), num_shards)):
        tr.write_shard(out_dir, split, i, num_shards, [records[j] for j in r], meta)
    return tr.write_meta(out_dir, meta)


def record_offsets(path):
    """Byte offset of every record in a TFRecord file (8-byte length, 4 crc, data, 4 crc)."""
    data, offsets, pos = Path(path).read_bytes(), [], 0
    while pos < len(data):
        offsets.append(pos)
        pos += 16 + struct.unpack("<Q", data[pos:pos + 8])[0]
    return offsets


def assert_records_equal(a: tr.TeacherRecord, b: tr.TeacherRecord):
    sa, sb = a.sample, b.sample
    assert sa.sample_id == sb.sample_id and sa.qa == sb.qa and sa.label_names == sb.label_names
    for name in ("rgb", "intrinsics", "cam_to_world", "boxes", "labels"):
        x, y = getattr(sa, name), getattr(sb, name)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name
    # Depth is stored in whole millimetres.
    want = (np.rint(sa.depth.astype(np.float64) * 1000).astype(np.uint16).astype(np.float32)
            / np.float32(1000))
    assert sb.depth.dtype == np.float32 and np.array_equal(sb.depth, want)
    assert np.abs(sb.depth - sa.depth).max() <= 0.0005 + 1e-6
    assert len(a.answers) == len(b.answers)
    for x, y in zip(a.answers, b.answers):
        assert (x.kind, x.gt_answer) == (y.kind, y.gt_answer)
        for name in ("prompt_ids", "answer_ids", "topk_ids", "topk_logprobs", "logsumexp"):
            u, v = getattr(x, name), getattr(y, name)
            assert u.dtype == v.dtype and np.array_equal(u, v), name


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("vocab,ids_dtype", [(100, "uint16"), (70000, "int32")])
def test_round_trip_is_exact(vocab, ids_dtype):
    meta = make_meta(vocab=vocab, k=5)
    assert meta.topk_ids_dtype == ids_dtype
    rec = make_record(np.random.default_rng(1), meta, "room_01", num_questions=4,
                      prompt_lens=[3, 9, 1, 4], answer_lens=[1, 2, 5, 3])
    data = tr.encode(rec, meta)
    back = tr.decode(data, meta)
    assert_records_equal(rec, back)
    assert back.answers[2].topk_ids.shape == (5, 5) and back.answers[2].topk_ids.dtype == ids_dtype
    assert back.content_hash == tr.content_hash(rec.sample, rec.answers, meta.teacher_id)
    tr.validate_record(back, meta)
    assert tr.encode(back, meta) == data  # re-encoding a decoded record reproduces the bytes

    feats = tf.train.Example.FromString(data).features.feature
    assert all(f.WhichOneof("kind") == "bytes_list" for f in feats.values())
    itemsize = np.dtype(ids_dtype).itemsize
    assert [len(b) for b in feats["topk_ids"].bytes_list.value] == [n * 5 * itemsize for n in (1, 2, 5, 3)]
    assert [len(b) for b in feats["topk_logprobs"].bytes_list.value] == [n * 5 * 2 for n in (1, 2, 5, 3)]
    assert [len(b) for b in feats["logsumexp"].bytes_list.value] == [n * 4 for n in (1, 2, 5, 3)]


def test_depth_quantisation_and_ceiling():
    meta = make_meta(views=1, size=(2, 3))
    rec = make_record(np.random.default_rng(2), meta, "d", num_questions=1)
    depth = np.array([[[0.0, 0.0004, 0.0006], [1.2344, 1.2346, 65.535]]], np.float32)
    back = tr.decode(tr.encode(dataclasses.replace(rec, sample=dataclasses.replace(rec.sample, depth=depth)), meta), meta)
    np.testing.assert_array_equal(back.sample.depth, np.array([[[0, 0, 0.001], [1.234, 1.235, 65.535]]], np.float32))
    too_deep = depth.copy()
    too_deep[0, 1, 0] = 65.536
    with pytest.raises(tr.RecordError, match=r"sample 'd': field 'depth': value 65.5360 m at view 0, pixel \[1, 0\].*65.535 m"):
        tr.encode(dataclasses.replace(rec, sample=dataclasses.replace(rec.sample, depth=too_deep)), meta)


def test_meta_validation_and_json(tmp_path):
    with pytest.raises(tr.RecordError, match=r"field 'k': must satisfy 1 <= k <= vocab_size=100, got 0"):
        make_meta(k=0)
    with pytest.raises(tr.RecordError, match=r"field 'k'.*got 101"):
        make_meta(k=101)
    with pytest.raises(tr.RecordError, match=r"field 'topk_ids_dtype': is 'uint16' but vocab_size=70000 needs 'int32'"):
        make_meta(vocab=70000, topk_ids_dtype="uint16")
    with pytest.raises(tr.RecordError, match=r"field 'topk_ids_dtype': is 'int32' but vocab_size=32000 needs 'uint16'"):
        make_meta(vocab=32000, topk_ids_dtype="int32")
    with pytest.raises(tr.RecordError, match="field 'logprobs_dtype'"):
        make_meta(logprobs_dtype="float32")
    meta = make_meta(calibration={"confidence": 0.9, "seed": 3}, prompt_template="USER: {q} ASSISTANT:")
    assert tr.TeacherMeta.from_json(json.loads(json.dumps(meta.to_json()))) == meta
    with pytest.raises(tr.RecordError, match=r"unknown keys \['topk'\]"):
        tr.TeacherMeta.from_json({**meta.to_json(), "topk": 3})
    with pytest.raises(tr.RecordError, match=r"teacher_meta.json: not found"):
        tr.read_meta(tmp_path)


def _mutations(rec, other, meta):
    a0 = rec.answers[0]

    def answer(**kw):
        return dataclasses.replace(rec, answers=(dataclasses.replace(a0, **kw), *rec.answers[1:]))

    altered = rec.sample.rgb.copy()
    altered[1, 3, 4, 0] ^= 1
    lp = a0.topk_logprobs.copy()
    lp[0, [0, 1]] = lp[0, [1, 0]]
    positive = a0.topk_logprobs.copy()
    positive[1, 0] = 0.25
    nan = a0.topk_logprobs.copy()
    nan[2, 3] = np.nan
    ids = a0.topk_ids.copy()
    ids[0, 2] = meta.vocab_size
    return {
        "altered frame": (dataclasses.replace(rec, sample=dataclasses.replace(rec.sample, rgb=altered)),
                          meta, "field 'content_hash'"),
        "swapped frames": (dataclasses.replace(rec, sample=dataclasses.replace(rec.sample, rgb=other.sample.rgb)),
                           meta, "field 'content_hash'"),
        "other teacher": (rec, dataclasses.replace(meta, teacher_id="another"), "field 'content_hash'"),
        "unsorted": (answer(topk_logprobs=lp), meta, r"field 'topk_logprobs\[0\]': token 0: log-probs must be sorted"),
        "positive": (answer(topk_logprobs=positive), meta, r"field 'topk_logprobs\[0\]': log-prob 0.25 at \[token, k\]=\[1, 0\]"),
        "nan": (answer(topk_logprobs=nan), meta, r"field 'topk_logprobs\[0\]': log-prob nan"),
        "id >= vocab": (answer(topk_ids=ids), meta, r"field 'topk_ids\[0\]': token id 100 outside \[0, vocab_size=100\)"),
        "rows": (answer(topk_ids=a0.topk_ids[:2], topk_logprobs=a0.topk_logprobs[:2]), meta,
                 r"field 'topk_ids\[0\]': must have shape \[len\(answer_ids\)=3, K\], got \[2, 4\]"),
        "lse length": (answer(logsumexp=a0.logsumexp[:2]), meta, r"field 'logsumexp\[0\]': must be float32 \[len\(answer_ids\)=3\]"),
        "K": (answer(topk_ids=a0.topk_ids[:, :3], topk_logprobs=a0.topk_logprobs[:, :3]), meta,
              "field 'k': question 0: record has K=3 but teacher_meta.json says 4"),
        "dtype": (answer(topk_ids=a0.topk_ids.astype(np.int32)), meta,
                  "field 'topk_ids_dtype': question 0: record has int32 but teacher_meta.json says uint16"),
        "kind": (answer(kind="size" if a0.kind != "size" else "contact"), meta, r"field 'qa_kind\[0\]'"),
    }


@pytest.mark.parametrize("case", ["altered frame", "swapped frames", "other teacher", "unsorted", "positive",
                                  "nan", "id >= vocab", "rows", "lse length", "K", "dtype", "kind"])
def test_validate_record_rejects(case):
    meta = make_meta()
    rng = np.random.default_rng(3)
    rec = tr.decode(tr.encode(make_record(rng, meta, "room"), meta), meta)  # carries its hash
    other = make_record(rng, meta, "other")
    bad, meta_used, pattern = _mutations(rec, other, meta)[case]
    with pytest.raises(tr.RecordError, match=r"sample 'room': " + pattern):
        tr.validate_record(bad, meta_used)
    tr.validate_record(rec, meta)


def test_decode_header_disagreeing_with_meta(tmp_path):
    meta = make_meta()
    rec = make_record(np.random.default_rng(4), meta, "s1")
    path = tr.write_shard(tmp_path, "train", 0, 1, [rec], meta)
    for other, pattern in ((make_meta(k=8), "field 'k': record has 4 but teacher_meta.json says 8"),
                           (make_meta(vocab=200), "field 'vocab_size': record has 100 but teacher_meta.json says 200")):
        with pytest.raises(tr.RecordError, match=f"{path}: record 0: sample 's1': {pattern}"):
            list(tr.read_shard(path, other))
    ex = tf.train.Example.FromString(tr.encode(rec, meta))
    ex.features.feature["topk_ids_dtype"].bytes_list.value[0] = b"int32"
    with pytest.raises(tr.RecordError, match="field 'topk_ids_dtype': record has 'int32' but teacher_meta.json says 'uint16'"):
        tr.decode(ex.SerializeToString(), meta)


def test_shard_assignment():
    assert tr.shard_assignment(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert tr.shard_assignment(2, 4) == [range(0, 1), range(1, 2), range(2, 2), range(2, 2)]
    ranges = tr.shard_assignment(1001, 16)
    assert [i for r in ranges for i in r] == list(range(1001))
    assert {len(r) for r in ranges} == {62, 63}
    with pytest.raises(ValueError, match="num_shards=0"):
        tr.shard_assignment(5, 0)


def test_atomic_shards_resume_and_meta_counts(tmp_path):
    meta = make_meta()
    records = varied_records(meta, 7)
    parts = tr.shard_assignment(len(records), 3)
    for i in (0, 2):
        tr.write_shard(tmp_path, "train", i, 3, [records[j] for j in parts[i]], meta)

    # A dump that dies inside a shard leaves neither the shard nor its temp file.
    with pytest.raises(RuntimeError, match="teacher crashed"):
        with tr.ShardWriter(tmp_path, "train", 1, 3, meta) as w:
            w.write(records[parts[1][0]])
            raise RuntimeError("teacher crashed")
    assert sorted(os.listdir(tmp_path)) == [tr.shard_name("train", 0, 3), tr.shard_name("train", 2, 3)]
    assert [p.name for p in tr.finished_shards(tmp_path, "train", 3)] == sorted(os.listdir(tmp_path))

    partial = tr.write_meta(tmp_path, meta)
    q = [len(r.answers) for r in records]
    t = [sum(a.answer_ids.size for a in r.answers) for r in records]
    done = [j for i in (0, 2) for j in parts[i]]

    def longest(js):  # the maxima that size the input pipeline's padding
        return {"max_questions": max(q[j] for j in js),
                "max_prompt_len": max(a.prompt_ids.size for j in js for a in records[j].answers),
                "max_answer_len": max(a.answer_ids.size for j in js for a in records[j].answers)}

    assert partial.splits["train"] == {"num_shards": 3, "num_records": len(done),
                                       "num_questions": sum(q[j] for j in done),
                                       "num_answer_tokens": sum(t[j] for j in done), **longest(done),
                                       "shard_records": [3, None, 2]}
    tr.write_shard(tmp_path, "train", 1, 3, [records[j] for j in parts[1]], meta)  # the rerun
    full = tr.write_meta(tmp_path, meta)
    assert full.splits["train"] == {"num_shards": 3, "num_records": 7, "num_questions": sum(q),
                                    "num_answer_tokens": sum(t), **longest(range(7)), "shard_records": [3, 2, 2]}
    assert tr.read_meta(tmp_path) == full
    got = [r for p in tr.finished_shards(tmp_path, "train", 3) for r in tr.read_shard(p, full)]
    for a, b in zip(records, got, strict=True):
        assert_records_equal(a, b)
    with pytest.raises(tr.RecordError, match="written with num_shards=3 but num_shards=4 was asked for"):
        tr.finished_shards(tmp_path, "train", 4)


def test_verify_reports_counts_and_every_bad_record(tmp_path):
    meta = make_meta()
    records = varied_records(meta, 6)
    full = write_dataset(tmp_path, meta, records, 2)
    out = _verify(tmp_path)
    assert out[0] == 0
    tokens = full.splits["train"]["num_answer_tokens"]
    assert f"2/2 shards, 6 records, {full.splits['train']['num_questions']} questions, {tokens} answer tokens, K=4" in out[1]
    # uint16 ids + fp16 log-probs at K=4, fp32 logsumexp, uint16 answer id: 4*2 + 4*2 + 4 + 2.
    assert "22.0 bytes per answer token" in out[1]

    shard0, shard1 = tr.finished_shards(tmp_path, "train", 2)
    # Shard 0: replace record 1 by a record whose frames belong to another sample.
    ex = tf.train.Example.FromString(tr.encode(records[1], meta))
    ex.features.feature["frames"].CopyFrom(tf.train.Example.FromString(tr.encode(records[2], meta)).features.feature["frames"])
    raws = [tr.encode(r, meta) for r in records[:3]]
    raws[1] = ex.SerializeToString()
    with tf.io.TFRecordWriter(str(shard0)) as w:
        for raw in raws:
            w.write(raw)
    # Shard 1: cut in the middle of record 2.
    offsets = record_offsets(shard1)
    os.truncate(shard1, offsets[2] + 20)
    num_problems, text = _verify(tmp_path)
    assert num_problems == 2
    assert f"BAD {shard0}: record 1: sample 'scene001': field 'content_hash'" in text
    assert f"BAD {shard1}: record 2: cannot be read (truncated file or CRC mismatch)" in text
    assert "2 problem(s)" in text

    # A flipped byte inside record 1 of shard 1 fails its CRC.
    data = bytearray(Path(shard1).read_bytes())
    data[offsets[1] + 40] ^= 0xFF
    Path(shard1).write_bytes(bytes(data))
    assert f"BAD {shard1}: record 1: cannot be read" in _verify(tmp_path)[1]

    # teacher_meta.json that disagrees with the records: every record names the field and both values.
    (tmp_path / tr.META_FILE).write_text(json.dumps({**full.to_json(), "k": 3}))
    text = _verify(tmp_path)[1]
    assert f"BAD {shard0}: record 0: sample 'scene000': field 'k': record has 4 but teacher_meta.json says 3" in text


def test_verify_names_a_stale_count_or_maximum(tmp_path):
    full = write_dataset(tmp_path, make_meta(), varied_records(make_meta(), 6), 2)
    assert _verify(tmp_path)[0] == 0
    for field in ("num_questions", "max_prompt_len"):
        doc = json.loads((tmp_path / tr.META_FILE).read_text())
        doc["splits"]["train"][field] += 1
        (tmp_path / tr.META_FILE).write_text(json.dumps(doc))
        rc, text = _verify(tmp_path)
        assert rc == 1, text
        assert (f"split 'train': field '{field}' says {full.splits['train'][field] + 1} but the shards "
                f"hold {full.splits['train'][field]}; rerun write_meta") in text
        tr.write_meta(tmp_path, full)  # rescans the shards: the true counts again


def _verify(path):
    import io
    buf = io.StringIO()
    rc = tr.verify(path, out=buf)
    return rc, buf.getvalue()


def test_verify_command_line(tmp_path):
    meta = make_meta()
    write_dataset(tmp_path, meta, varied_records(meta, 3), 1, split="val")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    ok = subprocess.run([sys.executable, "-m", "data_pipelines.teacher_records", "verify", str(tmp_path),
                         "--split", "val"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "split 'val': 1/1 shards, 3 records" in ok.stdout and "0 problem(s)" in ok.stdout
    assert tr.main(["verify", str(tmp_path), "--split", "train"]) == 1  # no such split
