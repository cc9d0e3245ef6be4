"""Grounded spatial-QA accuracy: the student's generated answers against the geometry.

The paper scores a question "correct" when student and teacher both do or both don't contain a
keyword; no ground truth is involved (reference/paper.md §1.6). Here every question of a held-out
scene has a grounded answer computed from exact geometry (`gt_answer` in the records), the
student answers it by greedy decoding exactly as at deployment (vision prefix + latents +
question, KV cache), and the first word of its answer must equal the grounded answer. The
teacher's greedy answers are scored the same way, so `retention/<kind>` = student / teacher.
Beside them, `grounded_forced/<kind>_acc` scores yes/no questions teacher-forced: whether the
"yes" logit beats the "no" logit at the first answer token, so a decoding problem (an answer that
starts with another token) cannot hide behind, or be mistaken for, a reasoning one.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from flax import nnx

from data_pipelines import teacher_records as tr
from spatial_distill import generate as generate_lib
from spatial_distill.models.student import Student
from spatial_distill.tokenizer import Tokenizer


def yes_no_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    """{"yes": id, "no": id} of the single tokens the answers start with; {} when the tokenizer
    splits either word (then no teacher-forced accuracy is reported)."""
    ids = {w: tokenizer.encode(w) for w in ("yes", "no")}
    return {w: i[0] for w, i in ids.items()} if all(len(i) == 1 for i in ids.values()) else {}


def first_word(text: str) -> str:
    m = re.search(r"[a-z0-9]+", text.lower())
    return m.group(0) if m else ""


def _records(records_dir: str, split: str):
    meta = tr.read_meta(records_dir)
    if split not in meta.splits:
        raise ValueError(f"{records_dir}: no {split!r} split in teacher_meta.json (has "
                         f"{sorted(meta.splits)}); run the dump stage")
    for path in tr.finished_shards(records_dir, split, meta.splits[split]["num_shards"]):
        yield from tr.read_shard(path, meta)


def _chunks(records, batch_size: int):
    chunk = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) == batch_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _arrays(chunk, batch_size, max_questions, max_prompt_len):
    s0 = chunk[0].sample
    images = np.zeros((batch_size,) + s0.rgb.shape, np.uint8)
    prompt = np.zeros((batch_size, max_questions, max_prompt_len), np.int32)
    mask = np.zeros_like(prompt, bool)
    for b, rec in enumerate(chunk):
        images[b] = rec.sample.rgb
        if len(rec.answers) > max_questions:
            raise ValueError(f"sample {rec.sample.sample_id!r} has {len(rec.answers)} questions, more "
                             f"than config.input.max_questions = {max_questions}")
        for q, ans in enumerate(rec.answers):
            n = len(ans.prompt_ids)
            if n > max_prompt_len:
                raise ValueError(f"sample {rec.sample.sample_id!r} question {q} has {n} prompt tokens, "
                                 f"more than config.input.max_prompt_len = {max_prompt_len}")
            prompt[b, q, :n] = ans.prompt_ids
            mask[b, q, :n] = True
    return images, prompt, mask


@nnx.jit(static_argnames=("max_new_tokens", "eos_id", "pad_id"))
def _answer(model: Student, images, prompt, mask, max_new_tokens, eos_id, pad_id):
    """Greedy answers `[B, Q, T]` and the logits of the first answer token `[B, Q, V]` (the
    same prefix pass: XLA computes it once)."""
    tokens, _ = model.generate(images, prompt, mask, max_new_tokens=max_new_tokens, eos_id=eos_id,
                               pad_id=pad_id)
    emb, valid = model.prefix(images, prompt, mask)
    logits, _ = generate_lib.prefill(model.decoder, emb, valid, emb.shape[1] + 1)
    return tokens, logits.reshape(*prompt.shape[:2], -1)


def evaluate(model: Student, tokenizer: Tokenizer, records_dir: str, *, split: str = "eval",
             batch_size: int = 8, max_questions: int, max_prompt_len: int,
             max_new_tokens: int = 4, predictions_path: str | None = None) -> dict:
    """Every eval metric of `model` on a split in one call (`predictions.predict` into a scratch
    directory, then `predictions.score`); the per-question rows go to `predictions_path`."""
    import shutil
    import tempfile

    from spatial_distill.eval import predictions

    with tempfile.TemporaryDirectory() as scratch:
        predictions.predict(model, tokenizer, records_dir, scratch, split=split, batch_size=batch_size,
                            max_questions=max_questions, max_prompt_len=max_prompt_len,
                            max_new_tokens=max_new_tokens)
        metrics, _ = predictions.score(scratch)
        if predictions_path:
            shutil.copyfile(os.path.join(scratch, predictions.PREDICTIONS), predictions_path)
    return metrics


def write_metrics(metrics: dict, eval_dir: str) -> str:
    os.makedirs(eval_dir, exist_ok=True)
    path = os.path.join(eval_dir, "metrics.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    return path
