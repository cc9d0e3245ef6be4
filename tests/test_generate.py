"""KV-cache generation: equality with a no-cache argmax loop, EOS handling, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spatial_distill import generate as gen
from spatial_distill.models import llama
from tests.test_llama import random_model

CONFIG = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
              num_kv_heads=2, rope_theta=10000.0, max_position_embeddings=40)
PROMPT_LENS = (3, 7, 10)  # batch of 3, left-padded to 10
P, N = 10, 8


@pytest.fixture(scope="module")
def models():
    scanned = random_model(llama.LlamaConfig(**CONFIG), seed=11)
    looped = llama.from_hf(llama.to_hf_state_dict(scanned),
                           {**CONFIG, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "num_key_value_heads": 2}, scan_layers=False)
    return {True: scanned, False: looped}


@pytest.fixture(scope="module")
def prompts():
    rs = np.random.RandomState(0)
    rows = [rs.randint(0, CONFIG["vocab_size"], n) for n in PROMPT_LENS]
    ids = np.zeros((3, P), np.int32)  # pad id 0 on the left
    mask = np.zeros((3, P), bool)
    for b, r in enumerate(rows):
        ids[b, P - len(r):], mask[b, P - len(r):] = r, True
    return rows, ids, mask


@pytest.fixture(scope="module")
def reference(models, prompts):
    """Greedy continuation without a cache: the full model re-run on each row's growing,
    unpadded sequence (right-padded to one length, which causal attention cannot see)."""
    model, (rows, _, _) = models[False], prompts
    forward = nnx.jit(lambda m, t: m(t))
    out = []
    for r in rows:
        seq = list(r)
        for _ in range(N):
            buf = np.zeros((1, P + N), np.int32)
            buf[0, : len(seq)] = seq
            with jax.default_matmul_precision("highest"):
                logits = np.asarray(forward(model, jnp.asarray(buf)))[0, len(seq) - 1]
            assert np.sort(logits)[-1] - np.sort(logits)[-2] > 1e-3  # no near-tie to flip
            seq.append(int(np.argmax(logits)))
        out.append(seq[len(r):])
    return np.array(out)


def _generate(model, ids, mask, **kw):
    kw = {"max_new_tokens": N, "eos_id": -1, "pad_id": 0, **kw}
    with jax.default_matmul_precision("highest"):
        tokens, lengths = gen.generate_from_ids(model, ids, mask, **kw)
    return np.asarray(tokens), np.asarray(lengths)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_greedy_matches_no_cache_loop(models, prompts, reference, scan_layers):
    _, ids, mask = prompts
    tokens, lengths = _generate(models[scan_layers], ids, mask)
    np.testing.assert_array_equal(tokens, reference)
    np.testing.assert_array_equal(lengths, [N, N, N])
    assert len({tuple(r) for r in reference}) == 3  # rows really differ


def test_eos_stops_a_row_and_pads(models, prompts, reference):
    _, ids, mask = prompts
    # EOS = the token row 0 emits at step 2 (first occurrence), so row 0 stops after 3 tokens.
    eos = int(reference[0, 2])
    assert eos not in reference[0, :2]
    tokens, lengths = _generate(models[True], ids, mask, eos_id=eos, pad_id=-7)
    for b in range(3):
        hits = np.flatnonzero(reference[b] == eos)
        n = hits[0] + 1 if hits.size else N
        assert lengths[b] == n
        np.testing.assert_array_equal(tokens[b, :n], reference[b, :n])
        assert (tokens[b, n:] == -7).all()
    assert lengths[0] == 3


def test_every_row_at_eos_after_one_token(models, prompts, reference):
    _, ids, mask = prompts
    same = np.repeat(ids[:1], 3, axis=0), np.repeat(mask[:1], 3, axis=0)
    tokens, lengths = _generate(models[True], *same, eos_id=int(reference[0, 0]))
    np.testing.assert_array_equal(lengths, [1, 1, 1])
    np.testing.assert_array_equal(tokens, [[reference[0, 0]] + [0] * (N - 1)] * 3)


def test_top_p_tiny_is_greedy(models, prompts, reference):
    _, ids, mask = prompts
    tokens, _ = _generate(models[True], ids, mask, temperature=1.0, top_p=1e-6,
                          rng=jax.random.key(3))
    np.testing.assert_array_equal(tokens, reference)


def test_sampling_is_deterministic_per_rng(models, prompts, reference):
    _, ids, mask = prompts
    kw = dict(temperature=2.0, top_p=0.95)
    a, _ = _generate(models[True], ids, mask, rng=jax.random.key(0), **kw)
    b, _ = _generate(models[True], ids, mask, rng=jax.random.key(0), **kw)
    c, _ = _generate(models[True], ids, mask, rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != reference).any()
    assert ((a >= 0) & (a < CONFIG["vocab_size"])).all()


def test_top_p_keeps_only_the_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.tile(np.log(probs), (4000, 1)))
    draws = np.asarray(gen.sample_token(logits, jax.random.key(0), 1.0, 0.7))
    counts = np.bincount(draws, minlength=4)
    assert counts[2:].sum() == 0  # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are cut
    assert abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03
    full = np.bincount(np.asarray(gen.sample_token(logits, jax.random.key(0), 1.0, 1.0)),
                       minlength=4) / 4000
    np.testing.assert_allclose(full, probs, atol=0.03)


def test_cached_chunks_equal_one_pass(models):
    """Prompt in two cache calls (4 + 6 tokens) gives the hidden states of one full pass."""
    model = models[True]
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 96, (2, 10)))
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    x = model.embed(ids)

    @nnx.jit
    def run(model, x):
        full, _ = model.hidden(x, positions=pos)
        cache = gen.init_cache(model.config, 2, 12)
        h1, cache = model.hidden(x[:, :4], positions=pos[:, :4], cache=cache, cache_index=0)
        h2, cache = model.hidden(x[:, 4:], positions=pos[:, 4:], cache=cache, cache_index=4)
        return full, h1, h2, cache

    with jax.default_matmul_precision("highest"):
        full, h1, h2, cache = run(model, x)
    np.testing.assert_allclose(np.concatenate([h1, h2], 1), full, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(cache.lengths, [10, 10])
    np.testing.assert_array_equal(cache.segment_ids[:, 10:], 0)
    with pytest.raises(ValueError, match="cannot take 6 tokens at index 8"):
        model.hidden(x[:, 4:], positions=pos[:, 4:], cache=cache, cache_index=8)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_repeated_prefix_cache_equals_full_sequences(models, scan_layers):
    """A prefix cached once and repeated 3x, then 3 different continuations, gives what each
    full sequence gives: the layout `Student` trains with (one scene, many questions)."""
    model = models[scan_layers]
    r = np.random.RandomState(2)
    prefix = jnp.asarray(r.randint(0, 96, (2, 5)))
    tails = jnp.asarray(r.randint(0, 96, (6, 4)))  # row 3b + j continues prefix b
    full_ids = jnp.concatenate([jnp.repeat(prefix, 3, axis=0), tails], axis=1)

    @nnx.jit
    def run(model):
        pos = jnp.broadcast_to(jnp.arange(9), (6, 9))
        full, _ = model.hidden(model.embed(full_ids), positions=pos)
        cache = gen.init_cache(model.config, 2, 9)
        _, cache = model.hidden(model.embed(prefix), positions=pos[:2, :5], cache=cache,
                                cache_index=0)
        cache = gen.repeat_cache(cache, 3)
        tail, cache = model.hidden(model.embed(tails), positions=pos[:, 5:], cache=cache,
                                   cache_index=5)
        return full, tail, cache

    with jax.default_matmul_precision("highest"):
        full, tail, cache = run(model)
    np.testing.assert_allclose(tail, full[:, 5:], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(cache.lengths, [9] * 6)


def test_bad_arguments(models, prompts):
    model, (_, ids, mask) = models[True], prompts
    right_padded = mask[:, ::-1]
    with pytest.raises(ValueError, match="left-padded"):
        gen.generate_from_ids(model, ids, right_padded, max_new_tokens=2, eos_id=1, pad_id=0)
    gap = mask.copy()
    gap[2, 5] = False
    with pytest.raises(ValueError, match="pad on the left only"):
        gen.generate_from_ids(model, ids, gap, max_new_tokens=2, eos_id=1, pad_id=0)
    with pytest.raises(ValueError, match="explicit rng"):
        gen.generate_from_ids(model, ids, mask, max_new_tokens=2, eos_id=1, pad_id=0,
                              temperature=0.5)
    with pytest.raises(ValueError, match=r"10 \+ max_new_tokens 31 = 41 exceeds .* 40"):
        gen.generate_from_ids(model, ids, mask, max_new_tokens=31, eos_id=1, pad_id=0)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate_from_ids(model, ids, mask, max_new_tokens=2, eos_id=1, pad_id=0, top_p=0.0)
