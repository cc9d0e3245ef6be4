"""The one attention entry point every model calls (DESIGN.md §6).

`attention(q, k, v, ..., implementation=SPEC)` dispatches on SPEC = `kind[:BQxBK]`:

  xla     the plain reference below (any shape, mask or dtype);
  pallas  our flash-attention kernel (`flash_attention.py`): Mosaic on TPU, Triton on GPU,
          interpreted on CPU, so it is testable everywhere;
  splash  JAX's own TPU splash kernel (`jax.experimental.pallas.ops.tpu.splash_attention`),
          interpreted off TPU;
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")` (GPU, bf16/fp16 only);
  auto    pallas on TPU, cudnn on GPU, xla on CPU.

`:BQxBK` sets the kernels' query and key block sizes (e.g. `pallas:256x128`; splash needs
multiples of 128); the default is 128x128 (64x64 for pallas on a GPU). A case an implementation does not
cover (an explicit boolean `mask`, a head_dim the kernel lacks, explicit positions with
splash's static causal mask, cudnn off GPU or in float32) falls back to XLA with one warning
naming the reason, never silently wrong.

Under a mesh (`sharding.axis_rules`), the Pallas kernels run per shard (`jax.shard_map`: batch
over the rules' `activation_batch` axes, heads over `activation_heads` when both head counts
divide), because GSPMD cannot partition a custom call and would gather its inputs onto every
device.

Layout: q `[batch, q_len, heads, head_dim]`, k and v `[batch, kv_len, kv_heads, head_dim]` with
`heads % kv_heads == 0` (grouped-query attention: head h reads kv head `h // (heads // kv_heads)`).
"""

from __future__ import annotations

import functools
import re
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from spatial_distill import sharding

IMPLEMENTATIONS = ("xla", "pallas", "splash", "cudnn", "auto")
DEFAULT_BLOCKS = (128, 128)
# Our kernel through Triton on a GPU: 128 x 128 blocks at head_dim 128 ask for 290 KiB of shared
# memory (an H200 has 227 KiB), and 64 x 64 ran 1.9x faster at head_dim 64 (docs/benchmarks.md).
GPU_DEFAULT_BLOCKS = (64, 64)
SPLASH_LANES = 128  # splash's blocks are whole vector lanes
_SPEC = re.compile(r"^([a-z]+)(?::(\d+)x(\d+))?$")
_WARNED: set[str] = set()


def parse(spec: str) -> tuple[str, tuple[int, int]]:
    """`"pallas:256x128"` -> `("pallas", (256, 128))`; a bare kind gets `DEFAULT_BLOCKS`.
    Raises ValueError naming the spec and what is allowed."""
    m = _SPEC.match(str(spec))
    if m is None or m.group(1) not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {spec!r} is not available; choose one of "
                         f"{IMPLEMENTATIONS}, optionally with block sizes as kind:BQxBK (pallas:256x128)")
    kind = m.group(1)
    if m.group(2) is None:
        return kind, DEFAULT_BLOCKS
    blocks = (int(m.group(2)), int(m.group(3)))
    if kind not in ("pallas", "splash", "auto"):
        raise ValueError(f"attention implementation {spec!r}: block sizes apply to pallas, splash "
                         f"and auto only")
    if min(blocks) < 8 or any(b % 8 for b in blocks):
        raise ValueError(f"attention implementation {spec!r}: block sizes must be positive "
                         f"multiples of 8")
    if kind == "splash" and any(b % SPLASH_LANES for b in blocks):
        raise ValueError(f"attention implementation {spec!r}: splash needs blocks that are "
                         f"multiples of {SPLASH_LANES}")
    return kind, blocks


def resolve(kind: str, backend: str | None = None) -> str:
    """The concrete kind `auto` stands for on `backend` (the default backend when None)."""
    if kind != "auto":
        return kind
    return {"tpu": "pallas", "gpu": "cudnn"}.get(backend or jax.default_backend(), "xla")


def default_blocks(kind: str, platform: str) -> tuple[int, int]:
    """The (query, key) block sizes of a spec that names none."""
    return GPU_DEFAULT_BLOCKS if kind == "pallas" and platform == "gpu" else DEFAULT_BLOCKS


def target_platform() -> str:
    """The platform the code is traced for: the active mesh's devices (an AOT compile for a TPU
    topology traces on a CPU host), else the default backend."""
    active = sharding.active()
    return active[0].devices.flat[0].platform if active is not None else jax.default_backend()


