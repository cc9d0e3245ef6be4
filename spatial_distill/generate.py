"""KV-cache decoding for the Llama decoder: one prefill call, then a jitted decode loop.

Prompts enter as embeddings, because the student's prefix is vision tokens + latent tokens + the
question, not token ids. Prompts are left-padded (`prompt_mask` True on real tokens), so every
row's last prompt token sits in the last column and every row writes its next token to the same
cache slot; per-row RoPE positions come from the mask's cumulative sum.

    tokens, lengths = generate(model, embeds, mask, max_new_tokens=32, eos_id=2, pad_id=0)

Shapes are static: the cache holds `prompt_len + max_new_tokens` slots, and the decode loop is a
`lax.while_loop` that stops early once every row has emitted `eos_id`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_distill.models.llama import KVCache, Llama, LlamaConfig


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache: k/v `[layers, batch, max_len, kv_heads, head_dim]` (scanned layers) or a
    tuple of per-layer `[batch, max_len, kv_heads, head_dim]`, zero segment ids (= empty)."""
    if max_len > config.max_position_embeddings:
        raise ValueError(f"cache length {max_len} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings}; shorten the prompt or max_new_tokens")
    dtype = config.dtype if dtype is None else jnp.dtype(dtype)
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    if config.scan_layers:
        k = jnp.zeros((config.num_layers, *shape), dtype)
        v = jnp.zeros((config.num_layers, *shape), dtype)
    else:
        k = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
        v = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    zeros = jnp.zeros((batch, max_len), jnp.int32)
    return KVCache(k, v, zeros, zeros, jnp.zeros((batch,), jnp.int32))


def repeat_cache(cache: KVCache, times: int) -> KVCache:
    """Each row of `cache` repeated `times` times in place (row r -> rows r*times .. r*times +
    times - 1): one prefix shared by several continuations, e.g. every question of a scene."""
    rep = lambda x: jnp.repeat(x, times, axis=0)
    if isinstance(cache.k, tuple):
        k, v = tuple(map(rep, cache.k)), tuple(map(rep, cache.v))
    else:  # scanned layers: [layers, batch, ...]
        k, v = jnp.repeat(cache.k, times, axis=1), jnp.repeat(cache.v, times, axis=1)
    return KVCache(k, v, rep(cache.segment_ids), rep(cache.positions), rep(cache.lengths))


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """`[B, L]` bool -> `[B, L]` int32: 0, 1, 2, ... over real tokens (padding gets 0)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def sample_token(logits: jax.Array, rng: jax.Array | None, temperature, top_p) -> jax.Array:
    """logits `[B, V]` -> token ids `[B]` int32. A Python temperature of 0 is greedy (argmax);
    otherwise softmax(logits / temperature) restricted to the smallest set of top tokens whose
    mass reaches top_p (the most likely token is always kept). temperature and top_p may be
    traced, so one compiled decode loop serves every setting."""
    if isinstance(temperature, (int, float)) and temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    # Mass strictly before each token; top_p = 1 keeps everything, rounding notwithstanding.
    keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p) | (top_p >= 1.0)
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill(graphdef, state, embeds, mask, max_len):
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.config, embeds.shape[0], max_len)
    h, cache = model.hidden(embeds, positions=positions_from_mask(mask),
                            segment_ids=mask.astype(jnp.int32), cache=cache, cache_index=0)
    return model.logits(h[:, -1:])[:, 0], cache


def prefill(model: Llama, prompt_embeds: jax.Array, prompt_mask: jax.Array,
            max_len: int) -> tuple[jax.Array, KVCache]:
    """Runs the left-padded prompt `[B, P, D]` once into a fresh cache of `max_len` slots.
    Returns (logits of the next token `[B, V]` float32, cache with slots `[0, P)` filled)."""
    graphdef, state = nnx.split(model)
    return _prefill(graphdef, state, prompt_embeds, jnp.asarray(prompt_mask, bool), max_len)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy"))
def _decode(graphdef, state, logits, cache, cache_index, rng, max_new_tokens, eos_id, pad_id,
            greedy, temperature, top_p):
    batch = logits.shape[0]
    temperature = 0.0 if greedy else temperature
    rng, key = jax.random.split(rng)
    first = sample_token(logits, key, temperature, top_p)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    # The parameters ride in the loop state: NNX refuses to rebuild a module inside the loop
    # from arrays of the enclosing trace. XLA passes loop-invariant values through uncopied.
    carry = (jnp.int32(1), first, first == eos_id, tokens, jnp.ones((batch,), jnp.int32),
             cache, rng, state)

    def cond(carry):
        t, _, done, *_ = carry
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        t, previous, done, tokens, lengths, cache, rng, state = carry
        model = nnx.merge(graphdef, state)
        # Every row feeds a token (finished rows feed their last, a valid id) so shapes stay
        # static; what finished rows compute is discarded below.
        h, cache = model.hidden(model.embed(previous[:, None]), positions=cache.lengths[:, None],
                                cache=cache, cache_index=cache_index + t - 1)
        rng, key = jax.random.split(rng)
        sampled = sample_token(model.logits(h)[:, 0], key, temperature, top_p)
        tokens = tokens.at[:, t].set(jnp.where(done, pad_id, sampled))
        lengths = lengths + (~done).astype(jnp.int32)
        return t + 1, sampled, done | (sampled == eos_id), tokens, lengths, cache, rng, state

    _, _, _, tokens, lengths, *_ = jax.lax.while_loop(cond, body, carry)
    return tokens, lengths


def decode(model: Llama, logits: jax.Array, cache: KVCache, cache_index, *, max_new_tokens: int,
           eos_id: int, pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
           rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Samples `max_new_tokens` tokens after `prefill`; the first from `logits` `[B, V]`, each
    later one after feeding the previous into cache slot `cache_index + t - 1`.
    Returns (tokens `[B, max_new_tokens]` int32, pad_id after EOS; lengths `[B]` int32 counting
    the emitted tokens including EOS)."""
    rng = jax.random.key(0) if rng is None else rng  # unused by greedy decoding
    graphdef, state = nnx.split(model)
    return _decode(graphdef, state, logits, cache, jnp.asarray(cache_index, jnp.int32), rng,
                   max_new_tokens, jnp.int32(eos_id), jnp.int32(pad_id), temperature == 0.0,
                   jnp.float32(temperature), jnp.float32(top_p))


