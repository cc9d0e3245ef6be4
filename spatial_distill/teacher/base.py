"""The one small interface every teacher implements, and the top-K extraction shared by all.

A teacher answers a sample's questions greedily (`answer`) and then scores its own answers
teacher-forced (`score`), returning the full next-token logits at every answer position. The dump
loop (not the teacher) turns those logits into what the records store: the top-K ids and
log-probs at the dump temperature and the raw logsumexp, so every teacher is stored identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from data_pipelines.sample import Sample


class Teacher(Protocol):
    teacher_id: str
    revision: str

    def calibration(self) -> dict:
        """Settings that shaped the outputs (stored in `teacher_meta.json`)."""

    def answer(self, sample: Sample, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Greedy answer token ids (EOS included) to each prompt (`prompts[i]` asks `sample.qa[i]`)."""

    def score(self, sample: Sample, prompts: Sequence[Sequence[int]],
              answers: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Teacher-forced logits `[len(answer_i), vocab]` float32: row j scores answer token j."""


def topk_at_temperature(logits: np.ndarray, k: int, temperature: float):
    """Top-K of `softmax(logits / T)` per row.

    logits `[L, V]` -> (ids `[L, K]` int64 sorted by descending probability (ties: lower id first),
    log-probs `[L, K]` float32, logsumexp `[L]` float32 of `logits / T`). The tail mass
    `1 - sum(exp(log-probs))` follows exactly from the stored values.
    """
    z = np.asarray(logits, np.float64) / float(temperature)
    if z.ndim != 2 or not 1 <= k <= z.shape[1]:
        raise ValueError(f"topk_at_temperature: logits {z.shape} with k={k}: need [L, V] and 1 <= k <= V")
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    ids = np.argsort(-z, axis=1, kind="stable")[:, :k]
    lp = np.take_along_axis(z, ids, axis=1) - lse[:, None]
    return ids, lp.astype(np.float32), lse.astype(np.float32)
