"""The train stage end to end on a shrunken tiny config: outputs, exact resume after SIGTERM and
kill -9, the NaN guard, bad inputs, three meshes on 8 CPU devices, and a real 2-process run.

Training runs in subprocesses that share a persistent XLA compilation cache (runs of the same
config and mesh compile once) and skip LLVM's optimisation passes: the programs are tiny, XLA:CPU
compile time dominates.
"""

import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from configs import student as student_configs
from data_pipelines import teacher_records as tr
from spatial_distill.train import checkpoint as ckpt_lib
from spatial_distill.train import metrics as metrics_lib

ROOT = Path(__file__).resolve().parents[1]
_LOG_IDS = itertools.count()
STEPS = 8

# Every DESIGN.md §5 name a text + depth + detection run logs (text-only runs lack aux/depth, aux/det).
TEXT_METRICS = {"learning/loss", "learning/grad_norm", "learning/lr", "learning/nonfinite_steps",
                "distill/kl", "distill/ce", "distill/teacher_topk_mass", "weights/text",
                "perf/step_time_s", "perf/tokens_per_s", "perf/mfu"}


def tiny_config(records: str | None = None, tokenizer: str | None = None, *, heads: bool = False,
                **overrides):
    """tiny, shrunk: 56 px, 2 views, a 1-block VGGT, a 2-layer 32-wide decoder, 300-token BPE.

    `overrides`: dotted config keys (`{"train.steps": 4}`) applied last."""
    c = student_configs.get_config("tiny")
    d = c.data
    d.image_size, d.num_views, d.num_train_scenes, d.num_eval_scenes, d.workers = 56, 2, 16, 8, 1
    c.teacher.num_shards = 2
    c.teacher.temperature = c.loss.temperature  # the KD temperature is the dump temperature
    c.teacher.records_dir = records
    c.tokenizer.path = tokenizer
    c.tokenizer.vocab_size = c.model.decoder.vocab_size = 300
    c.input.max_questions = 24
    c.input.max_prompt_len, c.input.max_answer_len = 32, 8  # a 300-entry BPE needs more tokens
    v = c.model.vision
    v.embed_dim, v.depth, v.num_heads, v.vit_depth, v.vit_heads = 32, 1, 2, 1, 2
    # The tiny preset's frozen vision side, object tokens and grounding, with random weights (the
    # shipped checkpoint has the full tiny widths; test_vision.py loads it).
    v.checkpoint, v.pos_embed_size = None, None
    c.model.object_head.hidden = 16
    c.model.vision_pool = "objects8"  # of 2 views x 16 patches
    m = c.model.decoder
    m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.intermediate_size = 32, 2, 4, 2, 64
    dh = c.model.depth_head
    dh.enabled, dh.features, dh.out_channels, dh.layers = heads, 8, (4, 8, 8, 8), (0, 0, 0, 0)
    h = c.model.det_head
    h.enabled, h.num_queries, h.dim, h.num_layers, h.num_heads = heads, 4, 16, 1, 2
    c.loss.chunk_size = 128
    t = c.train
    t.steps, t.batch_size, t.warmup_steps, t.log_every, t.checkpoint_every = STEPS, 2, 2, 1, 2
    # The tests' numbers assume these (the tiny preset itself trains at 2e-3 with static weights,
    # a warmup-stable-decay schedule and relation weight 4).
    t.learning_rate, c.loss.weighting, t.schedule, c.loss.relation_weight = 1e-3, "kendall", "cosine", 1.0
    t.keep_checkpoints, t.nan_patience = 2, 2
    for key, value in overrides.items():
        section, field = key.rsplit(".", 1)
        target = c
        for part in section.split("."):
            target = target[part]
        target[field] = tuple(value) if isinstance(value, list) else value
    return c


