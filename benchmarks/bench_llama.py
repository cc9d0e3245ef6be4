"""Llama decoder KV-cache generation on the local device: prefill ms, decode tokens/s, memory, FLOPs.

    python -m benchmarks.bench_llama [--configs tiny,paper2] [--repeats 5]   (from the repository root)

Batch 1, a 64-token prompt, 32 new tokens (greedy, EOS never hit, so all 32 are produced).
Configs: `tiny` (vocab 128, hidden 64, 3 layers) and `paper2`, the paper's decoder width with
2 layers (hidden 2048, 16 heads, MLP 8192, vocab 32000), float32, each run with scanned
(stacked, the training layout) and looped (one array per layer) parameters: on CPU a scan step
slices its layer's weights out of the stack as a copy, so it reads the weights twice.

Figures printed per config:
* prefill ms: one compiled call over the prompt, filling a fresh cache (median of --repeats);
* decode tok/s: the compiled `lax.while_loop` producing tokens 2..32 (the first comes from the
  prefill logits), i.e. 31 forward steps, divided into its median wall time;
* peak MiB: `compiled.memory_analysis()` of each program, arguments + outputs + temporaries
  - aliased bytes (parameters included);
* FLOPs/token: analytic `2 * matmul params + 4 * layers * heads * head_dim * slots`, where slots
  is the cache length the step attends over (the decode step reads every slot, masked), next to
  XLA's `cost_analysis()` of one compiled decode step (hidden on one token + logits).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_distill import generate as gen
from spatial_distill.models import llama

BATCH, PROMPT, NEW = 1, 64, 32
CONFIGS = {
    "tiny": llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3,
                              num_heads=4, num_kv_heads=2, max_position_embeddings=128),
    "paper2": llama.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                                num_layers=2, num_heads=16, max_position_embeddings=4096),
}


def random_model(config: llama.LlamaConfig, seed: int = 0) -> llama.Llama:
    """Weights drawn in numpy into an abstract model (a jax.random init compiles per shape)."""
    model = nnx.eval_shape(lambda: llama.Llama(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            value = rng.standard_normal(var.get_value().shape, dtype=np.float32) * 0.02
            is_norm = var.get_metadata()["out_sharding"][-1] == "norm"
            var.set_value(jnp.asarray(1 + value if is_norm else value))
    return model


def peak_mib(compiled) -> float:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return total / 2**20


def xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def analytic_flops_per_token(c: llama.LlamaConfig, slots: int) -> tuple[float, int]:
    per_layer = (c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
                 + 3 * c.hidden_size * c.intermediate_size)
    matmul_params = c.num_layers * per_layer + c.hidden_size * c.vocab_size  # + LM head
    attention = 4 * c.num_layers * c.num_heads * c.head_dim * slots  # q.k and p.v per slot
    return 2 * matmul_params + attention, matmul_params


def timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # first call after compile: warm caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, config: llama.LlamaConfig, repeats: int) -> dict:
    name = f"{name}, {'scanned' if config.scan_layers else 'looped'} layers"
    model = random_model(config)
    graphdef, state = nnx.split(model)
    max_len = PROMPT + NEW
    ids = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (BATCH, PROMPT)))
    embeds = model.embed(ids)
    mask = jnp.ones((BATCH, PROMPT), bool)

    prefill = jax.jit(lambda s, e, m: gen.prefill(nnx.merge(graphdef, s), e, m, max_len))
    t0 = time.perf_counter()
    prefill_c = prefill.lower(state, embeds, mask).compile()
    compile_prefill = time.perf_counter() - t0
    logits, cache = prefill_c(state, embeds, mask)

    decode = jax.jit(lambda s, lg, ca: gen.decode(nnx.merge(graphdef, s), lg, ca, PROMPT,
                                                  max_new_tokens=NEW, eos_id=-1, pad_id=0))
    t0 = time.perf_counter()
    decode_c = decode.lower(state, logits, cache).compile()
    compile_decode = time.perf_counter() - t0

    def step(graphdef, s, token, ca, index):
        m = nnx.merge(graphdef, s)
        h, ca = m.hidden(m.embed(token), positions=ca.lengths[:, None], cache=ca,
                         cache_index=index)
        return m.logits(h), ca

    token, index = jnp.zeros((BATCH, 1), jnp.int32), jnp.int32(PROMPT)
    step_c = jax.jit(step, static_argnums=0).lower(graphdef, state, token, cache, index).compile()
    # XLA's cost analysis counts a while-loop body once, so FLOPs are read from the same
    # programs with the layers unrolled (lowered abstractly: no weights needed).
    flat = nnx.eval_shape(lambda: llama.Llama(dataclasses.replace(config, scan_layers=False),
                                              rngs=nnx.Rngs(0)))
    flat_def, flat_state = nnx.split(flat)
    flat_cache = jax.eval_shape(lambda: gen.init_cache(flat.config, BATCH, max_len))
    step_flops = xla_flops(jax.jit(step, static_argnums=0).lower(
        flat_def, flat_state, token, flat_cache, index).compile())
    prefill_flops = xla_flops(jax.jit(lambda s, e, m: gen.prefill(
        nnx.merge(flat_def, s), e, m, max_len)).lower(flat_state, embeds, mask).compile())

    prefill_s = timed(lambda: prefill_c(state, embeds, mask), repeats)
    decode_s = timed(lambda: decode_c(state, logits, cache), repeats)
    tokens, lengths = decode_c(state, logits, cache)
    assert int(lengths[0]) == NEW, lengths
    analytic, matmul_params = analytic_flops_per_token(config, max_len)
    # Prefill: every prompt token through the layers (each query against all max_len slots),
    # the LM head only for the last position.
    head = 2 * config.hidden_size * config.vocab_size
    prefill_analytic = PROMPT * (analytic - head) + head
    n_params = sum(x.size for x in jax.tree.leaves(state))
    return dict(
        name=name, params=n_params, matmul_params=matmul_params,
        prefill_ms=1e3 * prefill_s, decode_tok_s=(NEW - 1) / decode_s,
        decode_ms_per_tok=1e3 * decode_s / (NEW - 1),
        prefill_peak=peak_mib(prefill_c), decode_peak=peak_mib(decode_c),
        step_peak=peak_mib(step_c), flops_analytic=analytic, flops_xla=step_flops,
        prefill_flops_xla=prefill_flops, prefill_flops_analytic=prefill_analytic, compile_s=compile_prefill + compile_decode)


def report(r: dict) -> None:
    print(f"\n[{r['name']}] {r['params'] / 1e6:.2f}M params ({r['matmul_params'] / 1e6:.2f}M "
          f"in matmuls), compile {r['compile_s']:.1f} s")
    print(f"  prefill        {r['prefill_ms']:9.2f} ms    (analytic "
          f"{r['prefill_flops_analytic'] / 1e9:.3f} GFLOP, XLA {r['prefill_flops_xla'] / 1e9:.3f})")
    print(f"  decode         {r['decode_tok_s']:9.1f} tok/s ({r['decode_ms_per_tok']:.2f} ms/token)")
    print(f"  peak memory    prefill {r['prefill_peak']:.1f} MiB, decode loop "
          f"{r['decode_peak']:.1f} MiB, one step {r['step_peak']:.1f} MiB")
    print(f"  FLOPs/token    analytic {r['flops_analytic'] / 1e6:.2f} M, "
          f"XLA decode step {r['flops_xla'] / 1e6:.2f} M")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="tiny,paper2")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"device {jax.devices()[0].device_kind} ({jax.default_backend()}), float32, batch "
          f"{BATCH}, prompt {PROMPT}, {NEW} new tokens, median of {args.repeats}")
    for name in args.configs.split(","):
        for scan in (True, False):
            report(bench(name, dataclasses.replace(CONFIGS[name], scan_layers=scan),
                         args.repeats))


if __name__ == "__main__":
    main()
