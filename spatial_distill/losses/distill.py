"""Text distillation: top-K + tail KL to the teacher and CE on the teacher's greedy answer.

    loss = mean over answer tokens of  α·T²·KL(p_t ‖ p_s) + (1 − α)·CE(student at T=1, target)

The teacher records keep, per answer token, the K most likely ids and their log-probs at the
temperature T (`topk_logprobs`, fp16 on disk). The KL is exact on the *coarsened* distribution of
K + 1 outcomes: the K teacher ids and one tail bucket holding everything else.

Tail masses:
- teacher: `1 − Σ_k exp(lp_k)`, from the stored log-probs. They were normalised with the teacher's
  full-vocabulary logsumexp when dumped, so they already carry it; the raw logsumexp also stored in
  the record would only help if the raw top-K logits were stored too, so it is not an input here.
  Computed as `−expm1(logsumexp(lp))` and clipped to [0, 1] (fp16 rounding can push the sum above 1).
- student: `1 − Σ_k p_s(id_k)` in log space, `log1mexp(logsumexp(student log-probs at the ids))`.
  Its input is clamped to a tail of at least `_STUDENT_TAIL_FLOOR`: in fp32 a tail smaller than
  that is rounding noise, and without the floor a tail of ~0 gives log 0 and an infinite gradient.

`tail` options: "bucket" (above), "renormalize" (both distributions renormalised over the K ids),
"ignore" (Σ_k p_t,k (lp_k − log p_s,k) over the K ids, no renormalisation, tail dropped).

Normalisation: token mean over the whole batch — Σ mask·loss_token / max(Σ mask, 1) — so every
answer token weighs the same whatever its question's or sample's length.

Memory: `kd_loss(..., chunked=True)` never forms a `[tokens, vocab]` logits array. The student's
logsumexps (at T and at 1), the logits at the teacher ids and at the target and the running argmax
come from one pass over vocabulary chunks of the LM-head kernel; the backward pass recomputes each
chunk's logits (a custom VJP), so neither pass holds more than `[tokens, chunk_size]` of logits.
The teacher-id logits are gathered inside each chunk rather than with `hidden @ w[:, ids]`, whose
`[tokens, K, D]` gather is larger than the full logits whenever D > V / K.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

TAILS = ("bucket", "renormalize", "ignore")

# Smallest student tail mass the KL sees (see the module docstring).
_STUDENT_TAIL_FLOOR = 1e-6
_MAX_LOG_MASS = math.log1p(-_STUDENT_TAIL_FLOOR)


def log1mexp(a: jax.Array) -> jax.Array:
    """log(1 − exp(a)) for a < 0, accurate near 0 and for very negative a (Mächler's split)."""
    return jnp.where(a > -math.log(2.0), jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


# --------------------------------------------------------------------------------------------
# Vocabulary statistics in chunks of the LM-head kernel.


def _chunk_starts(vocab: int, chunk: int) -> tuple[int, int]:
    """Number of full chunks and the size of the trailing partial chunk."""
    return vocab // chunk, vocab % chunk


def _for_each_chunk(w, chunk, body, carry):
    """Runs `body(start, w_chunk, carry)` over the column chunks of `w [D, V]`, in order."""
    n_full, rest = _chunk_starts(w.shape[1], chunk)

    def step(i, c):
        start = i * chunk
        return body(start, jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=1), c)

    if n_full:
        carry = jax.lax.fori_loop(0, n_full, step, carry)
    if rest:
        carry = body(n_full * chunk, w[:, n_full * chunk:], carry)
    return carry


def _local(ids, start, width):
    local = ids - start
    inside = (local >= 0) & (local < width)
    return jnp.clip(local, 0, width - 1), inside


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def vocab_stats(temperatures, chunk_size, hidden, w, ids):
    """Full-vocabulary statistics of `logits = hidden @ w` without forming the logits.

    Args:
      temperatures: tuple of positive floats (static).
      chunk_size: vocabulary columns per chunk (static).
      hidden: `[N, D]` final hidden states.
      w: `[D, V]` LM-head kernel.
      ids: `[N, M]` int vocabulary ids whose logits to gather.

    Returns:
      lse `[len(temperatures), N]` fp32 (logsumexp of logits / T), gathered `[N, M]` fp32 raw
      logits at `ids`, argmax `[N]` int32 (first maximal id). Differentiable in hidden and w.
    """
    out, _ = _stats_fwd(temperatures, chunk_size, hidden, w, ids)
    return out


def _stats_fwd(temperatures, chunk_size, hidden, w, ids):
    n = hidden.shape[0]
    inv_t = jnp.asarray([1.0 / t for t in temperatures], jnp.float32)[:, None]

    def body(start, w_c, carry):
        m, s, best, gathered = carry
        z = jnp.dot(hidden, w_c, preferred_element_type=jnp.float32)  # [N, C]
        m_c = z.max(axis=1)
        new_m = jnp.maximum(m, m_c)
        # max(z / T) = max(z) / T for T > 0: one running max serves every temperature.
        s = s * jnp.exp((m - new_m)[None] * inv_t) + jnp.exp(
            (z - new_m[:, None])[None] * inv_t[:, :, None]).sum(axis=2)
        best = jnp.where(m_c > m, start + jnp.argmax(z, axis=1).astype(jnp.int32), best)
        local, inside = _local(ids, start, z.shape[1])
        gathered = jnp.where(inside, jnp.take_along_axis(z, local, axis=1), gathered)
        return new_m, s, best, gathered

    init = (jnp.full((n,), -jnp.inf, jnp.float32),
            jnp.zeros((len(temperatures), n), jnp.float32),
            jnp.zeros((n,), jnp.int32),
            jnp.zeros(ids.shape, jnp.float32))
    m, s, best, gathered = _for_each_chunk(w, chunk_size, body, init)
    lse = m[None] * inv_t + jnp.log(s)
    return (lse, gathered, best), (hidden, w, ids, lse)


def _stats_bwd(temperatures, chunk_size, res, cts):
    hidden, w, ids, lse = res
    g_lse, g_gathered, _ = cts
    inv_t = jnp.asarray([1.0 / t for t in temperatures], jnp.float32)[:, None, None]
    rows = jnp.arange(hidden.shape[0])[:, None]
    compute = jnp.result_type(hidden.dtype, w.dtype)

    def body(start, w_c, carry):
        dh, dw = carry
        z = jnp.dot(hidden, w_c, preferred_element_type=jnp.float32)
        # d lse_T / d z = softmax(z / T) / T.
        dz = (g_lse[:, :, None] * inv_t * jnp.exp(z[None] * inv_t - lse[:, :, None])).sum(axis=0)
        local, inside = _local(ids, start, z.shape[1])
        dz = dz.at[rows, local].add(jnp.where(inside, g_gathered, 0.0)).astype(compute)
        # Low-precision operands with fp32 accumulation, as autodiff of a bf16 matmul would do;
        # upcasting w_c instead lets XLA hoist one fp32 copy of the whole kernel out of the loop.
        dh = dh + jnp.dot(dz, w_c.T, preferred_element_type=jnp.float32)
        dw_c = jnp.dot(hidden.T, dz, preferred_element_type=jnp.float32).astype(w.dtype)
        return dh, jax.lax.dynamic_update_slice_in_dim(dw, dw_c, start, axis=1)

    init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros_like(w))
    dh, dw = _for_each_chunk(w, chunk_size, body, init)
    return dh.astype(hidden.dtype), dw, None


