import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import student as student_configs
from spatial_distill.models import student as st

MANIFEST = (Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "llava3d"
            / "llava3d_7b_manifest.json")

B, Q, S, LP, LA = 2, 3, 2, 7, 4


def tiny_cfg(**overrides) -> st.StudentConfig:
    """The tiny preset's student at 56 px with a small decoder, pooled patch tokens and no heads
    (the object-token path has its own tests below)."""
    c = student_configs.get_config("tiny")
    c.model.vision.checkpoint = None
    c.model.vision.pos_embed_size = None
    c.model.object_head.enabled = False
    c.model.vision_pool = "grid2"
    c.model.grounding = False
    cfg = st.config_from(c.model, 56)
    small_decoder = dataclasses.replace(cfg.decoder, vocab_size=64, hidden_size=32, num_layers=2,
                                        num_heads=4, num_kv_heads=2, intermediate_size=64)
    cfg = dataclasses.replace(cfg, decoder=small_decoder, det_head=None, depth_head=None)
    return dataclasses.replace(cfg, **overrides)


@nnx.jit
def forward(model, images, prompt, pm, answer, am):
    return model(images, prompt, pm, answer, am)


@functools.lru_cache(maxsize=None)
def cached_model(seed=0, **overrides) -> st.Student:
    """Tests that only read a model share one (init compiles once per configuration)."""
    return st.create(tiny_cfg(**overrides), seed)


def batch(seed=0):
    r = np.random.default_rng(seed)
    images = r.uniform(size=(B, S, 56, 56, 3)).astype(np.float32)
    prompt = r.integers(4, 64, size=(B, Q, LP)).astype(np.int32)
    n_prompt = r.integers(2, LP + 1, size=(B, Q, 1))
    n_prompt[0, 0, 0] = LP  # one unpadded question
    answer = r.integers(4, 64, size=(B, Q, LA)).astype(np.int32)
    n_answer = r.integers(1, LA + 1, size=(B, Q, 1))
    pm = np.arange(LP) < n_prompt
    am = np.arange(LA) < n_answer
    return images, np.where(pm, prompt, 0), pm, np.where(am, answer, 0), am


def _compact_rows(model: st.Student, vision, prompt, pm, answer=None, am=None):
    """Per question, the compact sequence [V][T][Q][A] (or [V][Q][T][A]) right-padded to one
    length: trailing padding cannot change earlier positions of a causal decoder."""
    cfg = model.cfg
    rows = []
    for b in range(B):
        for q in range(Q):
            qe = model.decoder.embed(jnp.asarray(prompt[b, q][pm[b, q]])[None])[0]
            lat = [model.latents[...]] if cfg.num_latents else []
            parts = [vision[b], *lat, qe] if cfg.latent_position == "before_question" else [vision[b], qe, *lat]
            if answer is not None:
                parts.append(model.decoder.embed(jnp.asarray(answer[b, q][am[b, q]])[None])[0])
            rows.append(jnp.concatenate(parts))
    lengths = [r.shape[0] for r in rows]
    width = max(lengths)
    padded = jnp.stack([jnp.pad(r, ((0, width - r.shape[0]), (0, 0))) for r in rows])
    return padded, np.array(lengths)


def _vision(model, images):
    return see(model, jnp.asarray(images))["vision"]


@functools.partial(nnx.jit, static_argnames="project")
def see(model, images, project=True):
    """`model.see` compiled: eagerly, every op of the vision side compiles on its own."""
    return model.see(images, project=project)


@nnx.jit
def _hidden(decoder, embeds):
    positions = jnp.broadcast_to(jnp.arange(embeds.shape[1]), embeds.shape[:2])
    return decoder.hidden(embeds, positions=positions)[0]


def compact_reference(model: st.Student, images, prompt, pm, answer, am):
    """The bare decoder on each question's compact sequence; hidden states predicting A."""
    seqs, lengths = _compact_rows(model, _vision(model, images), prompt, pm, answer, am)
    h = np.asarray(_hidden(model.decoder, seqs))
    out = np.zeros((B * Q, LA, model.cfg.decoder.hidden_size), np.float32)
    for r, n in enumerate(lengths):
        na = int(am.reshape(B * Q, LA)[r].sum())
        out[r, :na] = h[r, n - na - 1: n - 1]  # hidden predicting answer token j sits just before it
    return out.reshape(B, Q, LA, -1)


