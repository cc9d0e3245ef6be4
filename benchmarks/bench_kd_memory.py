"""Memory of the KD loss + its gradient with and without vocabulary chunking (paper sizes).

    python -m benchmarks.bench_kd_memory                 # 1024 and 4096 answer tokens; ~1 min
    python -m benchmarks.bench_kd_memory --tokens 1024 --chunks 1024 2048 4096 --dtype bfloat16

The step compiled is `value_and_grad(kd_loss)` w.r.t. the student hidden states `[N, D]` and the
LM-head kernel `[D, V]` (what the train step differentiates), at the paper's vocabulary 32000,
D = 2048, K = 32 stored teacher ids. 1024 tokens = 8 samples × 8 questions × 16 answer tokens.
Figures are XLA's compiled `memory_analysis()` of the whole program on the local backend
(nothing runs): `temp` is the scratch the step needs beyond its inputs and outputs, set against
the analytic size of one full fp32 `[N, V]` logits tensor.

On the CPU backend `--dtype bfloat16` overstates the chunked path: XLA:CPU has no bf16 matmul or
bf16 dynamic-update-slice, so it converts the whole `[D, V]` kernel (and its gradient buffer) to
fp32 up front, adding ~D·V·4 bytes of temp that a backend with native bf16 matmuls should not
need (not measured here: no GPU/TPU backend was available).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from spatial_distill.losses.distill import kd_loss


def compiled_memory(tokens: int, d: int, vocab: int, k: int, dtype, chunked: bool,
                    chunk_size: int) -> dict:
    specs = (jax.ShapeDtypeStruct((tokens, d), dtype), jax.ShapeDtypeStruct((d, vocab), dtype),
             jax.ShapeDtypeStruct((tokens, k), jnp.int32),
             jax.ShapeDtypeStruct((tokens, k), jnp.float16),
             jax.ShapeDtypeStruct((tokens,), jnp.int32), jax.ShapeDtypeStruct((tokens,), jnp.bool_))

    def step(hidden, w, ids, logprobs, targets, mask):
        def loss(hidden, w):
            return kd_loss(hidden, w, ids, logprobs, targets, mask, alpha=0.7, temperature=3.0,
                           chunked=chunked, chunk_size=chunk_size)[0]
        return jax.value_and_grad(loss, argnums=(0, 1))(hidden, w)

    t0 = time.perf_counter()
    mem = jax.jit(step).lower(*specs).compile().memory_analysis()
    return dict(temp=mem.temp_size_in_bytes, args=mem.argument_size_in_bytes,
                out=mem.output_size_in_bytes, compile_s=time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="answer tokens N")
    p.add_argument("--hidden", type=int, default=2048, help="decoder width D")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary V")
    p.add_argument("--k", type=int, default=32, help="teacher top-K")
    p.add_argument("--chunks", type=int, nargs="+", default=[2048], help="chunk sizes to try")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the hidden states and the LM-head kernel")
    a = p.parse_args()
    dtype = jnp.dtype(a.dtype)
    mib = 2**20
    print(f"backend {jax.default_backend()}, D={a.hidden}, V={a.vocab}, K={a.k}, {a.dtype}")
    print(f"{'N':>6} {'path':>14} {'temp MiB':>10} {'args MiB':>10} {'out MiB':>9} "
          f"{'N·V·4 MiB':>10} {'temp/N·V·4':>11} {'compile s':>10}")
    for n in a.tokens:
        logits_bytes = n * a.vocab * 4
        runs = [("full logits", False, a.chunks[0])] + [(f"chunk {c}", True, c) for c in a.chunks]
        for name, chunked, c in runs:
            r = compiled_memory(n, a.hidden, a.vocab, a.k, dtype, chunked, c)
            print(f"{n:>6} {name:>14} {r['temp'] / mib:>10.1f} {r['args'] / mib:>10.1f} "
                  f"{r['out'] / mib:>9.1f} {logits_bytes / mib:>10.1f} "
                  f"{r['temp'] / logits_bytes:>11.2f} {r['compile_s']:>10.1f}")


if __name__ == "__main__":
    main()
