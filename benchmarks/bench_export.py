"""Export cost and the exported student's speed: export time and file sizes (tiny), file sizes
from shapes alone (paper), and answer latency of the torch student vs the Flax one on this CPU.

  python -m benchmarks.bench_export                # tiny timings + paper sizes
  python -m benchmarks.bench_export --runs=20

Tiny: the `tiny` preset's student with random weights (timing does not depend on the values)
and a BPE trained on synthetic questions; one scene of 4 views at 112 px and all its questions
answered together (greedy, 4 new tokens), as the eval stage does. Paper: bytes per file from the
abstract model's parameter shapes (nothing is allocated), float32 and bfloat16.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import student as student_configs
from data_pipelines import synthetic
from spatial_distill import tokenizer as tokenizer_lib
from spatial_distill.export import stage
from spatial_distill.models import student as st
from spatial_distill.models import word_tags

BYTES = {"float32": 4, "bfloat16": 2}


def file_parameters(model) -> dict[str, int]:
    """Parameters per export file (decoder/, vggt.safetensors, student.safetensors)."""
    counts = st.parameter_breakdown(model)
    vggt = sum(counts.get(k, 0) for k in ("aggregator", "camera_head", "depth_head"))
    d = model.cfg.decoder
    # A tied LM head is written as its own copy too (transformers' state_dict lists it).
    decoder = counts.get("decoder", 0) + (d.vocab_size * d.hidden_size if d.tie_word_embeddings else 0)
    return {"decoder": decoder, "vggt": vggt, "student": sum(counts.values()) - vggt - counts.get("decoder", 0)}


def dir_bytes(path: str) -> dict[str, int]:
    sizes = {}
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        sizes[name] = (sum(os.path.getsize(os.path.join(p, f)) for f in os.listdir(p))
                       if os.path.isdir(p) else os.path.getsize(p))
    return sizes


def paper_sizes() -> None:
    c = student_configs.get_config("paper")
    cfg = st.config_from(c.model, c.data.image_size, word_tags.StandInIds())
    params = file_parameters(st.create(cfg, abstract=True))
    print("paper (shapes only): parameters and bytes per file")
    for name, n in params.items():
        print(f"  {name:8s} {n / 1e6:9.1f}M  float32 {n * 4 / 2**30:6.2f} GiB  bfloat16 {n * 2 / 2**30:6.2f} GiB")
    total = sum(params.values())
    print(f"  {'total':8s} {total / 1e6:9.1f}M  float32 {total * 4 / 2**30:6.2f} GiB  "
          f"bfloat16 {total * 2 / 2**30:6.2f} GiB")


def _percentiles(times: list[float]) -> str:
    t = np.asarray(times) * 1e3
    return f"p50 {np.percentile(t, 50):7.1f} ms  p90 {np.percentile(t, 90):7.1f} ms"


def tiny(runs: int) -> None:
    import torch

    from spatial_distill.export import torch_student

    c = student_configs.get_config("tiny")
    scenes = [synthetic.generate_scene(i, image_size=(c.data.image_size,) * 2,
                                       num_views=c.data.num_views) for i in range(40)]
    work = tempfile.mkdtemp(prefix="bench_export-")
    corpus = [t for s in scenes for qa in s.qa for t in (qa.question, qa.answer)]
    tok = tokenizer_lib.train_bpe(corpus, c.tokenizer.vocab_size, os.path.join(work, "tokenizer"))
    c.model.vision.checkpoint = None  # random weights: the timing does not depend on them
    cfg = st.config_from(c.model, c.data.image_size, tok)
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, vocab_size=tok.vocab_size))
    model = st.create(cfg, 0)
    print(f"tiny: {sum(st.parameter_breakdown(model).values()) / 1e6:.2f}M parameters, "
          f"{c.data.num_views} views of {c.data.image_size} px")
    for dtype in ("float32", "bfloat16"):
        out = os.path.join(work, f"export-{dtype}")
        t0 = time.perf_counter()
        stage.write(model, tok, out, dtype=dtype)
        took = time.perf_counter() - t0
        sizes = dir_bytes(out)
        print(f"  export {dtype:8s} {took:5.2f} s  " + "  ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sizes.items()))

    scene = scenes[0]
    rows = [tok.encode(qa.question, add_bos=True) for qa in scene.qa]
    lp = max(map(len, rows))
    prompt = np.zeros((1, len(rows), lp), np.int32)
    mask = np.zeros(prompt.shape, bool)
    for i, r in enumerate(rows):
        prompt[0, i, :len(r)], mask[0, i, :len(r)] = r, True
    images = np.asarray(scene.rgb)[None]
    new = 4

    def flax_answer():
        tokens, _ = model.generate(jnp.asarray(images), jnp.asarray(prompt), jnp.asarray(mask),
                                   max_new_tokens=new, eos_id=tok.eos_id, pad_id=tok.pad_id)
        return jax.block_until_ready(tokens)

    student = torch_student.load(os.path.join(work, "export-float32"))
    torch.set_num_threads(os.cpu_count() or 1)

    def torch_answer():
        return student.generate(images, torch.from_numpy(prompt), torch.from_numpy(mask), max_new_tokens=new)

    print(f"  answer latency, one scene ({len(rows)} questions, {new} new tokens, float32, "
          f"{os.cpu_count()} CPU threads):")
    for name, fn in (("flax (jit)", flax_answer), ("torch", torch_answer)):
        fn()  # compile / warm up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        print(f"    {name:10s} {_percentiles(times)}")
    same = np.array_equal(np.asarray(flax_answer()), torch_answer()[0].numpy())
    print(f"  torch and flax answers identical: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    tiny(args.runs)
    paper_sizes()


if __name__ == "__main__":
    main()