vocab_stats.defvjp(_stats_fwd, _stats_bwd)


# --------------------------------------------------------------------------------------------
# The loss, from per-token statistics.


def _kl(z_topk, lse_t, topk_logprobs, temperature, tail):
    """Per-token KL(p_t ‖ p_s) `[N]`; z_topk `[N, K]` raw student logits at the teacher ids."""
    ls = z_topk / temperature - lse_t[:, None]  # student log-probs at T
    lp = topk_logprobs.astype(jnp.float32)
    if tail == "renormalize":
        lp = lp - jax.nn.logsumexp(lp, axis=1, keepdims=True)
        ls = ls - jax.nn.logsumexp(ls, axis=1, keepdims=True)
    kl = (jnp.exp(lp) * (lp - ls)).sum(axis=1)
    if tail != "bucket":
        return kl
    t_log_mass = jnp.minimum(jax.nn.logsumexp(lp, axis=1), 0.0)
    t_tail = jnp.clip(-jnp.expm1(t_log_mass), 0.0, 1.0)
    s_log_tail = log1mexp(jnp.minimum(jax.nn.logsumexp(ls, axis=1), _MAX_LOG_MASS))
    t_log_tail = jnp.log(jnp.where(t_tail > 0, t_tail, 1.0))
    return kl + jnp.where(t_tail > 0, t_tail * (t_log_tail - s_log_tail), 0.0)


