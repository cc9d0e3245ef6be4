"""Flash attention in Pallas: blockwise online softmax, forward and backward (custom VJP).

The semantics are exactly `kernels.attention`'s XLA path: causal by *position* (key j visible to
query i iff `kv_pos[j] <= q_pos[i]`), attention only within equal segment ids, grouped-query heads
(query head h reads kv head `h // (heads // kv_heads)`), a fully masked query row outputs 0.
Inputs may be float32 or bfloat16; logits, softmax statistics and accumulators are float32.

Blocking (shared by every backend): a grid over (batch, head, query block); each program keeps
its query block and runs a loop over key/value blocks with the running max `m`, normaliser `l`
and output accumulator, reading the key/value blocks of its (batch, kv head) by dynamic slices.
The backward recomputes the probabilities from the saved log-sum-exp: one kernel per query block
for dq (loop over key blocks), one per key block for dk and dv (loop over query blocks; GQA sums
the query heads of a group afterwards). Sequences are padded to the block sizes here, padded keys
get a segment id no query has, padded query rows are dropped.

On CPU the kernels run with `interpret=True` (tests); on TPU they lower through Mosaic, on GPU
through Triton.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

NEG = -1e30  # finite "minus infinity": masked logits, the initial running max
PAD_SEGMENT = -1  # segment id of padded keys (no query has it)
# A query/key block is `[block, head_dim]` with the whole head_dim as its minor dimension, which
# Mosaic tiles for any multiple of 8 (lowering checked for 8..256 in f32 and bf16); the MXU is
# fully used from 128.
HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 8, 256


def _pad(x, axis: int, size: int, value=0):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _visible(qseg, kseg, qpos, kpos, causal: bool):
    """qseg/qpos columns `[bq, 1]`, kseg/kpos rows `[1, bk]` -> `[bq, bk]` (no transposes: the
    layouts Mosaic keeps in registers)."""
    vis = qseg == kseg
    if causal:
        vis &= kpos <= qpos
    return vis


def _dot(a, b, contract):
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


# Vectors per position ride as 2-D blocks whose last two dimensions Mosaic can tile: query-side
# ones as columns `[L, 1]`, key-side ones as rows `[1, L]`, softmax statistics as columns.

# -- forward -----------------------------------------------------------------------------------
def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, qpos_ref, kpos_ref, o_ref, lse_ref, *,
                scale: float, causal: bool, block_k: int, num_k_blocks: int):
    q = q_ref[...].astype(jnp.float32)  # [bq, D]
    qseg, qpos = qseg_ref[...], qpos_ref[...]  # [bq, 1]
    bq, d = q.shape

    def body(j, carry):
        m, l, acc = carry
        ks = pl.ds(j * block_k, block_k)
        k = k_ref[ks, :].astype(jnp.float32)
        v = v_ref[ks, :]
        s = _dot(q, k, ((1,), (1,))) * scale  # [bq, bk]
        vis = _visible(qseg, kseg_ref[:, ks], qpos, kpos_ref[:, ks], causal)
        s = jnp.where(vis, s, NEG)
        m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
        p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(axis=-1, keepdims=True)
        acc = alpha * acc + _dot(p.astype(v.dtype), v, ((1,), (0,)))
        return m_new, l, acc

    init = (jnp.full((bq, 1), NEG, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, num_k_blocks, body, init)
    seen = l > 0
    safe = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen, acc / safe, 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe), NEG)


def _specs(bq, lq, lk, d, groups):
    """BlockSpecs over the grid (batch, head, query block)."""
    return dict(
        qblk=pl.BlockSpec((None, None, bq, d), lambda b, h, i: (b, h, i, 0)),
        kfull=pl.BlockSpec((None, None, lk, d), lambda b, h, i: (b, jax.lax.div(h, groups), 0, 0)),
        qcol=pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)),
        krow=pl.BlockSpec((None, 1, lk), lambda b, h, i: (b, 0, 0)),
        stat=pl.BlockSpec((None, None, bq, 1), lambda b, h, i: (b, h, i, 0)))


def _forward(q, k, v, qseg, kseg, qpos, kpos, *, scale, causal, block_q, block_k, interpret):
    """q `[B, H, Lq, D]`, k/v `[B, Hk, Lk, D]`, qseg/qpos `[B, Lq, 1]`, kseg/kpos `[B, 1, Lk]`."""
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    sp = _specs(block_q, Lq, Lk, D, H // Hk)
    kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, block_k=block_k,
                               num_k_blocks=Lk // block_k)
    return pl.pallas_call(
        kernel, grid=(B, H, Lq // block_q),
        in_specs=[sp["qblk"], sp["kfull"], sp["kfull"], sp["qcol"], sp["krow"], sp["qcol"], sp["krow"]],
        out_specs=[sp["qblk"], sp["stat"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, Lq, 1), jnp.float32)],
        interpret=interpret, name="flash_attention_fwd",
    )(q, k, v, qseg, kseg, qpos, kpos)


# -- backward ----------------------------------------------------------------------------------
def _dq_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, qpos_ref, kpos_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, scale, causal, block_k, num_k_blocks):
    q = q_ref[...].astype(jnp.float32)
    do = do_ref[...].astype(jnp.float32)
    lse, delta = lse_ref[...], delta_ref[...]  # [bq, 1]
    qseg, qpos = qseg_ref[...], qpos_ref[...]

    def body(j, dq):
        ks = pl.ds(j * block_k, block_k)
        k = k_ref[ks, :].astype(jnp.float32)
        v = v_ref[ks, :].astype(jnp.float32)
        s = _dot(q, k, ((1,), (1,))) * scale
        vis = _visible(qseg, kseg_ref[:, ks], qpos, kpos_ref[:, ks], causal)
        p = jnp.where(vis, jnp.exp(s - lse), 0.0)
        ds = p * (_dot(do, v, ((1,), (1,))) - delta)
        return dq + _dot(ds, k, ((1,), (0,))) * scale

    dq = jax.lax.fori_loop(0, num_k_blocks, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, kseg_ref, qseg_ref, kpos_ref, qpos_ref,
                dk_ref, dv_ref, *, scale, causal, block_q, num_q_blocks):
    # Transposed scores [bk, bq]: the key side is a block (columns `[bk, 1]`) and the whole query
    # side rides as rows `[1, Lq]` (lse, delta, segments, positions), which VMEM pads 8x, not
    # the 128x a `[Lq, 1]` column costs (11k-token VGGT attention would not fit otherwise).
    k = k_ref[...].astype(jnp.float32)  # [bk, D]
    v = v_ref[...].astype(jnp.float32)
    kseg, kpos = kseg_ref[...], kpos_ref[...]  # [bk, 1]

    def body(i, carry):
        dk, dv = carry
        qs = pl.ds(i * block_q, block_q)
        q = q_ref[qs, :].astype(jnp.float32)
        do = do_ref[qs, :].astype(jnp.float32)
        s_t = _dot(k, q, ((1,), (1,))) * scale  # [bk, bq]
        vis = kseg == qseg_ref[:, qs]  # [bk, bq]
        if causal:
            vis &= kpos <= qpos_ref[:, qs]
        p_t = jnp.where(vis, jnp.exp(s_t - lse_ref[:, qs]), 0.0)
        dv = dv + _dot(p_t, do, ((1,), (0,)))
        ds_t = p_t * (_dot(v, do, ((1,), (1,))) - delta_ref[:, qs])
        dk = dk + _dot(ds_t, q, ((1,), (0,))) * scale
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, num_q_blocks, body, (zeros, zeros))
    dk_ref[...] = dk
    dv_ref[...] = dv


def _backward(q, k, v, qseg, kseg, qpos, kpos, o, lse, do, *, scale, causal, block_q, block_k, interpret):
    B, H, Lq, D = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    groups = H // Hk
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)  # [B, H, Lq, 1]
    sp = _specs(block_q, Lq, Lk, D, groups)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, causal=causal, block_k=block_k, num_k_blocks=Lk // block_k),
        grid=(B, H, Lq // block_q),
        in_specs=[sp["qblk"], sp["kfull"], sp["kfull"], sp["qcol"], sp["krow"], sp["qcol"], sp["krow"],
                  sp["qblk"], sp["stat"], sp["stat"]],
        out_specs=sp["qblk"], out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret, name="flash_attention_dq",
    )(q, k, v, qseg, kseg, qpos, kpos, do, lse, delta)
    # dk, dv per query head over key blocks; a group's query heads are summed below.
    kblk = pl.BlockSpec((None, None, block_k, D), lambda b, h, j: (b, jax.lax.div(h, groups), j, 0))
    kout = pl.BlockSpec((None, None, block_k, D), lambda b, h, j: (b, h, j, 0))
    qfull = pl.BlockSpec((None, None, Lq, D), lambda b, h, j: (b, h, 0, 0))
    srow = pl.BlockSpec((None, None, 1, Lq), lambda b, h, j: (b, h, 0, 0))
    kcol = pl.BlockSpec((None, block_k, 1), lambda b, h, j: (b, j, 0))
    qrow = pl.BlockSpec((None, 1, Lq), lambda b, h, j: (b, 0, 0))
    as_row = lambda x: x.reshape(*x.shape[:-2], 1, x.shape[-2])  # noqa: E731 - [.., L, 1] -> [.., 1, L]
    as_col = lambda x: x.reshape(*x.shape[:-2], x.shape[-1], 1)  # noqa: E731 - [.., 1, L] -> [.., L, 1]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, causal=causal, block_q=block_q, num_q_blocks=Lq // block_q),
        grid=(B, H, Lk // block_k),
        in_specs=[kblk, kblk, qfull, qfull, srow, srow, kcol, qrow, kcol, qrow],
        out_specs=[kout, kout],
        out_shape=[jax.ShapeDtypeStruct((B, H, Lk, D), jnp.float32)] * 2,
        interpret=interpret, name="flash_attention_dkv",
    )(k, v, q, do, as_row(lse), as_row(delta), as_col(kseg), as_row(qseg), as_col(kpos), as_row(qpos))
    dk = dk.reshape(B, Hk, groups, Lk, D).sum(2).astype(k.dtype)
    dv = dv.reshape(B, Hk, groups, Lk, D).sum(2).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _flash(q, k, v, qseg, kseg, qpos, kpos, scale, causal, block_q, block_k, interpret):
    return _forward(q, k, v, qseg, kseg, qpos, kpos, scale=scale, causal=causal, block_q=block_q,
                    block_k=block_k, interpret=interpret)[0]


def _flash_fwd(q, k, v, qseg, kseg, qpos, kpos, scale, causal, block_q, block_k, interpret):
    o, lse = _forward(q, k, v, qseg, kseg, qpos, kpos, scale=scale, causal=causal, block_q=block_q,
                      block_k=block_k, interpret=interpret)
    return o, (q, k, v, qseg, kseg, qpos, kpos, o, lse)


def _flash_bwd(scale, causal, block_q, block_k, interpret, res, do):
    q, k, v, qseg, kseg, qpos, kpos, o, lse = res
    dq, dk, dv = _backward(q, k, v, qseg, kseg, qpos, kpos, o, lse, do, scale=scale, causal=causal,
                           block_q=block_q, block_k=block_k, interpret=interpret)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def supported(q_shape, k_shape) -> str | None:
    """Why the kernel cannot take these shapes (None: it can)."""
    d = q_shape[-1]
    if d % HEAD_DIM_MULTIPLE or d > MAX_HEAD_DIM:
        return f"head_dim {d} (the kernel takes multiples of {HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM})"
    if q_shape[2] % k_shape[2]:
        return f"{q_shape[2]} query heads are not a multiple of {k_shape[2]} kv heads"
    return None


def flash_attention(q, k, v, *, causal: bool = False, q_segment_ids=None, kv_segment_ids=None,
                    q_positions=None, kv_positions=None, scale: float | None = None,
                    block_q: int = 128, block_k: int = 128, interpret: bool | None = None) -> jax.Array:
    """`attention`'s semantics (see module doc) with the Pallas kernels. q `[B, Lq, H, D]`,
    k/v `[B, Lk, Hk, D]` -> `[B, Lq, H, D]` in q's dtype. Lengths are padded to the blocks;
    `interpret` defaults to True off TPU/GPU."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if interpret is None:
        interpret = jax.default_backend() not in ("tpu", "gpu")
    scale = D**-0.5 if scale is None else float(scale)
    bq, bk = min(block_q, _round_up(Lq, 8)), min(block_k, _round_up(Lk, 8))
    lq, lk = _round_up(Lq, bq), _round_up(Lk, bk)
    qpos = jnp.broadcast_to(jnp.arange(Lq) + (Lk - Lq) if q_positions is None else q_positions, (B, Lq))
    kpos = jnp.broadcast_to(jnp.arange(Lk) if kv_positions is None else kv_positions, (B, Lk))
    qseg = jnp.zeros((B, Lq), jnp.int32) if q_segment_ids is None else q_segment_ids
    kseg = jnp.zeros((B, Lk), jnp.int32) if kv_segment_ids is None else kv_segment_ids
    t = lambda x, n: _pad(jnp.swapaxes(x, 1, 2), 2, n)  # noqa: E731 - [B, L, H, D] -> [B, H, L, D]
    col = lambda x, n, fill=0: _pad(x.astype(jnp.int32), 1, n, fill)[:, :, None]  # noqa: E731 [B, L, 1]
    row = lambda x, n, fill=0: _pad(x.astype(jnp.int32), 1, n, fill)[:, None, :]  # noqa: E731 [B, 1, L]
    o = _flash(t(q, lq), t(k, lk), t(v, lk), col(qseg, lq), row(kseg, lk, PAD_SEGMENT), col(qpos, lq),
               row(kpos, lk), scale, bool(causal), bq, bk, bool(interpret))
    return jnp.swapaxes(o[:, :, :Lq], 1, 2)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


__all__ = ["MAX_HEAD_DIM", "flash_attention", "supported"]