@pytest.mark.parametrize("position", ["before_question", "after_question"])
@pytest.mark.parametrize("latents", [0, 3])
def test_padded_layout_equals_compact_sequence(position, latents):
    model = cached_model(num_latents=latents, latent_position=position)
    images, prompt, pm, answer, am = batch()
    with jax.default_matmul_precision("highest"):
        out = forward(model, jnp.asarray(images), jnp.asarray(prompt), jnp.asarray(pm),
                      jnp.asarray(answer), jnp.asarray(am))
        ref = compact_reference(model, images, prompt, pm, answer, am)
    got = np.asarray(out["answer_hidden"]) * am[..., None]
    np.testing.assert_allclose(got, ref, atol=2e-5)
    assert out["vision_tokens"].shape == (B, S * 4, 32)  # grid2: 4 tokens per view


def test_shared_prefix_gradients_equal_per_question_decoding():
    """Training decodes the shared prefix once per sample; the gradients (vision, latents and
    decoder) must equal those of decoding every question's whole sequence."""
    model = cached_model(num_latents=3)
    images, prompt, pm, answer, am = batch()
    graphdef, state = nnx.split(model)

    def shared(state):
        m = nnx.merge(graphdef, state)
        return (m(jnp.asarray(images), prompt, pm, answer, am)["answer_hidden"] ** 2 * am[..., None]).sum()

    def per_question(state):
        m = nnx.merge(graphdef, state)
        p = m.cfg.aggregator.patch_size
        _, patches = m.encode_images(jnp.asarray(images))
        vision = m.vision_tokens(patches, (images.shape[2] // p, images.shape[3] // p))
        emb, valid = m._sequence(vision, prompt, pm, answer, am)
        h, _ = m.decoder.hidden(emb, positions=st.generate_lib.positions_from_mask(valid),
                                segment_ids=valid.astype(jnp.int32))
        p0 = emb.shape[1] - prompt.shape[-1] - answer.shape[-1]
        slots = p0 + m._answer_source_slots(pm, LA).reshape(B * Q, LA)
        ah = jnp.take_along_axis(h, slots[..., None], axis=1).reshape(B, Q, LA, -1)
        return (ah ** 2 * am[..., None]).sum()

    with jax.default_matmul_precision("highest"):
        ga = jax.jit(jax.grad(shared))(state)
        gb = jax.jit(jax.grad(per_question))(state)
    for (path, a), (_, b) in zip(ga.flat_state(), gb.flat_state()):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        np.testing.assert_allclose(a, b, atol=1e-4 * max(1.0, np.abs(b).max()), rtol=0,
                                   err_msg=str(path))
    assert np.abs(np.asarray(ga["latents"].get_value())).max() > 0


def test_answer_token_change_never_reaches_earlier_positions():
    model = cached_model()
    images, prompt, pm, answer, am = batch()
    am[:] = True
    answer = np.where(am, np.maximum(answer, 4), 0)
    f = nnx.jit(lambda m, a: m(jnp.asarray(images), prompt, pm, a, am)["answer_hidden"])
    base = np.asarray(f(model, answer))
    changed = answer.copy()
    changed[:, :, 2] = (changed[:, :, 2] + 7) % 60 + 4
    new = np.asarray(f(model, changed))
    np.testing.assert_array_equal(new[:, :, :3], base[:, :, :3])  # predicts tokens 0..2
    assert np.abs(new[:, :, 3] - base[:, :, 3]).min() > 1e-6  # token 3 sees token 2


def test_latents_change_the_answer_and_zero_latents_disable_the_feature():
    model = st.create(tiny_cfg(num_latents=4), 0)
    images, prompt, pm, answer, am = batch()
    run = lambda m: np.asarray(m.answer_logits(forward(m, jnp.asarray(images), prompt, pm, answer, am)["answer_hidden"]))
    base = run(model)
    model.latents[...] = model.latents[...] + 0.5
    assert np.abs(run(model) - base).max() > 1e-3
    # K = 0 builds no latent parameter and matches the bare decoder (checked exactly above).
    plain = cached_model(num_latents=0)
    assert plain.latents is None
    assert not any("latents" in str(p) for p, _ in nnx.state(plain, nnx.Param).flat_state())


def test_latent_init_scale_and_determinism():
    a = st.create(tiny_cfg(num_latents=512), 3)
    b = st.create(tiny_cfg(num_latents=512), 3)
    lat = np.asarray(a.latents[...])
    assert abs(lat.std() - 0.02) < 0.002 and abs(lat.mean()) < 0.002
    for (pa, va), (pb, vb) in zip(nnx.state(a).flat_state(), nnx.state(b).flat_state()):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()))


