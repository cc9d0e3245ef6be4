"""The frozen vision side's output, computed once per training sample.

With `model.vision.frozen` and `model.object_head.frozen` (the tiny preset: a pretrained VGGT
and object head), everything before the projector is a fixed function of a sample's images, yet
the train step would recompute it every epoch: on the 2-core CPU that is a quarter of the tiny
step. `VisionCache` computes it the first time a sample is seen, with the same jitted function
for every sample (so an interrupted run that rebuilds its cache sees bitwise the same inputs),
and hands the step `vision_inputs [B, Nv, C']` instead. The grounding loss's pixel-level targets
(each object's observed colour, whether any view sees it) are as fixed, and cost the step as much
again as its decoder's MLP: the trainer caches them beside it. Host memory: Nv x C' float32 per
sample (64 x 143 x 4 B = 37 KiB for `tiny`, 37 MB for its 1,000 training scenes).

Single-process runs only: a multi-host batch's rows live on other hosts (the trainer then keeps
the in-step path).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np


def caches_vision(config: ml_collections.ConfigDict) -> bool:
    """Whether this run computes the frozen vision side once per sample (`VisionCache`):
    `train.cache_vision`, the aggregator and object/camera heads frozen, no head that reads the
    aggregator every step (depth, detection), one process."""
    m = config.model
    heads_frozen = m.object_head.frozen or not m.object_head.enabled
    return (bool(config.train.cache_vision) and m.vision.frozen and heads_frozen
            and not m.depth_head.enabled and not m.det_head.enabled and jax.process_count() == 1)


class VisionCache:
    """`lookup(ids, inputs, params)` -> `{name: [B, ...]}` numpy, filling rows on first sight.

    fn(params, inputs) -> `{name: [B, ...]}`: the frozen, per-sample part of the step (jitted by
    the caller); `inputs` is the part of the pipeline's batch it reads (uint8 `rgb [B, S, H, W,
    3]`, ...), placed on devices by `put`.
    """

    def __init__(self, fn: Callable, put: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]):
        self.fn, self.put = fn, put
        self.rows: dict[bytes, dict[str, np.ndarray]] = {}
        self.computed = 0  # samples computed (the rest of the lookups were cache hits)

    def lookup(self, ids: Sequence[bytes], inputs: Mapping[str, np.ndarray], params) -> dict[str, np.ndarray]:
        missing = [i for i, s in enumerate(ids) if s not in self.rows]
        if missing:
            out = {k: np.asarray(v) for k, v in jax.device_get(self.fn(params, self.put(dict(inputs)))).items()}
            for i in missing:
                self.rows[ids[i]] = {k: v[i] for k, v in out.items()}
            self.computed += len(missing)
        rows = [self.rows[s] for s in ids]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for r in self.rows.values() for v in r.values())
