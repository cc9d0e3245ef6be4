"""Real teachers behind the dump: the Flax LLaVA-3D port and transformers models (tiny, random,
built here), checked against a direct forward of the same model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from data_pipelines import teacher_records as tr
from spatial_distill import prepare
from spatial_distill.models import clip, llama, llava3d
from spatial_distill.teacher import dump as dump_lib
from spatial_distill.teacher import llava3d_teacher
from tests.test_dump import all_records, tiny_config

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 280  # tiny_config's BPE


def tiny_llava3d(vocab=VOCAB, seed=0) -> llava3d.LLaVA3D:
    cfg = llava3d.LLaVA3DConfig(
        llama=llama.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=2,
                                num_heads=4, max_position_embeddings=512),
        clip=clip.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                   image_size=28, patch_size=14),
        num_frames=4)
    return llava3d.LLaVA3D(cfg, rngs=nnx.Rngs(seed))


def _check_records_against(forward, out, tok, meta, max_new, n_questions=6):
    """Stored top-K ids equal a direct forward's (exactly), log-probs within fp16, and the tail mass
    the stored logsumexp implies equals the full softmax's."""
    rec = all_records(out, "train")[0]
    for qa, ans in list(zip(rec.sample.qa, rec.answers))[:n_questions]:
        logits = forward(rec.sample, qa.question, list(ans.answer_ids))  # [La, V] float64
        z = logits / meta.temperature
        lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        ids = np.argsort(-z, axis=1, kind="stable")[:, : meta.k]
        np.testing.assert_array_equal(ans.topk_ids, ids)
        np.testing.assert_array_equal(ans.answer_ids, logits.argmax(1))  # greedy = argmax
        lp = np.take_along_axis(z, ids, 1) - lse[:, None]
        np.testing.assert_allclose(ans.topk_logprobs.astype(np.float64), lp, atol=2e-3, rtol=1e-3)
        np.testing.assert_allclose(ans.logsumexp, lse, rtol=1e-5, atol=1e-5)
        tail_full = 1 - np.exp(lp).sum(1)
        tail_stored = 1 - np.exp(ans.topk_logprobs.astype(np.float64)).sum(1)
        np.testing.assert_allclose(tail_stored, tail_full, atol=1e-3)
        assert ans.answer_ids[-1] == tok.eos_id or len(ans.answer_ids) == max_new


def test_llava3d_teacher_dump_matches_a_direct_forward(tmp_path):
    model = tiny_llava3d()
    llava3d.save_official(model, str(tmp_path / "teacher"), max_shard_bytes=200_000)
    assert len(list((tmp_path / "teacher").glob("model-*.safetensors"))) > 1  # sharded + index
    c = tiny_config(kind="llava3d", path=str(tmp_path / "teacher"), k=8, max_new_tokens=5)
    out = dump_lib.dump(c, str(tmp_path / "w"))
    meta = tr.read_meta(out)
    assert meta.teacher_id == "llava3d:teacher" and len(meta.teacher_revision) == 16
    cal = meta.calibration
    assert cal["teacher_template"] == "llava_v1" and cal["voxel_cap_rule"] == llava3d.VOXEL_CAP_RULE
    assert cal["geometry"] == "sensor" and cal["max_voxel_tokens"] == 2560
    assert meta.splits["train"]["num_records"] == 12 and meta.splits["eval"]["num_records"] == 4
    tok = prepare.tokenizer(c, str(tmp_path / "w"))
    teacher = llava3d_teacher.LLaVA3DTeacher(model, tok, teacher_id="t", revision="0")

    def forward(sample, question, answer):
        x = teacher.scene_inputs(sample)
        ids = np.asarray([teacher.prompt_ids(question) + answer])
        logits = np.asarray(model(ids, images=x["images"], depths=x["depths"], poses=x["poses"],
                                  intrinsics=x["intrinsics"]), np.float64)[0]
        return logits[-len(answer) - 1: -1]

    _check_records_against(forward, out, tok, meta, 5)
    # The records keep the student's prompt (BOS + question), not the teacher's template.
    rec = all_records(out, "eval")[0]
    assert rec.answers[0].prompt_ids.tolist() == tok.encode(rec.sample.qa[0].question, add_bos=True)


