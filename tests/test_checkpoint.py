"""Checkpoints (round trip, retention, refusals that name what differs) and the metric writer."""

import json
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from spatial_distill.models import student as student_lib
from spatial_distill.models import word_tags
from spatial_distill.train import checkpoint as ckpt_lib
from spatial_distill.train import metrics as metrics_lib
from tests.test_trainer import tiny_config


def abstract_params(config):
    cfg = student_lib.config_from(config.model, config.data.image_size, word_tags.StandInIds())
    model = nnx.eval_shape(lambda: student_lib.Student(cfg, rngs=nnx.Rngs(0)))
    return {"student": nnx.state(model).to_pure_dict()}


def filled(abstract, seed=0):
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda a: r.normal(size=a.shape).astype(a.dtype), abstract)


def test_round_trip_retention_and_meta(tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    sh = NamedSharding(mesh, PartitionSpec())
    state = {"step": jnp.int32(0), "params": {"w": jnp.arange(6.0).reshape(2, 3), "b": {0: jnp.ones(2)}},
             "rng": jax.random.PRNGKey(3), "dwa": None}
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=2)
    for step in (1, 2, 3):
        s = dict(state, step=jnp.int32(step), params=jax.tree.map(lambda x: x * step, state["params"]))
        ckpt.save(step, s, {"step": step, "input": [{"epoch": 0, "batch": step}]})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
    assert ckpt.meta(3) == {"step": 3, "input": [{"epoch": 0, "batch": 3}]}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state)
    got = ckpt.restore(3, abstract)
    ckpt.close()
    assert int(got["step"]) == 3 and got["dwa"] is None
    np.testing.assert_array_equal(np.asarray(got["params"]["w"]), np.arange(6.0).reshape(2, 3) * 3)
    np.testing.assert_array_equal(np.asarray(got["rng"]), np.asarray(jax.random.PRNGKey(3)))
    assert got["params"]["w"].sharding == sh

    # A fresh manager (another process) reads the same steps.
    again = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=2)
    assert again.latest_step() == 3 and again.stored_shapes(2)["params"]["w"].shape == (2, 3)
    again.close()


def test_load_params_refuses_another_architecture(tmp_path):
    small = tiny_config(heads=True)
    params = filled(abstract_params(small))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=1)
    ckpt.save(5, {"step": np.int32(5), "params": params}, {"step": 5})
    ckpt.close()

    got = ckpt_lib.load_params(str(tmp_path / "ck"), abstract_params(small))
    np.testing.assert_array_equal(np.asarray(got["student"]["decoder"]["lm_head"]),
                                  params["student"]["decoder"]["lm_head"])

    wider = tiny_config(heads=True, **{"model.decoder.hidden_size": 64})
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        ckpt_lib.load_params(str(tmp_path / "ck"), abstract_params(wider))
    msg = str(e.value)
    assert "does not fit this model" in msg
    assert "student/decoder/embedding: checkpoint (300, 32) vs model (300, 64)" in msg
    assert "student/decoder/final_norm: checkpoint (32,) vs model (64,)" in msg

    no_heads = tiny_config(heads=False)
    with pytest.raises(ckpt_lib.CheckpointError, match=r"unexpected parameter\(s\): \['student/depth_head/"):
        ckpt_lib.load_params(str(tmp_path / "ck"), abstract_params(no_heads))
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint found"):
        ckpt_lib.load_params(str(tmp_path / "empty"), abstract_params(small))


def test_check_same_model_names_the_field():
    stored = ckpt_lib.config_dict(tiny_config())
    ckpt_lib.check_same_model(stored, tiny_config(**{"model.decoder.remat_policy": "full",
                                                     "model.vision.remat": True,
                                                     "model.slots.radius": 0.5,
                                                     "train.steps": 99}), "here")
    with pytest.raises(ckpt_lib.CheckpointError,
                       match=re.escape("here holds a checkpoint of another model (model.decoder.num_layers: "
                                       "checkpoint 2, this run 3)")):
        ckpt_lib.check_same_model(stored, tiny_config(**{"model.decoder.num_layers": 3}), "here")
    scan = tiny_config().model.decoder.scan_layers  # the parameter layout: stacked or per layer
    with pytest.raises(ckpt_lib.CheckpointError, match=f"model.decoder.scan_layers: checkpoint {scan}"):
        ckpt_lib.check_same_model(stored, tiny_config(**{"model.decoder.scan_layers": not scan}), "x")
    frozen = tiny_config().model.vision.frozen
    with pytest.raises(ckpt_lib.CheckpointError,
                       match=f"model.vision.frozen: checkpoint {frozen}, this run {not frozen}"):
        ckpt_lib.check_same_model(stored, tiny_config(**{"model.vision.frozen": not frozen}), "x")
    # The optimizer gains a scaling step for any vision_lr_scale but 1; 0.1 -> 0.2 only changes a rate.
    scaled = ckpt_lib.config_dict(tiny_config(**{"train.vision_lr_scale": 0.1}))
    ckpt_lib.check_same_model(scaled, tiny_config(**{"train.vision_lr_scale": 0.2}), "x")
    with pytest.raises(ckpt_lib.CheckpointError,
                       match=re.escape("x was trained with train.vision_lr_scale=0.1, this run asks for 1")):
        ckpt_lib.check_same_model(scaled, tiny_config(), "x")
    ckpt_lib.check_same_model({"model": stored["model"]}, tiny_config(), "x")  # older: no train section