def _combine(stats, topk_logprobs, targets, mask, *, alpha, temperature, tail, label_smoothing):
    lse_t, lse_1, z_topk, z_target, mean_z, argmax = stats
    kl = _kl(z_topk, lse_t, topk_logprobs, temperature, tail)
    nll = lse_1 - z_target
    ce = nll if label_smoothing == 0 else (
        (1.0 - label_smoothing) * nll + label_smoothing * (lse_1 - mean_z))
    per_token = alpha * temperature**2 * kl + (1.0 - alpha) * ce

    mask = mask.astype(jnp.float32)
    denom = jnp.maximum(mask.sum(), 1.0)

    def mean(x):
        return (x * mask).sum() / denom

    topk_mass = jnp.exp(topk_logprobs.astype(jnp.float32)).sum(axis=1)
    metrics = {
        "distill/kl": mean(kl),
        "distill/ce": mean(nll),
        "distill/teacher_topk_mass": mean(topk_mass),
        "distill/token_accuracy": mean((argmax == targets).astype(jnp.float32)),
    }
    return mean(per_token), jax.tree.map(jax.lax.stop_gradient, metrics)


def _check(where, *, leading, topk_ids, topk_logprobs, targets, mask, alpha, temperature,
           tail, label_smoothing, vocab):
    def bad(field, value, fix):
        raise ValueError(f"{where}: {field} = {value}: {fix}")

    if topk_ids.shape[:-1] != leading or topk_ids.ndim != len(leading) + 1:
        bad("topk_ids.shape", topk_ids.shape, f"must be {leading} + (K,) to match the student's "
            f"leading token shape {leading}")
    if topk_logprobs.shape != topk_ids.shape:
        bad("topk_logprobs.shape", topk_logprobs.shape, f"must equal topk_ids.shape {topk_ids.shape}")
    if not jnp.issubdtype(topk_ids.dtype, jnp.integer):
        bad("topk_ids.dtype", topk_ids.dtype, "must be an integer dtype")
    if topk_ids.shape[-1] > vocab:
        bad("K", topk_ids.shape[-1], f"must be at most the vocabulary size {vocab}")
    if targets.shape != leading:
        bad("targets.shape", targets.shape, f"must be the leading token shape {leading}")
    if mask.shape != leading:
        bad("mask.shape", mask.shape, f"must be the leading token shape {leading}")
    if not 0.0 <= alpha <= 1.0:
        bad("alpha", alpha, "must be in [0, 1] (weight of the KD term)")
    if not temperature > 0:
        bad("temperature", temperature, "must be > 0 (the teacher records' temperature)")
    if tail not in TAILS:
        bad("tail", repr(tail), f"must be one of {TAILS}")
    if not 0.0 <= label_smoothing < 1.0:
        bad("label_smoothing", label_smoothing, "must be in [0, 1)")