def test_bf16_forward_close_to_f32():
    cfg = tiny_cfg()
    f32 = cached_model()
    bf16_cfg = dataclasses.replace(cfg, vision_dtype="bfloat16",
                                   decoder=dataclasses.replace(cfg.decoder, dtype=jnp.bfloat16))
    bf16 = st.create(bf16_cfg, 0)
    images, prompt, pm, answer, am = batch()
    a = forward(f32, jnp.asarray(images), prompt, pm, answer, am)["answer_hidden"]
    b = forward(bf16, jnp.asarray(images), prompt, pm, answer, am)["answer_hidden"]
    assert b.dtype == jnp.bfloat16
    err = np.abs(np.asarray(b, np.float32) - np.asarray(a)) * am[..., None]
    assert err.max() < 0.1, err.max()  # RMS-normed hidden states, bf16 has 8 mantissa bits


def test_heads_and_mean1_pooling_shapes():
    c = student_configs.get_config("tiny")
    c.model.depth_head.enabled = c.model.det_head.enabled = True
    c.model.object_head.enabled = c.model.grounding = False
    c.model.vision.checkpoint = None
    c.model.vision_pool = "mean1"
    cfg = st.config_from(c.model, 56)
    model = st.create(cfg, 0)
    images, prompt, pm, answer, am = batch()
    out = forward(model, jnp.asarray(images), prompt, pm, answer, am)
    assert out["vision_tokens"].shape == (B, 1, 128)
    assert out["depth"].shape == (B, S, 56, 56) and out["depth_conf"].shape == (B, S, 56, 56)
    assert float(out["depth"].min()) > 0 and float(out["depth_conf"].min()) > 1
    assert out["det_logits"].shape == (B, 16, 4) and out["det_boxes"].shape == (B, 16, 7)
    assert float(out["det_boxes"][..., 3:6].min()) > 0


def test_pooling_matrix_is_adaptive_average():
    m = st.pooling_matrix(37, 37, 2)
    np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
    grid = np.arange(37 * 37, dtype=np.float64)
    np.testing.assert_allclose(m[0] @ grid, grid.reshape(37, 37)[:19, :19].mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="cannot pool a 3x3 patch grid to 4x4"):
        st.pooling_matrix(3, 3, 4)
    with pytest.raises(ValueError, match="vision_pool = 'max'"):
        tiny_cfg(vision_pool="max")


def test_generation_equals_argmax_loop_on_compact_sequence():
    model = st.create(tiny_cfg(num_latents=2), 1)
    images, prompt, pm, _, _ = batch()
    steps, eos = 5, 2
    with jax.default_matmul_precision("highest"):
        toks, lengths = model.generate(jnp.asarray(images), jnp.asarray(prompt), jnp.asarray(pm),
                                       max_new_tokens=steps, eos_id=eos, pad_id=0)
        seqs, n = _compact_rows(model, _vision(model, images), prompt, pm)
        seqs = jnp.pad(seqs, ((0, 0), (0, steps), (0, 0)))
        rows = np.arange(B * Q)
        want = np.zeros((B * Q, steps), np.int64)
        for t in range(steps):  # no cache: rerun the whole (growing) sequence every step
            logits = model.decoder.logits(_hidden(model.decoder, seqs))
            nxt = np.asarray(jnp.argmax(logits[rows, n - 1], -1))
            want[:, t] = nxt
            seqs = seqs.at[rows, n].set(model.decoder.embed(jnp.asarray(nxt)[:, None])[:, 0])
            n = n + 1
    got = np.asarray(toks).reshape(B * Q, steps)
    for r in range(B * Q):
        stop = list(want[r]).index(eos) + 1 if eos in want[r] else steps
        assert got[r, :stop].tolist() == want[r, :stop].tolist(), (r, got[r], want[r])
        assert (got[r, stop:] == 0).all() and int(np.asarray(lengths).reshape(-1)[r]) == stop


