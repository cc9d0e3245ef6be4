"""Student latency per sample: vision + prefill, decode tokens/s, memory, FLOPs per answer token.

  python -m benchmarks.bench_student                 # tiny, and paper widths with 2 layers
  python -m benchmarks.bench_student --presets=tiny

One sample = S views and Q questions answered together (the VGGT encoder runs once per sample;
every question shares its vision prefix). Prefill covers the vision encoder, the projector and
the decoder over [V][T][Q]; decode is the KV-cache loop. "paper-2L" keeps the paper widths (VGGT-1B
aggregator width, 2048-wide decoder, 32k vocab) with 2 aggregator / DINO / decoder layers so it
runs on a CPU; its figures scale roughly linearly in the layer counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import student as student_configs
from spatial_distill import generate as generate_lib
from spatial_distill.models import student as st
from spatial_distill.models import word_tags


def config_for(preset: str) -> tuple[st.StudentConfig, int]:
    base = "paper" if preset == "paper-2L" else preset
    c = student_configs.get_config(base)
    cfg = st.config_from(c.model, c.data.image_size, word_tags.StandInIds())
    cfg = dataclasses.replace(cfg, depth_head=None, det_head=None)  # inference answers text only
    if preset == "paper-2L":
        cfg = dataclasses.replace(
            cfg, aggregator=dataclasses.replace(cfg.aggregator, depth=2),
            patch_embed=dataclasses.replace(cfg.patch_embed, depth=2),
            decoder=dataclasses.replace(cfg.decoder, num_layers=2))
    return cfg, c.data.image_size


def decoder_flops_per_token(cfg: st.StudentConfig, context: int) -> float:
    """2 x matmul parameters (incl. LM head) + attention over `context` cached tokens."""
    d = cfg.decoder
    per_layer = (2 * d.hidden_size * d.num_heads * d.head_dim + 2 * d.hidden_size * d.num_kv_heads * d.head_dim
                 + 3 * d.hidden_size * d.intermediate_size)
    attn = 4 * d.num_heads * d.head_dim * context
    return d.num_layers * (2 * per_layer + attn) + 2 * d.hidden_size * d.vocab_size


def run(preset: str, views: int, questions: int, prompt_len: int, new_tokens: int) -> None:
    cfg, size = config_for(preset)
    model = st.create(cfg, 0)
    r = np.random.default_rng(0)
    images = jnp.asarray(r.uniform(size=(1, views, size, size, 3)).astype(np.float32))
    prompt = jnp.asarray(r.integers(4, cfg.decoder.vocab_size, size=(1, questions, prompt_len)), jnp.int32)
    mask = jnp.ones((1, questions, prompt_len), bool)

    prefix_fn = nnx.jit(lambda m, i, p, k: m.prefix(i, p, k))
    emb, pmask = prefix_fn(model, images, prompt, mask)  # compile
    total = emb.shape[1] + new_tokens
    generate_lib.prefill(model.decoder, emb, pmask, total)  # compile

    def timed(fn, n=3):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            out = jax.block_until_ready(fn())
            times.append(time.perf_counter() - t)
        return float(np.median(times)), out

    t_vision, (emb, pmask) = timed(lambda: prefix_fn(model, images, prompt, mask))
    t_prefill, (logits, cache) = timed(lambda: generate_lib.prefill(model.decoder, emb, pmask, total))
    decode = lambda: generate_lib.decode(model.decoder, logits, cache, emb.shape[1],
                                         max_new_tokens=new_tokens, eos_id=-1, pad_id=0)
    decode()
    t_decode, _ = timed(decode)
    mem = jax.jit(lambda e, m: generate_lib.prefill(model.decoder, e, m, total)).lower(emb, pmask).compile().memory_analysis()
    flops = decoder_flops_per_token(cfg, total)
    print(f"{preset:9s} views {views} x {size}px, {questions} questions x {prompt_len} tokens, "
          f"prefix {emb.shape[1]} tokens/question:")
    print(f"  vision+prefix {t_vision * 1e3:9.1f} ms | decoder prefill {t_prefill * 1e3:9.1f} ms | "
          f"decode {questions * (new_tokens - 1) / t_decode:8.1f} tok/s ({t_decode / (new_tokens - 1) * 1e3:.1f} ms/step "
          f"for {questions} rows)")
    if mem is not None:
        print(f"  prefill memory: args {mem.argument_size_in_bytes / 2**20:.1f} MiB, "
              f"temp {mem.temp_size_in_bytes / 2**20:.1f} MiB")
    print(f"  decoder FLOPs per answer token: {flops / 1e6:.2f} MFLOP "
          f"(params {sum(st.parameter_breakdown(model).values()) / 1e6:.1f}M)")


def print_sizes() -> None:
    """Parameter breakdown of the `paper` preset (abstract) next to the paper's and the teacher's."""
    c = student_configs.get_config("paper")
    counts = st.parameter_breakdown(st.create(st.config_from(c.model, c.data.image_size, word_tags.StandInIds()), abstract=True))
    total = sum(counts.values())
    for name, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {name:12s} {n:>15,d}")
    teacher = 7_080_764_416  # LLaVA-3D-7B, shared/fixtures/llava3d/llava3d_7b_manifest.json
    print(f"  {'total':12s} {total:>15,d}  (paper: 2.29B, {total / 2.29e9 - 1:+.2%}; teacher "
          f"{teacher:,d} = {teacher / total:.2f}x)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="tiny,paper-2L")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=24)
    p.add_argument("--new_tokens", type=int, default=8)
    a = p.parse_args()
    print(f"backend {jax.default_backend()}, devices {jax.devices()}")
    print("paper preset parameters:")
    print_sizes()
    for preset in a.presets.split(","):
        run(preset, a.views, a.questions, a.prompt_len, a.new_tokens)


if __name__ == "__main__":
    main()