def child(spec: dict) -> None:
    """Subprocess entry: one training run as `spec` says (see `run_child`)."""
    # tensorboardX imports torch when it is installed (4 s a process); nothing here needs it.
    sys.modules.setdefault("torch", None)
    import jax

    handler = logging.StreamHandler()  # the trainer's own log lines, timed, into the child's log
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logger = logging.getLogger("spatial_distill")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if "process" in spec:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{spec['port']}",
                                   num_processes=spec["num_processes"], process_id=spec["process"])
    from spatial_distill.train import trainer

    calls = {"n": 0}
    original = trainer.to_global

    def to_global(batch, mesh):  # one call per train step: the place to interrupt or corrupt one
        if "prompt_ids" not in batch:  # the frozen-vision cache's inputs, not a step's batch
            return original(batch, mesh)
        calls["n"] += 1
        if calls["n"] == spec.get("kill_at"):
            os.kill(os.getpid(), signal.SIGKILL)
        if calls["n"] == spec.get("exit_at"):  # every process together, as a job preemption
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("exit")
            os._exit(17)
        if calls["n"] == spec.get("term_at"):
            os.kill(os.getpid(), signal.SIGTERM)
        if spec.get("nan_from") and calls["n"] >= spec["nan_from"] and "topk_logprobs" in batch:
            batch = dict(batch, topk_logprobs=np.full_like(batch["topk_logprobs"], np.nan))
        return original(batch, mesh)

    trainer.to_global = to_global
    for overrides, pattern in spec.get("expect_errors", []):  # bad configs, before any run
        bad_dir = spec["runs"][0][0] + "_bad"
        with pytest.raises(ValueError, match=pattern):
            trainer.train_and_evaluate(tiny_config(spec["records"], spec["tokenizer"], **overrides),
                                       bad_dir)
        assert not os.path.exists(bad_dir)  # refused before anything was written
    for workdir, overrides in spec["runs"]:
        config = tiny_config(spec["records"], spec["tokenizer"], **overrides)
        trainer.train_and_evaluate(config, workdir)


def child_env(cache: Path, devices: int = 1) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0"}


def start_child(spec: dict, cache: Path, devices: int = 1):
    """Starts `child(spec)`; returns (process, log file). Output goes to a file, not a pipe: two
    processes of one job must never block on a full pipe while the other waits for them."""
    code = "import json, sys; from tests.test_trainer import child; child(json.loads(sys.argv[1]))"
    log = open(Path(cache).parent / f"child-{os.getpid()}-{next(_LOG_IDS)}.log", "w+")
    p = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], cwd=ROOT,
                         env=child_env(cache, devices), stdout=log, stderr=subprocess.STDOUT)
    return p, log


def finish(p, log, timeout: int = 600) -> tuple[int, str]:
    rc = p.wait(timeout=timeout)
    log.seek(0)
    out = log.read()
    log.close()
    return rc, out


def run_child(spec: dict, cache: Path, devices: int = 1, timeout: int = 600) -> tuple[int, str]:
    return finish(*start_child(spec, cache, devices), timeout=timeout)