def test_latent_diagnostic():
    model = st.create(tiny_cfg(num_latents=3), 0)
    images, prompt, pm, _, _ = batch()
    nearest = nnx.jit(lambda m, *args: m.latent_nearest_tokens(*args))
    d = nearest(model, jnp.asarray(images), prompt, pm)
    assert d["lm_head_argmax"].shape == (B, Q, 3) and d["embedding_nearest"].shape == (3,)
    # Setting a latent to a token's embedding makes that token its nearest neighbour.
    model.latents[...] = model.latents[...].at[1].set(model.decoder.embedding[...][17] * 3.0)
    assert int(nearest(model, jnp.asarray(images), prompt, pm)["embedding_nearest"][1]) == 17
    with pytest.raises(ValueError, match="no latent tokens"):
        cached_model(num_latents=0).latent_nearest_tokens(images, prompt, pm)


def test_question_longer_than_context_is_named():
    cfg = tiny_cfg()
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, max_position_embeddings=20))
    model = st.create(cfg, 0)
    images, prompt, pm, answer, am = batch()
    with pytest.raises(ValueError, match=r"student sequence of 27 tokens \(8 vision \+ 8 latent \+ 7 question"
                                         r" \+ 4 answer\) exceeds the decoder context max_position_embeddings = 20"):
        model(jnp.asarray(images), prompt, pm, answer, am)
    # Without the decoder (the vision stage) the context does not bound the patch tokens.
    out = model(jnp.asarray(images), prompt, pm, answer, am, text=False)
    assert out["vision_tokens"].shape[1] == 8 and "answer_hidden" not in out


def test_paper_preset_size():
    c = student_configs.get_config("paper")
    cfg = st.config_from(c.model, c.data.image_size)
    model = st.create(cfg, abstract=True)
    counts = st.parameter_breakdown(model)
    total = sum(counts.values())
    assert abs(total / 2.29e9 - 1) <= 0.02, counts
    assert counts["aggregator"] == 909_112_320  # VGGT-1B aggregator, exactly
    assert counts["depth_head"] == 32_654_562  # VGGT-1B depth head, exactly
    teacher = json.loads(MANIFEST.read_text())["total_params"]
    assert teacher / total >= 3.0



def object_cfg(**overrides) -> st.StudentConfig:
    """The tiny preset's object-token student (object + camera heads, grounding head), a
    token per patch unless overridden, at 56 px with random weights and a small decoder."""
    c = student_configs.get_config("tiny")
    c.model.vision.checkpoint = None
    c.model.vision.pos_embed_size = None
    c.model.object_words.enabled = False  # test_word_tags.py tests them
    cfg = st.config_from(c.model, 56)
    small_decoder = dataclasses.replace(cfg.decoder, vocab_size=64, hidden_size=32, num_layers=2,
                                        num_heads=4, num_kv_heads=2, intermediate_size=64)
    overrides.setdefault("vision_pool", "patch")  # a token per patch, whatever the preset pools
    return dataclasses.replace(cfg, decoder=small_decoder, **overrides)


