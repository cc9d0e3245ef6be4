"""The stages `run.py` dispatches to, one function per `config.mode`.

`pipeline` runs every stage in order on the configured data; `data` prepares the data (scenes,
tokenizer, statistics), `dump` writes the teacher records, `train` trains the student, `eval`
scores the latest checkpoint on the held-out scenes. `vision` pretrains the student's VGGT on the
training scenes (not part of the pipeline: its export is what `model.vision.checkpoint` loads).
`aot` compiles the train step for a TPU slice on this host and reports its memory and cost;
`export` writes the latest checkpoint as PyTorch artifacts.
"""

from __future__ import annotations

import ml_collections

from spatial_distill import aot, console, prepare
from spatial_distill.eval import stage as eval_stage
from spatial_distill.export import stage as export_stage
from spatial_distill.teacher import dump
from spatial_distill.train import trainer, vision

STAGES = {
    "data": prepare.prepare_data,
    "dump": dump.dump,
    "train": trainer.train_and_evaluate,
    "eval": eval_stage.evaluate,
    "vision": vision.pretrain,
    "aot": aot.run,
    "export": export_stage.export,
}
PIPELINE = ("data", "dump", "train", "eval")


WHAT = {
    "data": "scenes, tokenizer and statistics",
    "dump": "teacher answers to every question -> records",
    "train": "the student on the teacher records",
    "eval": "held-out questions, answered and scored against the geometry",
    "vision": "pretraining the student's VGGT on the training scenes",
    "aot": "compiling the train step for a TPU slice (memory, FLOPs, collectives)",
    "export": "the latest checkpoint as PyTorch artifacts",
}


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    names = PIPELINE if config.mode == "pipeline" else (config.mode,)
    if any(n not in STAGES for n in names):
        raise ValueError(f"config.mode = {config.mode!r}: choose one of {sorted(STAGES) + ['pipeline']}")
    for i, name in enumerate(names, 1):
        console.stage(i, len(names), name, WHAT[name])
        STAGES[name](config, workdir)
