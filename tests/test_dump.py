import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from configs import student as student_configs
from data_pipelines import synthetic
from data_pipelines import teacher_records as tr
from spatial_distill import prepare
from spatial_distill.teacher import dump as dump_lib
from spatial_distill.teacher.base import topk_at_temperature
from spatial_distill.teacher.oracle import OracleTeacher, margin

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = dict(num_train_scenes=12, num_eval_scenes=4, image_size=56)


def tiny_config(**teacher):
    c = student_configs.get_config("tiny")
    for k, v in OVERRIDES.items():
        c.data[k] = v
    c.data.workers = 1
    c.tokenizer.vocab_size = c.model.decoder.vocab_size = 280
    c.teacher.num_shards = 4
    c.input.max_prompt_len = 48  # a 280-entry BPE splits questions into more tokens
    for k, v in teacher.items():
        c.teacher[k] = v
    return c


def all_records(out_dir, split):
    meta = tr.read_meta(out_dir)
    paths = tr.finished_shards(out_dir, split, meta.splits[split]["num_shards"])
    return [r for p in paths for r in tr.read_shard(p, meta)]


def test_topk_at_temperature_matches_direct_softmax():
    r = np.random.default_rng(0)
    logits = r.normal(size=(3, 50)) * 3
    ids, lp, lse = topk_at_temperature(logits, 5, 2.0)
    p = np.exp(logits / 2) / np.exp(logits / 2).sum(1, keepdims=True)
    want = np.argsort(-p, axis=1)[:, :5]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(np.exp(lp), np.take_along_axis(p, want, 1), rtol=1e-5)
    np.testing.assert_allclose(lse, np.log(np.exp(logits / 2).sum(1)), rtol=1e-6)
    with pytest.raises(ValueError, match="1 <= k <= V"):
        topk_at_temperature(logits, 51, 1.0)


def test_dump_writes_every_sample_once_with_calibrated_oracle(tmp_path):
    c = tiny_config()
    out = dump_lib.dump(c, str(tmp_path))
    tok = prepare.tokenizer(c, str(tmp_path))
    meta = tr.read_meta(out)
    assert meta.teacher_id == "oracle-synthetic" and meta.k == 32 and meta.tokenizer_hash == tok.sha256
    assert meta.calibration["floor"] == 0.6 and meta.calibration["ceiling"] == 0.95
    for split, n in (("train", 12), ("eval", 4)):
        recs = all_records(out, split)
        ids = [r.sample.sample_id for r in recs]
        assert len(ids) == n == len(set(ids))
    scene_ids = {os.path.basename(d) for d in prepare.scene_dirs(c, str(tmp_path), "eval")}
    train_ids = {r.sample.sample_id for r in all_records(out, "train")}
    assert not train_ids & {r.sample.sample_id for r in all_records(out, "eval")}
    assert len(scene_ids) == 4

    # The meta records the longest prompt and answer: what an unset config.input pads to.
    for split in ("train", "eval"):
        answers = [a for r in all_records(out, split) for a in r.answers]
        assert meta.splits[split]["max_prompt_len"] == max(a.prompt_ids.size for a in answers)
        assert meta.splits[split]["max_answer_len"] == max(a.answer_ids.size for a in answers)
    resolved = dump_lib.with_record_lengths(c, meta, out)
    assert resolved.input.max_prompt_len == 48 and c.input.max_answer_len is None
    assert resolved.input.max_answer_len == max(meta.splits[s]["max_answer_len"] for s in ("train", "eval")) >= 2

    rec = all_records(out, "train")[0]
    for qa, ans in zip(rec.sample.qa, rec.answers):
        # The greedy answer is the grounded answer, and the teacher's top-1 is the greedy token.
        assert tok.decode(ans.answer_ids).strip() == qa.answer == ans.gt_answer
        assert ans.answer_ids[-1] == tok.eos_id
        np.testing.assert_array_equal(ans.topk_ids[:, 0], ans.answer_ids)
        p = np.exp(ans.topk_logprobs.astype(np.float64))
        assert (p.sum(-1) <= 1 + 1e-3).all() and (np.diff(ans.topk_logprobs, axis=-1) <= 0).all()
        if qa.answer in ("yes", "no"):
            other = tok.encode("no" if qa.answer == "yes" else "yes")[0]
            assert ans.topk_ids[0, 1] == other  # the opposite word is the runner-up
            assert 0.6 <= p[0, 0] <= 0.95 + 1e-3
        # logsumexp of the oracle's logits (= log-probs) at T = 1 is 0.
        np.testing.assert_allclose(ans.logsumexp, 0.0, atol=1e-5)


