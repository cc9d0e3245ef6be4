"""Train-step throughput: step time, decoder tokens/s and MFU of one jitted update.

  python -m benchmarks.bench_train                          # the tiny preset as configured
  python -m benchmarks.bench_train --depth_head --steps=10  # with the DPT depth head on
  python -m benchmarks.bench_train --no_cache --scan_layers=true --prompt_len=16 --answer_len=8
                                                            # the tiny step before 2026-12-05
  python -m benchmarks.bench_train --prompt_len=14 --answer_len=8  # before 2026-12-06's padding

The step is the trainer's (`spatial_distill.train.step.train_step`, sharded over
`config.mesh.shape`, state donated), on a synthetic batch with the input pipeline's shapes:
`batch_size` samples, every question slot real (prompts and answers at their length limits), so
the decoder's padded work equals the real work. With a frozen vision side the step reads what
`step.frozen_outputs` computed once, outside it, as the trainer's vision cache hands it. MFU uses the trainer's analytic FLOPs (6·N·tokens
for the decoder, the LM head on answer slots, 6·N·tokens for the VGGT aggregator; heads and
attention scores not counted) and, as a cross-check, XLA's own FLOP count of the compiled step.
Peak FLOP/s: the datasheet table in `spatial_distill.train.metrics`, or on CPU the measured
best float32 1024x1024 matmul throughput of this host (printed).
"""

from __future__ import annotations

import argparse
import functools
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from configs import student as student_configs
from data_pipelines.synthetic import look_at
from spatial_distill import sharding
from spatial_distill.models import student as student_lib
from spatial_distill.models import word_tags
from spatial_distill.train import metrics as metrics_lib
from spatial_distill.train import step as step_lib
from spatial_distill.train import vision_cache

# The tiny preset pads prompts and answers to the records' longest (`config.input` unset); with no
# records here, the main job's on seed 0 (BOS and EOS included).
BUILT_IN_LENGTHS = {"max_prompt_len": 13, "max_answer_len": 5}
# Object ids each question refers to (subject, reference): input_pipeline.MAX_REFERRED, which
# is not imported because that module pulls in TensorFlow, which this benchmark does not need.
MAX_REFERRED = 2


