"""The train stage: `train_and_evaluate(config, workdir)` (DESIGN.md §1, §6, §7).

Reads top to bottom in phases: setup and logging, mesh, input pipeline, model and optimizer,
shard and transfer, step functions, restore checkpoint, train loop. Outputs under `workdir`:

  checkpoints/<step>/   Orbax: train state + config, code version, input positions (checkpoint.py)
  metrics.jsonl         one line per logged step (process 0): learning/*, distill/*, aux/*,
                        weights/*, perf/*; eval/* lines at evaluation steps
  tb/                   the same scalars for TensorBoard

A rerun with the same workdir resumes from the latest checkpoint: the state, the RNG and the input
position are restored and metrics.jsonl is cut back to the restored step, so an interrupted run
(even `kill -9`) ends with the same per-step losses as one that was never interrupted. SIGTERM
makes the loop save and return. A non-finite loss or gradient skips the update; after
`train.nan_patience` in a row the run saves (params are the last good ones: nothing was applied)
and raises `NonFiniteLossError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from configs import common
from data_pipelines import teacher_records as tr
from data_pipelines.input_pipeline import InputPipeline, to_global
from spatial_distill import sharding
from spatial_distill import tokenizer as tokenizer_lib
from spatial_distill.models import student as student_lib
from spatial_distill.teacher.dump import LENGTH_FIELDS, records_dir, with_record_lengths
from spatial_distill.train import checkpoint as ckpt_lib
from spatial_distill.train import metrics as metrics_lib
from spatial_distill.train import step as step_lib
from spatial_distill.train import vision_cache

log = logging.getLogger(__name__)
BATCH_AXES = ("data", "fsdp")


class NonFiniteLossError(RuntimeError):
    """`train.nan_patience` consecutive steps had a non-finite loss or gradient."""


# ---------------------------------------------------------------------------------------------
# Checks of the teacher records against this run.


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> tokenizer_lib.Tokenizer:
    """The configured tokenizer, or the data stage's `WORKDIR/tokenizer` (never trained here)."""
    if config.tokenizer.path:
        return tokenizer_lib.load_tokenizer(config.tokenizer.path)
    path = os.path.join(workdir, "tokenizer")
    if not os.path.exists(os.path.join(path, tokenizer_lib.BPE_FILE)):
        raise tokenizer_lib.TokenizerError(
            f"no tokenizer: config.tokenizer.path is unset and {path}/{tokenizer_lib.BPE_FILE} does "
            "not exist; run the data and dump stages first (config.mode=pipeline) or set "
            "config.tokenizer.path to the tokenizer the records were dumped with")
    return tokenizer_lib.load_tokenizer(path)


def check_records(config: ml_collections.ConfigDict, meta: tr.TeacherMeta, data_dir: str,
                  tokenizer: tokenizer_lib.Tokenizer) -> None:
    """Raises ValueError naming the `teacher_meta.json` field that disagrees with this run."""
    where = os.path.join(data_dir, tr.META_FILE)
    size = config.data.image_size
    checks = (
        ("tokenizer_hash", meta.tokenizer_hash, tokenizer.sha256,
         f"the tokenizer {tokenizer.path} (sha256); the records come from another tokenizer: "
         "re-dump them with this one or set config.tokenizer.path to theirs"),
        ("vocab_size", meta.vocab_size, config.model.decoder.vocab_size,
         "config.model.decoder.vocab_size"),
        ("k", meta.k, config.teacher.k, "config.teacher.k; re-dump or set config.teacher.k"),
        ("temperature", meta.temperature, config.teacher.temperature, "config.teacher.temperature"),
        # kd_loss softens the student by the temperature the teacher log-probs were stored at;
        # the stored top-K cannot be re-tempered exactly (the full-vocabulary sum is gone).
        ("temperature", meta.temperature, config.loss.temperature,
         "config.loss.temperature (the KD temperature must be the dump temperature: dump with "
         "config.teacher.temperature = config.loss.temperature)"),
        ("image_size", tuple(meta.image_size), (size, size), "config.data.image_size"),
        ("num_views", meta.num_views, config.data.num_views, "config.data.num_views"),
    )
    for field, got, want, what in checks:
        if got != want:
            raise ValueError(f"{where}: field '{field}' = {got!r} but this run has {want!r} from {what}")