def losses(workdir) -> dict[int, float]:
    recs = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if "learning/loss" in r]
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"duplicated steps in {workdir}: {steps}"
    return {r["step"]: r["learning/loss"] for r in recs}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Teacher records of 16 train / 8 eval synthetic scenes (oracle teacher), 2 shards a split."""
    from spatial_distill.teacher import dump

    root = tmp_path_factory.mktemp("dump")
    out = dump.dump(tiny_config(), str(root))
    return {"records": out, "tokenizer": str(root / "tokenizer"),
            "cache": tmp_path_factory.mktemp("xla_cache")}


@pytest.fixture(scope="module")
def straight(records, tmp_path_factory):
    """An uninterrupted 8-step run (1 device): the reference curve."""
    wd = str(tmp_path_factory.mktemp("straight"))
    rc, err = run_child(spec_of(records, [[wd, {}]]), records["cache"])
    assert rc == 0, err[-3000:]
    return wd


def spec_of(records, runs, **kw):
    return {"records": records["records"], "tokenizer": records["tokenizer"], "runs": runs, **kw}


def test_run_writes_metrics_checkpoints_and_eval(records, straight):
    recs = metrics_lib.read_jsonl(os.path.join(straight, "metrics.jsonl"))
    train = [r for r in recs if "learning/loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        assert TEXT_METRICS <= set(r), TEXT_METRICS - set(r)
        assert np.isfinite(r["learning/loss"]) and r["learning/nonfinite_steps"] == 0
        assert 0 < r["perf/mfu"] < 1 and r["distill/teacher_topk_mass"] <= 1 + 1e-3
    # Linear warmup over 2 steps then cosine to 0 at step 8; lr is the one used by each update.
    lrs = [r["learning/lr"] for r in train]
    peak = tiny_config().train.learning_rate
    np.testing.assert_allclose(lrs[:3], [0.0, peak / 2, peak], rtol=1e-6)
    np.testing.assert_allclose(lrs[4], peak * 0.5 * (1 + np.cos(np.pi * 2 / 6)), rtol=1e-5)
    assert train[-1]["learning/loss"] < train[0]["learning/loss"]  # it learns
    evals = [r for r in recs if "eval/learning/loss" in r]
    assert [r["step"] for r in evals] == [STEPS] and np.isfinite(evals[0]["eval/distill/kl"])
    assert os.listdir(os.path.join(straight, "tb"))

    ckpt = ckpt_lib.Checkpointer(os.path.join(straight, "checkpoints"), keep=2)
    try:
        assert ckpt.all_steps() == [6, 8]  # every 2 steps, keep 2
        meta = ckpt.meta(8)
    finally:
        ckpt.close()
    assert meta["step"] == 8 and meta["scan_layers"] is False  # the tiny preset unrolls its 4 layers
    assert meta["code"]["version"] and "git_commit" in meta["code"]
    assert meta["config"]["model"]["decoder"]["hidden_size"] == 32
    # 16 records / batch 2 = 8 batches an epoch: after 8 steps, epoch 1 starts.
    assert meta["input"] == [{"epoch": 1, "batch": 0, "seed": 0, "split": "train", "batch_size": 2,
                              "process_index": 0, "process_count": 1}]


def test_rerunning_a_finished_run_builds_nothing(records, straight, monkeypatch):
    from spatial_distill.train import trainer

    metrics = os.path.join(straight, "metrics.jsonl")
    before = open(metrics).read()
    # The main job's rerun goes straight to its eval stage: no compile of a step it will not take.
    monkeypatch.setattr(trainer, "programs", lambda *a, **k: pytest.fail("a finished run built its programs"))
    trainer.train_and_evaluate(tiny_config(records["records"], records["tokenizer"]), straight)
    assert open(metrics).read() == before


@pytest.mark.slow
def test_sigterm_right_after_a_periodic_checkpoint_stops_cleanly(records, tmp_path):
    wd = str(tmp_path / "term_on_save")
    # SIGTERM during step 2, which is also a checkpoint step: one save, a clean stop.
    rc, err = run_child(spec_of(records, [[wd, {}]], term_at=2), records["cache"])
    assert rc == 0, err[-3000:]
    ckpt = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), keep=2)
    try:
        assert ckpt.all_steps() == [2]
    finally:
        ckpt.close()


@pytest.mark.slow
def test_sigterm_and_kill9_resume_bit_exact(records, straight, tmp_path):
    wd = str(tmp_path / "interrupted")
    # SIGTERM during step 3: the loop finishes the step, saves it and returns cleanly.
    rc, err = run_child(spec_of(records, [[wd, {}]], term_at=3), records["cache"])
    assert rc == 0, err[-3000:]
    ckpt = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), keep=2)
    assert ckpt.latest_step() == 3
    ckpt.close()
    # Resumed, then killed with SIGKILL while fetching batch 4 of the new run (global step 7).
    rc, _ = run_child(spec_of(records, [[wd, {}]], kill_at=4), records["cache"])
    assert rc == -signal.SIGKILL
    killed = losses(wd)
    assert max(killed) < STEPS
    # Resumed again to the end: each step once, every loss equal to the uninterrupted run's.
    rc, err = run_child(spec_of(records, [[wd, {}]]), records["cache"])
    assert rc == 0, err[-3000:]
    want, got = losses(straight), losses(wd)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == want  # bit for bit (JSON floats round-trip exactly)
    assert {s: killed[s] for s in killed} == {s: want[s] for s in killed}


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_stop(records, tmp_path):
    wd = str(tmp_path / "nan")
    # NaN teacher log-probs from step 5 on; checkpoints every 2 steps; patience 2.
    rc, err = run_child(spec_of(records, [[wd, {}]], nan_from=5), records["cache"])
    assert rc != 0 and "NonFiniteLossError" in err
    assert "not finite for 2 consecutive steps (5..6" in err
    recs = {r["step"]: r for r in metrics_lib.read_jsonl(os.path.join(wd, "metrics.jsonl"))}
    assert recs[4]["learning/nonfinite_steps"] == 0 and np.isfinite(recs[4]["learning/loss"])
    assert recs[5]["learning/nonfinite_steps"] == 1 and np.isnan(recs[5]["learning/loss"])
    assert recs[6]["learning/nonfinite_run"] == 2 and 7 not in recs
    ckpt = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), keep=2)
    try:
        assert ckpt.all_steps() == [4, 6]  # the stop saves the step it happens at
        import jax

        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                              ckpt.stored_shapes(4)["params"])
        good, stopped = ckpt.restore_params(4, target), ckpt.restore_params(6, target)
    finally:
        ckpt.close()
    # Skipped updates leave the params of the last good step.
    leaves = zip(jax.tree.leaves(good), jax.tree.leaves(stopped))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in leaves)


def test_bad_inputs_fail_with_named_errors(records, straight, tmp_path):
    from spatial_distill.train import trainer

    def run(config, workdir):
        trainer.train_and_evaluate(config, str(workdir))

    r, tok = records["records"], records["tokenizer"]
    # Records from another tokenizer: same vocabulary, different file.
    other_tok = tmp_path / "other_tok"
    shutil.copytree(tok, other_tok)
    text = (other_tok / "tokenizer.json").read_text()
    (other_tok / "tokenizer.json").write_text(text + "\n")
    with pytest.raises(ValueError, match="field 'tokenizer_hash'"):
        run(tiny_config(r, str(other_tok)), tmp_path / "a")
    with pytest.raises(ValueError, match=r"field 'k' = 32 but this run has 16 from config.teacher.k"):
        run(tiny_config(r, tok, **{"teacher.k": 16}), tmp_path / "b")
    with pytest.raises(ValueError, match="field 'temperature'.*config.loss.temperature"):
        run(tiny_config(r, tok, **{"loss.temperature": 2.0}), tmp_path / "c")

    # A workdir with another model's checkpoint: named field, both values, nothing deleted.
    before = sorted(os.listdir(os.path.join(straight, "checkpoints")))
    with pytest.raises(ckpt_lib.CheckpointError,
                       match=r"model.decoder.hidden_size: checkpoint 32, this run 64.*Nothing was deleted"):
        run(tiny_config(r, tok, **{"model.decoder.hidden_size": 64}), straight)
    assert sorted(os.listdir(os.path.join(straight, "checkpoints"))) == before

    # A record whose content no longer matches its hash: file and record index named.
    bad = tmp_path / "bad_records"
    shutil.copytree(r, bad)
    meta = tr.read_meta(bad)
    shard = tr.finished_shards(bad, "train", 2)[1]
    raws = [raw for _, raw in tr.iter_raw(shard)]
    ex = tf.train.Example.FromString(raws[3])
    ex.features.feature["content_hash"].bytes_list.value[0] = b"0" * 64
    raws[3] = ex.SerializeToString()
    with tf.io.TFRecordWriter(str(shard)) as w:
        for raw in raws:
            w.write(raw)
    tr.write_meta(bad, meta)
    with pytest.raises(tr.RecordError, match=rf"{shard.name}: record 3: .*field 'content_hash'"):
        run(tiny_config(str(bad), tok), tmp_path / "d")


@pytest.mark.slow
def test_same_losses_on_three_meshes_of_8_devices(records, tmp_path):
    meshes = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
    runs = [[str(tmp_path / f"mesh{i}"), {"mesh.shape": list(m), "train.batch_size": 8,
                                           "train.steps": 3, "train.checkpoint_every": 10}]
            for i, m in enumerate(meshes)]
    bad = [  # a batch that does not divide over the data axes; accumulation that cannot split it
        ({"mesh.shape": [8, 1, 1], "train.batch_size": 12},
         r"config.train.batch_size = 12: must divide across the data and fsdp mesh axes "
         r"\(8 x 1 = 8 ways\)"),
        ({"mesh.shape": [8, 1, 1], "train.batch_size": 8, "train.accum_steps": 2},
         r"config.train.accum_steps = 2: the batch of 8 must split into 2 micro-batches"),
    ]
    rc, out = run_child(spec_of(records, runs, expect_errors=bad), records["cache"], devices=8,
                        timeout=900)
    assert rc == 0, out[-3000:]
    curves = [losses(wd) for wd, _ in runs]
    for c in curves:
        assert sorted(c) == [1, 2, 3]
        np.testing.assert_allclose([c[s] for s in (1, 2, 3)], [curves[0][s] for s in (1, 2, 3)],
                                   rtol=0, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(records, tmp_path):
    wd = str(tmp_path / "multi")
    overrides = {"mesh.shape": [2, 1, 1], "train.steps": 6}

    def both(**kw):
        port = _free_port()
        procs = [start_child(spec_of(records, [[wd, overrides]], process=i, num_processes=2,
                                     port=port, **kw), records["cache"]) for i in range(2)]
        return [finish(p, log) for p, log in procs]

    # Both processes exit abruptly (no cleanup) fetching batch 5; step 4's checkpoint may or may
    # not be complete, so the rerun resumes from 2 or 4.
    for rc, err in both(exit_at=5):
        assert rc == 17, err[-3000:]
    killed = losses(wd)
    for rc, err in both():
        assert rc == 0, err[-3000:]
    got = losses(wd)
    assert sorted(got) == list(range(1, 7)) and all(np.isfinite(v) for v in got.values())
    assert {s: got[s] for s in killed} == killed  # recomputed steps match the killed run's
    ckpt = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), keep=2)
    try:
        assert ckpt.latest_step() == 6
        positions = ckpt.meta(6)["input"]
    finally:
        ckpt.close()
    # 8 records per process and batch 1 per process: 6 steps leave each at batch 6 of epoch 0.
    assert [(p["process_index"], p["epoch"], p["batch"]) for p in positions] == [(0, 0, 6), (1, 0, 6)]
