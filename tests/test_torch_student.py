"""The whole student in torch (spatial_distill/export/torch_student.py): an export of a Flax
student loads with `torch_student.load(OUT)` and gives every output within 1e-4 of the Flax model
(float32), the same greedy answers, for each pooling and head set, scanned and per-layer decoders,
float32 and bfloat16 exports; broken exports are named."""

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import student as student_configs
from spatial_distill import tokenizer as tokenizer_lib
from spatial_distill.export import stage
from spatial_distill.models import student as st

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from spatial_distill.export import torch_student  # noqa: E402 - needs torch

B, Q, S, LP, LA, SIZE = 2, 3, 2, 9, 4, 56
COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "brown")
CORPUS = [f"Is the {a} {s} near the {b} cylinder? {ans}" for a in COLOURS for b in COLOURS
          for s in ("box", "sphere") for ans in ("yes", "no")]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tokenizer_lib.train_bpe(CORPUS * 2, 300, str(tmp_path_factory.mktemp("bpe")))


def student_cfg(tokenizer, pool="objects8", **model_overrides) -> st.StudentConfig:
    """The tiny preset at 56 px with random weights and a small decoder; `pool` and heads vary."""
    c = student_configs.get_config("tiny")
    c.model.vision.checkpoint = None
    c.model.vision.pos_embed_size = None
    c.model.vision_pool = pool
    c.model.decoder.vocab_size = tokenizer.vocab_size
    objects = pool.startswith(("objects", "slots"))
    c.model.object_head.enabled = objects
    c.model.object_words.enabled = objects
    for key, value in model_overrides.items():
        section, _, field = key.rpartition(".")
        setattr(c.model if not section else c.model[section], field, value)
    cfg = st.config_from(c.model, SIZE, tokenizer)
    decoder = dataclasses.replace(cfg.decoder, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                  intermediate_size=96)
    return dataclasses.replace(cfg, decoder=decoder)