def verify_shards(data_dir: str, meta: tr.TeacherMeta, split: str, workdir: str) -> None:
    """Validates every record of this process's shards once (content hash included): the tf.data
    pipeline decodes without checking hashes. Raises `RecordError` naming file and record index.
    Verified shards are remembered by (name, size, mtime) in WORKDIR/.verified-p<process>.json."""
    n = int(meta.splits[split]["num_shards"])
    mine = tr.finished_shards(data_dir, split, n)[jax.process_index()::jax.process_count()]
    memo_path = os.path.join(workdir, f".verified-p{jax.process_index()}.json")
    memo = {}
    if os.path.exists(memo_path):
        with open(memo_path) as f:
            memo = json.load(f)
    for path in mine:
        st = os.stat(path)
        key = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
        if memo.get(key) == meta.teacher_id:
            continue
        for _ in tr.read_shard(path, meta, validate=True):
            pass
        memo[key] = meta.teacher_id
        with open(memo_path, "w") as f:
            json.dump(memo, f)


def check_accumulation(config: ml_collections.ConfigDict, num_devices: int) -> None:
    accum = int(config.train.accum_steps)
    data, fsdp, _ = sharding.mesh_shape(config.mesh.shape, num_devices)
    ways = data * fsdp
    if accum < 1 or config.train.batch_size % (ways * accum):
        raise ValueError(
            f"config.train.accum_steps = {accum}: the batch of {config.train.batch_size} must split "
            f"into {accum} micro-batches that each divide across the {ways} data x fsdp devices; "
            f"use a batch size that is a multiple of {ways * max(accum, 1)}")


def batch_shapes(config: ml_collections.ConfigDict, meta: tr.TeacherMeta, sharding_):
    """Global batch as ShapeDtypeStructs (keys of `data_pipelines.input_pipeline`)."""
    b, s, hw = config.train.batch_size, meta.num_views, tuple(meta.image_size)
    i = config.input
    q, lp, la, k, n = i.max_questions, i.max_prompt_len, i.max_answer_len, meta.k, i.max_boxes
    f32, i32, u8, b8 = jnp.float32, jnp.int32, jnp.uint8, jnp.bool_
    spec = {"rgb": ((b, s, *hw, 3), u8), "depth": ((b, s, *hw), f32),
            "intrinsics": ((b, s, 3, 3), f32), "cam_to_world": ((b, s, 4, 4), f32),
            "boxes": ((b, n, 7), f32), "box_mask": ((b, n), b8), "labels": ((b, n), i32),
            "question_mask": ((b, q), b8), "qa_kind": ((b, q), i32),
            "prompt_ids": ((b, q, lp), i32), "prompt_mask": ((b, q, lp), b8),
            "answer_ids": ((b, q, la), i32), "answer_mask": ((b, q, la), b8),
            "topk_ids": ((b, q, la, k), i32), "topk_logprobs": ((b, q, la, k), f32),
            "logsumexp": ((b, q, la), f32), "referred": ((b, q, 2), i32)}
    return {key: jax.ShapeDtypeStruct(shape, dt, sharding=sharding_) for key, (shape, dt) in spec.items()}


@dataclasses.dataclass(frozen=True)
class Programs:
    """A train run's model, state layout and jitted (not yet lowered) step functions on one mesh.
    The train stage and `aot.py` both build them here, so an AOT report compiles exactly what
    training runs. Lower and compile inside `sharding.axis_rules(mesh, rules)`."""

    model_cfg: student_lib.StudentConfig
    build: Callable  # key -> Student
    breakdown: dict  # parameter counts per part
    spec: step_lib.LossSpec
    init: Callable  # key -> TrainState
    abstract_state: step_lib.TrainState  # ShapeDtypeStructs carrying their shardings
    state_sh: step_lib.TrainState  # NamedShardings
    batch_spec: dict  # the input pipeline's global batch
    train_spec: dict  # what the train step takes (+ cached vision inputs)
    train_fn: Callable  # jitted (state, batch) -> (state, metrics)
    eval_fn: Callable  # jitted (params, dwa, batch) -> metrics
    vision_fn: Callable | None  # jitted frozen vision side, when it is cached


