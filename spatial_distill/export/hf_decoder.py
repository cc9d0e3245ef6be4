"""The student's decoder as a Hugging Face Llama directory that stock transformers loads.

    write(llama, tokenizer, out_dir, dtype="float32", max_shard_bytes=5 * 2**30)

`out_dir` gets `config.json` and `generation_config.json` (transformers' own `LlamaConfig` and
`GenerationConfig` write them), the weights as `model.safetensors`, or as
`model-0000k-of-0000n.safetensors` shards with `model.safetensors.index.json` above
`max_shard_bytes` (huggingface_hub's splitter), and the tokenizer: the built-in BPE through
`PreTrainedTokenizerFast`, a SentencePiece teacher tokenizer by copying its files. Then

    LlamaForCausalLM.from_pretrained(out_dir); AutoTokenizer.from_pretrained(out_dir)

work without custom code. Weight names and layouts are `llama.to_hf_state_dict`'s (the inverse
of the loader the decoder is tested with against transformers).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from spatial_distill import tokenizer as tokenizer_lib
from spatial_distill.models import llama as llama_lib

DTYPES = ("float32", "bfloat16")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD_PATTERN = "model{suffix}.safetensors"
SENTENCEPIECE_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                       "tokenizer.json", "added_tokens.json")


def hf_config(cfg: llama_lib.LlamaConfig, tokenizer: tokenizer_lib.Tokenizer, dtype: str):
    """transformers.LlamaConfig of a decoder config (the fields `LlamaConfig.from_hf` reads)."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings, hidden_act="silu", attention_bias=False,
        mlp_bias=False, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id, dtype=dtype, architectures=["LlamaForCausalLM"])


def _torch_tensors(state: dict[str, np.ndarray], dtype: str) -> dict:
    import torch

    target = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    # Contiguous copies: safetensors writes a transposed numpy view's memory, not its values.
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C", copy=True)).to(target)
            for k, v in state.items()}


def save_weights(state: dict[str, np.ndarray], out_dir: str, dtype: str, max_shard_bytes: int) -> list[str]:
    """HF-named arrays -> safetensors file(s) in `out_dir` (+ index when sharded); returns names."""
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.torch import save_file

    tensors = _torch_tensors(state, dtype)
    split = split_state_dict_into_shards_factory(
        tensors, get_storage_size=lambda t: t.numel() * t.element_size(),
        filename_pattern=SHARD_PATTERN, max_shard_size=int(max_shard_bytes))
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, os.path.join(out_dir, filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        with open(os.path.join(out_dir, INDEX), "w") as f:
            json.dump(index, f, indent=1)
    return sorted(split.filename_to_tensors)


def save_tokenizer(tokenizer: tokenizer_lib.Tokenizer, out_dir: str) -> None:
    """The decoder's tokenizer in a form `AutoTokenizer.from_pretrained(out_dir)` reads."""
    # `Tokenizer.path` is the tokenizer's file or its directory.
    source = os.path.dirname(tokenizer.path) if os.path.isfile(tokenizer.path) else tokenizer.path
    if tokenizer.backend == "hf_tokenizers":
        from tokenizers import Tokenizer as BackendTokenizer
        from transformers import PreTrainedTokenizerFast

        special = {name: tokenizer.id_to_token(i) for name, i in
                   (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id),
                    ("pad_token", tokenizer.pad_id))}
        backend = BackendTokenizer.from_file(tokenizer.path if os.path.isfile(tokenizer.path)
                                             else os.path.join(source, tokenizer_lib.BPE_FILE))
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=tokenizer.id_to_token(0), **special)
        fast.save_pretrained(out_dir)
        return
    present = [n for n in SENTENCEPIECE_FILES if os.path.exists(os.path.join(source, n))]
    if "tokenizer.model" not in present:
        raise tokenizer_lib.TokenizerError(
            f"{source}: no tokenizer.model to export with the decoder; point "
            "config.tokenizer.path at the teacher's tokenizer directory")
    for name in present:
        shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
    if "tokenizer_config.json" not in present:
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                       "unk_token": "<unk>", "add_bos_token": True}, f, indent=1)


def write(llama: llama_lib.Llama, tokenizer: tokenizer_lib.Tokenizer, out_dir: str, *,
          dtype: str = "float32", max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes the HF directory (module doc) into `out_dir` (created); returns the weight files."""
    if dtype not in DTYPES:
        raise ValueError(f"config.export.dtype = {dtype!r}: choose one of {DTYPES}")
    from transformers import GenerationConfig

    tokenizer_lib.check_vocab(tokenizer, llama.config.vocab_size, what="the decoder")
    os.makedirs(out_dir, exist_ok=True)
    config = hf_config(llama.config, tokenizer, dtype)
    config.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                     pad_token_id=tokenizer.pad_id, do_sample=False).save_pretrained(out_dir)
    files = save_weights(llama_lib.to_hf_state_dict(llama), out_dir, dtype, max_shard_bytes)
    save_tokenizer(tokenizer, out_dir)
    return files
