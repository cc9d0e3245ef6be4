"""The student (DESIGN.md §4): VGGT tokens -> projector -> Llama decoder with Hidden-CoT latents.

Per sample, the VGGT aggregator runs once over its S views; the last layer's patch tokens are
pooled per view to a `g x g` grid (`grid<g>`), kept one per patch (`patch`), cut down to the k
patches where the object head sees objects most surely (`objects<k>`, kept in view-then-raster
order), or, with `mean1`, averaged over every view and patch into the paper's single vision
token; then projected to the decoder width by a 2-layer MLP. With the object head
(`object_head.py`), each patch token also carries what the head reads there: objectness, class
and colour of the object it sees and that object's box in camera 0's frame, placed with the
camera head's predicted cameras or by registering the views on view 0's objects (VGGT's camera
head is then part of the student too). These explicit, low-dimensional object fields are what
lets a decoder trained from scratch bind "the red box" to its geometry (docs/learning.md). With
`word_tags` (`word_tags.py`), each question word that names an object (its colour, its class)
also retrieves the tokens whose predicted class and colour it names, before the decoder runs
(`ground_words`): the binding that a yes/no signal alone did not teach.
Every question of the sample then reads the same vision prefix:

    before_question (paper):  [V (S*g*g)] [T1..TK] [Q (Lp, right-padded)] [A (La, right-padded)]
    after_question:           [V] [Q] [T1..TK] [A]

The shared prefix ([V][T], or [V] with latents after the question) never sees what follows it,
so training decodes it once per sample into a KV cache that the sample's Q questions attend to,
instead of once per question. Padding stays where the input pipeline put it; it gets segment id 0
(it sees and is seen by no real token) and real tokens get contiguous RoPE positions from the
cumulative sum of the mask, so the decoder computes exactly what it would on the compact
sequence. Labels live on A only: the output is the hidden state that predicts each answer token
(`answer_hidden [B, Q, La, D]`), aligned with `answer_ids`, and the losses project it to the
vocabulary in chunks. The latent tokens T are learned embeddings (init N(0, 0.02^2)); they are
never decoded, except by the diagnostic `latent_nearest_tokens`.

Heads: depth (a VGGT DPT head, initialised from VGGT's when official weights are loaded), the
DETR-style 3D box head (`heads.py`), both reading the aggregator's tokens, and the grounding head:
a linear readout of the hidden state that predicts the first answer token, regressing the
attributes of the objects the question refers to (`losses/grounding.py`).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from spatial_distill import generate as generate_lib
from spatial_distill import geometry
from spatial_distill.models import slots
from spatial_distill.models import word_tags as word_tags_lib
from spatial_distill.models.camera_head import CameraHead, CameraHeadConfig
from spatial_distill.models.dpt import DPTConfig, DPTHead
from spatial_distill.models.heads import DetectionHead, DetHeadConfig
from spatial_distill.models.llama import Llama, LlamaConfig
from spatial_distill.models.object_head import ObjectHead, ObjectHeadConfig, split_features
from spatial_distill.models.vggt import Aggregator, AggregatorConfig, PatchEmbedConfig
from spatial_distill.sharding import constrain

LATENT_POSITIONS = ("before_question", "after_question")
_BLD = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class StudentConfig:
    aggregator: AggregatorConfig
    patch_embed: PatchEmbedConfig
    decoder: LlamaConfig
    depth_head: DPTConfig | None = None
    det_head: DetHeadConfig | None = None
    camera_head: CameraHeadConfig | None = None  # VGGT's; required by the object head
    object_head: ObjectHeadConfig | None = None
    grounding: bool = False  # the grounding readout head on the first answer position
    image_size: int = 0  # square input frames in pixels (the `patch` pooling needs the grid)
    # "mean1" (one token per sample, the paper's), "grid<g>" (g*g per view), "patch" (every
    # patch of every view), "objects<k>" (the k patches the object head finds objects in) or
    # "slots<k>" (patches grouped into at most k objects, one token each: `slots.py`).
    vision_pool: str = "grid2"
    slot_radius: float = 0.75  # metres between a patch's predicted centre and its slot seed's
    slot_colour_scale: float = 0.15  # RGB distance within which a patch joins a slot
    slot_min_objectness: float = 0.5  # a weaker seed leaves its slot (and the rest) empty
    # Question words retrieve the object tokens whose predicted class and colour they name
    # (`word_tags.py`, `ground_words`); None: off. Needs the object head.
    word_tags: word_tags_lib.WordTagConfig | None = None
    # x the object fields' geometry (centre, log size, yaw) where the projector and the word
    # values read the pooled tokens (`_linear_inputs`); 1: as the fields are.
    geometry_gain: float = 1.0
    num_latents: int = 8  # Hidden-CoT K; 0 disables
    latent_position: str = "before_question"
    freeze_vision: bool = False  # stop gradients at the aggregator output
    freeze_objects: bool = False  # and at the camera and object heads' outputs
    # Whether VGGT's camera loss reaches the aggregator. Off for the tiny VGGT trained from
    # scratch: its camera loss made no progress in thousands of steps and its gradient crowded out
    # the object objective in the shared trunk (docs/learning.md); the head still learns on top.
    camera_trains_trunk: bool = True
    vision_dtype: str = "float32"  # aggregator compute dtype; heads run in float32 regardless
    remat_vision: bool = False
    # Frames the depth head processes at once (rematerialised per chunk in training: live
    # full-resolution maps scale with it; dpt.DPTHead._map_frames). None: all at once.
    depth_frames_chunk: int | None = 8
    # kernels.attention implementation of the VGGT encoder and the camera head (the decoder's
    # and detection head's are in their own configs; `config_from` sets all from model.attention).
    attention: str = "xla"

    def __post_init__(self):
        if self.latent_position not in LATENT_POSITIONS:
            raise ValueError(f"StudentConfig.latent_position = {self.latent_position!r}: choose one "
                             f"of {LATENT_POSITIONS}")
        if self.num_latents < 0:
            raise ValueError(f"StudentConfig.num_latents = {self.num_latents} must be >= 0")
        self.pool_grid  # validates vision_pool
        if self.word_tags is not None:
            if self.object_head is None:
                raise ValueError("StudentConfig.word_tags read the object head's classes and colours: "
                                 "enable the object head (or turn model.object_words off)")
            if len(self.word_tags.class_ids) != self.object_head.num_classes:
                raise ValueError(f"StudentConfig.word_tags names {len(self.word_tags.class_ids)} classes, "
                                 f"the object head predicts {self.object_head.num_classes}")
        if self.object_head is not None and self.camera_head is None:
            raise ValueError("StudentConfig.object_head needs camera_head: the object centres are "
                             "composed with the predicted cameras")
        if self.camera_head is not None and self.camera_head.dim_in != 2 * self.aggregator.embed_dim:
            raise ValueError(f"camera_head.dim_in = {self.camera_head.dim_in} must be twice the "
                             f"aggregator width {self.aggregator.embed_dim}")
        if self.depth_head is not None and self.depth_head.dim_in != 2 * self.aggregator.embed_dim:
            raise ValueError(f"depth_head.dim_in = {self.depth_head.dim_in} must be twice the "
                             f"aggregator width {self.aggregator.embed_dim}")

    @property
    def num_object_tokens(self) -> int:
        """k of `objects<k>` / `slots<k>` (0 for the other poolings)."""
        for kind in ("objects", "slots"):
            if not self.vision_pool.startswith(kind):
                continue
            k = self.vision_pool[len(kind):]
            if not k.isdigit() or int(k) < 1:
                raise ValueError(f"StudentConfig.vision_pool = {self.vision_pool!r}: use {kind}<k>, "
                                 f"k >= 1 (e.g. {kind}16)")
            if self.object_head is None:
                raise ValueError(f"StudentConfig.vision_pool = {self.vision_pool!r} selects tokens by "
                                 "the object head's objectness: enable the object head")
            return int(k)
        return 0

    @property
    def slot_pooling(self) -> bool:
        return self.vision_pool.startswith("slots") and self.num_object_tokens > 0

    @property
    def geometry_column(self) -> int | None:
        """Where the object fields' geometry (centre, log size, yaw) starts in a pooled token
        (`Student.pool_tokens`: 2C patch features, then objectness, class probabilities, colour
        logits, centre, ...); None when `geometry_gain` leaves the tokens as they are."""
        if self.object_head is None or self.geometry_gain == 1.0:
            return None
        return 2 * self.aggregator.embed_dim + 4 + self.object_head.num_classes

    @property
    def pool_grid(self) -> int:
        if self.vision_pool == "mean1" or self.num_object_tokens:
            return 1
        if self.vision_pool == "patch":
            if self.image_size < 1 or self.image_size % self.aggregator.patch_size:
                raise ValueError(f"StudentConfig.vision_pool = 'patch' needs image_size (got "
                                 f"{self.image_size}), a multiple of the patch size "
                                 f"{self.aggregator.patch_size}")
            return self.image_size // self.aggregator.patch_size
        if self.vision_pool.startswith("grid") and self.vision_pool[4:].isdigit() and int(self.vision_pool[4:]) > 0:
            return int(self.vision_pool[4:])
        raise ValueError(f"StudentConfig.vision_pool = {self.vision_pool!r}: use 'mean1', 'patch', "
                         "'objects<k>', 'slots<k>' or 'grid<g>' (e.g. grid2)")

    def num_vision_tokens(self, num_views: int) -> int:
        if self.num_object_tokens:
            return self.num_object_tokens
        return 1 if self.vision_pool == "mean1" else num_views * self.pool_grid**2

    def shared_prefix_length(self, num_views: int) -> int:
        """Slots every question of a sample shares (decoded once per sample): [V][T] or [V]."""
        latents = self.num_latents if self.latent_position == "before_question" else 0
        return self.num_vision_tokens(num_views) + latents

    def sequence_length(self, num_views: int, prompt_len: int, answer_len: int) -> int:
        return self.num_vision_tokens(num_views) + self.num_latents + prompt_len + answer_len

    def check_lengths(self, num_views: int, prompt_len: int, answer_len: int) -> None:
        """A question that does not fit the decoder's context is an error naming both numbers."""
        total = self.sequence_length(num_views, prompt_len, answer_len)
        if total > self.decoder.max_position_embeddings:
            raise ValueError(
                f"student sequence of {total} tokens ({self.num_vision_tokens(num_views)} vision + "
                f"{self.num_latents} latent + {prompt_len} question + {answer_len} answer) exceeds "
                f"the decoder context max_position_embeddings = {self.decoder.max_position_embeddings}; "
                "shorten the question/answer limits or raise the context")