def step_flops(config: ml_collections.ConfigDict, prog: Programs, num_views: int) -> dict[str, float]:
    """Analytic FLOPs of one train step as `prog` runs it: with the vision side cached, the step
    does not run it (its forward happens once per sample, outside)."""
    flops = metrics_lib.config_train_flops(config, prog.model_cfg, prog.breakdown, num_views)
    if prog.vision_fn is not None:
        flops = {**flops, "vision": 0.0, "total": flops["decoder"]}
    return flops


def programs(config: ml_collections.ConfigDict, mesh, rules, meta, tokenizer, *,
             cache_vision: bool) -> Programs:
    """Builds `Programs` for `config` on `mesh`. `meta` gives the records' `num_views`,
    `image_size` and `k`; `tokenizer` the decoder's (word and relation ids)."""
    for field in LENGTH_FIELDS:
        if config.input[field] is None:
            raise ValueError(f"config.input.{field} is unset: pass the config through "
                             "dump.with_record_lengths (the records' longest) or set it")
    batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    replicated = NamedSharding(mesh, PartitionSpec())
    spec = step_lib.loss_spec(config, tokenizer)
    model_cfg = student_lib.config_from(config.model, config.data.image_size, tokenizer)
    if spec.runs_decoder:  # the vision stage never feeds its (unpooled) patches to a decoder
        model_cfg.check_lengths(meta.num_views, config.input.max_prompt_len, config.input.max_answer_len)

    def build(key):
        return student_lib.Student(model_cfg, rngs=nnx.Rngs(params=key))

    abstract_model = nnx.eval_shape(lambda: build(jax.random.PRNGKey(0)))
    graphdef, abstract_model_state = nnx.split(abstract_model)
    abstract_params = {"student": abstract_model_state.to_pure_dict()}
    if spec.weighting == "kendall":
        abstract_params["kendall"] = {"log_vars": jax.ShapeDtypeStruct((len(spec.tasks),), jnp.float32)}
    tx, schedule = step_lib.make_optimizer(config, abstract_params)

    def init(key):
        return step_lib.init_state(key, tx, spec, build)

    abstract_state = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
    state_sh = step_lib.state_shardings(abstract_state, abstract_model_state, mesh, rules)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, state_sh)

    step_kw = dict(graphdef=graphdef, abstract_state=abstract_model_state, spec=spec)
    batch_spec = batch_shapes(config, meta, batch_sharding)
    train_spec, vision_fn = batch_spec, None
    if cache_vision:
        def frozen(params, inputs):
            model = step_lib.student_from(graphdef, abstract_model_state, params)
            return step_lib.frozen_outputs(model, inputs, spec)

        vision_fn = jax.jit(frozen, in_shardings=(state_sh.params["student"], batch_sharding),
                            out_shardings=batch_sharding)
        shapes = jax.eval_shape(frozen, abstract_state.params["student"],
                                {k: batch_spec[k] for k in step_lib.FROZEN_INPUTS})
        train_spec = {**batch_spec, **{k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
                                       for k, v in shapes.items()}}
    # Each step traces once: the batch shapes are static (configured), so a second trace means
    # a shape or dtype changed between steps, which would silently recompile every few steps.
    # chex counts traces per definition site, process-wide: a fresh Programs starts its count.
    chex.clear_trace_counter()

    @chex.assert_max_traces(n=1)
    def train_step(state, batch):
        return step_lib.train_step(state, batch, tx=tx, schedule=schedule,
                                   accum_steps=int(config.train.accum_steps), **step_kw)

    @chex.assert_max_traces(n=1)
    def eval_step(params, dwa, batch):
        return step_lib.eval_step(params, dwa, batch, **step_kw)

    train_fn = jax.jit(train_step, in_shardings=(state_sh, batch_sharding),
                       out_shardings=(state_sh, replicated), donate_argnums=(0,))
    eval_fn = jax.jit(eval_step, in_shardings=(state_sh.params, state_sh.dwa, batch_sharding),
                      out_shardings=replicated)
    return Programs(model_cfg, build, student_lib.parameter_breakdown(abstract_model), spec, init,
                    abstract_state, state_sh, batch_spec, train_spec, train_fn, eval_fn, vision_fn)


