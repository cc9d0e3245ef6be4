"""The eval stage: the latest trained student, answering the held-out scenes' questions.

Writes `WORKDIR/eval/metrics.json` (`grounded/<kind>_acc`, `grounded/overall_acc`,
`teacher/<kind>_acc`, `retention/<kind>`) and `WORKDIR/eval/predictions.jsonl`.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from flax import nnx
from jax.sharding import SingleDeviceSharding

from spatial_distill import prepare
from spatial_distill.eval import grounded
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
    model = restore_student(config, workdir)
    eval_dir = os.path.join(workdir, "eval")
    os.makedirs(eval_dir, exist_ok=True)
    metrics = grounded.evaluate(
        model, prepare.tokenizer(config, workdir), dump.records_dir(config, workdir), split="eval",
        batch_size=config.train.batch_size, max_questions=config.input.max_questions,
        max_prompt_len=config.input.max_prompt_len, max_new_tokens=config.input.max_answer_len,
        predictions_path=os.path.join(eval_dir, "predictions.jsonl"))
    path = grounded.write_metrics(metrics, eval_dir)
    print(summary(metrics))
    print(f"  metrics in {path}, answers in {os.path.join(eval_dir, 'predictions.jsonl')}")
    return metrics


def summary(metrics: dict) -> str:
    """The held-out accuracies as a small table (student, teacher, retention per kind)."""
    kinds = sorted({k.split("/")[1][:-4] for k in metrics if k.startswith("grounded/") and k.endswith("_acc")},
                   key=lambda k: (k == "overall", k))
    rows = [f"  {'kind':<12} {'student':>8} {'teacher':>8} {'questions':>10}"]
    for k in kinds:
        rows.append(f"  {k:<12} {metrics[f'grounded/{k}_acc']:>8.3f} {metrics[f'teacher/{k}_acc']:>8.3f} "
                    f"{metrics[f'grounded/{k}_n']:>10d}")
    return "\n".join(rows)
