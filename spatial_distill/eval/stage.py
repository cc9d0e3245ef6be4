"""The eval stage: the latest trained student, answering the held-out scenes' questions.

Resumable (`predictions.py`): `WORKDIR/eval/predictions.jsonl` and `samples.jsonl` grow sample by
sample, and a rerun after an interruption finishes them. Writes `WORKDIR/eval/metrics.json` with
flat keys: `grounded/*` (against the geometry), `grounded_forced/*`, `teacher/*`, `retention/*`,
`grounded/unparsable_frac`, `paper_mode/*` (the paper's keyword agreement), `text/*` (BLEU, ROUGE,
METEOR against the teacher's answers) and, with those heads, `depth/*` and `det/*`.
"""

from __future__ import annotations

import itertools
import os

import jax
import ml_collections
from flax import nnx
from jax.sharding import SingleDeviceSharding

from data_pipelines import teacher_records as tr
from spatial_distill import prepare
from spatial_distill.eval import grounded, predictions, report
from spatial_distill.models import student as st
from spatial_distill.teacher import dump
from spatial_distill.train import checkpoint as ckpt_lib
from spatial_distill.train import step as step_lib


def restore_student(config: ml_collections.ConfigDict, workdir: str) -> st.Student:
    """The latest checkpoint's student weights (shape-checked against the config's model)."""
    cfg = st.config_from(config.model, config.data.image_size, prepare.tokenizer(config, workdir))
    graphdef, abstract_state = nnx.split(st.create(cfg, abstract=True))
    place = SingleDeviceSharding(jax.devices()[0])
    abstract = {"student": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place),
                                        abstract_state.to_pure_dict())}
    params = ckpt_lib.load_params(os.path.join(workdir, "checkpoints"), abstract)
    return step_lib.student_from(graphdef, abstract_state, params["student"])


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    records = dump.records_dir(config, workdir)
    config = dump.with_record_lengths(config, tr.read_meta(records), records)
    model = restore_student(config, workdir)
    step = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, create=False).latest_step()
    eval_dir = os.path.join(workdir, "eval")
    predictions.predict(
        model, prepare.tokenizer(config, workdir), records, eval_dir,
        split="eval", batch_size=config.train.batch_size, max_questions=config.input.max_questions,
        max_prompt_len=config.input.max_prompt_len, max_new_tokens=config.input.max_answer_len,
        checkpoint_step=step)
    metrics, notes = predictions.score(eval_dir, class_names=_class_names(config))
    path = grounded.write_metrics(metrics, eval_dir)
    examples = list(itertools.islice(grounded._records(records, "eval"), config.eval.report_samples))
    heads = {}
    if examples:
        images, prompt, mask = grounded._arrays(examples, len(examples), config.input.max_questions,
                                                config.input.max_prompt_len)
        heads = predictions._heads_out(model, images, prompt, mask)
    md, _ = report.write(eval_dir, workdir, metrics, notes, examples, heads)
    print(summary(metrics))
    for note in notes:
        print(f"  {note}")
    print(f"  metrics in {path}, answers in {os.path.join(eval_dir, predictions.PREDICTIONS)}, "
          f"report in {md} (and .html)")
    return metrics


def _class_names(config: ml_collections.ConfigDict):
    from data_pipelines import spatial_qa

    n = config.model.det_head.num_classes
    return spatial_qa.KINDS if n == len(spatial_qa.KINDS) else None


def summary(metrics: dict) -> str:
    """The held-out accuracies as a small table (student, teacher, retention per kind)."""
    kinds = sorted({k.split("/")[1][:-4] for k in metrics if k.startswith("grounded/") and k.endswith("_acc")},
                   key=lambda k: (k == "overall", k))
    rows = [f"  {'kind':<12} {'student':>8} {'teacher':>8} {'paper-mode':>10} {'questions':>10}"]
    for k in kinds:
        paper = metrics.get(f"paper_mode/{k}_acc")
        paper = f"{paper:>10.3f}" if paper is not None else f"{'-':>10}"
        rows.append(f"  {k:<12} {metrics[f'grounded/{k}_acc']:>8.3f} {metrics[f'teacher/{k}_acc']:>8.3f} "
                    f"{paper} {metrics[f'grounded/{k}_n']:>10d}")
    text = [f"{k.split('/')[1]} {metrics[k]:.3f}" for k in ("text/bleu1", "text/rouge1", "text/meteor")
            if k in metrics]
    if text:
        rows.append("  text vs the teacher: " + ", ".join(text))
    if "depth/abs_rel" in metrics:
        rows.append(f"  depth: abs_rel {metrics['depth/abs_rel']:.3f}, rmse {metrics['depth/rmse']:.3f} m, "
                    f"delta1 {metrics['depth/delta1']:.3f} (median-scaled abs_rel "
                    f"{metrics['depth/abs_rel_median_scaled']:.3f})")
    if "det/map25" in metrics:
        rows.append(f"  3D boxes: mAP@0.25 {metrics['det/map25']:.3f}, mAP@0.5 {metrics['det/map50']:.3f}")
    return "\n".join(rows)
