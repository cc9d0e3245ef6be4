"""Word tags: object tokens that carry the embeddings of the words that name them.

A question names its objects in words ("the red box"); the student's vision tokens carry what the
object head reads in each patch (class probabilities, colour, box). For a decoder trained from
scratch, matching the two is the hard part of the task (docs/learning.md): the word "red" is a
learned embedding, the colour a few numbers, and from a yes/no signal the projector takes
hundreds of steps to map one onto the other. With word tags, each vision token also gets

    objectness * gain * (sum_c p(class c) E[class word c] + sum_k p(colour k) E[colour word k])

where E is the decoder's own (trained) input embedding, so a question word and the object it
names share a direction from the first step and attention only has to learn to match equal
vectors. The class probabilities are the object head's; the colour-name probabilities a softmax
over the squared RGB distance of the predicted colour to each named colour's prototype (the
colour the renderer shows it in: albedo times the mean shading). Nothing here is ground truth:
both come from the vision side's predictions. Datasets without colour words give no colours.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class WordTagConfig:
    class_ids: tuple[tuple[int, ...], ...]  # per object-head class, the token ids of its name
    colour_ids: tuple[tuple[int, ...], ...] = ()  # per named colour, its token ids
    colour_prototypes: tuple[tuple[float, float, float], ...] = ()  # per named colour, RGB in [0, 1]
    colour_temperature: float = 0.005  # of the softmax over squared RGB distances
    gain: float = 0.0  # tags x `gain` added to the object tokens themselves (0: off)
    retrieve: bool = True  # question words retrieve the tokens whose tags match them
    retrieve_temperature: float = 0.05  # of the softmax over cosine similarities
    retrieve_threshold: float = 0.35  # the null slot's similarity: below it a word retrieves little

    def __post_init__(self):
        if not self.class_ids or any(not ids for ids in self.class_ids + self.colour_ids):
            raise ValueError("WordTagConfig: every class and colour needs at least one token id")
        if len(self.colour_ids) != len(self.colour_prototypes):
            raise ValueError(f"WordTagConfig: {len(self.colour_ids)} colour names but "
                             f"{len(self.colour_prototypes)} prototypes")
        for name in ("colour_temperature", "retrieve_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"WordTagConfig.{name} = {getattr(self, name)} must be > 0")


class StandInIds:
    """A tokenizer stand-in for shape and timing work (abstract models, benchmarks, tests): each
    word gets one id in [4, 4 + span). Never for training: the tags would name the wrong rows."""

    def __init__(self, span: int = 256):
        self.span = span

    def encode(self, text: str) -> list[int]:
        return [4 + zlib.crc32(w.encode()) % self.span for w in text.split()]


def resolve(tokenizer, class_names, colours: dict, *, num_classes: int, vocab_size: int,
            **options) -> WordTagConfig:
    """Token ids of each class and colour name (as a word of a question: the tokenizers here add
    the leading space themselves). Names that encode to nothing or past the vocabulary are errors."""
    class_names = tuple(class_names)
    if len(class_names) != num_classes:
        raise ValueError(f"model.object_words.classes has {len(class_names)} names {list(class_names)} "
                         f"but the object head predicts {num_classes} classes; give one name per class")

    def ids(word):
        out = tuple(int(i) for i in tokenizer.encode(word))
        if not out or max(out) >= vocab_size:
            raise ValueError(f"model.object_words: {word!r} encodes to {list(out)}, not ids in "
                             f"[0, {vocab_size}) of the decoder's vocabulary")
        return out

    return WordTagConfig(
        class_ids=tuple(ids(w) for w in class_names),
        colour_ids=tuple(ids(w) for w in colours),
        colour_prototypes=tuple(tuple(float(x) for x in rgb) for rgb in colours.values()),
        **options)


def _mean_embeddings(embedding: jax.Array, groups: tuple[tuple[int, ...], ...]) -> jax.Array:
    """`[N, D]`: each group's mean embedding row (a multi-token name reads as its average)."""
    width = max(len(g) for g in groups)
    idx = np.array([g + (g[0],) * (width - len(g)) for g in groups], np.int32)
    weight = np.array([[1.0 / len(g)] * len(g) + [0.0] * (width - len(g)) for g in groups], np.float32)
    return jnp.einsum("nw,nwd->nd", weight, embedding[idx].astype(jnp.float32))


def colour_probs(rgb: jax.Array, cfg: WordTagConfig) -> jax.Array:
    """rgb `[..., 3]` -> `[..., K]` probabilities of the named colours."""
    proto = jnp.asarray(cfg.colour_prototypes, jnp.float32)
    d2 = jnp.sum(jnp.square(rgb[..., None, :] - proto), -1)
    return jax.nn.softmax(-d2 / cfg.colour_temperature, -1)


def words(class_probs: jax.Array, rgb: jax.Array, embedding: jax.Array,
          cfg: WordTagConfig) -> jax.Array:
    """class_probs `[B, N, C]`, rgb `[B, N, 3]`, the decoder's embedding `[V, D]` -> the expected
    embedding of the words naming each token's class and colour `[B, N, D]` (float32)."""
    out = jnp.einsum("bnc,cd->bnd", class_probs, _mean_embeddings(embedding, cfg.class_ids))
    if cfg.colour_ids:
        out = out + jnp.einsum("bnk,kd->bnd", colour_probs(rgb, cfg),
                               _mean_embeddings(embedding, cfg.colour_ids))
    return out


def tags(objectness: jax.Array, class_probs: jax.Array, rgb: jax.Array, embedding: jax.Array,
         cfg: WordTagConfig) -> jax.Array:
    """objectness `[B, N]` and the rest as `words` -> tags `[B, N, D]` (float32) to add to the
    vision tokens: `gain * objectness * words`."""
    return cfg.gain * objectness[..., None] * words(class_probs, rgb, embedding, cfg)


def keys(objectness: jax.Array, class_probs: jax.Array, rgb: jax.Array, embedding: jax.Array,
         cfg: WordTagConfig) -> jax.Array:
    """Retrieval keys `[B, N, D]`: `objectness * words / |words|`, so a word's cosine with the
    words of a token, scaled by how surely the token sees an object, is one dot product."""
    w = words(class_probs, rgb, embedding, cfg)
    return objectness[..., None] * w * jax.lax.rsqrt(jnp.sum(jnp.square(w), -1, keepdims=True) + 1e-12)