def test_teacher_prompt_is_the_llava_template_spliced_at_the_image(tmp_path):
    c = tiny_config()
    tok = prepare.tokenizer(c, str(tmp_path))
    teacher = llava3d_teacher.LLaVA3DTeacher(tiny_llava3d(), tok, teacher_id="t", revision="0")
    ids = teacher.prompt_ids("Is the red box near the blue ball?")
    assert ids[0] == tok.bos_id and ids.count(llava3d.IMAGE_TOKEN_INDEX) == 1
    text = tok.decode([i for i in ids if i >= 0])
    assert text.strip().startswith("A chat between a curious human") and text.endswith("blue ball? ASSISTANT:")
    with pytest.raises(ValueError, match="holds a click"):
        teacher.prompt_ids("What is at [1.0, 2.0, 0.5]?")


def test_wrong_vocab_and_foreign_tokenizer_stop_before_any_record(tmp_path):
    llava3d.save_official(tiny_llava3d(vocab=300), str(tmp_path / "big"))
    c = tiny_config(kind="llava3d", path=str(tmp_path / "big"))
    with pytest.raises(ValueError, match="300"):
        dump_lib.dump(c, str(tmp_path / "w"))
    assert not list((tmp_path / "w").glob("records/teacher-*"))
    # A checkpoint shipping its own tokenizer that splits text differently.
    llava3d.save_official(tiny_llava3d(), str(tmp_path / "t"))
    c = tiny_config(kind="llava3d", path=str(tmp_path / "t"))
    prepare.tokenizer(c, str(tmp_path / "w"))  # the student's BPE, trained on the data
    from spatial_distill import tokenizer as tokenizer_lib

    tokenizer_lib.train_bpe(["completely different text " * 50, "zebra quartz"], VOCAB, str(tmp_path / "t"))
    with pytest.raises(ValueError, match="teacher and student tokenizers differ on"):
        dump_lib.dump(c, str(tmp_path / "w"))
    assert not list((tmp_path / "w").glob("records/teacher-*"))


def test_teacher_kind_and_geometry_are_validated(tmp_path):
    with pytest.raises(ValueError, match="config.teacher.kind = 'gpt'"):
        dump_lib.dump(tiny_config(kind="gpt"), str(tmp_path))
    with pytest.raises(ValueError, match="needs config.teacher.path"):
        dump_lib.dump(tiny_config(kind="llava3d"), str(tmp_path))
    tok = prepare.tokenizer(tiny_config(), str(tmp_path))
    with pytest.raises(ValueError, match="geometry='lidar'"):
        llava3d_teacher.LLaVA3DTeacher(tiny_llava3d(), tok, teacher_id="t", revision="0", geometry="lidar")


def _hf_models():
    import torch
    import transformers

    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=1024)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**text))
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  image_size=28, patch_size=14)
    # <unk> (0) stands for the image token: the byte-level BPE never emits it.
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=dict(model_type="llama", **text),
                                   image_token_index=0)
    return {"llama": lm, "llava": transformers.LlavaForConditionalGeneration(cfg)}


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_hf_teacher_dump_matches_a_direct_forward(kind, tmp_path):
    torch = pytest.importorskip("torch")
    from spatial_distill.teacher import hf_teacher

    model = _hf_models()[kind].eval()
    model.save_pretrained(tmp_path / "teacher")
    c = tiny_config(kind="hf", path=str(tmp_path / "teacher"), k=8, max_new_tokens=4, batch_size=5)
    out = dump_lib.dump(c, str(tmp_path / "w"))
    meta = tr.read_meta(out)
    assert meta.teacher_id == "hf:teacher" and meta.splits["train"]["num_records"] == 12
    tok = prepare.tokenizer(c, str(tmp_path / "w"))
    teacher = hf_teacher.HFTeacher(model, tok, teacher_id="t", revision="0")

    def forward(sample, question, answer):
        ids = torch.tensor([teacher.prompt_ids(question) + answer])
        kwargs = {"pixel_values": teacher._pixels(sample, 1)} if kind == "llava" else {}
        with torch.no_grad():
            logits = model(input_ids=ids, **kwargs).logits[0].double().numpy()
        return logits[-len(answer) - 1: -1]

    _check_records_against(forward, out, tok, meta, 4)
    if kind == "llava":
        assert meta.calibration["image_tokens"] == 4 and meta.calibration["image_size"] == 28


