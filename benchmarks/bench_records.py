"""Teacher-record sizes: bytes per answer token of the teacher outputs, bytes per sample with frames.

    python -m benchmarks.bench_records        (from the repository root)

Setting: K=32, vocab 32000 (Llama-2), 4 views, 8 questions of 3-5 answer tokens, 48-token prompts,
frames at 112x112 and 518x518. Frames are rendered scene-like images (floor, wall, shaded
primitives) -- "clean" as the synthetic renderer makes them and "noisy" with camera-like noise
(sigma 3 grey levels), which bounds what PNG achieves on real photos. MaxText's layout for the
same top-K (float32 values + int64 ids) costs 12 bytes per entry = 384 B per token at K=32.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from data_pipelines import teacher_records as tr
from data_pipelines.sample import QA, QA_KINDS, Sample

K, VOCAB, VIEWS, QUESTIONS, PROMPT_LEN = 32, 32000, 4, 8, 48
MAXTEXT_BYTES = K * (4 + 8)


def scene_frame(rng, size: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """A smooth scene-like RGB image and its depth (metres), `size` x `size`."""
    y, x = np.mgrid[0:size, 0:size] / size
    horizon = 0.45
    rgb = np.where((y > horizon)[..., None], [150, 120, 90], [200, 200, 190]).astype(np.float64)
    rgb *= (0.7 + 0.3 * (1 - y))[..., None]  # lighting falloff
    depth = np.where(y > horizon, 1.5 / np.maximum(y - horizon, 0.02) * 0.3, 6.0)
    for _ in range(5):
        cx, cy, r = rng.uniform(0.15, 0.85), rng.uniform(0.4, 0.9), rng.uniform(0.05, 0.15)
        colour = rng.integers(30, 255, 3)
        inside = ((x - cx) ** 2 + (y - cy) ** 2 < r * r) if rng.random() < 0.5 else \
            ((abs(x - cx) < r) & (abs(y - cy) < r))
        shade = 0.6 + 0.4 * np.clip(1 - (x - cx + r) / (2 * r), 0, 1)
        rgb[inside] = (colour * shade[..., None])[inside]
        depth[inside] = rng.uniform(1.0, 4.0) + 0.2 * (y - cy)[inside]
    rgb += rng.normal(0, noise, rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), depth.astype(np.float32)


def bench_record(rng, meta: tr.TeacherMeta, sample_id: str, size: int, noise: float) -> tr.TeacherRecord:
    frames = [scene_frame(rng, size, noise) for _ in range(VIEWS)]
    poses = np.tile(np.eye(4, dtype=np.float32), (VIEWS, 1, 1))
    poses[:, :3, 3] = rng.normal(0, 2, (VIEWS, 3))
    k = np.array([[size, 0, size / 2], [0, size, size / 2], [0, 0, 1]], np.float32)
    boxes = np.concatenate([rng.normal(0, 1, (6, 3)), rng.uniform(0.2, 1, (6, 3)), rng.uniform(-3, 3, (6, 1))], 1)
    qa = tuple(QA(f"Is object {i} near object {i + 1}?", "yes", QA_KINDS[i % 5], (i % 6, (i + 1) % 6))
               for i in range(QUESTIONS))
    sample = Sample(sample_id, np.stack([f[0] for f in frames]), np.stack([f[1] for f in frames]),
                    np.repeat(k[None], VIEWS, 0), poses, boxes.astype(np.float32),
                    np.arange(6, dtype=np.int32), tuple(f"obj{i}" for i in range(6)), qa)
    answers = []
    for i, q in enumerate(qa):
        la = 3 + i % 3  # 3-5 tokens, mean 4
        logits = rng.normal(0, 2, (la, VOCAB)).astype(np.float32)
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        top = np.argsort(-logits, axis=1)[:, :K]
        answers.append(tr.TeacherAnswer.build(
            meta, prompt_ids=rng.integers(3, VOCAB, PROMPT_LEN), answer_ids=top[:, 0], topk_ids=top,
            topk_logprobs=np.take_along_axis(logits, top, 1) - lse[:, None], logsumexp=lse,
            kind=q.kind, gt_answer=q.answer))
    return tr.TeacherRecord(sample, tuple(answers))


def feature_bytes(example: tf.train.Example, names) -> int:
    """Serialized size of an Example holding only `names` (payload plus protobuf framing)."""
    sub = tf.train.Example()
    for n in names:
        sub.features.feature[n].CopyFrom(example.features.feature[n])
    return len(sub.SerializeToString())


def main():
    rng = np.random.default_rng(0)
    teacher = ("topk_ids", "topk_logprobs", "logsumexp", "answer_ids")
    print(f"K={K}, vocab={VOCAB}, {VIEWS} views, {QUESTIONS} questions of 3-5 answer tokens, "
          f"{PROMPT_LEN}-token prompts")
    for size in (112, 518):
        meta = tr.TeacherMeta("bench", VOCAB, K, 1.0, (size, size), VIEWS)
        for noise in (0.0, 3.0):
            rec = bench_record(rng, meta, f"bench{size}", size, noise)
            data = tr.encode(rec, meta)
            ex = tf.train.Example.FromString(data)
            tokens = sum(a.answer_ids.size for a in rec.answers)
            payload = sum(len(b) for n in teacher for b in ex.features.feature[n].bytes_list.value)
            framed = feature_bytes(ex, teacher)
            if size == 112 and noise == 0.0:
                print(f"teacher outputs: {payload / tokens:.1f} B per answer token payload "
                      f"({framed / tokens:.1f} B with protobuf framing); MaxText float32+int64 = "
                      f"{MAXTEXT_BYTES} B -> {MAXTEXT_BYTES / (payload / tokens):.2f}x smaller "
                      f"(goal <= 140 B)")
            parts = {"frames": feature_bytes(ex, ["frames"]), "depth": feature_bytes(ex, ["depth"]),
                     "teacher": framed, "prompts": feature_bytes(ex, ["prompt_ids"])}
            print(f"{size}x{size} {'noisy' if noise else 'clean'}: {len(data) / 1024:.1f} KiB per sample "
                  f"(frames {parts['frames'] / 1024:.1f}, depth {parts['depth'] / 1024:.1f}, "
                  f"teacher {parts['teacher'] / 1024:.1f}, prompts {parts['prompts'] / 1024:.1f} KiB; "
                  f"raw rgb would be {rec.sample.rgb.nbytes / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
