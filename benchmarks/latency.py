"""Teacher (LLaVA-3D, our Flax port) against student on the same device and dtype: vision,
prefill and decode latency, tokens/s, memory, and the teacher/student ratios beside their
physical bounds.

    python -m benchmarks.latency [--teacher 7b-2L] [--student paper-2L] [--views 1] [--runs 20]
                                 [--new_tokens 16] [--dtype float32]

Both models have random weights (latency does not depend on them; EOS is never emitted, so every
decode produces exactly `--new_tokens`). Batch 1, one question. Per model and phase: a warm-up
call (compiles), then `--runs` timed calls; p50 / p90 in ms.

    vision   teacher: CLIP over the views + back-projection + voxel means + projector
             student: the VGGT aggregator + pooling + projector
    prefill  the language model over the prompt (teacher: llava_v1 template with the voxel
             tokens spliced in; student: [vision][latents][question]) into a fresh KV cache
    decode   the KV-cache loop, per new token

Bounds: decode is memory-bound, so its teacher/student ratio cannot exceed the ratio of the two
language models' weight bytes read per token (all but the input embedding table); prefill is
compute-bound, so its ratio is bounded by the analytic FLOPs of the two prompts (matmuls +
causal attention). End to end = vision + prefill + n x decode, reported at `--new_tokens` and at
each model's natural answer length (the paper: the teacher answers in 63.5 words, the student in
8.2; x1.33 tokens per word), against the paper's 8.7x (measured teacher on CPU vs student on GPU).

Presets: teacher `7b` (the reconstructed LLaVA-3D-7B), `7b-2L` (its widths with 2 CLIP and 2
Llama layers, for CPUs); student `paper` (2.29B), `paper-2L` (its widths, 2 VGGT / DINO / decoder
layers), `tiny`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.bench_student import config_for
from spatial_distill import generate as gen
from spatial_distill.models import llava3d
from spatial_distill.models import student as st

TOKENS_PER_WORD = 1.33
NATURAL_WORDS = {"teacher": 63.5, "student": 8.2}  # the paper's answer lengths (reference/paper.md)
TEXT_TOKENS = 60  # llava_v1 system prompt + a question, in Llama tokens
QUESTION_TOKENS = 16


def teacher_config(preset: str, dtype, scan_layers: bool) -> llava3d.LLaVA3DConfig:
    cfg = llava3d.LLaVA3DConfig.seven_b()
    llama, clip = cfg.llama, cfg.clip
    if preset == "7b-2L":
        llama = dataclasses.replace(llama, num_layers=2)
        clip = dataclasses.replace(clip, num_layers=3)  # layer -2 of 3: two layers run
    elif preset != "7b":
        raise ValueError(f"--teacher {preset!r}: choose 7b or 7b-2L")
    llama = dataclasses.replace(llama, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
    return dataclasses.replace(cfg, llama=llama,
                               clip=dataclasses.replace(clip, dtype=dtype, param_dtype=dtype))


_START = time.perf_counter()


def stage(what: str) -> None:
    """A progress line with the seconds since start (compiles of the full-size models take minutes)."""
    print(f"[{time.perf_counter() - _START:7.1f} s] {what}", flush=True)


def summary(m: dict) -> str:
    """One model's p50s, printed as soon as it is timed (a run cut short still reports them)."""
    return (f"vision {m['vision_p50']:.1f} ms, prefill {m['prefill_p50']:.1f} ms over {m['prompt']} tokens, "
            f"decode {m['decode_p50']:.2f} ms/token")


def timed(fn, runs: int) -> list[float]:
    jax.block_until_ready(fn())  # warm-up (compiles)
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t)
    return out


def memory_gib(compiled) -> float:
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes) / 2**30


def lm_stats(llm, prompt_len: int) -> dict:
    """Weight bytes read per decoded token and analytic prefill FLOPs of a Llama."""
    c = llm.config
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(llm, nnx.Param)))
    embed = c.vocab_size * c.hidden_size
    per_layer = (2 * c.hidden_size * c.num_heads * c.head_dim + 2 * c.hidden_size * c.num_kv_heads * c.head_dim
                 + 3 * c.hidden_size * c.intermediate_size)
    attn = 2 * c.num_heads * c.head_dim * prompt_len * (prompt_len + 1)  # QK^T and PV, causal half
    flops = c.num_layers * (2 * per_layer * prompt_len + attn) + 2 * c.hidden_size * c.vocab_size
    return {"decode_bytes": (params - embed) * jnp.dtype(c.dtype).itemsize, "prefill_flops": flops,
            "params": params}


def device_peaks(dtype) -> tuple[float, float]:
    """Measured matmul FLOP/s and memory bandwidth (bytes/s) of the local device: the roofline
    the two models' times are bounded by."""
    n = 2048
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda x: x @ x)
    flops = 2 * n**3 / min(timed(lambda: mm(a), 5))
    big = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MiB, read once per call
    total = jax.jit(jnp.sum)
    bandwidth = big.nbytes / min(timed(lambda: total(big), 5))
    return flops, bandwidth


