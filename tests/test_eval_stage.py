"""The eval stage's prediction pass and scoring: every key, resumability, heads."""

import dataclasses
import json

import numpy as np
import pytest

from data_pipelines import teacher_records as tr
from spatial_distill import prepare
from spatial_distill.eval import predictions
from spatial_distill.models import student as st
from spatial_distill.teacher import dump as dump_lib
from tests.test_dump import tiny_config


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("evalstage"))
    c = tiny_config()
    records = dump_lib.dump(c, wd)
    return dump_lib.with_record_lengths(c, tr.read_meta(records), records), records, prepare.tokenizer(c, wd)


def _student(c, tokenizer, heads=False):
    c = c.copy_and_resolve_references()
    c.model.depth_head.enabled = c.model.det_head.enabled = heads
    if heads:
        c.model.depth_head.layers = (0, 1, 2, 3)
    cfg = st.config_from(c.model, 56, tokenizer)
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(
        cfg.decoder, num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=2, intermediate_size=64))
    return st.create(cfg, 0)


def _predict(model, c, tok, records, out, **kw):
    return predictions.predict(model, tok, records, str(out), batch_size=3,
                               max_questions=c.input.max_questions,
                               max_prompt_len=c.input.max_prompt_len, **kw)


def test_every_text_key_and_notes_for_missing_heads(dumped, tmp_path):
    c, records, tok = dumped
    assert _predict(_student(c, tok), c, tok, records, tmp_path, checkpoint_step=7) == 4
    m, notes = predictions.score(str(tmp_path))
    for key in ("grounded/overall_acc", "grounded/unparsable_frac", "paper_mode/overall_acc",
                "teacher/overall_acc", "text/bleu1", "text/bleu4", "text/rouge1", "text/rouge2",
                "text/rougeL", "text/rouge1_precision", "text/rouge1_recall", "text/meteor",
                "text/student_len", "text/teacher_len"):
        assert key in m, key
    assert all(k in m for k in ("paper_mode/proximity_acc", "paper_mode/size_acc"))
    assert 0 <= m["grounded/unparsable_frac"] <= 1 and m["teacher/overall_acc"] == 1.0
    assert any(n.startswith("depth/*: skipped") for n in notes)
    assert any(n.startswith("det/*: skipped") for n in notes)
    rows = [json.loads(x) for x in (tmp_path / predictions.PREDICTIONS).read_text().splitlines()]
    assert len(rows) == m["grounded/overall_n"] and {"answer_text", "teacher_text"} <= set(rows[0])
    # The oracle answers with the grounded word itself: its paper-mode booleans are the student's
    # whenever the student says the same thing, so a perfect copy scores 1.0 there too.
    assert m["text/teacher_len"] == pytest.approx(np.mean([len(r["teacher_text"].split()) for r in rows]))


