"""Attention kernels: memory on a TPU chip, compiled ahead of time on this CPU (libtpu, no TPU
needed), or time on the local device (a GPU): XLA attention against our Pallas flash kernel and
JAX's splash (TPU) or cudnn (GPU) kernels, forward and forward + backward.

    python -m benchmarks.bench_attention [--topology v5e:2x2] [--views 8]
    python -m benchmarks.bench_attention --local [--impls xla,pallas,cudnn] [--runs 20]

Shapes: VGGT-1B global attention over `views` frames of 518 x 518 (37 x 37 patches + 5 special
tokens = 1,374 tokens a frame), 16 heads of 64, bfloat16, batch 1; and the paper student's
decoder (16 heads of 128) over 2,048 tokens. Prints `memory_analysis()` per program: temporaries
are what attention itself needs (XLA materialises the [heads, L, L] scores; the kernel keeps one
block of them).

`--local` times each implementation on `jax.devices()[0]` (median of `--runs` after a warm-up)
and checks it against XLA's output and gradients; TFLOP/s use the analytic attention FLOPs (4 x L^2
x heads x head_dim forward, halved when causal; backward 2.5x the forward, FlashAttention-2's
convention). An implementation that would fall back to XLA for these shapes is named, not timed.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.latency import timed
from spatial_distill import sharding
from spatial_distill.kernels.attention import attention, fallback_reason


def _gib(x: int) -> str:
    return f"{x / 2**30:.2f} GiB"


def cases(views: int) -> dict[str, tuple[int, int, int, bool]]:
    """name -> (tokens, heads, head_dim, causal)."""
    return {f"VGGT global attention, {views} views": (views * 1374, 16, 64, False),
            "student decoder, 2,048 tokens": (2048, 16, 128, True)}


def time_local(views: int, impls: list[str], runs: int) -> None:
    device = jax.devices()[0]
    print(f"local {device.device_kind} ({jax.default_backend()}), bfloat16, batch 1, median of {runs} runs")
    for name, (L, H, D, causal) in cases(views).items():
        q, k, v = (jax.random.normal(key, (1, L, H, D), jnp.bfloat16)
                   for key in jax.random.split(jax.random.PRNGKey(0), 3))
        fwd_flops = 4 * L * L * H * D * (0.5 if causal else 1.0)
        print(f"{name}: {L} tokens, {H} heads x {D}")
        ref = None
        for impl in impls:
            f = jax.jit(lambda q, k, v, impl=impl: attention(q, k, v, causal=causal, implementation=impl))
            g = jax.jit(jax.grad(lambda q, k, v, impl=impl: attention(
                q, k, v, causal=causal, implementation=impl).astype(jnp.float32).sum(), (0, 1, 2)))
            why = fallback_reason(q, k, causal=causal, implementation=impl)
            if why is not None:
                print(f"  {impl:14s} not timed: it runs XLA attention for {why}")
                continue
            try:
                out, grads = jax.block_until_ready((f(q, k, v), g(q, k, v)))
            except Exception as e:  # noqa: BLE001 - report the implementation and go on
                print(f"  {impl:14s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            if ref is None:
                ref = (out, grads)
            err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                      for a, b in zip((out, *grads), (ref[0], *ref[1]), strict=True))
            t_f, t_g = (float(np.median(timed(fn, runs))) for fn in (lambda: f(q, k, v), lambda: g(q, k, v)))
            print(f"  {impl:14s} forward {t_f * 1e3:8.3f} ms {fwd_flops / t_f / 1e12:7.3g} TFLOP/s   "
                  f"forward+backward {t_g * 1e3:8.3f} ms {3.5 * fwd_flops / t_g / 1e12:7.3g} TFLOP/s   "
                  f"max |diff| vs {impls[0]} {err:.3g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", default="v5e:2x2")
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--local", action="store_true", help="time on the local device instead of AOT for TPU")
    p.add_argument("--impls", default="xla,pallas,cudnn", help="--local: comma-separated implementations")
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    if args.local:
        time_local(args.views, args.impls.split(","), args.runs)
        return
    try:
        from jax.experimental import topologies

        device = topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices[0]
    except Exception as e:  # noqa: BLE001 - libtpu missing or an unknown topology
        raise SystemExit(f"cannot target TPU {args.topology!r} ({e}); install libtpu: "
                         "pip install 'spatial_distill[tpu]'") from e
    place = jax.sharding.SingleDeviceSharding(device)
    # Traced under a mesh of the TPU device, so `attention` targets TPU (Mosaic, not the
    # interpreter it would pick for this CPU host).
    mesh = sharding.make_mesh((1, 1, 1), [device])
    print(f"one {device.device_kind} chip of {args.topology}, bfloat16, batch 1")
    for name, (L, H, D, causal) in cases(args.views).items():
        x = jax.ShapeDtypeStruct((1, L, H, D), jnp.bfloat16, sharding=place)
        print(f"{name}: {L} tokens, {H} heads x {D}")
        for impl in ("xla", "pallas", "splash"):
            f = lambda q, k, v, impl=impl: attention(q, k, v, causal=causal, implementation=impl)  # noqa: E731
            g = jax.grad(lambda q, k, v, f=f: f(q, k, v).astype(jnp.float32).sum(), (0, 1, 2))
            for what, fn in (("forward", f), ("forward+backward", g)):
                with sharding.axis_rules(mesh):
                    compiled = jax.jit(fn).lower(x, x, x).compile()
                if impl != "xla":
                    assert "tpu_custom_call" in compiled.as_text(), f"{impl} did not lower through Mosaic"
                m = compiled.memory_analysis()
                print(f"  {impl:6s} {what:17s} temporaries {_gib(m.temp_size_in_bytes):>10s}   "
                      f"arguments + outputs {_gib(m.argument_size_in_bytes + m.output_size_in_bytes)}")


if __name__ == "__main__":
    main()
