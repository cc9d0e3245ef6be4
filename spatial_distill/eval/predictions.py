"""The eval stage's two halves: a resumable prediction pass, then scoring from what it wrote.

`predict` runs the student over a split's records in fixed-shape chunks and appends, per sample,
one row per question to `predictions.jsonl` (the student's and the teacher's full answers, the
grounded answer, the teacher-forced yes/no) and then one row to `samples.jsonl` (per-view depth
metrics and the detections with their ground truth, when the model has those heads). A sample is
done once its `samples.jsonl` row exists: an interrupted eval reruns only the samples after it,
and question rows of a half-written sample are dropped first, so nothing is counted twice.
`progress.json` pins the checkpoint step and the records: a different checkpoint starts over.

`score` reads the two files back and computes every metric: `grounded/*`, `grounded_forced/*`,
`teacher/*`, `retention/*`, `grounded/unparsable_frac`, `paper_mode/*` (paper_mode.py),
`text/*` (text_metrics.py), `depth/*` and `det/*` (geometry_metrics.py). Metrics a model or a
split cannot give are skipped with a note saying why.
"""

from __future__ import annotations

import collections
import json
import os

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from data_pipelines import spatial_qa
from data_pipelines import teacher_records as tr
from spatial_distill import geometry
from spatial_distill.eval import geometry_metrics, grounded, paper_mode
from spatial_distill.eval.grounded import first_word
from spatial_distill.eval.text_metrics import text_metrics
from spatial_distill.tokenizer import Tokenizer

PREDICTIONS, SAMPLES, PROGRESS = "predictions.jsonl", "samples.jsonl", "progress.json"
YES_NO = ("yes", "no")


def _done_samples(out_dir: str, identity: dict) -> set[str]:
    """Sample ids already evaluated for this identity (checkpoint, records); resets otherwise."""
    paths = {n: os.path.join(out_dir, n) for n in (PREDICTIONS, SAMPLES, PROGRESS)}
    old = None
    if os.path.exists(paths[PROGRESS]):
        try:
            with open(paths[PROGRESS]) as f:
                old = json.load(f)
        except json.JSONDecodeError:
            old = None  # unreadable: start over
    if old != identity:
        for p in paths.values():
            if os.path.exists(p):
                os.remove(p)
        tmp = paths[PROGRESS] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(identity, f)
        os.replace(tmp, paths[PROGRESS])
        return set()
    done = set()
    if os.path.exists(paths[SAMPLES]):
        with open(paths[SAMPLES]) as f:
            for line in f:
                try:
                    done.add(json.loads(line)["sample_id"])
                except (json.JSONDecodeError, KeyError):
                    break  # a torn last line: that sample is redone
        _keep_lines(paths[SAMPLES], done)
    if os.path.exists(paths[PREDICTIONS]):
        _keep_lines(paths[PREDICTIONS], done)
    return done


def _keep_lines(path: str, done: set[str]) -> None:
    """Rewrites a jsonl file keeping only complete rows of finished samples."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("sample_id") in done:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


@nnx.jit
def _vision_heads(model, images, prompt, mask):
    """The depth and detection heads' outputs (no text: one dummy answer token)."""
    out = model(images, prompt, mask, prompt[:, :, :1], mask[:, :, :1], text=False)
    keep = {}
    if "depth" in out:
        keep["depth"] = out["depth"]
    if "det_logits" in out:
        keep["det_probs"] = jax.nn.softmax(out["det_logits"], axis=-1)
        keep["det_boxes"] = out["det_boxes"]
    return keep


def _heads_out(model, images, prompt, mask) -> dict[str, np.ndarray]:
    """Depth `[B, S, H, W]` and detections of the model's heads ({} when it has none)."""
    if model is None or (getattr(model, "depth_head", None) is None
                         and getattr(model, "det_head", None) is None):
        return {}
    return {k: np.asarray(v) for k, v in _vision_heads(model, images, prompt, mask).items()}


def predict(model, tokenizer: Tokenizer, records_dir: str, out_dir: str, *, split: str = "eval",
            batch_size: int = 8, max_questions: int, max_prompt_len: int, max_new_tokens: int = 4,
            checkpoint_step: int | None = None) -> int:
    """Writes (or completes) `predictions.jsonl` and `samples.jsonl` in `out_dir`; returns the
    number of samples evaluated by this call."""
    os.makedirs(out_dir, exist_ok=True)
    meta = tr.read_meta(records_dir)
    if split not in meta.splits:
        raise ValueError(f"{records_dir}: no {split!r} split in teacher_meta.json (has "
                         f"{sorted(meta.splits)}); run the dump stage")
    identity = {"checkpoint_step": checkpoint_step, "records_dir": os.path.abspath(records_dir),
                "split": split, "teacher_id": meta.teacher_id,
                "num_records": meta.splits[split].get("num_records")}
    done = _done_samples(out_dir, identity)
    yes_no = grounded.yes_no_tokens(tokenizer)
    todo = (r for r in grounded._records(records_dir, split) if r.sample.sample_id not in done)
    total = meta.splits[split].get("num_records") or None
    written = 0
    with open(os.path.join(out_dir, PREDICTIONS), "a") as preds, \
            open(os.path.join(out_dir, SAMPLES), "a") as samples, \
            tqdm(total=total, initial=len(done), desc=f"eval ({split})", unit="sample") as bar:
        for chunk in grounded._chunks(todo, batch_size):
            images, prompt, mask = grounded._arrays(chunk, batch_size, max_questions, max_prompt_len)
            tokens, first = grounded._answer(model, images, prompt, mask, max_new_tokens, tokenizer.eos_id,
                                    tokenizer.pad_id)
            tokens = np.asarray(tokens)
            first = None if first is None else np.asarray(first)
            heads = _heads_out(model, images, prompt, mask)
            for b, rec in enumerate(chunk):
                for q, (qa, ans) in enumerate(zip(rec.sample.qa, rec.answers)):
                    said = tokenizer.decode(tokens[b, q])
                    forced = None
                    if first is not None and first_word(ans.gt_answer) in yes_no:
                        forced = "yes" if first[b, q, yes_no["yes"]] > first[b, q, yes_no["no"]] else "no"
                    preds.write(json.dumps({
                        "sample_id": rec.sample.sample_id, "kind": qa.kind, "question": qa.question,
                        "answer": first_word(said), "answer_text": said.strip(),
                        "gt": first_word(ans.gt_answer),
                        "teacher": first_word(tokenizer.decode(ans.answer_ids)),
                        "teacher_text": tokenizer.decode(ans.answer_ids).strip(), "forced": forced}) + "\n")
                preds.flush()
                samples.write(json.dumps(_sample_row(rec.sample, heads, b)) + "\n")
                samples.flush()
                written += 1
                bar.update(1)
    return written