def test_an_interrupted_eval_finishes_without_duplicates(dumped, tmp_path, monkeypatch):
    c, records, tok = dumped
    model = _student(c, tok)
    _predict(model, c, tok, records, tmp_path / "whole", checkpoint_step=1)
    whole, _ = predictions.score(str(tmp_path / "whole"))

    real = predictions._sample_row
    calls = {"n": 0}

    def crash_on_the_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(predictions, "_sample_row", crash_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        _predict(model, c, tok, records, tmp_path / "cut", checkpoint_step=1)
    monkeypatch.setattr(predictions, "_sample_row", real)
    # The third sample's question rows were written before the crash; the rerun drops them.
    assert _predict(model, c, tok, records, tmp_path / "cut", checkpoint_step=1) == 2
    cut, _ = predictions.score(str(tmp_path / "cut"))
    assert cut == whole
    ids = [json.loads(x)["sample_id"] for x in (tmp_path / "cut" / predictions.SAMPLES).read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 4
    # Another checkpoint starts over.
    assert _predict(model, c, tok, records, tmp_path / "cut", checkpoint_step=2) == 4


def test_depth_and_box_metrics_with_the_heads(dumped, tmp_path):
    c, records, tok = dumped
    _predict(_student(c, tok, heads=True), c, tok, records, tmp_path)
    m, notes = predictions.score(str(tmp_path), class_names=("box", "sphere", "cylinder"))
    for key in ("depth/abs_rel", "depth/rmse", "depth/delta1", "depth/abs_rel_median_scaled",
                "depth/rmse_median_scaled", "depth/delta1_median_scaled", "det/ap25", "det/ap50",
                "det/map25", "det/map50"):
        assert key in m and np.isfinite(m[key]), key
    assert 0 <= m["depth/delta1"] <= 1 and 0 <= m["det/map25"] <= 1
    assert any(k.startswith("det/ap25_") for k in m) and not notes


def test_report_has_tables_curves_and_pictures(dumped, tmp_path):
    from spatial_distill.eval import grounded, report

    c, records, tok = dumped
    model = _student(c, tok, heads=True)
    _predict(model, c, tok, records, tmp_path)
    m, notes = predictions.score(str(tmp_path))
    with open(tmp_path / "metrics.jsonl", "w") as f:  # a training log, as the trainer writes it
        for step in (1, 2, 3):
            f.write(json.dumps({"step": step, "learning/loss": 5.0 - step, "aux/text": 3.0 / step}) + "\n")
        f.write(json.dumps({"step": 3, "eval/learning/loss": 2.5}) + "\n")
    examples = list(grounded._records(records, "eval"))[:2]
    images, prompt, mask = grounded._arrays(examples, 2, c.input.max_questions, c.input.max_prompt_len)
    heads = predictions._heads_out(model, images, prompt, mask)
    md, page = report.write(str(tmp_path), str(tmp_path), m, notes, examples, heads)
    text = open(md).read()
    assert "| proximity |" in text and "paper-mode" in text and "`det/map25`" in text
    assert "![curves](report/curves.png)" in text and "![sample 1](report/sample_1.png)" in text
    assert examples[0].sample.qa[0].question in text
    for name in ("curves.png", "sample_0.png", "sample_1.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000
    assert "<table" in open(page).read() and '<img src="report/sample_0.png"' in open(page).read()


def test_box_corners_of_a_yawed_box():
    from spatial_distill.eval.report import box_corners

    c = box_corners([[1, 2, 3, 2, 4, 6, np.pi / 2]])[0]
    # Turned a quarter: the 2 m side lies along y, the 4 m side along x.
    np.testing.assert_allclose(c.min(0), [1 - 2, 2 - 1, 0], atol=1e-9)
    np.testing.assert_allclose(c.max(0), [1 + 2, 2 + 1, 6], atol=1e-9)


@pytest.mark.slow
def test_the_eval_stage_of_a_trained_checkpoint_end_to_end(dumped, tmp_path):
    """run.py trains the tiny student (heads on) for 2 steps on the dumped records, then its eval
    stage writes every key it can produce, the report, and resumes to the same metrics."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    c, records, tok = dumped
    root = Path(__file__).resolve().parents[1]
    flags = [sys.executable, "run.py", "--config=configs/student.py:tiny", f"--workdir={tmp_path}",
             "--config.data.num_train_scenes=12", "--config.data.num_eval_scenes=4",
             "--config.data.image_size=56", "--config.data.workers=1",
             "--config.tokenizer.vocab_size=280", "--config.model.decoder.vocab_size=280",
             f"--config.teacher.records_dir={records}", f"--config.tokenizer.path={tok.path}",
             "--config.input.max_prompt_len=48", "--config.train.steps=2", "--config.train.batch_size=2",
             "--config.model.depth_head.enabled=True", "--config.model.det_head.enabled=True",
             "--config.eval.report_samples=2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for mode in ("train", "eval"):
        r = subprocess.run(flags + [f"--config.mode={mode}"], cwd=root, env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    from spatial_distill.eval import grounded

    # Teacher-forced yes/no needs both words to be single tokens, which a 280-entry BPE may not give.
    forced = ("grounded_forced/",) if grounded.yes_no_tokens(tok) else ()
    for prefix in ("grounded/", "teacher/", "paper_mode/", "text/", "depth/", "det/") + forced:
        assert any(k.startswith(prefix) for k in m), prefix
    assert "grounded/unparsable_frac" in m and "text/meteor" in m and "det/map50" in m
    assert (tmp_path / "eval" / "report.md").exists() and (tmp_path / "eval" / "report.html").exists()
    assert "report in" in r.stdout and "paper-mode" in r.stdout
    r = subprocess.run(flags + ["--config.mode=eval"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=900)  # nothing left to predict: the same metrics
    assert r.returncode == 0 and json.loads((tmp_path / "eval" / "metrics.json").read_text()) == m

    # The export stage on the same checkpoint: a stock transformers decoder equal to the Flax
    # one, the VGGT parts under official keys, a non-empty OUT refused unless overwrite.
    out = tmp_path / "export"
    r = subprocess.run(flags + ["--config.mode=export", f"--config.export.dir={out}"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "exported step 2" in r.stdout, r.stderr[-3000:]
    import safetensors
    import torch
    import transformers

    from configs import student as student_config
    from spatial_distill.eval import stage as eval_stage

    config = student_config.get_config("tiny")  # the flags above that shape the model
    config.update_from_flattened_dict({
        "data.image_size": 56, "tokenizer.vocab_size": 280, "model.decoder.vocab_size": 280,
        "tokenizer.path": tok.path, "model.depth_head.enabled": True, "model.det_head.enabled": True})
    config = dump_lib.with_record_lengths(config, tr.read_meta(records), records)  # the eval stage's budget
    model = eval_stage.restore_student(config, str(tmp_path))
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out / "decoder")).eval()
    ids = np.asarray([tok.encode("Is the red box near the blue sphere?", add_bos=True)])
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.decoder(ids)), want, atol=1e-4, rtol=0)
    with safetensors.safe_open(str(out / "vggt.safetensors"), "np") as f:
        keys = set(f.keys())
    assert {k.split(".")[0] for k in keys} == {"aggregator", "camera_head", "depth_head"}
    assert "aggregator.patch_embed.patch_embed.proj.weight" in keys or any(
        k.startswith("aggregator.patch_embed.") for k in keys)
    record = json.loads((out / "export.json").read_text())
    assert record["step"] == 2 and record["dtype"] == "float32"
    # The whole student in torch answers every held-out question as the eval stage did.
    from spatial_distill.export import torch_student

    student = torch_student.load(str(out))
    said = {}
    for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        said[row["sample_id"], row["question"]] = row["answer_text"]
    answered = 0
    for rec in grounded._records(records, "eval"):
        questions = [qa.question for qa in rec.sample.qa]
        assert [tok.encode(q, add_bos=True) for q in questions] == [list(a.prompt_ids) for a in rec.answers]
        got = student.answer(rec.sample.rgb, questions, max_new_tokens=config.input.max_answer_len)
        assert got == [said[rec.sample.sample_id, q] for q in questions], rec.sample.sample_id
        answered += len(questions)
    assert answered == len(said) > 0
    r = subprocess.run(flags + ["--config.mode=export", f"--config.export.dir={out}"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 1 and "exists and is not empty" in r.stderr and "overwrite=True" in r.stderr
    assert not list(tmp_path.glob("export.tmp-*"))