def batch(tokenizer, seed=0):
    r = np.random.default_rng(seed)
    images = r.integers(0, 256, size=(B, S, SIZE, SIZE, 3), dtype=np.uint8)
    rows = [tokenizer.encode(CORPUS[int(i)].rsplit("?", 1)[0] + "?", add_bos=True)
            for i in r.integers(0, len(CORPUS), size=B * Q)]
    prompt = np.zeros((B, Q, LP), np.int32)
    pm = np.zeros((B, Q, LP), bool)
    for i, row in enumerate(rows):
        row = row[:LP - i % 3]  # different lengths, right-padded
        prompt[i // Q, i % Q, :len(row)] = row
        pm[i // Q, i % Q, :len(row)] = True
    answer = r.integers(4, tokenizer.vocab_size, size=(B, Q, LA)).astype(np.int32)
    am = np.arange(LA) < r.integers(1, LA + 1, size=(B, Q, 1))
    return images, prompt, pm, np.where(am, answer, 0), am


def exported(tmp_path, tokenizer, cfg, dtype="float32", seed=0):
    model = st.create(cfg, seed)
    out = str(tmp_path / f"export-{dtype}")
    stage.write(model, tokenizer, out, dtype=dtype)
    return model, out


@nnx.jit  # eagerly, every op of the vision side compiles on its own
def _flax_forward(model, *data):
    out = model(*data)
    out["answer_logits"] = model.answer_logits(out["answer_hidden"])
    return out


def flax_outputs(model, data) -> dict:
    return _flax_forward(model, *(jnp.asarray(x) for x in data))


def flax_generate(model, images, prompt, pm, **kw):
    """`model.generate`, compiled as one program (the eval stage runs it so)."""
    return nnx.jit(lambda m, *args: m.generate(*args, **kw))(
        model, jnp.asarray(images), jnp.asarray(prompt), jnp.asarray(pm))


def torch_outputs(student, data) -> dict:
    return student(*(torch.from_numpy(np.asarray(x)) for x in data))


def assert_same(flax_out: dict, torch_out: dict, answer_mask, atol=1e-4, rtol=1e-4):
    """Every Flax output within tolerance; answer outputs at real answer tokens (the padded
    slots' states mean nothing in either: Flax isolates padding, torch masks it as keys only)."""
    assert set(flax_out) <= set(torch_out), set(flax_out) - set(torch_out)
    for key, want in flax_out.items():
        got = torch_out[key]
        wants, gots = (want, got) if isinstance(want, list) else ([want], [got])
        assert len(wants) == len(gots), key
        for w, g in zip(wants, gots):
            g = g.float().numpy()
            w = np.asarray(w, np.float32)
            assert g.shape == w.shape, (key, g.shape, w.shape)
            if key.startswith("answer_"):
                g, w = g[answer_mask], w[answer_mask]
            np.testing.assert_allclose(g, w, atol=atol, rtol=rtol, err_msg=key)


CASES = {
    # the tiny preset: object tokens (registered views), word retrieval, latents, grounding
    "objects": dict(pool="objects8"),
    "slots": dict(pool="slots4", **{"num_latents": 0}),
    # the paper's heads: grid pooling, DPT depth, DETR boxes, latents after the question,
    # a per-layer (unscanned) decoder
    "heads": dict(pool="grid2", **{"depth_head.enabled": True, "det_head.enabled": True,
                                   "latent_position": "after_question",
                                   "decoder.scan_layers": False}),
    "mean1": dict(pool="mean1", **{"grounding": False, "decoder.tie_word_embeddings": True}),
}


@pytest.fixture(scope="module")
def export_of(tmp_path_factory, tokenizer):
    """case -> (Flax model, its export dir), built once per module (tests only read them)."""
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = exported(tmp_path_factory.mktemp(case), tokenizer, student_cfg(tokenizer, **CASES[case]))
        return cache[case]

    return get


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_student_matches_flax_on_every_output_and_answer(export_of, tokenizer, case):
    model, out = export_of(case)
    cfg = model.cfg
    student = torch_student.load(out)
    assert not student.training and student.cfg == cfg
    data = batch(tokenizer)
    want = flax_outputs(model, data)
    got = torch_outputs(student, data)
    assert_same(want, got, data[4])
    if cfg.depth_head is not None:
        assert got["depth"].shape == (B, S, SIZE, SIZE) and got["det_boxes"].shape[-1] == 7
    images, prompt, pm = data[:3]
    tokens, lengths = flax_generate(model, images, prompt, pm, max_new_tokens=5,
                                    eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    t_tokens, t_lengths = student.generate(images, prompt, pm, max_new_tokens=5)  # numpy in: accepted
    np.testing.assert_array_equal(t_lengths.numpy(), np.asarray(lengths))
    np.testing.assert_array_equal(t_tokens.numpy(), np.asarray(tokens))


def test_answer_tokenizes_the_question_as_the_records_do(export_of, tokenizer):
    model, out = export_of("objects")
    student = torch_student.load(out)
    images = batch(tokenizer)[0][0]  # one scene's views [S, H, W, 3] uint8
    questions = ["Is the red box near the blue cylinder?", "Is the cyan sphere near the white cylinder?"]
    said = student.answer(images, questions, max_new_tokens=5)
    ids = [tokenizer.encode(q, add_bos=True) for q in questions]
    prompt = np.zeros((1, 2, max(map(len, ids))), np.int32)
    pm = np.zeros(prompt.shape, bool)
    for i, row in enumerate(ids):
        prompt[0, i, :len(row)], pm[0, i, :len(row)] = row, True
    tokens, lengths = flax_generate(model, images[None], prompt, pm, max_new_tokens=5,
                                    eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    want = [tokenizer.decode(np.asarray(tokens)[0, i, :int(lengths[0, i])]).strip() for i in range(2)]
    assert said == want
    assert student.answer(images, questions[0], max_new_tokens=5) == want[0]
    # Views at another resolution are resized to the trained one.
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)
    assert isinstance(student.answer(big, questions[0], max_new_tokens=5), str)
    with pytest.raises(ValueError, match=r"uint8 \[S, H, W, 3\]"):
        student.answer(images[0], questions[0])
    with pytest.raises(ValueError, match="uint8 pixels"):
        student.answer(images.astype(np.float32), questions[0])


def test_bfloat16_export_loads_in_bfloat16_close_to_float32(tmp_path, tokenizer):
    # A student that trained in bfloat16 (float32 parameters, bf16 aggregator and decoder), as
    # the paper preset does. Grid pooling: objects<k>'s top-k may flip under bf16 noise.
    cfg = student_cfg(tokenizer, pool="grid2", **{"depth_head.enabled": True, "vision.dtype": "bfloat16",
                                                  "decoder.dtype": "bfloat16"})
    assert cfg.vision_dtype == "bfloat16" and cfg.decoder.dtype == "bfloat16"
    model, out = exported(tmp_path, tokenizer, cfg, dtype="bfloat16")
    with open(os.path.join(out, "export.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    student = torch_student.load(out)
    # The aggregator and decoder compute in bfloat16; heads, projector and readouts keep float32.
    for name, p in student.named_parameters():
        low = name.startswith(("aggregator.", "decoder."))
        assert p.dtype == (torch.bfloat16 if low else torch.float32), name
    data = batch(tokenizer)
    got = torch_outputs(student, data)
    want = flax_outputs(model, data)
    for key in ("answer_logits", "vision_tokens", "depth"):
        g, w = got[key].float().numpy(), np.asarray(want[key])
        if key == "answer_logits":
            g, w = g[data[4]], w[data[4]]
        err, scale = np.abs(g - w).max(), np.abs(w).max()
        assert err < 0.05 * scale, (key, err, scale)  # bf16 weights and activations end to end
    # The same file loads in float32 on request.
    student32 = torch_student.load(out, dtype=torch.float32)
    assert {p.dtype for p in student32.parameters()} == {torch.float32}


def test_config_round_trips_through_json(tokenizer):
    from spatial_distill.teacher import dump

    assert torch_student.PROMPT_TEMPLATE == dump.PROMPT_TEMPLATE  # answer() prompts as the records do
    for case in CASES.values():
        cfg = student_cfg(tokenizer, **case)
        data = json.loads(json.dumps(torch_student.config_to_json(cfg)))
        assert torch_student.config_from_json(data) == cfg
    with pytest.raises(ValueError, match=r"unknown StudentConfig fields \['future'\]"):
        torch_student.config_from_json({**torch_student.config_to_json(cfg), "future": 1})


def test_broken_exports_are_named(tmp_path, export_of):
    _, out = export_of("mean1")
    with pytest.raises(FileNotFoundError, match="student_config.json is missing"):
        torch_student.load(str(tmp_path))
    broken = str(tmp_path / "broken")
    shutil.copytree(out, broken)
    os.remove(os.path.join(broken, "student.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"student.safetensors is missing"):
        torch_student.load(broken)
    # A config that disagrees with the weights (another latent count) names the keys.
    shutil.rmtree(broken)
    shutil.copytree(out, broken)
    path = os.path.join(broken, "student_config.json")
    with open(path) as f:
        meta = json.load(f)
    meta["student"]["num_latents"] += 1
    with open(path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match=r"mis-shaped \['latents: file \(8, 64\) vs model \(9, 64\)'\]"):
        torch_student.load(broken)
    with open(os.path.join(broken, "vggt.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ValueError, match="vggt.safetensors: not a readable safetensors file"):
        torch_student.load(broken)