def kd_loss(hidden, w, topk_ids, topk_logprobs, targets, mask, *, alpha: float,
            temperature: float, tail: str = "bucket", chunked: bool = True,
            chunk_size: int = 2048, label_smoothing: float = 0.0):
    """KD + CE loss from the student's final hidden states and its LM-head kernel.

    Args:
      hidden: `[..., D]` student final hidden states at the answer positions (any leading shape,
        e.g. `[B, Q, La]`), float32 or bfloat16.
      w: `[D, V]` LM-head kernel (`Llama.lm_head_kernel()`).
      topk_ids: `[..., K]` int teacher top-K ids.
      topk_logprobs: `[..., K]` teacher log-probs at `temperature` (fp16 or fp32).
      targets: `[...]` int teacher greedy answer ids.
      mask: `[...]` bool/float, 1 on answer tokens.
      alpha: weight of the KD term; CE gets 1 − alpha.
      temperature: T of the stored teacher log-probs; the student is softened by the same T.
      tail: "bucket" | "renormalize" | "ignore" (module docstring).
      chunked: compute vocabulary statistics in chunks of `chunk_size` columns of `w`, never
        forming `[..., V]` logits; False forms the full fp32 logits (small cases).
      label_smoothing: ε of the CE term, smoothing towards the uniform distribution.

    Returns:
      (loss scalar fp32, metrics dict: distill/kl, distill/ce (unsmoothed NLL),
      distill/teacher_topk_mass, distill/token_accuracy — token means over `mask`).
    """
    leading = hidden.shape[:-1]
    if w.ndim != 2 or w.shape[0] != hidden.shape[-1]:
        raise ValueError(f"kd_loss: w.shape = {w.shape}: must be [D, V] with D = "
                         f"{hidden.shape[-1]} (hidden's last dim); pass lm_head_kernel(), not its "
                         "transpose")
    if chunk_size < 1:
        raise ValueError(f"kd_loss: chunk_size = {chunk_size}: must be >= 1")
    _check("kd_loss", leading=leading, topk_ids=topk_ids,
           topk_logprobs=topk_logprobs, targets=targets, mask=mask, alpha=alpha,
           temperature=temperature, tail=tail, label_smoothing=label_smoothing, vocab=w.shape[1])
    if not chunked:
        logits = jnp.dot(hidden, w, preferred_element_type=jnp.float32)
        return kd_loss_from_logits(logits, topk_ids, topk_logprobs, targets, mask, alpha=alpha,
                                   temperature=temperature, tail=tail,
                                   label_smoothing=label_smoothing)

    k = topk_ids.shape[-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    ids = jnp.concatenate([topk_ids.reshape(-1, k), targets.reshape(-1, 1)], axis=1).astype(jnp.int32)
    (lse, gathered, argmax) = vocab_stats((float(temperature), 1.0), int(chunk_size), h, w, ids)
    mean_z = None
    if label_smoothing:
        mean_z = jnp.dot(h, w.mean(axis=1).astype(h.dtype), preferred_element_type=jnp.float32)
    stats = (lse[0], lse[1], gathered[:, :k], gathered[:, k], mean_z, argmax)
    return _combine(stats, topk_logprobs.reshape(-1, k), targets.reshape(-1), mask.reshape(-1),
                    alpha=alpha, temperature=temperature, tail=tail,
                    label_smoothing=label_smoothing)


def kd_loss_from_logits(logits, topk_ids, topk_logprobs, targets, mask, *, alpha: float,
                        temperature: float, tail: str = "bucket", label_smoothing: float = 0.0):
    """The same loss as `kd_loss` from full logits `[..., V]` (small cases, tests)."""
    leading = logits.shape[:-1]
    _check("kd_loss_from_logits", leading=leading, topk_ids=topk_ids,
           topk_logprobs=topk_logprobs, targets=targets, mask=mask, alpha=alpha,
           temperature=temperature, tail=tail, label_smoothing=label_smoothing,
           vocab=logits.shape[-1])
    k = topk_ids.shape[-1]
    z = logits.reshape(-1, logits.shape[-1]).astype(jnp.float32)
    ids = topk_ids.reshape(-1, k).astype(jnp.int32)
    t = targets.reshape(-1).astype(jnp.int32)
    stats = (jax.nn.logsumexp(z / temperature, axis=1), jax.nn.logsumexp(z, axis=1),
             jnp.take_along_axis(z, ids, axis=1), jnp.take_along_axis(z, t[:, None], axis=1)[:, 0],
             z.mean(axis=1), jnp.argmax(z, axis=1).astype(jnp.int32))
    return _combine(stats, topk_logprobs.reshape(-1, k), t, mask.reshape(-1), alpha=alpha,
                    temperature=temperature, tail=tail, label_smoothing=label_smoothing)