def generate(model: Llama, prompt_embeds: jax.Array, prompt_mask: jax.Array, *,
             max_new_tokens: int, eos_id: int, pad_id: int, temperature: float = 0.0,
             top_p: float = 1.0, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Continues left-padded prompts.

    Args:
      prompt_embeds: `[B, P, D]` (e.g. `model.embed(ids)`, or vision + latent + text tokens).
      prompt_mask: `[B, P]` bool, True on real tokens, padding on the left only.
      temperature: 0 = greedy; > 0 samples (needs `rng`), restricted to nucleus `top_p`.
    Returns (tokens `[B, max_new_tokens]` int32 with pad_id after EOS, lengths `[B]` int32).
    """
    B, P = prompt_embeds.shape[:2]
    if prompt_mask.shape != (B, P):
        raise ValueError(f"prompt_mask shape {prompt_mask.shape} != prompt_embeds' {(B, P)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if temperature > 0.0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an explicit rng, e.g. jax.random.key(0)")
    if not isinstance(prompt_mask, jax.core.Tracer):
        m = np.asarray(prompt_mask, bool)
        if not m[:, -1].all():
            raise ValueError(f"rows {np.flatnonzero(~m[:, -1]).tolist()} of prompt_mask end in "
                             "padding (or are empty); prompts must be left-padded")
        if (np.diff(m.astype(np.int8), axis=1) < 0).any():
            raise ValueError("prompt_mask has padding after a real token; pad on the left only")
    total = P + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} = {total} exceeds "
                         f"max_position_embeddings {model.config.max_position_embeddings}")
    logits, cache = prefill(model, prompt_embeds, prompt_mask, total)
    return decode(model, logits, cache, P, max_new_tokens=max_new_tokens, eos_id=eos_id,
                  pad_id=pad_id, temperature=temperature, top_p=top_p, rng=rng)


def generate_from_ids(model: Llama, prompt_ids: jax.Array, prompt_mask: jax.Array,
                      **kwargs) -> tuple[jax.Array, jax.Array]:
    """`generate` on token ids `[B, P]` (left-padded; padding ids must be valid ids)."""
    return generate(model, model.embed(jnp.asarray(prompt_ids)), prompt_mask, **kwargs)


__all__ = ["decode", "generate", "generate_from_ids", "init_cache", "positions_from_mask",
           "prefill", "repeat_cache", "sample_token"]