def gemm_rate(rows: int, llm, dtype) -> float:
    """FLOP/s of one of the model's MLP matmuls `[rows, hidden] x [hidden, intermediate]`: what
    its prefill can reach at that prompt length on this device (small row counts leave the
    matmul units idle long before the roofline says so)."""
    c = llm.config
    x, w = jnp.ones((rows, c.hidden_size), dtype), jnp.ones((c.hidden_size, c.intermediate_size), dtype)
    mm = jax.jit(lambda a, b: a @ b)
    return 2 * rows * c.hidden_size * c.intermediate_size / float(np.median(timed(lambda: mm(x, w), 10)))


def measure(llm, vision_fn, embeds, runs: int, new_tokens: int) -> dict:
    """Times vision, prefill and decode of one model; `embeds` `[1, P, D]` is its prompt."""
    P = embeds.shape[1]
    mask = jnp.ones((1, P), bool)
    total = P + new_tokens
    graphdef, state = nnx.split(llm)
    # Compiled once, ahead of time, for its memory figure; timed as that same executable (a
    # second compile of a full-size model through the jit cache costs minutes on a GPU).
    prefill = gen._prefill.lower(graphdef, state, embeds, mask, total).compile()
    logits, cache = prefill(state, embeds, mask)
    stage("  prefill compiled")
    t_vision = timed(vision_fn, runs)
    t_prefill = timed(lambda: prefill(state, embeds, mask), runs)
    stage("  vision and prefill timed; decode next")
    t_decode = timed(lambda: gen.decode(llm, logits, cache, P, max_new_tokens=new_tokens, eos_id=-1,
                                        pad_id=0), runs)
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3  # noqa: E731
    per_token = [t / new_tokens for t in t_decode]
    return {"prompt": P, "vision_p50": pct(t_vision, 50), "vision_p90": pct(t_vision, 90),
            "prefill_p50": pct(t_prefill, 50), "prefill_p90": pct(t_prefill, 90),
            "decode_p50": pct(per_token, 50), "decode_p90": pct(per_token, 90),
            "tokens_per_s": 1e3 / pct(per_token, 50), "prefill_gib": memory_gib(prefill),
            "gemm_gflops": gemm_rate(P, llm, embeds.dtype) / 1e9, **lm_stats(llm, P)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="7b-2L")
    p.add_argument("--student", default="paper-2L")
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16" if jax.default_backend() != "cpu" else "float32")
    # Inference layout of both language models. Scanned (stacked) layers make XLA slice every
    # layer's weights out of the stack inside the loop, a copy of the whole model per call: on
    # the 2-core CPU the student's 28-token prefill ran 2.3x slower that way (docs/benchmarks.md).
    p.add_argument("--layers", choices=("per_layer", "scanned"), default="per_layer")
    args = p.parse_args()
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype {dtype.name}, "
          f"batch 1, {args.views} view(s), {args.new_tokens} new tokens, {args.runs} timed runs, "
          f"{args.layers.replace('_', '-')} decoder layers")

    # Teacher: a scene of V views whose patches all fall in distinct voxels (the most tokens).
    scan = args.layers == "scanned"
    tcfg = teacher_config(args.teacher, dtype, scan)
    teacher = llava3d.LLaVA3D(tcfg, rngs=nnx.Rngs(0))
    S = tcfg.clip.image_size
    images = jnp.asarray(rng.normal(size=(1, args.views, 3, S, S)).astype(np.float32))
    depths = jnp.asarray(rng.uniform(0.5, 5.0, size=(1, args.views, S, S)).astype(np.float32))
    poses = jnp.broadcast_to(jnp.eye(4), (1, args.views, 4, 4)).astype(jnp.float32)
    K = jnp.asarray(np.diag([400.0, 400.0, 1.0, 1.0]) + np.pad([[0, 0, S / 2], [0, 0, S / 2]], ((0, 2), (0, 1))),
                    jnp.float32)
    intr = jnp.broadcast_to(K, (1, args.views, 4, 4))
    encode = nnx.jit(lambda m, *x: m.encode_scene(*x))
    stage(f"teacher {args.teacher} built; compiling its vision")
    tokens = encode(teacher, images, depths, poses, intr)
    ids = np.full((1, TEXT_TOKENS + 1), 5, np.int64)
    ids[0, 0], ids[0, 40] = 1, llava3d.IMAGE_TOKEN_INDEX
    spliced = teacher.splice(ids, tokens)
    n = int(spliced.lengths[0])
    t_embeds = spliced.embeds[:, :n]
    stage(f"teacher vision compiled ({n} prompt tokens); timing")
    teacher_m = measure(teacher.llm, lambda: encode(teacher, images, depths, poses, intr), t_embeds,
                        args.runs, args.new_tokens)
    stage(f"teacher timed: {summary(teacher_m)}")

    # Student: the same number of views at its own resolution, one question.
    scfg, size = config_for(args.student)
    scfg = dataclasses.replace(scfg, decoder=dataclasses.replace(scfg.decoder, dtype=dtype, param_dtype=dtype,
                                                                 scan_layers=scan))
    student = st.create(scfg, 0)
    simages = jnp.asarray(rng.uniform(size=(1, args.views, size, size, 3)).astype(np.float32))
    prompt = jnp.asarray(rng.integers(4, scfg.decoder.vocab_size, size=(1, 1, QUESTION_TOKENS)), jnp.int32)
    pmask = jnp.ones((1, 1, QUESTION_TOKENS), bool)
    stage(f"student {args.student} built; compiling its vision")
    see = nnx.jit(lambda m, x: m.see(x)["vision"])
    s_embeds, _ = nnx.jit(lambda m, *x: m.prefix(*x))(student, simages, prompt, pmask)
    student_m = measure(student.decoder, lambda: see(student, simages), s_embeds.astype(dtype),
                        args.runs, args.new_tokens)
    stage(f"student timed: {summary(student_m)}")

    rows = [("prompt tokens", "prompt", "{:.0f}"), ("LM parameters", "params", "{:,.0f}"),
            ("vision p50 / p90 ms", ("vision_p50", "vision_p90"), "{:.1f} / {:.1f}"),
            ("prefill p50 / p90 ms", ("prefill_p50", "prefill_p90"), "{:.1f} / {:.1f}"),
            ("decode p50 / p90 ms/token", ("decode_p50", "decode_p90"), "{:.2f} / {:.2f}"),
            ("decode tokens/s", "tokens_per_s", "{:.1f}"), ("prefill program GiB", "prefill_gib", "{:.2f}"),
            ("MLP matmul at prompt rows", "gemm_gflops", "{:.0f} GFLOP/s")]
    print(f"\n{'':28s} {'teacher ' + args.teacher:>24s} {'student ' + args.student:>24s}")
    for name, key, fmt in rows:
        cell = lambda m: fmt.format(*(m[k] for k in key)) if isinstance(key, tuple) else fmt.format(m[key])  # noqa: E731
        print(f"{name:28s} {cell(teacher_m):>24s} {cell(student_m):>24s}")
    peak, bandwidth = device_peaks(dtype)
    # Roofline time per phase (ms): compute- or memory-bound, whichever is slower. A prefill also
    # reads every weight once; a short prompt (the student's) is memory-bound, not compute-bound.
    roof = {name: {"prefill": 1e3 * max(m["prefill_flops"] / peak, m["decode_bytes"] / bandwidth),
                   "decode": 1e3 * m["decode_bytes"] / bandwidth}
            for name, m in (("teacher", teacher_m), ("student", student_m))}
    print(f"\ndevice roofline (measured): matmul {peak / 1e9:.0f} GFLOP/s, memory {bandwidth / 1e9:.1f} GB/s")
    for phase in ("prefill", "decode"):
        t, s_ = roof["teacher"][phase], roof["student"][phase]
        print(f"  {phase}: roofline teacher {t:.1f} ms, student {s_:.1f} ms -> bound {t / s_:.2f}x; "
              f"measured at {t / teacher_m[f'{phase}_p50']:.0%} (teacher) and "
              f"{s_ / student_m[f'{phase}_p50']:.0%} (student) of their rooflines")
    decode_ratio = teacher_m["decode_p50"] / student_m["decode_p50"]
    decode_bound = teacher_m["decode_bytes"] / student_m["decode_bytes"]
    prefill_ratio = teacher_m["prefill_p50"] / student_m["prefill_p50"]
    prefill_bound = teacher_m["prefill_flops"] / student_m["prefill_flops"]
    print(f"\nteacher / student   decode {decode_ratio:.2f}x (bound: weight bytes {decode_bound:.2f}x, "
          f"{decode_ratio / decode_bound:.0%} of it)   prefill {prefill_ratio:.2f}x (bound: FLOPs "
          f"{prefill_bound:.2f}x, {prefill_ratio / prefill_bound:.0%} of it)")
    # Even a prefill that were nothing but matmuls at this device's own rate for its row count
    # reaches only this ratio: the FLOPs bound scaled by the two prompts' matmul rates.
    ceiling = prefill_bound * student_m["gemm_gflops"] / teacher_m["gemm_gflops"]
    print(f"prefill ceiling of this device's matmuls ({student_m['prompt']} vs {teacher_m['prompt']} "
          f"rows): {ceiling:.2f}x = {ceiling / prefill_bound:.0%} of the FLOPs bound")
    for label, nt, ns in (("fixed", args.new_tokens, args.new_tokens),
                          ("natural", round(NATURAL_WORDS["teacher"] * TOKENS_PER_WORD),
                           round(NATURAL_WORDS["student"] * TOKENS_PER_WORD))):
        e2e = {who: m["vision_p50"] + m["prefill_p50"] + n * m["decode_p50"]
               for who, m, n in (("t", teacher_m, nt), ("s", student_m, ns))}
        print(f"end to end ({label} lengths: teacher {nt}, student {ns} tokens): teacher {e2e['t']:.0f} ms, "
              f"student {e2e['s']:.0f} ms -> {e2e['t'] / e2e['s']:.2f}x (paper: 8.7x, across devices)")


if __name__ == "__main__":
    main()