def test_code_version_and_input_positions():
    v = ckpt_lib.code_version()
    assert v["version"] == "0.1.0"
    assert v["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", v["git_commit"])
    pos = {"epoch": 2, "batch": 5, "process_index": 0, "process_count": 1}
    assert ckpt_lib.input_positions(pos) == [pos]


def test_metric_writer_and_truncation(tmp_path):
    w = metrics_lib.MetricWriter(str(tmp_path))
    for step in range(1, 6):
        w.write(step, {"learning/loss": 1.0 / step, "perf/mfu": np.float32(0.25)})
    w.flush()
    recs = metrics_lib.read_jsonl(w.path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5] and recs[1]["learning/loss"] == 0.5
    w.close()
    assert os.listdir(tmp_path / "tb")
    with open(w.path, "a") as f:
        f.write('{"step": 6, "learning/lo')  # a line torn by kill -9
    assert len(metrics_lib.read_jsonl(w.path)) == 5
    assert metrics_lib.truncate_jsonl(w.path, 3) == 3
    assert [json.loads(line)["step"] for line in open(w.path)] == [1, 2, 3]
    quiet = metrics_lib.MetricWriter(str(tmp_path / "other"), enabled=False)
    quiet.write(1, {"a": 1.0})
    quiet.close()
    assert not os.path.exists(tmp_path / "other")


def test_flops_and_peak():
    f = metrics_lib.train_flops_per_step(
        {"decoder": 1000 + 2 * 10 * 4, "aggregator": 500}, batch=2, views=3, questions=5,
        sequence=7, answer_len=2, vision_tokens=11, hidden=4, vocab=10, tied_embeddings=False,
        vision_frozen=False)
    assert f["decoder_tokens"] == 2 * 5 * 7
    assert f["decoder"] == 6 * 1000 * 70 + 6 * 4 * 10 * 2 * 5 * 2
    assert f["vision"] == 6 * 500 * 2 * 3 * 11
    frozen = metrics_lib.train_flops_per_step(
        {"decoder": 1000 + 10 * 4, "aggregator": 500}, batch=2, views=3, questions=5, sequence=7,
        answer_len=2, vision_tokens=11, hidden=4, vocab=10, tied_embeddings=True, vision_frozen=True)
    assert frozen["decoder"] == f["decoder"] and frozen["vision"] == f["vision"] / 3
    # A 3-slot prefix shared by the 5 questions is decoded once per sample: 2 * (3 + 5 * 4) tokens.
    shared = metrics_lib.train_flops_per_step(
        {"decoder": 1000 + 2 * 10 * 4, "aggregator": 500}, batch=2, views=3, questions=5,
        sequence=7, answer_len=2, vision_tokens=11, hidden=4, vocab=10, tied_embeddings=False,
        vision_frozen=False, shared_prefix=3)
    assert shared["decoder_tokens"] == 2 * (3 + 5 * 4)
    assert shared["decoder"] == 6 * 1000 * 46 + 6 * 4 * 10 * 2 * 5 * 2

    def device(kind, platform="tpu", process=0):
        return types.SimpleNamespace(device_kind=kind, platform=platform, process_index=process)

    peak, how = metrics_lib.peak_flops([device("TPU v5 lite")] * 4)
    assert peak == 4 * 197e12 and "197 TFLOP/s" in how
    peak, how = metrics_lib.peak_flops([device("NVIDIA H100 80GB HBM3", "gpu")])
    assert peak == 989e12
    assert np.isnan(metrics_lib.peak_flops([device("mystery chip")])[0])
    cpu, how = metrics_lib.peak_flops(jax.devices("cpu"))
    assert 1e8 < cpu < 1e14 and "measured" in how