def synthetic_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    """A full batch with the input pipeline's keys, shapes and dtypes (all questions real)."""
    r = np.random.default_rng(seed)
    b, s, hw = config.train.batch_size, config.data.num_views, config.data.image_size
    i, k, v = config.input, config.teacher.k, config.model.decoder.vocab_size
    q, lp, la, n = i.max_questions, i.max_prompt_len, i.max_answer_len, i.max_boxes
    logits = r.normal(0, 2, (b, q, la, v)).astype(np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.argsort(-logp, -1)[..., :k]
    cams = [[look_at(r.uniform(-4, 4, 3) + [0, 0, 2], r.uniform(-1, 1, 3)) for _ in range(s)]
            for _ in range(b)]
    return {
        "rgb": r.integers(0, 256, (b, s, hw, hw, 3), dtype=np.uint8),
        "depth": r.uniform(0.5, 6, (b, s, hw, hw)).astype(np.float32),
        "intrinsics": np.tile(np.array([[hw, 0, hw / 2], [0, hw, hw / 2], [0, 0, 1]], np.float32), (b, s, 1, 1)),
        "cam_to_world": np.asarray(cams, np.float32),
        "boxes": np.concatenate([r.uniform(-2, 2, (b, n, 3)), r.uniform(0.2, 1, (b, n, 3)),
                                 r.uniform(-np.pi, np.pi, (b, n, 1))], -1).astype(np.float32),
        "box_mask": np.ones((b, n), bool),
        "labels": r.integers(0, config.model.det_head.num_classes, (b, n)).astype(np.int32),
        "question_mask": np.ones((b, q), bool), "qa_kind": np.zeros((b, q), np.int32),
        "prompt_ids": r.integers(4, v, (b, q, lp)).astype(np.int32),
        "prompt_mask": np.ones((b, q, lp), bool),
        "answer_ids": top[..., 0].astype(np.int32), "answer_mask": np.ones((b, q, la), bool),
        "topk_ids": top.astype(np.int32),
        "topk_logprobs": np.take_along_axis(logp, top, -1).astype(np.float32),
        "logsumexp": np.zeros((b, q, la), np.float32),
        # Every question refers to a subject and a reference object (the grounding loss's targets).
        "referred": np.stack([r.permutation(n)[:MAX_REFERRED] for _ in range(b * q)]).reshape(
            b, q, MAX_REFERRED).astype(np.int32),
    }


def run(config, steps: int) -> dict:
    mesh = sharding.make_mesh(config.mesh.shape)
    rules = sharding.DEFAULT_RULES
    cfg = student_lib.config_from(config.model, config.data.image_size, word_tags.StandInIds())
    build = lambda key: student_lib.Student(cfg, rngs=nnx.Rngs(params=key))  # noqa: E731
    abstract_model = nnx.eval_shape(lambda: build(jax.random.PRNGKey(0)))
    graphdef, abstract_state = nnx.split(abstract_model)
    spec = step_lib.loss_spec(config)
    params = {"student": abstract_state.to_pure_dict()}
    if spec.weighting == "kendall":
        params["kendall"] = {"log_vars": jax.ShapeDtypeStruct((len(spec.tasks),), jnp.float32)}
    tx, schedule = step_lib.make_optimizer(config, params)
    key = jax.random.PRNGKey(0)
    init = functools.partial(step_lib.init_state, key, tx, spec, build)
    state_sh = step_lib.state_shardings(jax.eval_shape(init), abstract_state, mesh, rules)
    state = student_lib.init_program(init, out_shardings=state_sh)()
    batch_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    batch = jax.device_put(synthetic_batch(config), batch_sh)
    cached = vision_cache.caches_vision(config)
    if cached:  # as the trainer runs it: the frozen part once per sample, outside the step
        frozen = jax.jit(lambda p, b: step_lib.frozen_outputs(
            step_lib.student_from(graphdef, abstract_state, p), b, spec))
        batch = {**batch, **frozen(state.params["student"], {k: batch[k] for k in step_lib.FROZEN_INPUTS})}

    fn = jax.jit(functools.partial(step_lib.train_step, graphdef=graphdef, abstract_state=abstract_state,
                                   tx=tx, schedule=schedule, spec=spec,
                                   accum_steps=config.train.accum_steps),
                 in_shardings=(state_sh, batch_sh), donate_argnums=(0,))
    t = time.perf_counter()
    with sharding.axis_rules(mesh, rules):
        compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    xla_flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", float("nan")))

    for _ in range(2):  # warm-up
        state, m = compiled(state, batch)
    jax.block_until_ready(m)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    step_s = (time.perf_counter() - t) / steps
    # The kernel's share: XLA:CPU's temporary buffers are mapped afresh every step, and each page
    # faults in zeroed (docs/benchmarks.md: GLIBC_TUNABLES=glibc.malloc.hugetlb=1).
    after = resource.getrusage(resource.RUSAGE_SELF)
    per_step = {"minor_faults": (after.ru_minflt - usage.ru_minflt) / steps,
                "user_s": (after.ru_utime - usage.ru_utime) / steps,
                "sys_s": (after.ru_stime - usage.ru_stime) / steps}

    breakdown = student_lib.parameter_breakdown(abstract_model)
    flops = metrics_lib.config_train_flops(config, cfg, breakdown, config.data.num_views)
    if cached:  # the step does not run the vision side (trainer.step_flops)
        flops = {**flops, "vision": 0.0, "total": flops["decoder"]}
    peak, how = metrics_lib.peak_flops(list(mesh.devices.flat))
    return {"tasks": spec.tasks, "params_m": sum(breakdown.values()) / 1e6, "compile_s": compile_s,
            "step_s": step_s, "tokens_per_s": flops["decoder_tokens"] / step_s,
            "model_flops": flops["total"], "xla_flops": xla_flops, "mfu": flops["total"] / step_s / peak,
            "mfu_xla": xla_flops / step_s / peak, "peak": peak, "peak_how": how,
            "loss": float(m["learning/loss"]), "cached": cached, **per_step}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch_size", type=int, default=None)
    ap.add_argument("--depth_head", action="store_true", help="enable the DPT depth head")
    ap.add_argument("--no_cache", action="store_true",
                    help="run the frozen vision side in every step (train.cache_vision = False)")
    ap.add_argument("--scan_layers", choices=("true", "false"), default=None,
                    help="override model.decoder.scan_layers")
    ap.add_argument("--prompt_len", type=int, default=None, help="override input.max_prompt_len")
    ap.add_argument("--answer_len", type=int, default=None, help="override input.max_answer_len")
    args = ap.parse_args(argv)
    config = student_configs.get_config(args.preset)
    if args.batch_size:
        config.train.batch_size = args.batch_size
    if args.depth_head:
        config.model.depth_head.enabled = True
    if args.no_cache:
        config.train.cache_vision = False
    if args.scan_layers:
        config.model.decoder.scan_layers = args.scan_layers == "true"
    for field, value in BUILT_IN_LENGTHS.items():
        if config.input[field] is None:
            config.input[field] = value
    if args.prompt_len:
        config.input.max_prompt_len = args.prompt_len
    if args.answer_len:
        config.input.max_answer_len = args.answer_len
    r = run(config, args.steps)
    print(f"{args.preset}: batch {config.train.batch_size} x {config.data.num_views} views x "
          f"{config.input.max_questions} questions of {config.input.max_prompt_len} + "
          f"{config.input.max_answer_len} tokens, decoder {'scanned' if config.model.decoder.scan_layers else 'unrolled'}, "
          f"vision side {'cached' if r['cached'] else 'in the step'}, {r['params_m']:.2f}M params, tasks {r['tasks']}, "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    print(f"  peak {r['peak'] / 1e9:.1f} GFLOP/s ({r['peak_how']})")
    print(f"  compile {r['compile_s']:.1f} s, step {r['step_s'] * 1e3:.0f} ms, "
          f"{r['tokens_per_s']:.0f} decoder tokens/s")
    print(f"  per step: {r['minor_faults']:.0f} minor page faults, CPU {r['user_s']:.2f} s user + "
          f"{r['sys_s']:.2f} s system")
    print(f"  model FLOPs/step {r['model_flops'] / 1e9:.2f} G (analytic) vs {r['xla_flops'] / 1e9:.2f} G "
          f"(XLA); MFU {100 * r['mfu']:.1f}% analytic, {100 * r['mfu_xla']:.1f}% by XLA's count")


if __name__ == "__main__":
    main()
