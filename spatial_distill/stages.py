"""The stages `run.py` dispatches to, one function per `config.mode`.

`pipeline` runs every stage in order on the configured data; `data` prepares the data (scenes,
tokenizer, statistics), `dump` writes the teacher records, `train` trains the student, `eval`
scores the latest checkpoint on the held-out scenes.
"""

from __future__ import annotations

import ml_collections

from spatial_distill import prepare
from spatial_distill.eval import stage as eval_stage
from spatial_distill.teacher import dump
from spatial_distill.train import trainer

STAGES = {
    "data": prepare.prepare_data,
    "dump": dump.dump,
    "train": trainer.train_and_evaluate,
    "eval": eval_stage.evaluate,
}
PIPELINE = ("data", "dump", "train", "eval")


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    if config.mode == "pipeline":
        for name in PIPELINE:
            STAGES[name](config, workdir)
        return
    if config.mode not in STAGES:
        raise ValueError(f"config.mode = {config.mode!r}: choose one of {sorted(STAGES) + ['pipeline']}")
    STAGES[config.mode](config, workdir)
