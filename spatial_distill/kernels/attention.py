"""The one attention entry point every model calls (DESIGN.md §6).

`attention(q, k, v, ...)` dispatches on `implementation`: `"xla"` is the plain reference below;
`"pallas"` our flash-attention kernel (`flash_attention.py`; interpreted on CPU, so it is
testable everywhere); `"auto"` the kernel on TPU and GPU, XLA on CPU. A case the kernel does not
cover (an explicit boolean `mask`, a head_dim it lacks) falls back to XLA with one warning,
never silently wrong.

Layout: q `[batch, q_len, heads, head_dim]`, k and v `[batch, kv_len, kv_heads, head_dim]` with
`heads % kv_heads == 0` (grouped-query attention: head h reads kv head `h // (heads // kv_heads)`).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "pallas", "auto")
_WARNED: set[str] = set()


def _fallback(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"attention: the Pallas kernel does not cover {reason}; using XLA attention",
                      stacklevel=3)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    mask: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    scale: float | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Scaled dot-product attention. Returns `[batch, q_len, heads, head_dim]` in q's dtype.

    Args:
      causal: key j is visible to query i only if `kv_positions[j] <= q_positions[i]`
        (positions default to `arange`, with queries right-aligned to the keys, so a KV-cache
        decode step with q_len=1 sees every cached key).
      mask: optional boolean, broadcastable to `[batch, heads, q_len, kv_len]`; True = visible.
      q_segment_ids / kv_segment_ids: `[batch, len]` int; attention only within equal ids
        (packing and padding: give padding its own id).
      scale: defaults to `head_dim ** -0.5`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r} is not available; choose one of "
            f"{IMPLEMENTATIONS}"
        )
    if implementation == "auto":
        implementation = "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"
    if implementation == "pallas":
        from spatial_distill.kernels import flash_attention

        why = "an explicit boolean mask" if mask is not None else flash_attention.supported(q.shape, k.shape)
        if why is None:
            return flash_attention.flash_attention(
                q, k, v, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                q_positions=q_positions, kv_positions=kv_positions, scale=scale)
        _fallback(why)
    b, lq, h, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not agree")
    if h % hk:
        raise ValueError(f"attention: {h} query heads are not a multiple of {hk} kv heads")
    scale = d**-0.5 if scale is None else scale

    groups = h // hk
    qg = q.reshape(b, lq, hk, groups, d)
    # Logits and softmax in at least float32 (bf16 softmax loses mass; float64 stays float64).
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=acc)
    logits = logits * jnp.asarray(scale, acc)

    visible = None
    if causal:
        qp = jnp.arange(lq) + (lk - lq) if q_positions is None else q_positions
        kp = jnp.arange(lk) if kv_positions is None else kv_positions
        qp = jnp.broadcast_to(qp, (b, lq)) if qp.ndim == 1 else qp
        kp = jnp.broadcast_to(kp, (b, lk)) if kp.ndim == 1 else kp
        visible = kp[:, None, :] <= qp[:, :, None]  # [b, q, k]
    if q_segment_ids is not None or kv_segment_ids is not None:
        qs = q_segment_ids if q_segment_ids is not None else jnp.zeros((b, lq), jnp.int32)
        ks = kv_segment_ids if kv_segment_ids is not None else jnp.zeros((b, lk), jnp.int32)
        seg = qs[:, :, None] == ks[:, None, :]
        visible = seg if visible is None else visible & seg
    if visible is not None:
        visible = visible[:, None, None, :, :]  # [b, 1, 1, q, k]
    if mask is not None:
        m = jnp.broadcast_to(mask, (b, h, lq, lk)).reshape(b, hk, groups, lq, lk)
        visible = m if visible is None else visible & m
    if visible is not None:
        logits = jnp.where(visible, logits, jnp.finfo(acc).min)

    probs = jax.nn.softmax(logits, axis=-1)
    if visible is not None:
        # A fully masked row (padding query) attends to nothing instead of averaging everything.
        probs = jnp.where(visible.any(axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v, preferred_element_type=acc)
    return out.reshape(b, lq, h, d).astype(q.dtype)