def pooling_matrix(h: int, w: int, g: int) -> np.ndarray:
    """`[g*g, h*w]` adaptive-average-pooling weights (PyTorch AdaptiveAvgPool2d bins)."""
    if g > min(h, w):
        raise ValueError(f"cannot pool a {h}x{w} patch grid to {g}x{g}: g must be <= {min(h, w)}")
    out = np.zeros((g, g, h, w), np.float32)
    for i in range(g):
        r0, r1 = (i * h) // g, -((-(i + 1) * h) // g)
        for j in range(g):
            c0, c1 = (j * w) // g, -((-(j + 1) * w) // g)
            out[i, j, r0:r1, c0:c1] = 1.0 / ((r1 - r0) * (c1 - c0))
    return out.reshape(g * g, h * w)


def _dense(din, dout, names, rngs):
    return nnx.Linear(din, dout, rngs=rngs,
                      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
                      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)))


class Student(nnx.Module):
    def __init__(self, cfg: StudentConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        vision_width = 2 * cfg.aggregator.embed_dim
        d = cfg.decoder.hidden_size
        # Everything but the scanned decoder draws from a ref-backed stream: with a plain count,
        # each draw under tracing (jit, eval_shape) scans the whole trace, which is quadratic in
        # model size (minutes for the paper preset). The decoder splits its stream per scanned
        # layer, which a ref-backed count cannot do, so it keeps `rngs`.
        with nnx.var_defaults(ref=True):
            fast = nnx.Rngs(params=rngs.params())
        self.aggregator = Aggregator(cfg.aggregator, cfg.patch_embed, dtype=jnp.dtype(cfg.vision_dtype),
                                     remat=cfg.remat_vision, attention_impl=cfg.attention, rngs=fast)
        self.camera_head = (CameraHead(cfg.camera_head, attention_impl=cfg.attention, rngs=fast)
                            if cfg.camera_head else None)
        self.object_head = ObjectHead(cfg.object_head, vision_width, rngs=fast) if cfg.object_head else None
        token_width = vision_width + (cfg.object_head.num_features if cfg.object_head else 0)
        self.proj_in = _dense(token_width, d, ("embed", "mlp"), fast)
        self.proj_out = _dense(d, d, ("mlp", "embed"), fast)
        # What a question word that names an object reads from that object (`ground_words`).
        self.word_values = (nnx.Linear(token_width, d, rngs=fast, use_bias=False, kernel_init=nnx.with_partitioning(
            nnx.initializers.normal(0.02 / np.sqrt(token_width)), (None, "embed")))
            if cfg.word_tags is not None and cfg.word_tags.retrieve else None)
        self.decoder = Llama(cfg.decoder, rngs=rngs)
        self.latents = (nnx.Param(nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed"))(
            fast.params(), (cfg.num_latents, d))) if cfg.num_latents else None)
        self.depth_head = DPTHead(cfg.depth_head, rngs=fast) if cfg.depth_head else None
        self.det_head = DetectionHead(cfg.det_head, vision_width, rngs=fast) if cfg.det_head else None
        # Subject and reference: attributes, class logits and colour of each.
        self.grounding_head = (_dense(d, 2 * grounding_width(cfg), ("embed", None), fast)
                               if cfg.grounding else None)
        # The signed margin of the relation the question asks (`losses/grounding.relation_loss`).
        self.relation_head = _dense(d, 1, ("embed", None), fast) if cfg.grounding else None

    # -- vision --------------------------------------------------------------------------------
    def _layers_needed(self) -> list[int]:
        need = {self.cfg.aggregator.depth - 1}
        if self.depth_head is not None:
            need |= {i % self.cfg.aggregator.depth for i in self.cfg.depth_head.intermediate_layer_idx}
        return sorted(need)

    def encode_images(self, images: jax.Array):
        """images `[B, S, H, W, 3]` in [0, 1] -> (aggregator layers, patch tokens `[B, S, h*w, 2C]`)."""
        layers, psi = self.aggregator(images, keep_layers=self._layers_needed())
        if self.cfg.freeze_vision:
            layers = [None if t is None else jax.lax.stop_gradient(t) for t in layers]
        return layers, layers[-1][:, :, psi:, :]

    def see(self, images: jax.Array, *, project: bool = True) -> dict:
        """Everything the student reads off the images once per sample.

        images `[B, S, H, W, 3]` in [0, 1]. Returns `layers` (aggregator outputs), `patches`
        `[B, S, h*w, 2C]`, `vision_inputs` (the pooled tokens before the projector, `[B, Nv, C']`),
        `vision` (projected tokens `[B, Nv, D]`; not with `project=False`), and with the camera
        and object heads `pose_enc_list` (list of `[B, S, 9]`) and `object_raw` `[B, S, h*w, F]`.
        """
        hh, ww = images.shape[2:4]
        p = self.cfg.aggregator.patch_size
        layers, patches = self.encode_images(images)
        out = {"layers": layers, "patches": patches}
        fields = None
        if self.camera_head is not None:
            last = layers[-1] if self.cfg.camera_trains_trunk else jax.lax.stop_gradient(layers[-1])
            out["pose_enc_list"] = self.camera_head([last])
        if self.object_head is not None:
            out["object_raw"] = raw = self.object_head(patches)
            fields = self.object_head.features(raw, out["pose_enc_list"][-1], (hh, ww), p)
            if self.cfg.freeze_objects:  # the decoder's losses stop at the frozen heads
                fields = jax.lax.stop_gradient(fields)
        order = weights = None
        if self.cfg.num_object_tokens:
            objectness = out["object_raw"][..., 0].reshape(images.shape[0], -1)
            k = self.cfg.num_object_tokens
            if k > objectness.shape[1]:
                raise ValueError(f"vision_pool {self.cfg.vision_pool}: only {objectness.shape[1]} patch "
                                 f"tokens ({images.shape[1]} views of {hh}x{ww}); lower k")
            if self.cfg.slot_pooling:
                f = split_features(fields.reshape(images.shape[0], -1, fields.shape[-1]),
                                   self.cfg.object_head.num_classes)
                weights = slots.group(f["objectness"], f["centre"], f["colour"], f["class_probs"],
                                      k, radius=self.cfg.slot_radius,
                                      colour_scale=self.cfg.slot_colour_scale,
                                      min_objectness=self.cfg.slot_min_objectness)
            else:  # the k patches most likely to see an object, in view-then-raster order
                order = jnp.sort(jax.lax.top_k(jax.lax.stop_gradient(objectness), k)[1], axis=-1)
        out["vision_inputs"] = self.pool_tokens(patches, (hh // p, ww // p), fields, order, weights)
        if project:
            out["vision"] = self.project(out["vision_inputs"])
            out["word_memory"] = self.word_memory(out["vision_inputs"])
        return out

    @property
    def vision_frozen(self) -> bool:
        """Whether everything before the projector is frozen (its output can be cached)."""
        heads_frozen = self.cfg.freeze_objects or (self.camera_head is None and self.object_head is None)
        return self.cfg.freeze_vision and heads_frozen

    def pool_tokens(self, patches: jax.Array, hw: tuple[int, int],
                    object_fields: jax.Array | None = None,
                    order: jax.Array | None = None, weights: jax.Array | None = None) -> jax.Array:
        """patches `[B, S, h*w, 2C]` (and the object head's per-patch fields `[B, S, h*w, F]`)
        -> pooled tokens `[B, Nv, C']` (float32), the projector's input. `order` `[B, k]`: the
        (view-major) patch indices `objects<k>` keeps; `weights` `[B, k, S*h*w]`: the slots'
        patch weights (`slots.group`)."""
        b = patches.shape[0]
        x = patches.astype(jnp.float32)
        if object_fields is not None:
            x = jnp.concatenate([x, object_fields.astype(jnp.float32)], -1)
        if self.cfg.vision_pool == "mean1":
            return x.mean(axis=(1, 2))[:, None]  # [B, 1, C']
        if order is not None:
            return jnp.take_along_axis(x.reshape(b, -1, x.shape[-1]), order[..., None], axis=1)
        if weights is not None:
            return jnp.einsum("bkp,bpc->bkc", weights, x.reshape(b, -1, x.shape[-1]))
        if self.cfg.vision_pool == "patch":
            return x.reshape(b, -1, x.shape[-1])
        pool = jnp.asarray(pooling_matrix(hw[0], hw[1], self.cfg.pool_grid))
        pooled = jnp.einsum("gp,bspc->bsgc", pool, x)
        return pooled.reshape(b, -1, pooled.shape[-1])

    def _object_words(self, pooled: jax.Array, fn) -> jax.Array:
        """`fn` (`word_tags.tags` or `.keys`) of the object fields in pooled tokens `[B, Nv, C']`."""
        f = split_features(pooled[..., 2 * self.cfg.aggregator.embed_dim:].astype(jnp.float32),
                           self.cfg.object_head.num_classes)
        return fn(f["objectness"], f["class_probs"], f["colour"], self.decoder.embedding[...],
                  self.cfg.word_tags)

    def _linear_inputs(self, pooled: jax.Array) -> jax.Array:
        """Pooled tokens as the projector and word values read them: the object fields' geometry
        times `geometry_gain`. The 2C patch features (RMS ~1.5 each for the tiny VGGT) swamp the
        centre's x (std ~0.5 m), and Adam moves every input's weights at the same rate, so a small
        input is slow to be used: left/right, read from x alone, is learned last (docs/learning.md)."""
        pooled = pooled.astype(jnp.float32)
        start = self.cfg.geometry_column
        return pooled if start is None else pooled.at[..., start:].multiply(self.cfg.geometry_gain)

    def project(self, pooled: jax.Array) -> jax.Array:
        """Pooled tokens `[B, Nv, C']` -> vision tokens `[B, Nv, D]` in the decoder's dtype
        (with `word_tags`, plus `gain` x the embeddings of the words naming what each token sees)."""
        pooled = pooled.astype(jnp.float32)
        x = self.proj_out(jax.nn.gelu(self.proj_in(self._linear_inputs(pooled)), approximate=False))
        if self.cfg.word_tags is not None and self.cfg.word_tags.gain:
            x = x + self._object_words(pooled, word_tags_lib.tags)
        return constrain(x.astype(self.cfg.decoder.dtype), _BLD)

    def word_memory(self, pooled: jax.Array):
        """Keys (`word_tags.keys` `[B, Nv, D]`) and values (`[B, Nv, D]`) that question words
        retrieve objects by (`ground_words`); None without `word_tags.retrieve`."""
        if self.word_values is None:
            return None
        return (self._object_words(pooled, word_tags_lib.keys),
                self.word_values(self._linear_inputs(pooled)))

    def ground_words(self, emb: jax.Array, memory, questions: int) -> jax.Array:
        """Question embeddings `[B*Q, L, D]` plus, for each word, what it names in the scene.

        Each word's embedding is compared (cosine) with every token's word tags; a softmax over
        the tokens and one null slot (fixed logit `retrieve_threshold`: words that name nothing
        retrieve nothing) weighs the tokens' values. "red" finds the red object's patches from the
        first step, because the tag is built from the same embedding row; what the decoder then
        learns is what to do with the retrieved geometry (docs/learning.md).
        """
        if memory is None:
            return emb
        keys, values = memory
        t = self.cfg.word_tags
        b = keys.shape[0]
        e = emb.astype(jnp.float32).reshape(b, questions, *emb.shape[1:])
        unit = lambda x: x * jax.lax.rsqrt(jnp.sum(jnp.square(x), -1, keepdims=True) + 1e-12)
        sim = jnp.einsum("bqld,bnd->bqln", unit(e), keys)  # cosine x objectness
        null = jnp.full(sim.shape[:-1] + (1,), t.retrieve_threshold, sim.dtype)
        w = jax.nn.softmax(jnp.concatenate([sim, null], -1) / t.retrieve_temperature, -1)[..., :-1]
        got = jnp.einsum("bqln,bnd->bqld", w, values)
        return (e + got).reshape(emb.shape).astype(emb.dtype)

    def vision_tokens(self, patches: jax.Array, hw: tuple[int, int],
                      object_fields: jax.Array | None = None,
                      order: jax.Array | None = None) -> jax.Array:
        """`project(pool_tokens(...))`: patch tokens (and object fields) -> `[B, Nv, D]`."""
        return self.project(self.pool_tokens(patches, hw, object_fields, order))

    # -- sequence assembly ---------------------------------------------------------------------
    def _shared_prefix(self, vision):
        """The part every question of a sample shares: `[V][T]` (before_question) or `[V]`,
        `[B, P0, D]`."""
        k = self.cfg.num_latents
        if k and self.cfg.latent_position == "before_question":
            b, _, d = vision.shape
            lat = jnp.broadcast_to(self.latents[...].astype(vision.dtype), (b, k, d))
            return jnp.concatenate([vision, lat], axis=1)
        return vision

    def _question_part(self, prompt_ids, prompt_mask, answer_ids=None, answer_mask=None, memory=None):
        """Per question, what follows the shared prefix: `[Q][A]` or `[Q][T][A]` (question words
        grounded in `memory`, `word_memory`'s output). Returns embeddings `[B*Q, Lr, D]` and
        validity `[B*Q, Lr]`."""
        b, q, lp = prompt_ids.shape
        k = self.cfg.num_latents
        words = self.ground_words(self.decoder.embed(prompt_ids.reshape(b * q, lp)), memory, q)
        parts = [(words, prompt_mask.reshape(b * q, lp))]
        if k and self.cfg.latent_position == "after_question":
            d = parts[0][0].shape[-1]
            parts.append((jnp.broadcast_to(self.latents[...].astype(parts[0][0].dtype), (b * q, k, d)),
                          jnp.ones((b * q, k), bool)))
        if answer_ids is not None:
            la = answer_ids.shape[-1]
            parts.append((self.decoder.embed(answer_ids.reshape(b * q, la)),
                          answer_mask.reshape(b * q, la)))
        emb = jnp.concatenate([p[0] for p in parts], axis=1)
        valid = jnp.concatenate([p[1].astype(bool) for p in parts], axis=1)
        return emb, valid

    def _sequence(self, vision, prompt_ids, prompt_mask, answer_ids=None, answer_mask=None,
                  memory=None):
        """The whole per-question sequence `[B*Q, P0 + Lr, D]` and its validity (generation,
        diagnostics: the training forward never repeats the shared prefix)."""
        b, q = prompt_ids.shape[:2]
        shared = self._shared_prefix(vision)
        p0, d = shared.shape[1:]
        rest, valid = self._question_part(prompt_ids, prompt_mask, answer_ids, answer_mask, memory)
        shared = jnp.broadcast_to(shared[:, None], (b, q, p0, d)).reshape(b * q, p0, d)
        return (jnp.concatenate([shared, rest], axis=1),
                jnp.concatenate([jnp.ones((b * q, p0), bool), valid], axis=1))

    def _answer_source_slots(self, prompt_mask, answer_len: int) -> jax.Array:
        """`[B, Q, La]` slot, in the question part, whose hidden state predicts each answer token."""
        k, lp = self.cfg.num_latents, prompt_mask.shape[-1]
        n_prompt = prompt_mask.sum(-1).astype(jnp.int32)  # [B, Q]
        if self.cfg.latent_position == "after_question" and k:
            first = jnp.broadcast_to(jnp.int32(lp + k - 1), n_prompt.shape)  # last latent
            answer_start = lp + k
        else:
            first = n_prompt - 1  # last real question token
            answer_start = lp
        j = jnp.arange(answer_len, dtype=jnp.int32)
        return jnp.where(j == 0, first[..., None], answer_start + j - 1)

    def _decode_questions(self, vision, prompt_ids, prompt_mask, answer_ids, answer_mask, memory=None):
        """Hidden states of every question part `[B*Q, Lr, D]`.

        The shared prefix runs once per sample into a KV cache, which every question of the sample
        then attends to: Q times less prefix work than decoding each question's full sequence
        (the prefix never sees what follows it, so the result is the same).
        """
        b, q = prompt_ids.shape[:2]
        shared = self._shared_prefix(vision)
        p0 = shared.shape[1]
        rest, valid = self._question_part(prompt_ids, prompt_mask, answer_ids, answer_mask, memory)
        cache = generate_lib.init_cache(self.cfg.decoder, b, p0 + rest.shape[1])
        positions = jnp.broadcast_to(jnp.arange(p0, dtype=jnp.int32), (b, p0))
        _, cache = self.decoder.hidden(shared, positions=positions, cache=cache, cache_index=0)
        cache = generate_lib.repeat_cache(cache, q)
        hidden, _ = self.decoder.hidden(
            rest, positions=p0 + generate_lib.positions_from_mask(valid),
            segment_ids=valid.astype(jnp.int32), cache=cache, cache_index=p0)
        return hidden

    def __call__(self, images, prompt_ids, prompt_mask, answer_ids, answer_mask, *,
                 text: bool = True, vision_inputs: jax.Array | None = None) -> dict:
        """Training forward.

        Args:
          images: `[B, S, H, W, 3]` float in [0, 1] (or uint8, divided by 255).
          prompt_ids / prompt_mask: `[B, Q, Lp]` int / bool, right-padded.
          answer_ids / answer_mask: `[B, Q, La]` int / bool, right-padded (teacher answer, EOS incl.).
          text: run the decoder (False: vision outputs only, as the vision stage trains them).
          vision_inputs: `see(images, project=False)["vision_inputs"]` computed earlier (a frozen
            vision side's output, cached by the trainer): the images are not looked at again, so
            the heads that read the aggregator (depth, detection) must be off.
        Returns dict: `answer_hidden [B, Q, La, D]` (text), `vision_tokens [B, Nv, D]`, and when
        the heads exist `grounding [B, Q, 2, F]` and `relation [B, Q]` (text), `pose_enc_list` (list of `[B, S, 9]`),
        `object_raw [B, S, h*w, F]`, `depth [B, S, H, W]`, `depth_conf [B, S, H, W]`,
        `det_logits [B, Nq, C+1]`, `det_boxes [B, Nq, 7]`.
        """
        # The batch contract of every caller (trainer, eval, export parity): shapes and dtypes
        # checked at trace time, so a pipeline change fails here, not as a broadcast deep inside.
        chex.assert_rank(images, 5)
        chex.assert_shape(images, (None, None, None, None, 3))
        chex.assert_rank([prompt_ids, prompt_mask, answer_ids, answer_mask], 3)
        chex.assert_equal_shape([prompt_ids, prompt_mask])
        chex.assert_equal_shape([answer_ids, answer_mask])
        chex.assert_equal_shape_prefix([images, prompt_ids, answer_ids], 1)
        chex.assert_equal_shape_prefix([prompt_ids, answer_ids], 2)
        chex.assert_type([prompt_ids, answer_ids], int)
        if images.dtype == jnp.uint8:
            images = images.astype(jnp.float32) / 255.0
        b, s, hh, ww, _ = images.shape
        q, lp = prompt_ids.shape[1:]
        la = answer_ids.shape[-1]
        if text:
            self.cfg.check_lengths(s, lp, la)
        if vision_inputs is not None:
            if self.depth_head is not None or self.det_head is not None:
                raise ValueError("Student: cached vision_inputs leave the depth and detection heads "
                                 "nothing to read; disable them or pass the images only")
            seen = {"vision": self.project(vision_inputs), "word_memory": self.word_memory(vision_inputs)}
        else:
            seen = self.see(images)
        vision = seen["vision"]
        out = {"vision_tokens": vision}
        for key in ("pose_enc_list", "object_raw"):
            if key in seen:
                out[key] = seen[key]
        if text:
            hidden = self._decode_questions(vision, prompt_ids, prompt_mask, answer_ids, answer_mask,
                                            seen["word_memory"])
            slots = self._answer_source_slots(prompt_mask, la).reshape(b * q, la)
            answer_hidden = jnp.take_along_axis(hidden, slots[..., None], axis=1).reshape(b, q, la, -1)
            out["answer_hidden"] = answer_hidden
            if self.grounding_head is not None:
                g = self.grounding_head(answer_hidden[:, :, 0].astype(jnp.float32))
                out["grounding"] = g.reshape(b, q, 2, -1)
                out["relation"] = self.relation_head(answer_hidden[:, :, 0].astype(jnp.float32))[..., 0]
        if self.depth_head is not None:
            depth, conf = self.depth_head(seen["layers"], (hh, ww), self.cfg.aggregator.patch_start_idx,
                                          frames_chunk_size=self.cfg.depth_frames_chunk)
            out["depth"], out["depth_conf"] = depth[..., 0], conf
        if self.det_head is not None:
            patches = seen["patches"]
            out["det_logits"], out["det_boxes"] = self.det_head(patches.reshape(b, -1, patches.shape[-1]))
        return out

    def answer_logits(self, answer_hidden: jax.Array) -> jax.Array:
        """`[B, Q, La, D]` -> `[B, Q, La, V]` float32 (small vocabularies / tests; losses chunk)."""
        b, q, la, d = answer_hidden.shape
        return self.decoder.logits(answer_hidden.reshape(b * q, la, d)).reshape(b, q, la, -1)

    # -- inference -----------------------------------------------------------------------------
    def prefix(self, images, prompt_ids, prompt_mask):
        """Left-padded generation prefix `[V][T][Q]` (or `[V][Q][T]`): `([B*Q, P, D], [B*Q, P])`.

        Real tokens are moved to the end of each row so the last slot is the last real token.
        """
        if images.dtype == jnp.uint8:
            images = images.astype(jnp.float32) / 255.0
        seen = self.see(images)
        vision = seen["vision"]
        emb, valid = self._sequence(vision, prompt_ids, prompt_mask, memory=seen["word_memory"])
        length = valid.shape[1]
        # Stable order: pads first, then real tokens in their original order.
        order = jnp.argsort(jnp.where(valid, 1, 0) * length + jnp.arange(length), axis=1)
        return (jnp.take_along_axis(emb, order[..., None], axis=1),
                jnp.take_along_axis(valid, order, axis=1))

    def generate(self, images, prompt_ids, prompt_mask, *, max_new_tokens: int, eos_id: int,
                 pad_id: int, temperature: float = 0.0, top_p: float = 1.0, rng=None):
        """Answers every question: tokens `[B, Q, max_new_tokens]` and lengths `[B, Q]`."""
        b, q = prompt_ids.shape[:2]
        emb, mask = self.prefix(images, prompt_ids, prompt_mask)
        self.cfg.check_lengths(images.shape[1], prompt_ids.shape[-1], max_new_tokens)
        tokens, lengths = generate_lib.generate(
            self.decoder, emb, mask, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
            temperature=temperature, top_p=top_p, rng=rng)
        return tokens.reshape(b, q, -1), lengths.reshape(b, q)

    def latent_nearest_tokens(self, images, prompt_ids, prompt_mask) -> dict:
        """Diagnostic (paper Fig. 4): what the K latent slots 'say'.

        Returns `lm_head_argmax [B, Q, K]` (the LM head's top token at each latent slot, as the
        paper's `decode_thinking_tokens`) and `embedding_nearest [K]` (the vocabulary entry whose
        input embedding has the highest cosine similarity with each raw latent vector).
        """
        k = self.cfg.num_latents
        if not k:
            raise ValueError("latent_nearest_tokens: the model has no latent tokens (num_latents=0)")
        b, q, lp = prompt_ids.shape
        images = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images
        seen = self.see(images)
        vision = seen["vision"]
        emb, valid = self._sequence(vision, prompt_ids, prompt_mask, memory=seen["word_memory"])
        hidden, _ = self.decoder.hidden(emb, positions=generate_lib.positions_from_mask(valid),
                                        segment_ids=valid.astype(jnp.int32))
        nv = vision.shape[1]
        start = nv if self.cfg.latent_position == "before_question" else nv + lp
        logits = self.decoder.logits(hidden[:, start:start + k])
        table = self.decoder.embedding[...].astype(jnp.float32)
        lat = self.latents[...].astype(jnp.float32)
        cos = (lat / jnp.linalg.norm(lat, axis=-1, keepdims=True)) @ (
            table / jnp.maximum(jnp.linalg.norm(table, axis=-1, keepdims=True), 1e-12)).T
        return {"lm_head_argmax": jnp.argmax(logits, -1).reshape(b, q, k),
                "embedding_nearest": jnp.argmax(cos, -1)}


def grounding_width(cfg: StudentConfig) -> int:
    """Per referred object, the grounding head predicts `geometry.ATTRIBUTES`, class logits and
    colour (classes from the object or detection head; 3 primitives without either)."""
    classes = (cfg.object_head.num_classes if cfg.object_head else
               cfg.det_head.num_classes if cfg.det_head else 3)
    return geometry.NUM_ATTRIBUTES + classes + 3


def parameter_breakdown(model: nnx.Module) -> dict[str, int]:
    """Parameter count per top-level component (works on `nnx.eval_shape` models)."""
    counts: dict[str, int] = {}
    for path, v in nnx.state(model, nnx.Param).flat_state():
        counts[str(path[0])] = counts.get(str(path[0]), 0) + int(np.prod(v.get_value().shape))
    return counts


def config_from(model: ml_collections.ConfigDict, image_size: int, tokenizer=None) -> StudentConfig:
    """`StudentConfig` from the `config.model` section of `configs/student.py`.

    `tokenizer` (the decoder's) resolves `model.object_words` to token ids; it is required when
    they are on.

    The DINO pos-embed grid is sized for `model.vision.pos_embed_size` pixels: by default
    `image_size` when training from scratch and 518 with a checkpoint (official VGGT's grid;
    resized at run time, as upstream does).
    """
    v, d = model.vision, model.decoder
    grid_px = v.pos_embed_size or (518 if v.checkpoint else image_size)
    aggregator = AggregatorConfig(img_size=grid_px, embed_dim=v.embed_dim, depth=v.depth,
                                  num_heads=v.num_heads)
    patch_embed = PatchEmbedConfig(img_size=grid_px, embed_dim=v.embed_dim, depth=v.vit_depth,
                                   num_heads=v.vit_heads)
    decoder = LlamaConfig(
        vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
        num_layers=d.num_layers, num_heads=d.num_heads, num_kv_heads=d.num_kv_heads,
        rope_theta=d.rope_theta, rms_norm_eps=d.rms_norm_eps,
        max_position_embeddings=d.max_position_embeddings,
        tie_word_embeddings=d.tie_word_embeddings, scan_layers=d.scan_layers,
        remat_policy=d.remat_policy, dtype=d.dtype, attention_impl=model.attention)
    depth = None
    if model.depth_head.enabled:
        depth = DPTConfig(dim_in=2 * v.embed_dim, features=model.depth_head.features,
                          out_channels=tuple(model.depth_head.out_channels),
                          intermediate_layer_idx=tuple(model.depth_head.layers),
                          output_dim=2, activation="exp", conf_activation="expp1")
    det = None
    if model.det_head.enabled:
        h = model.det_head
        det = DetHeadConfig(num_queries=h.num_queries, num_classes=h.num_classes, dim=h.dim,
                            num_layers=h.num_layers, num_heads=h.num_heads, attention=model.attention)
    camera = obj = None
    if model.object_head.enabled:
        o = model.object_head
        obj = ObjectHeadConfig(num_classes=o.num_classes, hidden=o.hidden,
                               register_views=bool(o.register_views))
        camera = CameraHeadConfig(dim_in=2 * v.embed_dim, trunk_depth=o.camera_trunk_depth,
                                  num_heads=v.num_heads)
    tags = None
    if model.object_words.enabled and obj is not None:
        if tokenizer is None:
            raise ValueError("model.object_words is on: building the student needs the decoder's "
                             "tokenizer to find the words' ids (pass tokenizer=...)")
        w = model.object_words
        tags = word_tags_lib.resolve(
            tokenizer, w.classes, dict(w.colours), num_classes=obj.num_classes,
            vocab_size=d.vocab_size, colour_temperature=float(w.colour_temperature),
            gain=float(w.gain), retrieve=bool(w.retrieve),
            retrieve_temperature=float(w.retrieve_temperature),
            retrieve_threshold=float(w.retrieve_threshold))
    return StudentConfig(aggregator=aggregator, patch_embed=patch_embed, decoder=decoder,
                         word_tags=tags, depth_head=depth, det_head=det, camera_head=camera, object_head=obj,
                         grounding=bool(model.grounding), image_size=image_size,
                         vision_pool=model.vision_pool, slot_radius=float(model.slots.radius),
                         slot_colour_scale=float(model.slots.colour_scale),
                         slot_min_objectness=float(model.slots.min_objectness),
                         num_latents=model.num_latents, latent_position=model.latent_position,
                         geometry_gain=float(model.geometry_gain), freeze_vision=v.frozen, freeze_objects=bool(model.object_head.frozen),
                         camera_trains_trunk=bool(model.object_head.camera_trains_trunk),
                         vision_dtype=v.dtype, remat_vision=v.remat, attention=model.attention,
                         depth_frames_chunk=model.depth_head.frames_chunk or None)


def create(cfg: StudentConfig, seed: int = 0, *, abstract: bool = False) -> Student:
    """Builds a Student with random weights from `seed` (or only its shapes: `abstract=True`).

    Initialisation is compiled once instead of being run op by op (which compiles a kernel per
    parameter shape). On CPU the init program is compiled without LLVM's expensive passes: it
    runs once, and XLA:CPU otherwise spends ~4x longer optimising its threefry graph than the
    whole init takes to run.
    """

    def build():
        return Student(cfg, rngs=nnx.Rngs(seed))

    shapes = nnx.eval_shape(build)
    if abstract:
        return shapes
    graphdef, _ = nnx.split(shapes)
    return nnx.merge(graphdef, init_program(lambda: nnx.state(build()))())


def init_program(fn, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` compiled for a one-off run (cheap compile on CPU)."""
    lowered = jax.jit(fn, **jit_kwargs).lower()
    options = ({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
               if jax.default_backend() == "cpu" else None)
    return lowered.compile(compiler_options=options)