def _fallback(kind: str, reason: str) -> None:
    key = f"{kind}: {reason}"
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(f"attention: {kind} does not cover {reason}; using XLA attention", stacklevel=3)


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
    kind, blocks = parse(implementation)
    platform = target_platform()
    kind = resolve(kind, platform)
    blocks = default_blocks(kind, platform) if ":" not in str(implementation) else blocks
    _check_shapes(q, k, v)
    why = _uncovered(kind, platform, q, k, causal, mask, q_positions, kv_positions)
    if kind != "xla" and why is None:
        kw = dict(causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                  q_positions=q_positions, kv_positions=kv_positions, scale=scale)
        if kind == "cudnn":
            return jax_nn_attention(q, k, v, implementation="cudnn", **kw)
        interpret = platform != "tpu" and (kind == "splash" or platform != "gpu")
        return _per_shard(functools.partial(_kernel, kind=kind, blocks=blocks, interpret=interpret),
                          q, k, v, **kw)
    if why is not None:
        _fallback(kind, why)
    return xla_attention(q, k, v, causal=causal, mask=mask, q_segment_ids=q_segment_ids,
                         kv_segment_ids=kv_segment_ids, q_positions=q_positions,
                         kv_positions=kv_positions, scale=scale)


def fallback_reason(q, k, *, causal: bool = False, mask=None, q_positions=None, kv_positions=None,
                    implementation: str = "xla") -> str | None:
    """Why `attention` with these arguments would run XLA instead of `implementation` here
    (None: it runs the implementation asked for)."""
    platform = target_platform()
    return _uncovered(resolve(parse(implementation)[0], platform), platform, q, k, causal, mask,
                      q_positions, kv_positions)


def _uncovered(kind, platform, q, k, causal, mask, q_positions, kv_positions) -> str | None:
    if kind == "xla":
        return None
    if mask is not None:
        return "an explicit boolean mask"
    if kind == "pallas":
        from spatial_distill.kernels import flash_attention

        return flash_attention.supported(q.shape, k.shape)
    if kind == "splash":
        return _splash_unsupported(q, k, causal, q_positions, kv_positions)
    return _cudnn_unsupported(q, platform)


def _check_shapes(q, k, v) -> None:
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not agree "
                         "(expected q [batch, q_len, heads, head_dim], k = v [batch, kv_len, kv_heads, head_dim])")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")


def xla_attention(q, k, v, *, causal=False, mask=None, q_segment_ids=None, kv_segment_ids=None,
                  q_positions=None, kv_positions=None, scale=None) -> jax.Array:
    """The reference: `attention`'s semantics in plain XLA ops (`[b, h, q, k]` logits)."""
    b, lq, h, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale

    groups = h // hk
    qg = q.reshape(b, lq, hk, groups, d)
    # Logits and softmax in at least float32 (bf16 softmax loses mass; float64 stays float64).
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=acc)
    logits = logits * jnp.asarray(scale, acc)

    visible = _visibility(b, lq, lk, causal, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
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


# -- the other implementations ------------------------------------------------------------------
def _splash_unsupported(q, k, causal, q_positions, kv_positions) -> str | None:
    if causal and (q_positions is not None or kv_positions is not None):
        return "causal attention by explicit positions (its causal mask is static)"
    if q.shape[-1] % 8:
        return f"head_dim {q.shape[-1]} (not a multiple of 8)"
    return None


def _cudnn_unsupported(q, platform: str) -> str | None:
    if platform != "gpu":
        return f"the {platform} backend (cudnn needs a GPU)"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"{q.dtype} inputs (cudnn attention takes bfloat16 or float16)"
    if q.shape[-1] % 8 or q.shape[-1] > 128:
        return f"head_dim {q.shape[-1]} (cudnn takes multiples of 8 up to 128)"
    return None


def _visibility(b, lq, lk, causal, q_segment_ids, kv_segment_ids, q_positions, kv_positions):
    """Boolean `[b, lq, lk]`: key j visible to query i (None when everything is visible).
    Reduced at once (`.any(-1)`: does each query see a key?) it fuses and nothing `[lq, lk]`
    stays live."""
    visible = None
    if causal:
        qp = jnp.arange(lq) + (lk - lq) if q_positions is None else q_positions
        kp = jnp.arange(lk) if kv_positions is None else kv_positions
        qp = jnp.broadcast_to(qp, (b, lq)) if qp.ndim == 1 else qp
        kp = jnp.broadcast_to(kp, (b, lk)) if kp.ndim == 1 else kp
        visible = kp[:, None, :] <= qp[:, :, None]
    if q_segment_ids is not None or kv_segment_ids is not None:
        qs = jnp.zeros((b, lq), jnp.int32) if q_segment_ids is None else q_segment_ids
        ks = jnp.zeros((b, lk), jnp.int32) if kv_segment_ids is None else kv_segment_ids
        seg = qs[:, :, None] == ks[:, None, :]
        visible = seg if visible is None else visible & seg
    return visible


def jax_nn_attention(q, k, v, *, implementation: str, causal=False, q_segment_ids=None,
                     kv_segment_ids=None, q_positions=None, kv_positions=None, scale=None):
    """`attention`'s semantics through `jax.nn.dot_product_attention` (cudnn on GPU; the tests
    run the same argument construction with its xla implementation). Its `is_causal` is
    top-left aligned, so right-aligned or position-based causality and segments become a mask;
    rows that see no key are zeroed (the library would average them)."""
    b, lq, _, d = q.shape
    lk = k.shape[1]
    plain_causal = causal and lq == lk and q_positions is None and kv_positions is None
    visible = _visibility(b, lq, lk, causal and not plain_causal, q_segment_ids, kv_segment_ids,
                          q_positions, kv_positions)
    any_key = None
    if visible is not None:
        any_key = (visible & jnp.tril(jnp.ones((lq, lk), bool)) if plain_causal else visible).any(-1)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=None if visible is None else visible[:, None], scale=d**-0.5 if scale is None else scale,
        is_causal=plain_causal, implementation=implementation)
    return out if any_key is None else jnp.where(any_key[:, :, None, None], out, 0).astype(q.dtype)