def test_object_tokens_carry_the_object_fields_and_grounding_reads_the_answer_position():
    cfg = object_cfg()
    assert cfg.vision_pool == "patch" and cfg.grounding and cfg.freeze_vision and cfg.freeze_objects
    model = st.create(cfg, 0)
    images, prompt, pm, answer, am = batch()
    out = forward(model, jnp.asarray(images), prompt, pm, answer, am)
    assert out["vision_tokens"].shape == (B, S * 16, 32)  # 4 x 4 patches per 56-px view
    assert out["object_raw"].shape == (B, S, 16, cfg.object_head.num_raw)
    assert len(out["pose_enc_list"]) == 4 and out["pose_enc_list"][-1].shape == (B, S, 9)
    assert out["grounding"].shape == (B, Q, 2, 8 + 3 + 3)
    # The grounding head reads the hidden state that predicts the first answer token.
    want = model.grounding_head(out["answer_hidden"][:, :, 0]).reshape(B, Q, 2, -1)
    np.testing.assert_allclose(np.asarray(out["grounding"]), np.asarray(want), atol=1e-5)
    rel = model.relation_head(out["answer_hidden"][:, :, 0])[..., 0]
    assert out["relation"].shape == (B, Q)
    np.testing.assert_allclose(np.asarray(out["relation"]), np.asarray(rel), atol=1e-5)
    # The fields the decoder reads: the centre channels are the composed object centres.
    seen = see(model, jnp.asarray(images))
    fields = model.object_head.features(seen["object_raw"], seen["pose_enc_list"][-1], (56, 56), 14)
    from spatial_distill.models.object_head import cameras
    ext, intr = cameras(seen["pose_enc_list"][-1], (56, 56))
    if cfg.object_head.register_views:
        ext = model.object_head.register_views(seen["object_raw"], ext, intr, (4, 4), 14)
    centres = model.object_head.centres(seen["object_raw"], ext, intr, (4, 4), 14)
    np.testing.assert_allclose(np.asarray(fields[..., 7:10]), np.asarray(centres), atol=1e-5)
    assert fields.shape[-1] == cfg.object_head.num_features


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_vision_and_object_heads_get_no_gradient_from_the_decoder(frozen):
    # Unregistered views: the decoder reaches the camera head through every view's extrinsics.
    cfg = object_cfg(freeze_vision=frozen, freeze_objects=frozen)
    cfg = dataclasses.replace(cfg, object_head=dataclasses.replace(cfg.object_head, register_views=False))
    model = st.create(cfg, 0)
    images, prompt, pm, answer, am = batch()

    def loss(m):
        out = m(jnp.asarray(images), prompt, pm, answer, am)
        return jnp.mean(out["answer_hidden"] ** 2) + jnp.mean(out["grounding"] ** 2)

    grads = nnx.jit(nnx.grad(loss))(model)  # eagerly, every op compiles on its own: ~4x slower
    norm = lambda part: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads[part])))
    for part in ("aggregator", "object_head", "camera_head"):
        assert (norm(part) == 0) == frozen, part
    assert norm("proj_in") > 0 and norm("grounding_head") > 0


def test_cached_vision_inputs_give_the_same_outputs():
    from spatial_distill.train.vision_cache import VisionCache

    model = st.create(object_cfg(vision_pool="objects8"), 0)
    assert model.vision_frozen
    images, prompt, pm, answer, am = batch()
    x = jnp.asarray(images)
    cached = see(model, x, project=False)["vision_inputs"]
    assert cached.shape == (B, 8, 128 + model.cfg.object_head.num_features)
    a = forward(model, x, prompt, pm, answer, am)
    b = nnx.jit(lambda m, *args: m(*args, vision_inputs=cached))(model, x, prompt, pm, answer, am)
    for key in ("answer_hidden", "grounding", "vision_tokens"):
        np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), atol=1e-5, err_msg=key)

    calls = []

    def fn(params, inputs):  # stands for the vision side and the grounding targets
        calls.append(len(inputs["rgb"]))
        rgb = jnp.asarray(inputs["rgb"])
        return {"vision_inputs": rgb.sum(axis=(1, 2, 3))[:, None, :], "seen": rgb.max((1, 2, 3, 4)) > 128}

    cache = VisionCache(fn, lambda v: v)
    imgs = np.random.default_rng(0).integers(0, 255, (2, 1, 2, 2, 3)).astype(np.uint8)
    first = cache.lookup([b"a", b"b"], {"rgb": imgs}, None)
    assert first["vision_inputs"].shape == (2, 1, 3) and first["seen"].shape == (2,)
    again = cache.lookup([b"b", b"a"], {"rgb": imgs[::-1]}, None)  # both cached: no call
    for key in first:
        np.testing.assert_array_equal(again[key], first[key][::-1])
    cache.lookup([b"a", b"c"], {"rgb": imgs}, None)  # one new sample: one call for the batch
    assert calls == [2, 2] and cache.computed == 3
    assert cache.nbytes == 3 * (3 * 4 + 1)  # uint32 sums and a bool per sample


