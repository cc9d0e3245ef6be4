"""Training metrics: a non-blocking JSONL + TensorBoard writer, and the FLOPs behind `perf/mfu`.

`MetricWriter` hands records to a background thread, so the train loop never waits on disk; only
`flush()` (called before a checkpoint is saved) waits, which makes every line up to a checkpoint's
step durable before the checkpoint exists. On resume, `truncate_jsonl` drops the lines past the
restored step (and a line cut short by a kill), so the file holds each step once.

MFU (DESIGN.md §5 `perf/mfu`) = analytic model FLOPs per step / step time / peak FLOP/s:
- decoder: 6·N·tokens, N = its per-token parameters (the embedding table is a gather, not a
  matmul), tokens = the shared prefix ([V][T]) once per sample plus every slot of every
  question's padded rest ([Q][A]), as the student computes them; plus the LM head 6·D·V per
  answer slot (the only positions projected to the vocabulary);
- VGGT aggregator (with its DINO patch embed): 6·N·tokens over every frame's patch + special
  tokens, 2·N·tokens when frozen (forward only);
- not counted: attention scores (quadratic in length, small at these lengths), the depth and
  detection heads, the optimizer. So MFU is a slight underestimate.
Peak FLOP/s per device come from `PEAK_FLOPS` (dense bf16 datasheet figures) matched on
`device_kind`; for CPU it is measured once: the best of a few float32 1024² matmuls on all cores.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np

# device_kind substring -> dense bf16 peak FLOP/s per device (datasheets).
PEAK_FLOPS = (
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),  # v5p reports its kind as "TPU v5"; after the v5e names it would shadow
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
)


class MetricWriter:
    """Writes `{"step": s, name: value, ...}` lines to `WORKDIR/metrics.jsonl` and scalars to
    TensorBoard (`WORKDIR/tb`) from a background thread. `enabled=False` (processes other than 0)
    makes every call a no-op. `purge_step`: TensorBoard forgets events from this step on (resume).
    """

    def __init__(self, workdir: str, *, enabled: bool = True, purge_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge_step)
        self._file = open(self.path, "a")
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="metric-writer", daemon=True)
        self._thread.start()

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.enabled:
            self._raise_if_failed()
            self._queue.put((int(step), {k: float(v) for k, v in metrics.items()}))

    def flush(self) -> None:
        """Blocks until every record so far is written and fsynced."""
        if self.enabled:
            self._queue.join()
            self._raise_if_failed()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            self._queue.put(None)
            self._thread.join()
            self._file.close()
            self._tb.close()
            self.enabled = False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                step, metrics = item
                self._file.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
                for name, value in metrics.items():
                    self._tb.add_scalar(name, value, step)
            except BaseException as e:  # noqa: BLE001 - re-raised in the train loop
                self._error = e
            finally:
                self._queue.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing metrics to {self.path} failed: {self._error}") from self._error


def read_jsonl(path: str) -> list[dict]:
    """The complete records of a metrics file (a torn last line from a kill is skipped)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                out.append(rec)
    return out


def truncate_jsonl(path: str, last_step: int) -> int:
    """Keeps the records with step <= last_step (atomically); returns how many were dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        total = sum(1 for _ in f)
    keep = [r for r in read_jsonl(path) if r["step"] <= last_step]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return total - len(keep)


# ---------------------------------------------------------------------------------------------
# FLOPs and peak throughput.


def train_flops_per_step(breakdown: Mapping[str, int], *, batch: int, views: int,
                         questions: int, sequence: int, answer_len: int, vision_tokens: int,
                         hidden: int, vocab: int, tied_embeddings: bool,
                         vision_frozen: bool, shared_prefix: int = 0) -> dict[str, float]:
    """Analytic FLOPs of one train step (module docstring).

    breakdown: `parameter_breakdown(student)` (top-level component -> parameter count).
    sequence: decoder slots per question (vision + latents + prompt + answer, padded), of which
    the first `shared_prefix` are decoded once per sample and read by every question;
    vision_tokens: aggregator tokens per frame (patches + camera/register tokens).
    Returns {"decoder", "vision", "total", "decoder_tokens"}.
    """
    # The decoder count includes its input embedding and LM head: neither is a per-token matmul
    # over the whole sequence (the head is applied to answer slots only, counted apart).
    per_token = breakdown.get("decoder", 0) - (1 if tied_embeddings else 2) * vocab * hidden
    tokens = batch * (shared_prefix + questions * (sequence - shared_prefix))
    decoder = 6.0 * per_token * tokens + 6.0 * hidden * vocab * batch * questions * answer_len
    vis_tokens = batch * views * vision_tokens
    vision = (2.0 if vision_frozen else 6.0) * breakdown.get("aggregator", 0) * vis_tokens
    return {"decoder": decoder, "vision": vision, "total": decoder + vision,
            "decoder_tokens": float(tokens)}


def config_train_flops(config, model_cfg, breakdown: Mapping[str, int],
                       num_views: int) -> dict[str, float]:
    """`train_flops_per_step` for a student config (`configs/student.py`) and its `StudentConfig`
    at the input pipeline's static shapes (every question and token slot counted)."""
    lp, la = config.input.max_prompt_len, config.input.max_answer_len
    return train_flops_per_step(
        breakdown, batch=config.train.batch_size, views=num_views,
        questions=config.input.max_questions,
        sequence=model_cfg.sequence_length(num_views, lp, la), answer_len=la,
        vision_tokens=(config.data.image_size // model_cfg.aggregator.patch_size) ** 2
        + model_cfg.aggregator.patch_start_idx,
        hidden=model_cfg.decoder.hidden_size, vocab=model_cfg.decoder.vocab_size,
        tied_embeddings=model_cfg.decoder.tie_word_embeddings,
        vision_frozen=model_cfg.freeze_vision,
        shared_prefix=model_cfg.shared_prefix_length(num_views))


_CPU_PEAK: dict[int, float] = {}


def measure_cpu_flops(size: int = 1024, repeats: int = 5) -> float:
    """Best float32 matmul throughput of this host's CPU (FLOP/s), measured once per process."""
    if size in _CPU_PEAK:
        return _CPU_PEAK[size]
    cpu = jax.local_devices(backend="cpu")[0]  # this host's, also in multi-process runs
    a = jax.device_put(np.ones((size, size), np.float32), cpu)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    _CPU_PEAK[size] = 2.0 * size**3 / best
    return _CPU_PEAK[size]


def peak_flops(devices: Sequence[jax.Device] | None = None) -> tuple[float, str]:
    """(peak FLOP/s of all `devices` together, how it was obtained)."""
    devices = list(jax.devices() if devices is None else devices)
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        # Forced host "devices" share the same cores: the host's measured peak, once per process.
        hosts = len({d.process_index for d in devices})
        return measure_cpu_flops() * hosts, f"measured CPU float32 matmul peak x {hosts} host(s)"
    for name, flops in PEAK_FLOPS:
        if name in kind:
            return flops * len(devices), f"{kind}: {flops / 1e12:.0f} TFLOP/s bf16 dense per device"
    return math.nan, f"unknown device kind {kind!r}: no peak FLOP/s, MFU not reported"


def to_host(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    """Replicated scalar metrics -> floats (one explicit transfer; works in multi-process runs,
    where a replicated global array is not fully addressable)."""
    local = {k: v.addressable_data(0) for k, v in metrics.items()}
    return {k: float(v) for k, v in jax.device_get(local).items()}
