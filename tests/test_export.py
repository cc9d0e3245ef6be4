"""Export to PyTorch (`spatial_distill/export/`): the decoder as a Hugging Face Llama directory
that stock transformers loads, with logits within 1e-4 of the Flax decoder and identical greedy
generations; sharded weights with an index; the tokenizer through AutoTokenizer."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spatial_distill import generate
from spatial_distill import tokenizer as tokenizer_lib
from spatial_distill.export import hf_decoder
from spatial_distill.models import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CORPUS = [f"Is the {a} {s} near the {b} box? {ans}" for a in ("red", "green", "blue", "pink")
          for b in ("cyan", "white", "brown") for s in ("box", "sphere") for ans in ("yes", "no")]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tokenizer_lib.train_bpe(CORPUS * 4, 300, str(tmp_path_factory.mktemp("bpe")))


def _decoder(tied=False, kv_heads=2, seed=0):
    cfg = llama.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2,
                            num_heads=4, num_kv_heads=kv_heads, max_position_embeddings=64,
                            rope_theta=500.0, tie_word_embeddings=tied)
    return llama.Llama(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("tied,kv_heads", [(False, 2), (True, 4)])
def test_stock_transformers_loads_the_decoder_with_equal_logits_and_greedy_answers(tmp_path, tokenizer, tied, kv_heads):
    model = _decoder(tied, kv_heads)
    files = hf_decoder.write(model, tokenizer, str(tmp_path))
    assert files == ["model.safetensors"]
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    prompts = ["Is the red box near the cyan box?", "Is the blue sphere near the white box?"]
    ids = [tokenizer.encode(p, add_bos=True) for p in prompts]
    width = max(map(len, ids))
    # Left padding, as both generators take it.
    padded = np.array([[tokenizer.pad_id] * (width - len(i)) + i for i in ids], np.int64)
    mask = np.array([[0] * (width - len(i)) + [1] * len(i) for i in ids], np.int64)
    with torch.no_grad():
        hf_logits = hf(input_ids=torch.from_numpy(padded[:1, -len(ids[0]):])).logits.numpy()
    ours = np.asarray(model(jnp.asarray(padded[:1, -len(ids[0]):])))
    np.testing.assert_allclose(ours, hf_logits, atol=1e-4, rtol=0)
    with torch.no_grad():
        hf_out = hf.generate(input_ids=torch.from_numpy(padded), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=6, do_sample=False)[:, width:].numpy()
    ours, lengths = generate.generate_from_ids(model, jnp.asarray(padded), jnp.asarray(mask, bool),
                                               max_new_tokens=6, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    for row, (want, n) in enumerate(zip(hf_out, np.asarray(lengths))):
        np.testing.assert_array_equal(np.asarray(ours)[row, :n], want[:n], err_msg=f"prompt {row}")
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto(prompts[0], add_special_tokens=False)["input_ids"] == tokenizer.encode(prompts[0])
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (tokenizer.bos_id, tokenizer.eos_id,
                                                                          tokenizer.pad_id)


def test_sharded_bfloat16_export_has_an_index_and_loads(tmp_path, tokenizer):
    model = _decoder()
    files = hf_decoder.write(model, tokenizer, str(tmp_path), dtype="bfloat16", max_shard_bytes=40_000)
    assert len(files) > 1 and all(f.startswith("model-0000") for f in files)
    index = json.load(open(tmp_path / hf_decoder.INDEX))
    assert sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == sum(v.size * 2 for v in llama.to_hf_state_dict(model).values())
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path))
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    want = llama.to_hf_state_dict(model)["model.layers.1.mlp.down_proj.weight"]
    got = hf.model.layers[1].mlp.down_proj.weight.detach().float().numpy()
    np.testing.assert_allclose(got, want, rtol=2**-8, atol=0)  # bf16 rounding only


def test_bad_export_inputs_are_named(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="config.export.dtype = 'float16'"):
        hf_decoder.write(_decoder(), tokenizer, str(tmp_path), dtype="float16")
    small = tokenizer_lib.train_bpe(CORPUS, 280, str(tmp_path / "small"))
    with pytest.raises(tokenizer_lib.TokenizerError, match="280"):
        hf_decoder.write(_decoder(), small, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_official_vggt_round_trips_through_the_export_bit_for_bit(tmp_path):
    """Official tiny VGGT -> our Flax port -> OUT/vggt.safetensors: every tensor byte-identical
    to the official checkpoint's (the track head, which is not ported, aside), and the file loads
    strictly into the torch modules the exported student runs."""
    from pathlib import Path

    from safetensors.numpy import load_file

    from spatial_distill.export import stage, torch_vggt
    from spatial_distill.models import vggt

    fixture = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "vggt" / "tiny"
    official = load_file(str(fixture / "state_dict.safetensors"))
    model = vggt.load_official(str(fixture / "state_dict.safetensors"), str(fixture / "config.json"))
    path = str(tmp_path / stage.VGGT_FILE)
    stage._save_vggt(stage.vggt_tensors(model), path, "float32")
    written = load_file(path)
    want = {k for k in official if k.split(".")[0] in ("aggregator", "camera_head", "depth_head")}
    assert set(written) == want
    for k in want:
        assert written[k].dtype == official[k].dtype and written[k].shape == official[k].shape, k
        assert written[k].tobytes() == official[k].tobytes(), k
    tensors = {k: torch.from_numpy(v) for k, v in written.items()}
    for name, module in (("aggregator", torch_vggt.Aggregator(model.cfg.aggregator, model.cfg.aggregator_patch_embed_vit)),
                         ("camera_head", torch_vggt.CameraHead(model.cfg.camera_head)),
                         ("depth_head", torch_vggt.DPTHead(model.cfg.depth_head))):
        module.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")},
                               strict=True)