def test_geometry_gain_scales_only_the_fields_geometry_where_the_projector_reads_it():
    # The tiny preset's own gain is 3: the plain student sets 1 explicitly.
    plain = st.create(object_cfg(geometry_gain=1.0), 0)
    gained = st.create(object_cfg(geometry_gain=3.0), 0)
    seen = see(plain, jnp.asarray(batch()[0]), project=False)
    pooled = np.asarray(seen["vision_inputs"])
    # Patch features, objectness, class probabilities, colour logits, then the geometry.
    start = 2 * plain.cfg.aggregator.embed_dim + 1 + plain.cfg.object_head.num_classes + 3
    assert pooled.shape[-1] - start == 3 + 3 + 2  # centre, log size, (cos 2ψ, sin 2ψ)
    assert gained.cfg.geometry_column == start and plain.cfg.geometry_column is None
    scaled = pooled.copy()
    scaled[..., start:] *= 3.0
    np.testing.assert_allclose(np.asarray(gained.project(jnp.asarray(pooled))),
                               np.asarray(plain.project(jnp.asarray(scaled))), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(gained.project(jnp.asarray(pooled))),
                           np.asarray(plain.project(jnp.asarray(pooled))), atol=1e-3)


def test_object_pooling_keeps_the_most_object_like_patches_in_order():
    model = st.create(object_cfg(vision_pool="objects5"), 0)
    images = jnp.asarray(batch()[0])
    seen = see(model, images, project=False)
    objectness = np.asarray(seen["object_raw"][..., 0]).reshape(B, -1)
    want = np.sort(np.argsort(-objectness, axis=1)[:, :5], axis=1)
    tokens = np.asarray(model.pool_tokens(seen["patches"], (4, 4), None, jnp.asarray(want)))
    np.testing.assert_allclose(np.asarray(seen["vision_inputs"])[..., :128], tokens, atol=1e-6)
    flat = np.asarray(seen["patches"]).reshape(B, -1, 128)
    np.testing.assert_allclose(tokens, np.take_along_axis(flat, want[..., None], 1), atol=1e-6)
    assert model.cfg.num_vision_tokens(S) == 5
    with pytest.raises(ValueError, match="objects<k> selects|enable the object head"):
        tiny_cfg(vision_pool="objects5")  # no object head
    with pytest.raises(ValueError, match="only 32 patch tokens"):
        see(st.create(object_cfg(vision_pool="objects40"), 0), images)


def test_slot_pooling_averages_the_grouped_patches():
    from spatial_distill.models import slots

    model = st.create(object_cfg(vision_pool="slots3", slot_min_objectness=0.0), 0)
    images = jnp.asarray(batch()[0])
    seen = see(model, images, project=False)
    fields = model.object_head.features(seen["object_raw"], seen["pose_enc_list"][-1], (56, 56), 14)
    flat = np.asarray(fields).reshape(B, -1, fields.shape[-1])
    c = model.cfg.object_head.num_classes
    colours = 1 / (1 + np.exp(-flat[..., 1 + c:4 + c]))  # the fields carry colour logits
    w = np.asarray(slots.group(flat[..., 0], flat[..., 4 + c:7 + c], colours, flat[..., 1:1 + c],
                               3, radius=0.75, colour_scale=0.15, min_objectness=0.0))
    from spatial_distill.models.object_head import split_features
    np.testing.assert_allclose(np.asarray(split_features(jnp.asarray(flat), c)["colour"]), colours, rtol=1e-6)
    np.testing.assert_allclose(w.sum(-1), 1, rtol=1e-5)  # no objectness floor: every slot is used
    x = np.concatenate([np.asarray(seen["patches"]).reshape(B, -1, 128), flat], -1)
    np.testing.assert_allclose(np.asarray(seen["vision_inputs"]), np.einsum("bkp,bpc->bkc", w, x), atol=1e-5)
    assert model.cfg.num_vision_tokens(S) == 3
    with pytest.raises(ValueError, match="slots<k>"):
        object_cfg(vision_pool="slots0").num_object_tokens


def test_batch_contract_is_checked_at_the_model_boundary():
    model = cached_model()
    images, prompt, pm, answer, am = batch()
    with pytest.raises(AssertionError, match="assert_equal_shape"):
        model(jnp.asarray(images), prompt, pm[:, :, :-1], answer, am)
    with pytest.raises(AssertionError, match="assert_equal_shape_prefix"):
        model(jnp.asarray(images[:1]), prompt, pm, answer, am)
    with pytest.raises(AssertionError, match="assert_type"):
        model(jnp.asarray(images), prompt.astype(np.float32), pm, answer, am)
    with pytest.raises(AssertionError, match="assert_rank"):
        model(jnp.asarray(images[:, 0]), prompt, pm, answer, am)
