import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from spatial_distill.models import word_tags


class WordTokenizer:
    """Whitespace tokenizer over a fixed word list (id = index + 4)."""

    def __init__(self, words):
        self.words = list(words)

    def encode(self, text):
        return [self.words.index(w) + 4 for w in text.split()]


TOKENIZER = WordTokenizer(["box", "sphere", "cylinder", "red", "blue", "light", "green"])
COLOURS = {"red": (0.5, 0.05, 0.05), "blue": (0.05, 0.1, 0.5), "light green": (0.3, 0.6, 0.3)}


def config(**options):
    return word_tags.resolve(TOKENIZER, ("box", "sphere", "cylinder"), COLOURS, num_classes=3,
                             vocab_size=16, **options)


def test_resolve_names_ids_and_rejects_bad_words():
    cfg = config(gain=2.0)
    assert cfg.class_ids == ((4,), (5,), (6,))
    assert cfg.colour_ids == ((7,), (8,), (9, 10))  # a two-token name keeps both ids
    assert cfg.colour_prototypes[2] == (0.3, 0.6, 0.3) and cfg.gain == 2.0
    with pytest.raises(ValueError, match="has 2 names .* predicts 3 classes"):
        word_tags.resolve(TOKENIZER, ("box", "sphere"), COLOURS, num_classes=3, vocab_size=16)
    with pytest.raises(ValueError, match=r"'sphere' encodes to \[5\], not ids in \[0, 5\)"):
        word_tags.resolve(TOKENIZER, ("box", "sphere", "cylinder"), {}, num_classes=3, vocab_size=5)
    with pytest.raises(ValueError, match="2 colour names but 1 prototypes"):
        word_tags.WordTagConfig(class_ids=((1,),), colour_ids=((2,), (3,)), colour_prototypes=((0, 0, 0),))


def test_tags_keys_and_colour_probabilities_match_numpy():
    cfg = config(gain=3.0, colour_temperature=0.01)
    r = np.random.default_rng(0)
    emb = r.normal(size=(16, 8)).astype(np.float32)
    objectness = r.uniform(size=(2, 5)).astype(np.float32)
    class_probs = r.dirichlet(np.ones(3), size=(2, 5)).astype(np.float32)
    rgb = r.uniform(size=(2, 5, 3)).astype(np.float32)

    proto = np.array(list(COLOURS.values()))
    d2 = ((rgb[..., None, :] - proto) ** 2).sum(-1)
    p = np.exp(-(d2 - d2.min(-1, keepdims=True)) / 0.01)
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(word_tags.colour_probs(jnp.asarray(rgb), cfg)), p, atol=1e-5)

    colour_rows = np.stack([emb[7], emb[8], (emb[9] + emb[10]) / 2])
    want_words = class_probs @ emb[4:7] + p @ colour_rows
    args = (jnp.asarray(objectness), jnp.asarray(class_probs), jnp.asarray(rgb), jnp.asarray(emb), cfg)
    np.testing.assert_allclose(np.asarray(word_tags.tags(*args)),
                               3.0 * objectness[..., None] * want_words, rtol=1e-5, atol=1e-5)
    unit = want_words / np.linalg.norm(want_words, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(word_tags.keys(*args)), objectness[..., None] * unit,
                               rtol=1e-5, atol=1e-5)


def test_question_words_retrieve_the_token_they_name():
    from spatial_distill.models import student as st
    from tests.test_student import B, object_cfg

    cfg = object_cfg(vision_pool="objects4")
    cfg = dataclasses.replace(cfg, word_tags=word_tags.WordTagConfig(
        class_ids=((4,), (5,), (6,)), retrieve_temperature=0.01, retrieve_threshold=0.5))
    model = st.create(cfg, 0)
    d = cfg.decoder.hidden_size
    n = 4
    # Orthonormal keys; token 2 of sample 0 is named by embedding row e2.
    basis = np.linalg.qr(np.random.default_rng(1).normal(size=(d, d)))[0].T.astype(np.float32)
    keys = np.zeros((B, n, d), np.float32)
    keys[:, :n] = basis[:n]
    values = np.random.default_rng(2).normal(size=(B, n, d)).astype(np.float32)
    emb = np.zeros((B, 3, d), np.float32)  # one question per sample, three words
    emb[0, 0] = 0.02 * basis[2]  # names token 2 (the scale of a word does not matter)
    emb[0, 1] = 0.02 * basis[n + 1]  # names nothing in the scene
    emb[0, 2] = 0.02 * (basis[1] + basis[3])  # cosine 0.71 with tokens 1 and 3: above 0.5
    out = np.asarray(model.ground_words(jnp.asarray(emb), (jnp.asarray(keys), jnp.asarray(values)), 1))
    np.testing.assert_allclose(out[0, 0], emb[0, 0] + values[0, 2], atol=1e-4)
    np.testing.assert_allclose(out[0, 1], emb[0, 1], atol=1e-4)
    np.testing.assert_allclose(out[0, 2], emb[0, 2] + (values[0, 1] + values[0, 3]) / 2, atol=1e-3)
    # Without retrieval the embeddings pass through.
    np.testing.assert_array_equal(np.asarray(model.ground_words(jnp.asarray(emb), None, 1)), emb)