@pytest.mark.slow
def test_two_processes_dump_disjoint_complete_shards_equal_to_one_process(tmp_path):
    """Two jax.distributed processes (2 CPU devices each, the teacher tensor-parallel over them)
    write disjoint shards whose records equal a one-process dump's."""
    llava3d.save_official(tiny_llava3d(), str(tmp_path / "teacher"))
    overrides = dict(kind="llava3d", path=str(tmp_path / "teacher"), k=8, max_new_tokens=4)
    single = dump_lib.dump(tiny_config(**overrides), str(tmp_path / "one"))
    # The data and tokenizer are shared; each process dumps into the same records directory.
    work = tmp_path / "two"
    c = tiny_config(**overrides)
    prepare.prepare_data(c, str(work))
    code = (
        "import json, sys, jax\n"
        "spec = json.loads(sys.argv[1])\n"
        "jax.config.update('jax_cpu_collectives_implementation', 'gloo')\n"
        "jax.distributed.initialize(coordinator_address=f\"127.0.0.1:{spec['port']}\", "
        "num_processes=2, process_id=spec['process'])\n"
        "assert jax.local_device_count() == 2\n"
        "from tests.test_dump import tiny_config\n"
        "from spatial_distill.teacher import dump\n"
        "dump.dump(tiny_config(**spec['overrides']), spec['work'])\n")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(
        {"port": port, "process": p, "overrides": overrides, "work": str(work)})], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in range(2)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    out = dump_lib.records_dir(c, str(work))
    for split, n in (("train", 12), ("eval", 4)):
        assert len(tr.finished_shards(out, split, 4)) == 4
        two = {r.sample.sample_id: r for r in all_records(out, split)}
        one = {r.sample.sample_id: r for r in all_records(single, split)}
        assert len(two) == n and two.keys() == one.keys()
        for sid, rec in two.items():
            for a, b in zip(rec.answers, one[sid].answers):
                np.testing.assert_array_equal(a.answer_ids, b.answer_ids)
                np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
                np.testing.assert_allclose(a.topk_logprobs.astype(np.float32),
                                           b.topk_logprobs.astype(np.float32), atol=2e-3)
    assert tr.read_meta(out).splits["train"]["num_records"] == 12


def test_2d_mode_and_scenes_without_depth(tmp_path):
    """A scene without depth stops with the two ways out named; 2D mode answers from view 0."""
    import dataclasses

    from data_pipelines import synthetic
    from spatial_distill.teacher import llava3d_inputs

    c = tiny_config()
    tok = prepare.tokenizer(c, str(tmp_path))
    model = tiny_llava3d()
    s = synthetic.generate_scene(7, image_size=(56, 56), num_views=3)
    no_depth = dataclasses.replace(s, depth=np.zeros_like(s.depth))
    teacher = llava3d_teacher.LLaVA3DTeacher(model, tok, teacher_id="t", revision="0", max_new_tokens=3)
    with pytest.raises(ValueError, match=r"views \[0, 1, 2\] have no valid depth.*geometry=vggt.*llava_mode=2d"):
        teacher.answer(no_depth, None)
    flat = llava3d_teacher.LLaVA3DTeacher(model, tok, teacher_id="t", revision="0", max_new_tokens=3,
                                          mode="2d")
    answers = flat.answer(no_depth, None)
    logits = flat.score(no_depth, None, answers)
    image = llava3d_inputs.image_2d(s.rgb[0], "square", 28)[None]
    for i in (0, 5):
        ids = np.asarray([flat.prompt_ids(s.qa[i].question) + answers[i]])
        full = np.asarray(model(ids, images=image))[0]
        assert full.shape[0] == ids.shape[1] - 1 + 4  # 2x2 CLIP patches replace the -200
        a = len(answers[i])
        np.testing.assert_allclose(full[-a - 1: -1], logits[i], atol=1e-5)
        np.testing.assert_array_equal(full[-a - 1: -1].argmax(-1), answers[i])
    assert flat.calibration()["mode"] == "2d"
