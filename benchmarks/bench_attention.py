"""Attention memory on a TPU chip, compiled ahead of time on this CPU (libtpu, no TPU needed):
XLA attention against our Pallas flash kernel and JAX's splash kernel, forward and forward +
backward.

    python -m benchmarks.bench_attention [--topology v5e:2x2] [--views 8]

Shapes: VGGT-1B global attention over `views` frames of 518 x 518 (37 x 37 patches + 5 special
tokens = 1,374 tokens a frame), 16 heads of 64, bfloat16, batch 1; and the paper student's
decoder (16 heads of 128) over 2,048 tokens. Prints `memory_analysis()` per program: temporaries
are what attention itself needs (XLA materialises the [heads, L, L] scores; the kernel keeps one
block of them).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from spatial_distill import sharding
from spatial_distill.kernels.attention import attention


def _gib(x: int) -> str:
    return f"{x / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", default="v5e:2x2")
    p.add_argument("--views", type=int, default=8)
    args = p.parse_args()
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
    cases = {f"VGGT global attention, {args.views} views": (args.views * 1374, 16, 64, False),
             "student decoder, 2,048 tokens": (2048, 16, 128, True)}
    print(f"one {device.device_kind} chip of {args.topology}, bfloat16, batch 1")
    for name, (L, H, D, causal) in cases.items():
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