def _sample_row(sample, heads: dict, b: int) -> dict:
    row = {"sample_id": sample.sample_id}
    if "depth" in heads:
        pred = heads["depth"][b]
        row["depth"] = [geometry_metrics.depth_metrics(pred[v:v + 1], sample.depth[v:v + 1])
                        if (sample.depth[v] > 0).any() else None for v in range(len(pred))]
    if "det_boxes" in heads:
        probs = heads["det_probs"][b][:, :-1]  # the last class is "no object"
        labels = probs.argmax(-1)
        gt = np.asarray(geometry.boxes_in_camera0_frame(sample.boxes[None], sample.cam_to_world[None]))[0]
        row["det"] = {"boxes": heads["det_boxes"][b].tolist(), "labels": labels.tolist(),
                      "scores": probs.max(-1).tolist(), "gt_boxes": gt.tolist(),
                      "gt_labels": np.asarray(sample.labels).tolist()}
    return row


def _unparsable(kind: str, answer: str) -> bool:
    if kind == "describe":
        return not (answer.isdigit() or answer in spatial_qa.NUMBER_WORDS)
    return answer not in YES_NO


def score(out_dir: str, *, class_names=None) -> tuple[dict, list[str]]:
    """Every metric from `out_dir`'s predictions; returns (flat metrics, notes on what was skipped)."""
    with open(os.path.join(out_dir, PREDICTIONS)) as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(out_dir, SAMPLES)) as f:
        samples = [json.loads(line) for line in f]
    if not rows:
        raise ValueError(f"{out_dir}: no questions were evaluated (is the split empty?)")
    notes: list[str] = []
    right, teacher_right, total = collections.Counter(), collections.Counter(), collections.Counter()
    forced_right, forced_total = collections.Counter(), collections.Counter()
    graded = [r for r in rows if r["gt"]]
    if not graded:
        notes.append("grounded/*: skipped, the records hold no ground-truth answers (gt_answer); "
                     "dump from data with grounded QA")
    for r in graded:
        k = r["kind"]
        total[k] += 1
        right[k] += r["answer"] == r["gt"]
        teacher_right[k] += r["teacher"] == r["gt"]
        if r.get("forced") is not None:
            forced_total[k] += 1
            forced_right[k] += r["forced"] == r["gt"]
    m: dict[str, float] = {}
    for k in sorted(total):
        m[f"grounded/{k}_acc"] = right[k] / total[k]
        m[f"grounded/{k}_n"] = total[k]
        m[f"teacher/{k}_acc"] = teacher_right[k] / total[k]
        if teacher_right[k]:
            m[f"retention/{k}"] = right[k] / teacher_right[k]
    for k in sorted(forced_total):
        m[f"grounded_forced/{k}_acc"] = forced_right[k] / forced_total[k]
    if graded:
        n = len(graded)
        m["grounded/overall_acc"] = sum(right.values()) / n
        m["teacher/overall_acc"] = sum(teacher_right.values()) / n
        m["grounded/overall_n"] = n
    m["grounded/unparsable_frac"] = float(np.mean([_unparsable(r["kind"], r["answer"]) for r in rows]))
    m.update(paper_mode.agreement((r["kind"], r["answer_text"], r["teacher_text"]) for r in rows))
    m.update(text_metrics([r["answer_text"] for r in rows], [r["teacher_text"] for r in rows]))
    per_view = [d for s in samples for d in s.get("depth") or [] if d]
    if per_view:
        m.update({k: float(np.mean([d[k] for d in per_view])) for k in per_view[0]})
    elif not any("depth" in s for s in samples):
        notes.append("depth/*: skipped, the model has no depth head (model.depth_head.enabled)")
    dets = [s["det"] for s in samples if "det" in s]
    if dets:
        m.update(geometry_metrics.detection_metrics(
            [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"]} for d in dets],
            [{"boxes": d["gt_boxes"], "labels": d["gt_labels"]} for d in dets], class_names))
    else:
        notes.append("det/*: skipped, the model has no detection head (model.det_head.enabled)")
    return m, notes


__all__ = ["PREDICTIONS", "SAMPLES", "predict", "score"]