def _kernel(q, k, v, *, kind, blocks, interpret, **kw):
    if kind == "pallas":
        from spatial_distill.kernels import flash_attention

        return flash_attention.flash_attention(q, k, v, block_q=blocks[0], block_k=blocks[1],
                                               interpret=interpret, **kw)
    return splash_attention(q, k, v, block_q=blocks[0], block_k=blocks[1], interpret=interpret, **kw)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def splash_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                     q_positions=None, kv_positions=None, scale=None, block_q=128, block_k=128,
                     interpret: bool | None = None) -> jax.Array:
    """`attention`'s semantics with JAX's splash kernel (default positions only when causal).

    Lengths are padded to the blocks; padded keys and queries get a segment id no real token has
    (-1), so no real query sees a padded key and the padded rows, dropped after, see each other.
    The kernel takes `[heads, len, head_dim]` per example (vmapped over the batch) and no scale,
    so q is scaled first; rows that see no key are zeroed (splash would average them)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    del q_positions, kv_positions  # only meaningful when causal, which `attention` routes to XLA
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    # Both blocks are whole lanes (its backward tiles segment ids along lanes on either side).
    bq = _round_up(min(block_q, _round_up(lq, SPLASH_LANES)), SPLASH_LANES)
    bk = _round_up(min(block_k, _round_up(lk, SPLASH_LANES)), SPLASH_LANES)
    plq, plk = _round_up(lq, bq), _round_up(lk, bk)
    any_key = None
    if q_segment_ids is not None or kv_segment_ids is not None or (causal and lq > lk):
        any_key = _visibility(b, lq, lk, causal, q_segment_ids, kv_segment_ids, None, None).any(-1)
    segments = None
    if q_segment_ids is not None or kv_segment_ids is not None or plq != lq or plk != lk:
        qs = jnp.zeros((b, lq), jnp.int32) if q_segment_ids is None else q_segment_ids.astype(jnp.int32)
        ks = jnp.zeros((b, lk), jnp.int32) if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
        segments = sk.SegmentIds(q=jnp.pad(qs, ((0, 0), (0, plq - lq)), constant_values=-1),
                                 kv=jnp.pad(ks, ((0, 0), (0, plk - lk)), constant_values=-1))
    scale = d**-0.5 if scale is None else scale
    to_heads = lambda x, n: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, n - x.shape[1]), (0, 0)))  # noqa: E731
    qh = to_heads((q.astype(jnp.float32) * scale).astype(q.dtype), plq)
    kh, vh = to_heads(k, plk), to_heads(v, plk)
    # Causal keeps the XLA path's right alignment: query i sees key j iff j <= i + (lk - lq).
    one = sm.CausalMask((plq, plk), offset=lk - lq) if causal else sm.FullMask((plq, plk))
    blocks = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                           block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([one] * h), block_sizes=blocks, head_shards=1,
                                q_seq_shards=1, interpret=interpret)
    if segments is None:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:
        out = jax.vmap(kernel)(qh, kh, vh, segments)
    out = jnp.swapaxes(out[:, :, :lq], 1, 2).astype(q.dtype)
    return out if any_key is None else jnp.where(any_key[:, :, None, None], out, 0).astype(q.dtype)


def _per_shard(fn, q, k, v, **kw):
    """Runs `fn` per shard of the active mesh (module doc); directly when no mesh is active."""
    active = sharding.active()
    if active is None:
        return fn(q, k, v, **kw)
    mesh, rules = active
    spec = lambda name, size: sharding.divisible(sharding.logical_to_spec((name,), rules), (size,), mesh)[0]  # noqa: E731
    batch = spec("activation_batch", q.shape[0])
    heads = spec("activation_heads", q.shape[2])
    if heads is not None and spec("activation_heads", k.shape[2]) != heads:
        heads = None  # kv heads the axis does not divide: keep both whole, or GQA's map breaks
    arrays = {name: x for name, x in kw.items() if isinstance(x, jax.Array) and x.ndim >= 1}
    static = {name: x for name, x in kw.items() if name not in arrays}
    vec = lambda x: PartitionSpec(batch, *([None] * (x.ndim - 1))) if x.ndim == 2 else PartitionSpec()  # noqa: E731

    def local(q, k, v, arrays):
        return fn(q, k, v, **arrays, **static)

    return jax.shard_map(
        local, mesh=mesh, check_vma=False,
        in_specs=(PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None, heads, None),
                  PartitionSpec(batch, None, heads, None), {n: vec(x) for n, x in arrays.items()}),
        out_specs=PartitionSpec(batch, None, heads, None))(q, k, v, arrays)
