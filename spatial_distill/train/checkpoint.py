"""Orbax checkpoints of the train state, with what is needed to resume exactly and to refuse a
checkpoint that does not fit.

`WORKDIR/checkpoints/<step>/` holds two items:
  state  the `TrainState` as a dict (params incl. the Kendall log-variances, optimizer state,
         step, RNG key, DWA history, non-finite counters), written by every process for its shards
  meta   JSON: the full config, the code version (`spatial_distill.__version__` + git commit),
         `scan_layers`, and `input`: one input-pipeline position per process
Saving is asynchronous (orbax copies the arrays to host memory, then writes in a thread); a step
directory appears only once complete, so a run killed mid-save resumes from the previous one.

Refusals, each naming what differs, and deleting nothing:
- `check_same_model`: the stored config's `model` section differs from this run's (compute dtypes
  and remat settings may differ: they change neither parameters nor optimizer state), or
  `train.vision_lr_scale` moves to or from 1 (which adds or drops an optimizer-state step);
- `check_shapes`: a stored parameter's shape differs from the model's, or a parameter is missing
  or unexpected (e.g. a checkpoint of another preset loaded by `load_params`).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

import spatial_distill

# Model fields that change how the model computes but neither its parameters nor the optimizer
# state (`vision.frozen` does change the latter: frozen parameters carry no Adam moments).
# Model fields a run may change on resume: compute settings, where weights came from, and the
# slot grouping's thresholds (hyperparameters of a parameter-free pooling).
NON_STRUCTURAL = ("vision.dtype", "vision.remat", "decoder.dtype", "decoder.remat_policy",
                  "vision.checkpoint", "decoder.checkpoint", "slots.radius", "slots.colour_scale",
                  "slots.min_objectness", "attention", "depth_head.frames_chunk")


class CheckpointError(ValueError):
    """A checkpoint that does not fit this run; the message says what differs and the fix."""


def code_version() -> dict:
    """`{"version": ..., "git_commit": ... or None}` of the code that writes a checkpoint."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(spatial_distill.__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"version": spatial_distill.__version__, "git_commit": commit}


def config_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def check_same_model(stored_config: Mapping, config: ml_collections.ConfigDict, where: str) -> None:
    """Raises CheckpointError when the stored `model` section differs from `config.model`, or
    when `train.vision_lr_scale` moves to or from 1 (the optimizer state gains or loses a step)."""
    old_scale = float(stored_config.get("train", {}).get("vision_lr_scale", 1.0))
    new_scale = float(config.train.vision_lr_scale)
    if (old_scale == 1.0) != (new_scale == 1.0):
        raise CheckpointError(
            f"{where} was trained with train.vision_lr_scale={old_scale:g}, this run asks for "
            f"{new_scale:g}: a scale of 1 and any other keep different optimizer states. Nothing "
            "was deleted: resume with a scale on the same side of 1, or use another workdir")
    diffs = config_diffs(stored_config.get("model", {}), config_dict(config)["model"], NON_STRUCTURAL)
    if diffs:
        listed = "; ".join(f"model.{k}: checkpoint {a!r}, this run {b!r}" for k, a, b in diffs[:8])
        raise CheckpointError(
            f"{where} holds a checkpoint of another model ({listed}"
            f"{'; ...' if len(diffs) > 8 else ''}). Nothing was deleted: use another workdir, or "
            f"the config that wrote it (preset {stored_config.get('preset')!r})")


def config_diffs(stored: Mapping, current: Mapping, ignore=()) -> list[tuple[str, object, object]]:
    """`(dotted key, stored value, current value)` of every leaf field of two config dicts that
    differs (a field only one side has reads "<absent>"), but the keys in `ignore`."""
    old, new = _flatten(stored), _flatten(current)
    return [(k, old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(old) | set(new))
            if k not in ignore and _norm(old.get(k, "<absent>")) != _norm(new.get(k, "<absent>"))]


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_path_str(p): tuple(x.shape) for p, x in leaves if hasattr(x, "shape")}


