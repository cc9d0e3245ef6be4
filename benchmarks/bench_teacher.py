"""LLaVA-3D teacher: dump throughput on the local device, and the 7B's prefill/decode compiled AOT
for a TPU slice.

    python -m benchmarks.bench_teacher throughput [--scenes 12] [--views 4] [--questions 17]
    python -m benchmarks.bench_teacher aot --topology v5e:2x2 [--batch 8]   (needs jax[tpu])

`throughput`: a tiny random-weight LLaVA-3D (CLIP 2 x 64 at 56 px, Llama 2 x 128, the synthetic
BPE's vocabulary) answers and scores every question of synthetic scenes exactly as the dump does
(`dump.teacher_record`: scene encoded once, questions batched, KV-cache greedy, teacher-forced
logits, top-K). The first scene (compilation) is timed apart. Prints samples/s, questions/s and
answer tokens/s.

`aot`: the 7B (reconstructed config, random weights never materialised) tensor-parallel over the
slice's chips, bfloat16: one prefill over `batch` questions of a full scene (2,560 voxel tokens +
64 text tokens) into a KV cache, and one decode step; `memory_analysis()` per device against the
chip's HBM. Needs libtpu (`pip install 'spatial_distill[tpu]'`), no TPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def throughput(args) -> None:
    import tempfile

    from flax import nnx

    from data_pipelines import synthetic
    from data_pipelines import teacher_records as tr
    from spatial_distill import tokenizer as tokenizer_lib
    from spatial_distill.models import clip, llama, llava3d
    from spatial_distill.teacher import dump
    from spatial_distill.teacher.llava3d_teacher import LLaVA3DTeacher

    scenes = [synthetic.generate_scene(i, image_size=(args.image, args.image), num_views=args.views)
              for i in range(args.scenes)]
    corpus = [t for s in scenes for qa in s.qa for t in (qa.question, qa.answer)]
    tok = tokenizer_lib.train_bpe(corpus, 384, tempfile.mkdtemp())
    cfg = llava3d.LLaVA3DConfig(
        llama=llama.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=256,
                                num_layers=2, num_heads=4, max_position_embeddings=1024),
        clip=clip.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                   image_size=56, patch_size=14))
    model = llava3d.LLaVA3D(cfg, rngs=nnx.Rngs(0))
    teacher = LLaVA3DTeacher(model, tok, teacher_id="bench", revision="0",
                             max_new_tokens=args.max_new_tokens, batch_size=args.batch)
    meta = tr.TeacherMeta(teacher_id="bench", teacher_revision="0", vocab_size=tok.vocab_size, k=32,
                          temperature=1.0, image_size=(args.image, args.image), num_views=args.views,
                          tokenizer_hash=tok.sha256, prompt_template=dump.PROMPT_TEMPLATE,
                          calibration={}, splits={})
    times, questions, tokens = [], 0, 0
    for i, s in enumerate(scenes):
        t0 = time.perf_counter()
        rec = dump.teacher_record(s, teacher, tok, meta, max_answer_len=args.max_new_tokens)
        dt = time.perf_counter() - t0
        if i == 0:
            print(f"first scene (compiles): {dt:.2f} s")
            continue
        times.append(dt)
        questions += len(rec.answers)
        tokens += sum(len(a.answer_ids) for a in rec.answers)
    wall = sum(times)
    print(f"device {jax.devices()[0].device_kind}; {len(times)} timed scenes x {args.views} views "
          f"({args.image} px), {questions} questions, batch {args.batch}, <= {args.max_new_tokens} new tokens")
    print(f"  per scene: median {statistics.median(times) * 1e3:.0f} ms")
    print(f"  samples/s {len(times) / wall:.2f}   questions/s {questions / wall:.1f}   "
          f"answer tokens/s {tokens / wall:.1f}")


def aot(args) -> None:
    from flax import nnx
    from jax.experimental import topologies

    from spatial_distill import aot, generate, sharding
    from spatial_distill.models import llava3d

    topo = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
    devices = topo.devices
    mesh = sharding.make_mesh((1, 1, -1), devices)
    cfg = llava3d.LLaVA3DConfig.seven_b()
    cfg = dataclasses.replace(cfg, llama=dataclasses.replace(cfg.llama, dtype=jnp.bfloat16,
                                                             param_dtype=jnp.bfloat16))
    model = llava3d.abstract_model(cfg)
    graphdef, state = nnx.split(model.llm)
    shard = sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES)
    abstract = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                            state.to_pure_dict(), shard.to_pure_dict())
    B, P, new = args.batch, cfg.max_voxel_tokens + 64, args.new_tokens
    D = cfg.llama.hidden_size
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def prefill(params, embeds, mask):
        llm = nnx.merge(graphdef, nnx.State(params) if not isinstance(params, nnx.State) else params)
        cache = generate.init_cache(llm.config, B, P + new)
        h, cache = llm.hidden(embeds, positions=generate.positions_from_mask(mask),
                              segment_ids=mask.astype(jnp.int32), cache=cache, cache_index=0)
        return llm.logits(h[:, -1:]), cache

    def decode_step(params, cache, token, index):
        llm = nnx.merge(graphdef, nnx.State(params) if not isinstance(params, nnx.State) else params)
        h, cache = llm.hidden(llm.embed(token), positions=cache.lengths[:, None], cache=cache,
                              cache_index=index)
        return llm.logits(h), cache

    hbm = aot.chip(devices[0]).hbm_bytes
    print(f"LLaVA-3D 7B language model, {args.topology} ({len(devices)} chips, tensor-parallel), "
          f"bf16, batch {B} questions x {P} prompt tokens (2,560 voxels + 64 text), cache {P + new} slots")
    with sharding.axis_rules(mesh):
        embeds = jax.ShapeDtypeStruct((B, P, D), jnp.bfloat16, sharding=replicated)
        mask = jax.ShapeDtypeStruct((B, P), jnp.bool_, sharding=replicated)
        pre = jax.jit(prefill).lower(abstract, embeds, mask).compile()
        _, cache = jax.eval_shape(prefill, abstract, embeds, mask)
        # The cache as the prefill leaves it (split over the kv heads), donated to the step.
        cache = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                             cache, pre.output_shardings[1])
        token = jax.ShapeDtypeStruct((B, 1), jnp.int32, sharding=replicated)
        index = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
        dec = jax.jit(decode_step, donate_argnums=(1,)).lower(abstract, cache, token, index).compile()
    for name, compiled in (("prefill", pre), ("decode step", dec)):
        mem = compiled.memory_analysis()
        per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                      - mem.alias_size_in_bytes)
        print(f"  {name:11s} per device: arguments {mem.argument_size_in_bytes / 2**30:.2f} GiB, outputs "
              f"{mem.output_size_in_bytes / 2**30:.2f} GiB, temporaries {mem.temp_size_in_bytes / 2**30:.2f}"
              f" GiB, aliased {mem.alias_size_in_bytes / 2**30:.2f} GiB -> {per_device / 2**30:.2f} GiB of "
              f"{hbm / 2**30:.0f} GiB HBM: fits={per_device <= hbm}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--scenes", type=int, default=12)
    t.add_argument("--views", type=int, default=4)
    t.add_argument("--image", type=int, default=112)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--max_new_tokens", type=int, default=8)
    a = sub.add_parser("aot")
    a.add_argument("--topology", default="v5e:2x2")
    a.add_argument("--batch", type=int, default=8)
    a.add_argument("--new_tokens", type=int, default=32)
    args = p.parse_args()
    np.set_printoptions(precision=3)
    throughput(args) if args.cmd == "throughput" else aot(args)


if __name__ == "__main__":
    main()
