"""The stages `run.py` dispatches to, one function per `config.mode`.

`pipeline` runs every stage in order on the configured data; `data` prepares the data alone.
"""

from __future__ import annotations

import ml_collections

from spatial_distill import prepare

STAGES = {
    "data": prepare.prepare_data,
}
PIPELINE = ("data",)


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    if config.mode == "pipeline":
        for name in PIPELINE:
            STAGES[name](config, workdir)
        return
    if config.mode not in STAGES:
        raise ValueError(f"config.mode = {config.mode!r}: choose one of {sorted(STAGES) + ['pipeline']}")
    STAGES[config.mode](config, workdir)