def test_unset_input_lengths_come_from_the_records_and_set_ones_are_checked():
    def meta(**train):
        splits = {"train": {"num_shards": 1, "max_prompt_len": 11, "max_answer_len": 3, **train},
                  "eval": {"num_shards": 1, "max_prompt_len": 13, "max_answer_len": 2}}
        return tr.TeacherMeta(teacher_id="t", vocab_size=384, k=4, temperature=1.0, image_size=(56, 56),
                              num_views=2, splits=splits)

    c = student_configs.get_config("tiny")
    got = dump_lib.with_record_lengths(c, meta(), "/r")
    assert (got.input.max_prompt_len, got.input.max_answer_len) == (13, 3)  # the longest of both splits
    assert c.input.max_prompt_len is None  # the caller's config is not changed
    c.input.max_prompt_len, c.input.max_answer_len = 20, 3
    got = dump_lib.with_record_lengths(c, meta(), "/r")
    assert (got.input.max_prompt_len, got.input.max_answer_len) == (20, 3)
    c.input.max_prompt_len = 12
    with pytest.raises(ValueError, match=r"config.input.max_prompt_len = 12 but the records in /r hold 13 "
                                         r"tokens \('max_prompt_len' in teacher_meta.json\); raise it or leave it None"):
        dump_lib.with_record_lengths(c, meta(), "/r")
    # The meta is untrusted: a length that is no token count within the context is refused.
    c.input.max_prompt_len = None
    for bad in (10**9, -1, "13"):
        with pytest.raises(ValueError, match=r"/r/teacher_meta.json: 'max_answer_len' = .* \(per split\) is "
                                             r"not a token count in 1..65536; re-dump the records"):
            dump_lib.with_record_lengths(c, meta(max_answer_len=bad), "/r")
    # Records dumped before the maxima were recorded: set limits still work, unset ones are named.
    old = meta()
    for v in old.splits.values():
        del v["max_prompt_len"], v["max_answer_len"]
    c.input.max_prompt_len = 20
    assert dump_lib.with_record_lengths(c, old, "/r").input.max_prompt_len == 20
    c.input.max_answer_len = None
    with pytest.raises(ValueError, match=r"/r/teacher_meta.json does not record 'max_answer_len' .*rerun the "
                                         r"dump stage .*or set config.input.max_answer_len"):
        dump_lib.with_record_lengths(c, old, "/r")


def test_oracle_confidence_grows_with_margin(tmp_path):
    c = tiny_config()
    tok = prepare.tokenizer(c, str(tmp_path))
    oracle = OracleTeacher(tok, floor=0.6, ceiling=0.95)
    pairs = []
    for seed in range(12):
        s = synthetic.generate_scene(seed, image_size=(56, 56), num_views=2)
        for i, qa in enumerate(s.qa):
            if qa.kind == "proximity":
                pairs.append((margin(s, i), oracle.confidence(s, i)))
    pairs.sort()
    conf = [p[1] for p in pairs]
    assert len(pairs) > 10 and conf == sorted(conf)
    assert 0.6 <= conf[0] < conf[-1] <= 0.95
    with pytest.raises(ValueError, match="floor <= ceiling"):
        OracleTeacher(tok, floor=0.9, ceiling=0.7)


def test_interrupted_dump_resumes_without_duplicates(tmp_path, monkeypatch):
    c = tiny_config()
    calls = collections.Counter()
    real = dump_lib.teacher_record

    def crash_on_the_seventh(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:  # mid-way through shard 2 of train
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(dump_lib, "teacher_record", crash_on_the_seventh)
    with pytest.raises(KeyboardInterrupt):
        dump_lib.dump(c, str(tmp_path))
    out = dump_lib.records_dir(c, str(tmp_path))
    assert len(tr.finished_shards(out, "train", 4)) == 2
    monkeypatch.setattr(dump_lib, "teacher_record", real)
    dump_lib.dump(c, str(tmp_path))
    ids = [r.sample.sample_id for r in all_records(out, "train")]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 12
    assert tr.read_meta(out).splits["train"]["num_records"] == 12


def test_rerun_with_other_k_is_refused_and_changes_nothing(tmp_path):
    dump_lib.dump(tiny_config(), str(tmp_path))
    out = dump_lib.records_dir(tiny_config(), str(tmp_path))
    before = {p: p.stat().st_mtime_ns for p in Path(out).iterdir()}
    with pytest.raises(ValueError, match=r"holds teacher records with k = 32 but this run has k = 16"):
        dump_lib.dump(tiny_config(k=16), str(tmp_path))
    assert {p: p.stat().st_mtime_ns for p in Path(out).iterdir()} == before


@pytest.mark.slow
def test_kill_9_then_rerun_gives_every_sample_once(tmp_path):
    args = [sys.executable, "run.py", "--config=configs/teacher_dump.py:tiny", f"--workdir={tmp_path}",
            "--config.data.num_train_scenes=40", "--config.data.num_eval_scenes=8",
            "--config.data.workers=1", "--config.tokenizer.vocab_size=300",
            "--config.model.decoder.vocab_size=300", "--config.teacher.num_shards=8"]
    # Data and tokenizer first, so the kill lands inside the dump itself.
    subprocess.run(args + ["--config.mode=data"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = tmp_path / "records"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if records.exists() and list(records.glob("teacher-train-*.tfrecord")):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(records.glob("teacher-train-*.tfrecord")))
    assert 1 <= done_at_kill < 8, done_at_kill
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True, timeout=600)
    ids = [r.sample.sample_id for r in all_records(records, "train")]
    assert len(ids) == 40 == len(set(ids))
    assert not list(records.glob(".teacher-*"))  # the rerun removed the killed shard's temp file
    r = subprocess.run([sys.executable, "-m", "data_pipelines.teacher_records", "verify", str(records)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "0 problem(s)" in r.stdout, r.stdout + r.stderr
