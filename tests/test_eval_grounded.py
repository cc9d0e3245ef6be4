import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import teacher_records as tr
from spatial_distill import prepare
from spatial_distill.eval import grounded
from spatial_distill.models import student as st
from spatial_distill.teacher import dump as dump_lib
from tests.test_dump import tiny_config


@pytest.fixture(scope="module")
def dumped(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("eval"))
    c = tiny_config()
    records = dump_lib.dump(c, wd)
    # The answer budget is the records' longest answer (the tiny preset leaves it unset).
    return dump_lib.with_record_lengths(c, tr.read_meta(records), records), wd, records, prepare.tokenizer(c, wd)


def _small_student(c, tokenizer):
    cfg = st.config_from(c.model, 56, tokenizer)
    cfg = dataclasses.replace(cfg, depth_head=None, det_head=None,
                              decoder=dataclasses.replace(cfg.decoder, num_layers=1, hidden_size=32,
                                                          num_heads=2, num_kv_heads=2,
                                                          intermediate_size=64))
    return st.create(cfg, 0)


def test_first_word():
    assert grounded.first_word(" Yes, it is.") == "yes"
    assert grounded.first_word("") == "" and grounded.first_word("  four") == "four"


def test_metrics_of_a_real_untrained_student(dumped, tmp_path):
    c, wd, records, tok = dumped
    model = _small_student(c, tok)
    m = grounded.evaluate(model, tok, records, batch_size=3, max_questions=c.input.max_questions,
                          max_prompt_len=c.input.max_prompt_len, predictions_path=str(tmp_path / "p.jsonl"))
    n = m["grounded/overall_n"]
    assert n == sum(m[f"grounded/{k}_n"] for k in ("contact", "describe", "orientation", "proximity", "size")
                    if f"grounded/{k}_n" in m)
    assert all(0.0 <= v <= 1.0 for k, v in m.items() if k.endswith("_acc"))
    assert m["teacher/overall_acc"] == 1.0  # the oracle's greedy answer is the grounded answer
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == n


def test_scoring_is_against_the_geometry(dumped, monkeypatch):
    c, wd, records, tok = dumped
    recs = list(grounded._records(records, "eval"))
    flip = {"yes": "no", "no": "yes"}

    def fake(model, images, prompt, mask, max_new_tokens, eos_id, pad_id, *, say):
        out = np.zeros(prompt.shape[:2] + (max_new_tokens,), np.int32)
        for b, r in enumerate(recs_iter.pop(0)):
            for q, a in enumerate(r.answers):
                ids = tok.encode(say(a.gt_answer), add_eos=True)[:max_new_tokens]
                out[b, q, :len(ids)] = ids
        return jnp.asarray(out), None

    for say, want in ((lambda gt: gt, 1.0), (lambda gt: flip.get(gt, gt), 0.0)):
        recs_iter = [recs[i:i + 2] for i in range(0, len(recs), 2)]
        monkeypatch.setattr(grounded, "_answer", lambda *a, say=say: fake(*a, say=say))
        m = grounded.evaluate(None, tok, records, batch_size=2, max_questions=c.input.max_questions,
                              max_prompt_len=c.input.max_prompt_len,
                              max_new_tokens=c.input.max_answer_len)
        for kind in ("proximity", "contact", "size", "orientation"):
            if f"grounded/{kind}_acc" in m:
                assert m[f"grounded/{kind}_acc"] == want
        assert m["grounded/describe_acc"] == 1.0  # counting answers are not flipped


def test_too_many_questions_is_named(dumped):
    c, wd, records, tok = dumped
    with pytest.raises(ValueError, match=r"questions, more than config.input.max_questions = 2"):
        grounded.evaluate(_small_student(c, tok), tok, records, batch_size=2, max_questions=2,
                          max_prompt_len=c.input.max_prompt_len)
