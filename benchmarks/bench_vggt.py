"""VGGT port on CPU: jitted forward time, compiled memory, and FLOPs of VGGT-1B at 518x518.

    python -m benchmarks.bench_vggt            # from the repo root; a few minutes on 2 CPU cores
    python -m benchmarks.bench_vggt --heavy    # adds the 1B-width model with heads at 518x518

Weights are random (shapes are what matter). "1B-width" models have the real VGGT-1B widths
(embed 1024, 16 heads, camera trunk 2048, DPT features 256) but only `--layers` aggregator block
pairs and DINO blocks, since the full 24+24+24 blocks take minutes per forward on a small CPU.
FLOPs of the full VGGT-1B come from `jax.jit(...).lower(...).cost_analysis()` on an abstract
model (nothing allocated, nothing compiled), compared with the analytic count below.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import resource
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from spatial_distill.models.vggt import VGGT, VGGTConfig, abstract_model

TINY_JSON = (pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "vggt"
             / "tiny" / "config.json")


def tiny_config() -> VGGTConfig:
    return VGGTConfig.from_json(TINY_JSON)


def width_1b_config(layers: int, heads: bool) -> VGGTConfig:
    base = VGGTConfig.vggt_1b()
    idx = tuple(min(i * layers // 4, layers - 1) for i in range(4))  # spread over the kept layers
    return dataclasses.replace(
        base,
        aggregator=dataclasses.replace(base.aggregator, depth=layers),
        aggregator_patch_embed_vit=dataclasses.replace(base.aggregator_patch_embed_vit, depth=layers),
        depth_head=dataclasses.replace(base.depth_head, intermediate_layer_idx=idx),
        point_head=dataclasses.replace(base.point_head, intermediate_layer_idx=idx),
        enable_camera=heads, enable_depth=heads, enable_point=heads)


def _mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def time_forward(cfg: VGGTConfig, frames: int, hw: int, runs: int) -> dict:
    model = VGGT(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def fwd(state, images):
        out = nnx.merge(graphdef, state)(images)
        out.pop("patch_start_idx")
        return out

    images = jax.random.uniform(jax.random.key(1), (1, frames, 3, hw, hw))
    t0 = time.perf_counter()
    compiled = jax.jit(fwd).lower(state, images).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(state, images))  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(state, images))
        times.append(time.perf_counter() - t0)
    mem = compiled.memory_analysis()
    return dict(compile_s=compile_s, median_s=statistics.median(times), args=mem.argument_size_in_bytes,
                temp=mem.temp_size_in_bytes, out=mem.output_size_in_bytes)


# -- analytic FLOPs (multiply-add = 2 FLOPs; matmuls and convolutions only) --------------------

def block_flops(tokens: int, attn_len: int, dim: int, mlp_ratio: float) -> float:
    """One pre-norm block over `tokens` tokens attending within groups of `attn_len`:
    qkv 6LC^2 + proj 2LC^2 + MLP 4LC*C_mlp + QK^T and PV 4*L*attn_len*C."""
    return tokens * dim * (8 * dim + 4 * mlp_ratio * dim + 4 * attn_len)


def aggregator_flops(cfg: VGGTConfig, frames: int, hh: int, ww: int) -> float:
    a, v = cfg.aggregator, cfg.aggregator_patch_embed_vit
    hw = (hh // a.patch_size) * (ww // a.patch_size)
    c = a.embed_dim
    n_dino = 1 + v.num_register_tokens + hw
    p = a.patch_start_idx + hw
    per_frame = (2 * hw * 3 * a.patch_size**2 * c  # patch conv
                 + v.depth * block_flops(n_dino, n_dino, c, v.mlp_ratio)
                 + a.depth * block_flops(p, p, c, a.mlp_ratio)  # frame attention
                 + a.depth * block_flops(p, frames * p, c, a.mlp_ratio))  # global: S*P keys
    return frames * per_frame


def camera_flops(cfg: VGGTConfig, frames: int, iterations: int = 4) -> float:
    h, d = cfg.camera_head, cfg.camera_head.dim_in
    per_iter = frames * (2 * 9 * d + 2 * d * 3 * d + 2 * d * (d // 2) + 2 * (d // 2) * 9)
    per_iter += h.trunk_depth * block_flops(frames, frames, d, h.mlp_ratio)
    return iterations * per_iter


def dpt_flops(cfg, frames: int, hh: int, ww: int, patch: int = 14) -> float:
    """Spec §5 at input HxW; the final hidden width 32 of output_conv2 is fixed upstream."""
    h, w = hh // patch, ww // patch
    f, oc = cfg.features, cfg.out_channels
    s3 = ((h - 1) // 2 + 1) * ((w - 1) // 2 + 1)
    sizes = [16 * h * w, 4 * h * w, h * w, s3]  # after resize_layers 0..3
    fl = sum(2 * cfg.dim_in * o * h * w for o in oc)  # projects (1x1)
    fl += 2 * h * w * 16 * oc[0] ** 2 + 2 * h * w * 4 * oc[1] ** 2 + 2 * s3 * 9 * oc[3] ** 2  # resize
    fl += sum(2 * 9 * o * f * s for o, s in zip(oc, sizes))  # layer{1..4}_rn
    rcu = 2 * 2 * 9 * f * f  # two 3x3 convs, per pixel
    fused = 4 * sizes[0]  # refinenet1 output: twice layer1's size per side
    fl += rcu * sizes[3] + 2 * f * f * sizes[2]  # refinenet4: RCU2, out_conv at layer3 size
    fl += 2 * rcu * sizes[2] + 2 * f * f * sizes[1]  # refinenet3
    fl += 2 * rcu * sizes[1] + 2 * f * f * sizes[0]  # refinenet2
    fl += 2 * rcu * sizes[0] + 2 * f * f * fused  # refinenet1
    fl += 2 * 9 * f * (f // 2) * fused  # output_conv1
    fl += (2 * 9 * (f // 2) * 32 + 2 * 32 * cfg.output_dim) * hh * ww  # output_conv2
    return frames * fl


def lowered_flops(cfg: VGGTConfig, frames: int, hw: int) -> float:
    graphdef, state = nnx.split(abstract_model(cfg))

    def fwd(state, images):
        return nnx.merge(graphdef, state)(images)

    images = jax.ShapeDtypeStruct((1, frames, 3, hw, hw), jnp.float32)
    return float(jax.jit(fwd).lower(state, images).cost_analysis()["flops"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (median)")
    ap.add_argument("--layers", type=int, default=2, help="block pairs of the 1B-width models")
    ap.add_argument("--heavy", action="store_true", help="also time 1B-width with heads at 518")
    ap.add_argument("--skip-flops", action="store_true")
    args = ap.parse_args()
    s = args.frames
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s); "
          f"S={s} frames, batch 1, float32")

    runs = [("tiny (fixture config), heads", tiny_config(), 126),
            ("tiny (fixture config), heads", tiny_config(), 518),
            (f"1B-width, {args.layers} layers, heads", width_1b_config(args.layers, True), 126),
            (f"1B-width, {args.layers} layers, aggregator only", width_1b_config(args.layers, False), 518)]
    if args.heavy:
        runs.append((f"1B-width, {args.layers} layers, heads", width_1b_config(args.layers, True), 518))
    print(f"\n{'model':44s} {'HxW':>8s} {'compile':>8s} {'forward':>9s} {'args':>13s} {'temp':>13s}")
    for name, cfg, hw in runs:
        r = time_forward(cfg, s, hw, args.runs)
        print(f"{name:44s} {hw:>4d}x{hw:<3d} {r['compile_s']:7.1f}s {r['median_s']:8.3f}s "
              f"{_mib(r['args'])} {_mib(r['temp'])}")
    print(f"peak RSS of this process: {_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}")

    if args.skip_flops:
        return
    full = VGGTConfig.vggt_1b()
    agg_only = dataclasses.replace(full, enable_camera=False, enable_depth=False, enable_point=False)
    hw = 518
    analytic_agg = aggregator_flops(full, s, hw, hw)
    analytic_heads = camera_flops(full, s) + dpt_flops(full.depth_head, s, hw, hw) + dpt_flops(full.point_head, s, hw, hw)
    print(f"\nVGGT-1B FLOPs per frame at {hw}x{hw}, S={s} (global attention grows with S):")
    print("  analytic: block(L, A) = L*C*(8C + 4*C_mlp + 4A); aggregator = S*[2*hw*3*14^2*C "
          "+ 24*block(N_dino, N_dino) + 24*block(P, P) + 24*block(P, S*P)], N_dino = P = 5 + hw")
    t0 = time.perf_counter()
    low_agg = lowered_flops(agg_only, s, hw)
    low_all = lowered_flops(full, s, hw)
    print(f"  {'':22s} {'analytic':>12s} {'XLA cost_analysis':>18s}   (lowering took {time.perf_counter() - t0:.0f}s)")
    print(f"  {'aggregator':22s} {analytic_agg / s / 1e12:10.3f} T {low_agg / s / 1e12:16.3f} T")
    print(f"  {'with camera+DPT heads':22s} {(analytic_agg + analytic_heads) / s / 1e12:10.3f} T "
          f"{low_all / s / 1e12:16.3f} T")
    print(f"  heads alone: camera {camera_flops(full, s) / s / 1e9:.2f} G, depth "
          f"{dpt_flops(full.depth_head, s, hw, hw) / s / 1e9:.1f} G, point "
          f"{dpt_flops(full.point_head, s, hw, hw) / s / 1e9:.1f} G (analytic)")


if __name__ == "__main__":
    main()
