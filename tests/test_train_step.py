"""The loss over a batch and the train step: schedule, optimizer masks, task weighting, gradient
accumulation, the NaN guard on a real step (text + grounding + depth + detection). The camera-0
frames are tested in test_geometry.py."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines.synthetic import look_at
from spatial_distill.losses import weighting
from spatial_distill.models import student as student_lib
from spatial_distill.models import word_tags
from spatial_distill.train import step as step_lib
from tests.test_trainer import tiny_config

# XLA:CPU spends most of a test's time optimising these tiny programs: skip LLVM's passes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
B, S, Q, LP, LA, K, N = 2, 2, 3, 6, 4, 8, 3


def compile_fast(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


# ------------------------------------------------------------------------ schedule, optimizer


def test_learning_rate_schedule():
    c = tiny_config(**{"train.steps": 10, "train.warmup_steps": 4, "train.learning_rate": 1e-3})
    lr = step_lib.learning_rate_schedule(c)
    np.testing.assert_allclose([float(lr(i)) for i in (0, 2, 4, 7, 10)],
                               [0.0, 5e-4, 1e-3, 1e-3 * 0.5 * (1 + np.cos(np.pi * 3 / 6)), 0.0],
                               atol=1e-9)
    short = step_lib.learning_rate_schedule(tiny_config(**{"train.steps": 2, "train.warmup_steps": 4}))
    np.testing.assert_allclose(float(short(1)), 1e-3 / 4, rtol=1e-6)  # only warms up
    wsd = step_lib.learning_rate_schedule(tiny_config(**{
        "train.steps": 20, "train.warmup_steps": 4, "train.learning_rate": 1e-3,
        "train.schedule": "wsd", "train.decay_fraction": 0.25}))  # stable to step 15, then linear
    np.testing.assert_allclose([float(wsd(i)) for i in (2, 4, 10, 15, 17, 20)],
                               [5e-4, 1e-3, 1e-3, 1e-3, 6e-4, 0.0], atol=1e-9)
    for field, value in [("train.schedule", "linear"), ("train.decay_fraction", 0.0)]:
        with pytest.raises(ValueError, match=f"config.{field} = "):
            step_lib.learning_rate_schedule(tiny_config(**{field: value}))


@pytest.fixture(scope="module")
def abstract_student():
    cfg = student_lib.config_from(tiny_config(heads=True).model, 56, word_tags.StandInIds())
    model = nnx.eval_shape(lambda: student_lib.Student(cfg, rngs=nnx.Rngs(0)))
    return cfg, model


def test_frozen_vision_gets_no_update_and_decay_skips_vectors(abstract_student):
    _, model = abstract_student
    params = {"student": jax.tree.map(lambda a: np.ones(a.shape, a.dtype),
                                      nnx.state(model).to_pure_dict()),
              "kendall": {"log_vars": np.zeros(3, np.float32)}}
    c = tiny_config(heads=True, **{"model.vision.frozen": True, "train.warmup_steps": 0,
                                   "train.weight_decay": 0.5})
    tx, _ = step_lib.make_optimizer(c, params)
    grads = jax.tree.map(lambda p: np.full(p.shape, 0.01, p.dtype), params)
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    upd = updates["student"]
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(upd["aggregator"]))
    # AdamW's first step moves every trained parameter by lr (sign of the gradient) ...
    np.testing.assert_allclose(np.asarray(upd["decoder"]["final_norm"]), -1e-3, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(updates["kendall"]["log_vars"]), -1e-3, rtol=1e-4)
    # ... plus lr * weight decay * param on matrices only.
    np.testing.assert_allclose(np.asarray(upd["decoder"]["lm_head"]), -1e-3 - 1e-3 * 0.5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(upd["latents"]), -1e-3, rtol=1e-4)
    labels = step_lib.param_labels(params, frozen_vision=False)
    assert set(jax.tree.leaves(labels)) == {"train"}


def test_vision_lr_scale_scales_only_the_pretrained_vision_updates(abstract_student):
    _, model = abstract_student
    params = {"student": jax.tree.map(lambda a: np.ones(a.shape, a.dtype),
                                      nnx.state(model).to_pure_dict()),
              "kendall": {"log_vars": np.zeros(3, np.float32)}}
    grads = jax.tree.map(lambda p: np.full(p.shape, 0.01, p.dtype), params)

    def first_updates(**over):
        c = tiny_config(heads=True, **{"model.vision.frozen": False, "train.warmup_steps": 0,
                                       "train.weight_decay": 0.5, **over})
        tx, _ = step_lib.make_optimizer(c, params)
        return jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)[0]["student"]

    base, scaled = first_updates(), first_updates(**{"train.vision_lr_scale": 0.1})
    assert step_lib.PRETRAINED_VISION[0] in base
    for part in step_lib.PRETRAINED_VISION:
        if part in base:  # lr x 0.1, weight decay included: AdamW's step is linear in lr
            chex.assert_trees_all_close(scaled[part], jax.tree.map(lambda u: 0.1 * u, base[part]),
                                        rtol=1e-6)
    # lr 1e-3 x 0.1 times (sign of the gradient + weight decay 0.5 on this matrix-shaped token).
    np.testing.assert_allclose(np.asarray(scaled["aggregator"]["camera_token"]), -1e-4 * 1.5, rtol=1e-4)
    for part in set(base) - set(step_lib.PRETRAINED_VISION):  # the decoder side is untouched
        chex.assert_trees_all_equal(scaled[part], base[part])
    with pytest.raises(ValueError, match="train.vision_lr_scale = 0"):
        first_updates(**{"train.vision_lr_scale": 0.0})


def test_state_shardings_follow_the_parameters_with_frozen_vision(abstract_student):
    cfg, _ = abstract_student
    config = tiny_config(heads=True, **{"model.vision.frozen": True})
    build = lambda key: student_lib.Student(cfg, rngs=nnx.Rngs(params=key))  # noqa: E731
    _, abstract_model_state = nnx.split(nnx.eval_shape(lambda: build(jax.random.PRNGKey(0))))
    spec = step_lib.loss_spec(config)
    params = {"student": abstract_model_state.to_pure_dict(),
              "kendall": {"log_vars": jax.ShapeDtypeStruct((3,), jnp.float32)}}
    tx, _ = step_lib.make_optimizer(config, params)
    abstract = jax.eval_shape(lambda k: step_lib.init_state(k, tx, spec, build), jax.random.PRNGKey(0))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    sh = step_lib.state_shardings(abstract, abstract_model_state, mesh, step_lib.sharding.DEFAULT_RULES)
    assert not cfg.decoder.scan_layers  # the tiny preset unrolls: one entry per layer
    q = sh.params["student"]["decoder"]["layers"][0]["q"].spec
    assert q == jax.sharding.PartitionSpec("fsdp", "tensor", None)  # embed, heads, head_dim
    adam = sh.opt_state.inner_states["train"].inner_state[1][0]
    assert adam.mu["student"]["decoder"]["layers"][0]["q"].spec == q
    assert adam.nu["student"]["det_head"]["queries"].spec == sh.params["student"]["det_head"]["queries"].spec
    assert adam.count.spec == jax.sharding.PartitionSpec()
    assert not jax.tree.leaves(adam.mu["student"]["aggregator"])  # frozen: no moments at all


def test_weighting_methods():
    losses = {"text": jnp.float32(2.0), "depth": jnp.float32(4.0), "det": jnp.float32(1.0)}
    spec = step_lib.LossSpec(tasks=("depth", "det", "text"), weighting="kendall", alpha=0.7,
                             temperature=3.0, tail="bucket", chunked=True, chunk_size=128)
    s = jnp.array([1.0, -1.0, 10.0])  # depth, det, text (sorted); text is clamped to 4
    total, m, _ = step_lib.combine(losses, {"log_vars": s}, None, spec)
    want = 0.5 * np.exp(-1) * 4 + 0.5 + 0.5 * np.exp(1) * 1 - 0.5 + np.exp(-4) * 2 + 2
    np.testing.assert_allclose(float(total), want, rtol=1e-6)
    np.testing.assert_allclose(float(m["weights/text"]), np.exp(-4), rtol=1e-6)

    static = spec.__class__(**{**spec.__dict__, "weighting": "static"})
    total, m, _ = step_lib.combine(losses, None, None, static)
    np.testing.assert_allclose(float(total), 2 + 0.15 * 4 + 0.35 * 1, rtol=1e-6)

    dwa = spec.__class__(**{**spec.__dict__, "weighting": "dwa"})
    state = weighting.dwa_init(dwa.tasks)
    total, m, state = step_lib.combine(losses, None, state, dwa)
    assert float(total) == 7.0 and float(m["weights/text"]) == 1.0  # no history yet: weights 1
    _, _, state = step_lib.combine(dict(losses, text=jnp.float32(4.0)), None, state, dwa)
    total, m, state = step_lib.combine(losses, None, state, dwa)
    # Loss ratios of the last two steps (depth, det, text) = (1, 1, 2): w = 3 softmax(r / 2).
    w = 3 * np.exp(np.array([1, 1, 2]) / 2) / np.exp(np.array([1, 1, 2]) / 2).sum()
    np.testing.assert_allclose([float(m[f"weights/{t}"]) for t in dwa.tasks], w, rtol=1e-6)
    np.testing.assert_allclose(float(total), w @ np.array([4.0, 1.0, 2.0]), rtol=1e-6)
    assert int(state.count) == 3


def test_loss_spec_reads_the_weighting_settings_and_names_bad_values():
    c = tiny_config(heads=True, **{"loss.weighting": "static", "loss.kendall_range": (-2.0, 3.0),
                                   "loss.dwa_temperature": 0.5, "loss.relation_weight": 3.0})
    c.loss.static_weights.det = 0.8
    spec = step_lib.loss_spec(c)
    assert spec.kendall_range == (-2.0, 3.0) and spec.dwa_temperature == 0.5
    assert spec.relation_weight == 3.0
    losses = {t: jnp.float32(v) for t, v in {"text": 2.0, "depth": 4.0, "det": 1.0}.items()
              if t in spec.tasks}
    total, _, _ = step_lib.combine(losses, None, None, spec)
    want = 2.0 + (0.15 * 4.0 if "depth" in spec.tasks else 0.0) + 0.8 * 1.0
    np.testing.assert_allclose(float(total), want, rtol=1e-6)
    for field, value, match in [("loss.kendall_range", (1.0, 1.0), "kendall_range"),
                                ("loss.dwa_temperature", 0.0, "dwa_temperature"),
                                ("loss.relation_weight", -1.0, "relation_weight = -1.0")]:
        with pytest.raises(ValueError, match=match):
            step_lib.loss_spec(tiny_config(**{field: value}))
    bad = tiny_config()
    bad.loss.static_weights.text = -1.0
    with pytest.raises(ValueError, match="static_weights"):
        step_lib.loss_spec(bad)


# ------------------------------------------------------------------------ a real step


def make_batch(seed: int, vocab: int) -> dict:
    """A valid input-pipeline batch (B=2 samples, 3 question slots of which 2 are real)."""
    r = np.random.default_rng(seed)
    prompt_len = np.array([[6, 3, 0], [4, 5, 0]])[..., None]
    answer_len = np.array([[2, 4, 0], [1, 3, 0]])[..., None]
    pm, am = np.arange(LP) < prompt_len, np.arange(LA) < answer_len
    logits = r.normal(0, 2, (B, Q, LA, vocab)) / 3.0
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.argsort(-logp, -1)[..., :K]
    cams = np.stack([[look_at(r.uniform(-4, 4, 3) + [0, 0, 2], r.uniform(-1, 1, 3)) for _ in range(S)]
                     for _ in range(B)])
    depth = r.uniform(1, 5, (B, S, 56, 56)).astype(np.float32)
    depth[:, :, :5] = 0  # missing depth
    boxes = np.concatenate([r.uniform(-2, 2, (B, N, 3)), r.uniform(0.2, 1, (B, N, 3)),
                            r.uniform(-np.pi, np.pi, (B, N, 1))], -1)
    box_mask = np.array([[True, True, False], [True, False, False]])
    return {
        "rgb": r.integers(0, 256, (B, S, 56, 56, 3), dtype=np.uint8), "depth": depth,
        "intrinsics": np.tile(np.array([[50.0, 0, 28], [0, 50, 28], [0, 0, 1]], np.float32), (B, S, 1, 1)),
        "cam_to_world": cams.astype(np.float32), "boxes": np.where(box_mask[..., None], boxes, 0).astype(np.float32),
        "box_mask": box_mask, "labels": np.where(box_mask, r.integers(0, 3, (B, N)), -1).astype(np.int32),
        "question_mask": prompt_len[..., 0] > 0, "qa_kind": np.array([[0, 1, -1], [2, 3, -1]], np.int32),
        "prompt_ids": np.where(pm, r.integers(4, vocab, (B, Q, LP)), 0).astype(np.int32), "prompt_mask": pm,
        "answer_ids": np.where(am, top[..., 0], 0).astype(np.int32), "answer_mask": am,
        "topk_ids": np.where(am[..., None], top, 0).astype(np.int32),
        "topk_logprobs": np.where(am[..., None], np.take_along_axis(logp, top, -1), 0).astype(np.float32),
        "logsumexp": np.zeros((B, Q, LA), np.float32),
        "referred": np.array([[[0, 1], [1, 0], [-1, -1]], [[0, -1], [0, -1], [-1, -1]]], np.int32),
    }


def setup_step(config, cfg):
    build = lambda key: student_lib.Student(cfg, rngs=nnx.Rngs(params=key))  # noqa: E731
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(jax.random.PRNGKey(0))))
    spec = step_lib.loss_spec(config)
    params = {"student": abstract.to_pure_dict()}
    if spec.weighting == "kendall":
        params["kendall"] = {"log_vars": jax.ShapeDtypeStruct((len(spec.tasks),), jnp.float32)}
    tx, schedule = step_lib.make_optimizer(config, params)
    key = jax.random.PRNGKey(0)
    state = compile_fast(lambda k: step_lib.init_state(k, tx, spec, build), key)(key)
    return state, dict(graphdef=graphdef, abstract_state=abstract, spec=spec), tx, schedule


def test_train_step_skips_nonfinite_then_updates(abstract_student):
    # Two micro-batches of one sample each: the update goes through gradient accumulation.
    config = tiny_config(heads=True, **{"train.warmup_steps": 0, "train.accum_steps": 2})
    cfg, _ = abstract_student
    state, kw, tx, schedule = setup_step(config, cfg)
    assert kw["spec"].tasks == ("depth", "det", "ground", "text")  # objects: frozen (pretrained)
    good = make_batch(0, cfg.decoder.vocab_size)
    bad = dict(good, topk_logprobs=np.where(good["answer_mask"][..., None], np.nan,
                                            good["topk_logprobs"]).astype(np.float32))
    step = compile_fast(functools.partial(step_lib.train_step, tx=tx, schedule=schedule,
                                          accum_steps=2, **kw), state, good)
    before = jax.tree.map(np.asarray, state)

    state, m = step(state, bad)
    m = {k: float(v) for k, v in m.items()}
    assert np.isnan(m["learning/loss"])
    assert (m["learning/nonfinite_steps"], m["learning/nonfinite_run"]) == (1, 1)
    after = jax.tree.map(np.asarray, state)
    assert int(after.step) == 1 and int(after.nonfinite_total) == 1
    chex.assert_trees_all_equal((before.params, before.opt_state), (after.params, after.opt_state))  # nothing applied

    state, m = step(state, good)
    m = {k: float(v) for k, v in m.items()}
    assert (m["learning/nonfinite_steps"], m["learning/nonfinite_run"]) == (1, 0)
    assert m["learning/lr"] == pytest.approx(1e-3)  # the first applied update: schedule(0)
    # Kendall at s = 0: text (classification) weight 1, depth, det and ground (regression) 0.5.
    assert [m[f"weights/{t}"] for t in ("text", "depth", "det", "ground")] == [1.0, 0.5, 0.5, 0.5]
    np.testing.assert_allclose(m["learning/loss"], m["aux/text"] + 0.5 * (
        m["aux/depth"] + m["aux/det"] + m["aux/ground"]), rtol=1e-6)
    assert m["ground/referred"] == 3.0  # (4 + 2) / 2 micro-batches
    assert m["det/num_gt"] == 1.5 and 0 < m["distill/teacher_topk_mass"] < 1  # (2 + 1) / 2
    assert all(np.isfinite(v) for v in m.values())
    new = jax.tree.map(np.asarray, state)

    def moved(a, b):
        return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    for part in ("decoder", "latents", "depth_head", "det_head", "proj_in", "grounding_head"):
        assert moved(after.params["student"][part], new.params["student"][part]), part
    for part in ("aggregator", "camera_head", "object_head"):  # the preset freezes them
        assert not moved(after.params["student"][part], new.params["student"][part]), part
    assert moved(after.params["kendall"], new.params["kendall"])


def test_accumulation_averages_interleaved_micro_batches():
    r = np.random.default_rng(3)
    batch = {"x": jnp.asarray(r.normal(size=(8, 3)), jnp.float32),
             "y": jnp.asarray(r.normal(size=(8,)), jnp.float32)}
    w = jnp.asarray(r.normal(size=(3,)), jnp.float32)

    def value_and_grad(p, mb):  # a least-squares loss: its mean and gradient per micro-batch
        loss, grad = jax.value_and_grad(lambda q: jnp.mean((mb["x"] @ q - mb["y"]) ** 2))(p)
        return loss, {"w": grad, "rows": mb["y"]}

    loss, aux = jax.jit(lambda p, b: step_lib.accumulate(value_and_grad, p, b, 4))(w, batch)
    # Micro-batch i takes rows i, i + 4 (every device keeps a share of each micro-batch).
    parts = [value_and_grad(w, {k: v[i::4] for k, v in batch.items()}) for i in range(4)]
    np.testing.assert_allclose(float(loss), np.mean([float(p[0]) for p in parts]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(aux["w"]), np.mean([p[1]["w"] for p in parts], 0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["rows"]),
                               np.mean([np.asarray(batch["y"])[i::4] for i in range(4)], 0), rtol=1e-6)
    same, _ = step_lib.accumulate(value_and_grad, w, batch, 1)
    np.testing.assert_allclose(float(same), float(jnp.mean((batch["x"] @ w - batch["y"]) ** 2)), rtol=1e-6)


def test_vggt_weights_fill_the_aggregator_and_depth_head(tmp_path):
    from safetensors.numpy import save_file

    from spatial_distill.models.state_dict import CheckpointMismatchError

    config = tiny_config(heads=True, **{"model.vision.checkpoint": str(tmp_path / "vggt.safetensors")})
    cfg = student_lib.config_from(config.model, 56, word_tags.StandInIds())
    assert cfg.aggregator.img_size == 518  # an official checkpoint brings its 518-pixel grid

    def build(key):
        return student_lib.Student(cfg, rngs=nnx.Rngs(params=key))

    # An "official" checkpoint: another student's aggregator, depth and camera heads, plus a
    # point head the student has no use for.
    source = nnx.eval_shape(lambda: build(jax.random.PRNGKey(1)))
    r = np.random.default_rng(0)
    nnx.update(source, jax.tree.map(lambda a: r.normal(size=a.shape).astype(a.dtype),
                                    nnx.state(source)))
    tensors = {**source.aggregator.export_torch("aggregator"),
               **source.depth_head.export_torch("depth_head"),
               **source.camera_head.export_torch("camera_head"),
               "point_head.norm.weight": np.zeros((4,), np.float32)}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp_path / "vggt.safetensors")

    got = step_lib.vggt_weights(build, config.model.vision.checkpoint, depth_head=True)
    want = nnx.state(source).to_pure_dict()
    assert sorted(got) == ["aggregator", "camera_head", "depth_head"]  # no object head keys: random
    for part in got:
        chex.assert_trees_all_equal(got[part], want[part])
    # The vision stage's export also holds the object head: loaded too.
    save_file({k: np.ascontiguousarray(v) for k, v in
               {**tensors, **source.object_head.export_torch("object_head")}.items()},
              tmp_path / "vggt.safetensors")
    got = step_lib.vggt_weights(build, config.model.vision.checkpoint, depth_head=True)
    chex.assert_trees_all_equal(got["object_head"], want["object_head"])

    # The vision stage's export has no depth head: the student's starts from random weights.
    no_depth = {k: v for k, v in tensors.items() if not k.startswith("depth_head.")}
    save_file({k: np.ascontiguousarray(v) for k, v in no_depth.items()}, tmp_path / "vggt.safetensors")
    assert sorted(step_lib.vggt_weights(build, config.model.vision.checkpoint, depth_head=True)) == [
        "aggregator", "camera_head"]

    del tensors["aggregator.camera_token"]
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp_path / "vggt.safetensors")
    with pytest.raises(CheckpointMismatchError, match="aggregator.camera_token"):
        step_lib.vggt_weights(build, config.model.vision.checkpoint, depth_head=True)


def test_decoder_weights_from_a_hugging_face_llama(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from spatial_distill.models import llama

    config = tiny_config()
    cfg = student_lib.config_from(config.model, 56, word_tags.StandInIds()).decoder
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # O(1) logits: the default init gives ~0
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 2 else 0.1) + (1.0 if p.ndim == 1 else 0.0))
    hf.save_pretrained(tmp_path / "llama", safe_serialization=True)

    pure = step_lib.decoder_weights(cfg, str(tmp_path / "llama"))
    decoder = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(decoder)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(decoder, state)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    ours = np.asarray(decoder(ids))
    ported = llama.from_hf(str(tmp_path / "llama"), scan_layers=cfg.scan_layers)  # the same layout
    np.testing.assert_array_equal(ours, np.asarray(ported(ids)))
    with torch.no_grad():
        want = hf(torch.from_numpy(np.asarray(ids, np.int64))).logits.numpy()
    np.testing.assert_allclose(ours, want, atol=1e-4 * np.abs(want).max())

    other = dataclasses.replace(cfg, vocab_size=384)
    with pytest.raises(step_lib.DecoderMismatchError,
                       match="the pretrained decoder's vocabulary is 300 but config.model.decoder has 384"):
        step_lib.decoder_weights(other, str(tmp_path / "llama"))
    with pytest.raises(step_lib.DecoderMismatchError, match="hidden_size = 32 but config.model.decoder has 64"):
        step_lib.decoder_weights(dataclasses.replace(cfg, hidden_size=64, head_dim=16), str(tmp_path / "llama"))
    with pytest.raises(FileNotFoundError, match="needs a local Hugging Face model directory"):
        step_lib.decoder_weights(cfg, str(tmp_path / "missing"))


def test_relation_readout_enters_the_ground_task_times_its_weight():
    config = tiny_config()
    cfg = student_lib.config_from(config.model, 56, word_tags.StandInIds())
    graphdef, state = nnx.split(student_lib.Student(cfg, rngs=nnx.Rngs(0)))
    batch = make_batch(0, cfg.decoder.vocab_size)
    word = int(batch["prompt_ids"][0, 0, 1])  # a token of question 0, whose two objects are referred
    base = step_lib.loss_spec(config)

    def ground(spec):
        def fn(s, b):
            losses, m = step_lib.task_losses(nnx.merge(graphdef, s), b, spec)
            return losses["ground"], m.get("ground/relation_mse", jnp.float32(0)), m.get("ground/relations", 0.0)
        return [float(x) for x in compile_fast(fn, state, batch)(state, batch)]

    plain, _, _ = ground(base)
    weighted, mse, n = ground(dataclasses.replace(base, relations=(((word,), "x", 1.0, 0.0),), relation_weight=3.0))
    assert n >= 1 and mse > 0
    np.testing.assert_allclose(weighted, plain + 3.0 * mse, rtol=1e-5)


def test_cached_frozen_outputs_give_the_in_step_losses():
    # The trainer's vision cache hands the step `frozen_outputs`; with them in the batch the step
    # must compute what it computes from the images and boxes, task for task.
    config = tiny_config()
    cfg = student_lib.config_from(config.model, 56, word_tags.StandInIds())
    graphdef, state = nnx.split(student_lib.Student(cfg, rngs=nnx.Rngs(0)))
    batch = make_batch(1, cfg.decoder.vocab_size)
    spec = step_lib.loss_spec(config)
    assert spec.tasks == ("ground", "text") and nnx.merge(graphdef, state).vision_frozen

    def losses(s, b):
        return step_lib.task_losses(nnx.merge(graphdef, s), b, spec)

    frozen = compile_fast(lambda s, b: step_lib.frozen_outputs(nnx.merge(graphdef, s), b, spec),
                          state, batch)(state, batch)
    assert frozen["target_colours"].shape == (B, N, 3) and frozen["target_seen"].shape == (B, N)
    assert frozen["target_seen"].any() and not frozen["target_seen"][1, 1:].any()  # padded boxes unseen
    direct, m_direct = compile_fast(losses, state, batch)(state, batch)
    cached_batch = {**batch, **frozen}
    cached, m_cached = compile_fast(losses, state, cached_batch)(state, cached_batch)
    for task in ("text", "ground"):
        np.testing.assert_allclose(float(cached[task]), float(direct[task]), rtol=1e-5, err_msg=task)
    np.testing.assert_allclose(float(m_cached["ground/colour_l1"]), float(m_direct["ground/colour_l1"]), rtol=1e-5)

    objects = dataclasses.replace(spec, tasks=("ground", "objects", "text"))
    with pytest.raises(ValueError, match="cached grounding targets but the object head trains"):
        jax.eval_shape(lambda s, b: step_lib.task_losses(nnx.merge(graphdef, s), b, objects), state, cached_batch)