# ---------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       verify_records: bool | None = None) -> None:
    """Trains the student on the teacher records of `config`, resuming from `workdir` if it holds
    a checkpoint; evaluates on the eval split every `train.eval_every` steps and at the end.

    verify_records: validate every record (content hash included) once before training; None
    reads `config.train.verify_records`.
    """
    if verify_records is None:
        verify_records = bool(config.train.verify_records)
    with contextlib.ExitStack() as cleanup:
        _train_and_evaluate(config, workdir, verify_records, cleanup)


def _train_and_evaluate(config, workdir, verify_records, cleanup: contextlib.ExitStack) -> None:
    # -- Setup and logging -------------------------------------------------------------------
    jax.config.update("jax_threefry_partitionable", True)
    common.validate(config, num_devices=jax.device_count())
    check_accumulation(config, jax.device_count())
    os.makedirs(workdir, exist_ok=True)
    primary = jax.process_index() == 0
    total_steps = int(config.train.steps)
    # A workdir holding another model's checkpoint is refused before anything is built.
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=config.train.keep_checkpoints)
    cleanup.callback(ckpt.close)
    latest = ckpt.latest_step()
    if latest is not None:
        where = f"{ckpt.directory}/{latest}"
        stored = ckpt.meta(latest)
        ckpt_lib.check_same_model(stored["config"], config, where)
        if latest == total_steps:  # finished: a rerun (the main job's) builds and compiles nothing
            log.info("%s is the last step: trained to step %d", where, latest)
            return

    # -- Mesh ----------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = sharding.DEFAULT_RULES
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
             jax.process_count())

    # -- Input pipeline ------------------------------------------------------------------------
    data_dir = records_dir(config, workdir)
    meta = tr.read_meta(data_dir)
    tokenizer = load_tokenizer(config, workdir)
    check_records(config, meta, data_dir, tokenizer)
    config = with_record_lengths(config, meta, data_dir)  # unset input lengths: the records' longest
    log.info("questions padded to %d prompt + %d answer tokens, %d per sample", config.input.max_prompt_len,
             config.input.max_answer_len, config.input.max_questions)
    if verify_records:
        for split in ("train", "eval"):
            verify_shards(data_dir, meta, split, workdir)
    size = (config.data.image_size, config.data.image_size)
    limits = dict(max_questions=config.input.max_questions, max_prompt_len=config.input.max_prompt_len,
                  max_answer_len=config.input.max_answer_len, max_boxes=config.input.max_boxes)
    spec = step_lib.loss_spec(config, tokenizer)
    limits["require_referred"] = "ground" in spec.tasks
    cache_vision = vision_cache.caches_vision(config)
    train_data = InputPipeline(data_dir, "train", batch_size=config.train.batch_size,
                               seed=config.seed, image_size=size,
                               shuffle_buffer=config.input.shuffle_buffer,
                               with_sample_ids=cache_vision, **limits)
    # Built now so a missing or too small eval split fails before training, not after it.
    eval_data = InputPipeline(data_dir, "eval", batch_size=config.train.batch_size, seed=config.seed,
                              shuffle=False, num_epochs=1, image_size=size, **limits)
    eval_start = eval_data.state()

    # -- Model, optimizer, shardings and step functions ----------------------------------------
    prog = programs(config, mesh, rules, meta, tokenizer, cache_vision=cache_vision)
    model_cfg, build, spec, init = prog.model_cfg, prog.build, prog.spec, prog.init
    init_key = jax.random.PRNGKey(config.seed)
    abstract_state, state_sh, batch_spec = prog.abstract_state, prog.state_sh, prog.batch_spec
    train_spec, train_fn, eval_fn = prog.train_spec, prog.train_fn, prog.eval_fn
    log.info("student parameters: %s (total %.2fM); tasks %s weighted by %s", prog.breakdown,
             sum(prog.breakdown.values()) / 1e6, spec.tasks, spec.weighting)
    cache = None
    if cache_vision:
        cache = vision_cache.VisionCache(prog.vision_fn, lambda x: to_global(x, mesh))
        log.info("frozen vision side cached per training sample: %s",
                 {k: v.shape[1:] for k, v in train_spec.items() if k not in batch_spec})
    t0 = time.perf_counter()
    with sharding.axis_rules(mesh, rules):  # constrain() calls see the mesh while tracing
        train_step = train_fn.lower(abstract_state, train_spec).compile()
    log.info("train step compiled in %.1f s", time.perf_counter() - t0)
    compiled_eval = []  # compiled at the first evaluation

    def evaluate(state) -> dict[str, float]:
        if not compiled_eval:
            t0 = time.perf_counter()
            with sharding.axis_rules(mesh, rules):
                compiled_eval.append(eval_fn.lower(abstract_state.params, abstract_state.dwa,
                                                   batch_spec).compile())
            log.info("eval step compiled in %.1f s", time.perf_counter() - t0)
        sums, n = {}, 0
        eval_data.restore(eval_start)
        for batch in eval_data:
            m = metrics_lib.to_host(compiled_eval[0](state.params, state.dwa, to_global(batch, mesh)))
            sums = {k: sums.get(k, 0.0) + v for k, v in m.items()}
            n += 1
        return {f"eval/{k}": v / max(n, 1) for k, v in sums.items()}

    flops = step_flops(config, prog, meta.num_views)
    peak, peak_source = metrics_lib.peak_flops(list(mesh.devices.flat))
    log.info("%.3g model FLOPs per step; peak %.3g FLOP/s (%s)", flops["total"], peak, peak_source)

    # -- Restore checkpoint --------------------------------------------------------------------
    if latest is not None:
        state = step_lib.TrainState(**ckpt.restore(latest, abstract_state.to_dict()))
        positions = stored["input"]
        if len(positions) != jax.process_count():
            raise ckpt_lib.CheckpointError(
                f"{where} was written by {len(positions)} processes but this run has "
                f"{jax.process_count()}; the input positions cannot be split differently")
        train_data.restore(positions[jax.process_index()])
        if primary:
            dropped = metrics_lib.truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), latest)
            log.info("resumed from %s (dropped %d metric lines past it)", where, dropped)
    else:
        # Sharded init: every parameter is created on the devices that hold it.
        t0 = time.perf_counter()
        state = student_lib.init_program(lambda: init(init_key), out_shardings=state_sh)()
        if config.model.vision.checkpoint:
            # The aggregator (and depth head) start from VGGT; everything else stays random.
            loaded = step_lib.vggt_weights(build, config.model.vision.checkpoint,
                                           depth_head=model_cfg.depth_head is not None)
            student = dict(state.params["student"])
            for part, tree in loaded.items():
                student[part] = jax.device_put(tree, state_sh.params["student"][part])
            state = state.replace(params={**state.params, "student": student})
            log.info("VGGT weights for %s from %s", sorted(loaded), config.model.vision.checkpoint)
        if config.model.decoder.checkpoint:
            loaded = step_lib.decoder_weights(model_cfg.decoder, config.model.decoder.checkpoint)
            student = dict(state.params["student"])
            student["decoder"] = jax.device_put(loaded, state_sh.params["student"]["decoder"])
            state = state.replace(params={**state.params, "student": student})
            log.info("decoder weights from %s", config.model.decoder.checkpoint)
        log.info("initialised in %.1f s", time.perf_counter() - t0)
    start = int(jax.device_get(state.step.addressable_data(0)))

    # -- Train loop ----------------------------------------------------------------------------
    writer = metrics_lib.MetricWriter(workdir, enabled=primary,
                                      purge_step=start + 1 if latest is not None else None)
    cleanup.callback(writer.close)
    bar = cleanup.enter_context(tqdm(total=total_steps, initial=start, desc="train", unit="step",
                                     disable=not primary, dynamic_ncols=True))
    stop = cleanup.enter_context(_StopFlag())
    pending: list = []  # (step, device metrics) of the newest step: fetched one step later
    timing = {"t": time.perf_counter(), "step": start}

    def report(state, step):
        """Fetches the pending step's metrics (its step has finished by now), logs them, and
        stops the run on too many non-finite steps. `state`/`step` are the newest ones."""
        if not pending:
            return
        done, m = pending.pop()
        m = metrics_lib.to_host(m)
        bar.set_postfix(loss=f"{m['learning/loss']:.4f}", refresh=False)
        if done % config.train.log_every == 0 or done in (start + 1, total_steps):
            now = time.perf_counter()
            dt = (now - timing["t"]) / max(done - timing["step"], 1)
            timing.update(t=now, step=done)
            m["perf/step_time_s"] = dt
            m["perf/tokens_per_s"] = flops["decoder_tokens"] / dt
            if np.isfinite(peak):
                m["perf/mfu"] = flops["total"] / dt / peak
            writer.write(done, m)
        if m["learning/nonfinite_run"] >= config.train.nan_patience:
            run = int(m["learning/nonfinite_run"])
            save(state, step)
            ckpt.wait()
            raise NonFiniteLossError(
                f"the loss or gradient was not finite for {run} consecutive steps "
                f"({done - run + 1}..{done}; train.nan_patience = {config.train.nan_patience}). "
                f"Their updates were skipped, so the checkpoint saved at step {step} holds the last "
                "good params. Lower train.learning_rate / train.grad_clip or check the records, "
                "then rerun to resume")

    def save(state, step):
        report(state, step)
        writer.flush()  # every metric line up to `step` is on disk before the checkpoint is
        ckpt.save(step, state.to_dict(), {
            "config": ckpt_lib.config_dict(config), "code": ckpt_lib.code_version(),
            "scan_layers": bool(config.model.decoder.scan_layers), "step": step,
            "input": ckpt_lib.input_positions(train_data.state())})

    eval_every = int(config.train.eval_every)
    step = start
    while step < total_steps and not stop.requested(step):
        batch = next(train_data)
        _check_labels(batch, model_cfg)
        if cache is not None:
            batch.update(cache.lookup(batch.pop("sample_id"), {k: batch[k] for k in step_lib.FROZEN_INPUTS},
                                      state.params["student"]))
        batch = to_global(batch, mesh)
        with jax.transfer_guard("disallow"):  # an implicit host<->device copy is a bug here
            state, m = train_step(state, batch)
        step += 1
        report(state, step)
        pending.append((step, m))
        bar.update(1)
        if step % config.train.checkpoint_every == 0 and step < total_steps:
            save(state, step)
        if eval_every and step % eval_every == 0 and step < total_steps:
            report(state, step)
            writer.write(step, evaluate(state))
    report(state, step)
    if step < total_steps:
        if ckpt.latest_step() != step:  # unless the signal came right after a periodic save
            save(state, step)
        log.warning("SIGTERM: saved step %d and stopped; rerun to resume", step)
        return
    if ckpt.latest_step() != step:
        save(state, step)
    if latest != total_steps:
        held_out = evaluate(state)
        writer.write(step, held_out)
        if primary:
            shown = [(k, held_out[f"eval/{k}"]) for k in SUMMARY_METRICS if f"eval/{k}" in held_out]
            tqdm.write(f"  step {step}, held-out: " + ", ".join(f"{k} {v:.4g}" for k, v in shown))
    log.info("trained to step %d", step)


# Held-out metrics the stage prints when it ends (the rest are in metrics.jsonl / TensorBoard).
SUMMARY_METRICS = ("learning/loss", "distill/token_accuracy", "ground/centre_err_m", "ground/class_acc",
                   "objects/centre_err_m", "objects/class_acc", "camera/translation_l1")


def _check_labels(batch, model_cfg) -> None:
    if model_cfg.det_head is None:
        return
    c = model_cfg.det_head.num_classes
    top = int(batch["labels"].max(initial=-1))
    if top >= c:
        raise ValueError(f"the records hold box label {top} but config.model.det_head.num_classes = "
                         f"{c}; raise num_classes to at least {top + 1}")


class _StopFlag:
    """SIGTERM sets a flag that the loop polls, so it can save and return between steps.

    With several processes every one must stop at the same step: jax's preemption sync point
    (which hears the SIGTERM itself) agrees on one; alone, a Python signal handler suffices.
    """

    def __init__(self):
        self._flag = False
        self._previous = None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self._flag = True

    def requested(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # no preemption service in this distributed setup
                return False
        return self._flag

    def __enter__(self) -> _StopFlag:
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