def check_shapes(stored, expected, where: str, *, prefix: str = "") -> None:
    """Compares two trees of arrays/metadata by path; raises naming each mismatched parameter
    with both shapes, and the missing/unexpected ones."""
    have = {k: v for k, v in _shapes(stored).items() if k.startswith(prefix)}
    want = {k: v for k, v in _shapes(expected).items() if k.startswith(prefix)}
    bad = [f"{k}: checkpoint {have[k]} vs model {want[k]}"
           for k in sorted(set(have) & set(want)) if have[k] != want[k]]
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    if bad or missing or unexpected:
        parts = []
        if bad:
            parts.append(f"{len(bad)} shape mismatch(es): " + "; ".join(bad[:6]))
        if missing:
            parts.append(f"{len(missing)} parameter(s) missing from the checkpoint: {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected parameter(s): {unexpected[:4]}")
        raise CheckpointError(f"{where} does not fit this model (another preset or architecture?): "
                              + " | ".join(parts))


# Replica-parallel saving splits each replicated array among its replicas by slicing it with eager
# ops (one compile per shape); it pays off for large shards only.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
        (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()),
        (jax.Array, th.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)),
        (str, th.StringHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpointer:
    """`CheckpointManager` over `directory` keeping the newest `keep` steps."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True, create: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=async_save)
        # Handlers named up front, so a fresh manager can read the metadata of an old step.
        self._mgr = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": _state_handler(), "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def save(self, step: int, state: Mapping, meta: Mapping, *, force: bool = True) -> None:
        """Starts an async save of `state` (dict of arrays) and `meta` (JSON) at `step`."""
        self._mgr.save(int(step), args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(dict(state)), meta=ocp.args.JsonSave(dict(meta))),
            force=force)

    def meta(self, step: int) -> dict:
        return self._mgr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def stored_shapes(self, step: int):
        return self._mgr.item_metadata(int(step))["state"]

    def restore(self, step: int, abstract_state: Mapping) -> dict:
        """The state at `step`, placed per the shardings of `abstract_state`
        (`jax.ShapeDtypeStruct`s with `.sharding`); parameter shapes are checked first."""
        where = f"checkpoint {self.directory}/{step}"
        check_shapes(self.stored_shapes(step)["params"], abstract_state["params"], where)
        return self._restore(step, dict(abstract_state), partial=False)

    def restore_params(self, step: int, abstract_params: Mapping) -> dict:
        """Only `params` (a partial restore: the optimizer state is never read)."""
        return self._restore(step, {"params": dict(abstract_params)}, partial=True)["params"]

    def _restore(self, step: int, target: dict, *, partial: bool) -> dict:
        args = ocp.args.PyTreeRestore(item=target, partial_restore=partial,
                                      restore_args=ocp.checkpoint_utils.construct_restore_args(target))
        return self._mgr.restore(int(step), args=ocp.args.Composite(state=args)).state

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()


def load_params(directory: str, abstract_params: Mapping, step: int | None = None) -> dict:
    """Only the params of a train checkpoint (eval/export), checked against `abstract_params`
    (`{"student": ..., ...}` of ShapeDtypeStructs, with shardings to place them)."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no checkpoint found; train first")
    ckpt = Checkpointer(directory, keep=1_000_000, async_save=False, create=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{directory}: no checkpoint found; train first")
        stored = ckpt.stored_shapes(step)["params"]
        stored = {k: v for k, v in stored.items() if k in abstract_params}
        check_shapes(stored, abstract_params, f"checkpoint {directory}/{step}")
        return ckpt.restore_params(step, abstract_params)
    finally:
        ckpt.close()


def input_positions(local: dict) -> list[dict]:
    """Every process's input-pipeline position (all processes call this together)."""
    if jax.process_count() == 1:
        return [dict(local)]
    from jax.experimental import multihost_utils

    pos = multihost_utils.process_allgather(np.array([local["epoch"], local["batch"]], np.int64))
    return [{**local, "process_index": p, "epoch": int(e), "batch": int(b)}
            for p, (e, b) in enumerate(np.asarray(pos).reshape(-1, 2))]
