"""The whole student in PyTorch: load an export and answer questions about a scene's views.

    from spatial_distill.export import torch_student
    student = torch_student.load("OUT")                 # a torch.nn.Module in eval mode
    student.answer(views, "Is the red box near the blue sphere?")   # views uint8 [S, H, W, 3]

An export (`config.mode=export`, `stage.py`) stores each weight once, in the format its users
expect: `OUT/vggt.safetensors` (the VGGT aggregator and heads, official key names: `torch_vggt.py`),
`OUT/decoder/` (a Hugging Face Llama directory, loaded here with stock transformers) and
`OUT/student.safetensors` (what is neither: object and box heads, projector, word values,
latents, grounding readouts). `OUT/student_config.json` is the `StudentConfig` and the prompt
and tokenizer facts `answer` needs. `load(OUT)` assembles them with strict key checks.

`TorchStudent.forward` mirrors the Flax `Student.__call__` (same inputs and output names, with
`answer_logits` added); `generate` mirrors `Student.generate` (greedy); both are checked against
the Flax model to 1e-4 in float32 (tests/test_torch_student.py). The training-only conveniences
(the per-sample KV cache, rematerialisation, sharding) are not needed at inference and are not
here: each question's sequence runs whole, which computes the same thing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spatial_distill.export import (
    CONFIG_VERSION,
    DECODER_DIR,
    STUDENT_FILE,
    VGGT_FILE,
    torch_heads,
    torch_vggt,
)
from spatial_distill.export import STUDENT_CONFIG as CONFIG_FILE
from spatial_distill.models import student as student_lib

PROMPT_TEMPLATE = "<s>{question}"  # teacher.dump.PROMPT_TEMPLATE: what every record's prompt is


def _cache_argument() -> str:
    """transformers 5.24 renamed `past_key_values` (argument and output field) to `cache`."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


_CACHE_ARG = _cache_argument()


def _tensor(x) -> torch.Tensor:
    """Tensors as given (any device); numpy arrays and lists as CPU tensors."""
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


# -- config <-> JSON ---------------------------------------------------------------------------
def config_to_json(cfg: student_lib.StudentConfig) -> dict:
    """`StudentConfig` (nested dataclasses, tuples, dtypes) as plain JSON values."""
    # Dtype fields may hold numpy/JAX dtype objects: stored by name, which they also accept.
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=lambda o: np.dtype(o).name))


def _build(cls, value, where: str):
    """`value` (JSON) as an instance of the annotated type `cls` (dataclasses, tuples, optionals)."""
    origin = typing.get_origin(cls)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = next(a for a in typing.get_args(cls) if a is not type(None))
        return _build(inner, value, where)
    if dataclasses.is_dataclass(cls):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object for {cls.__name__}, got {type(value).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"{where}: unknown {cls.__name__} fields {unknown}; the export was written "
                             "by a newer spatial_distill: upgrade it")
        return cls(**{k: _build(hints[k], v, f"{where}.{k}") for k, v in value.items()})
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(cls)
        inner = args[0] if args else typing.Any
        return tuple(_build(inner, v, where) for v in value)
    return value


def config_from_json(data: dict, where: str = CONFIG_FILE) -> student_lib.StudentConfig:
    return _build(student_lib.StudentConfig, data, where)


# -- the module -------------------------------------------------------------------------------
class TorchStudent(nn.Module):
    """The student (spatial_distill/models/student.py) in torch; `decoder` is a stock
    `transformers.LlamaForCausalLM`."""

    def __init__(self, cfg: student_lib.StudentConfig, decoder: nn.Module, *, bos_id: int, eos_id: int,
                 pad_id: int, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.tokenizer = tokenizer
        vision_width = 2 * cfg.aggregator.embed_dim
        d = cfg.decoder.hidden_size
        self.aggregator = torch_vggt.Aggregator(cfg.aggregator, cfg.patch_embed)
        self.camera_head = torch_vggt.CameraHead(cfg.camera_head) if cfg.camera_head else None
        self.object_head = (torch_heads.ObjectHead(cfg.object_head, vision_width)
                            if cfg.object_head else None)
        token_width = vision_width + (cfg.object_head.num_features if cfg.object_head else 0)
        self.proj_in = nn.Linear(token_width, d)
        self.proj_out = nn.Linear(d, d)
        self.word_values = (nn.Linear(token_width, d, bias=False)
                            if cfg.word_tags is not None and cfg.word_tags.retrieve else None)
        self.decoder = decoder
        self.latents = nn.Parameter(torch.zeros(cfg.num_latents, d)) if cfg.num_latents else None
        self.depth_head = torch_vggt.DPTHead(cfg.depth_head) if cfg.depth_head else None
        self.det_head = torch_heads.DetectionHead(cfg.det_head, vision_width) if cfg.det_head else None
        width = student_lib.grounding_width(cfg)
        self.grounding_head = nn.Linear(d, 2 * width) if cfg.grounding else None
        self.relation_head = nn.Linear(d, 1) if cfg.grounding else None

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    def set_dtype(self, dtype: torch.dtype) -> TorchStudent:
        """The aggregator and the decoder compute in `dtype`; the heads, the projector, the
        word values, the latents and the readouts keep float32 parameters, as the Flax model keeps
        them whatever its compute dtypes (a bfloat16 file upcasts exactly)."""
        self.float()
        self.aggregator.to(dtype)
        self.decoder.to(dtype)
        return self

    # -- vision ---------------------------------------------------------------------------------
    def _layers_needed(self) -> list[int]:
        need = {self.cfg.aggregator.depth - 1}
        if self.depth_head is not None:
            need |= {i % self.cfg.aggregator.depth for i in self.cfg.depth_head.intermediate_layer_idx}
        return sorted(need)

    def see(self, images: torch.Tensor) -> dict:
        """images `[B, S, H, W, 3]` in [0, 1] -> `layers`, `patches` `[B, S, h*w, 2C]`,
        `vision_inputs` `[B, Nv, C']`, `vision` `[B, Nv, D]`, `word_memory`, and with the camera
        and object heads `pose_enc_list` and `object_raw` (as `Student.see`)."""
        b, s, hh, ww, _ = images.shape
        p = self.cfg.aggregator.patch_size
        layers, psi = self.aggregator(images.permute(0, 1, 4, 2, 3), keep_layers=self._layers_needed())
        patches = layers[-1][:, :, psi:, :]
        out = {"layers": layers, "patch_start_idx": psi, "patches": patches}
        fields = order = weights = None
        if self.camera_head is not None:
            out["pose_enc_list"] = self.camera_head([layers[-1]])
        if self.object_head is not None:
            out["object_raw"] = raw = self.object_head(patches)
            fields = self.object_head.features(raw, out["pose_enc_list"][-1], (hh, ww), p)
        k = self.cfg.num_object_tokens
        if k:
            objectness = out["object_raw"][..., 0].reshape(b, -1)
            if k > objectness.shape[1]:
                raise ValueError(f"vision_pool {self.cfg.vision_pool}: only {objectness.shape[1]} patch "
                                 f"tokens ({s} views of {hh}x{ww}); lower k")
            if self.cfg.slot_pooling:
                f = torch_heads.split_features(fields.reshape(b, -1, fields.shape[-1]),
                                               self.cfg.object_head.num_classes)
                weights = torch_heads.slots_group(
                    f["objectness"], f["centre"], f["colour"], f["class_probs"], k,
                    radius=self.cfg.slot_radius, colour_scale=self.cfg.slot_colour_scale,
                    min_objectness=self.cfg.slot_min_objectness)
            else:  # the k patches most likely to see an object, in view-then-raster order
                order = torch.sort(torch.topk(objectness, k, dim=-1).indices, dim=-1).values
        out["vision_inputs"] = pooled = self.pool_tokens(patches, (hh // p, ww // p), fields, order, weights)
        out["vision"] = self.project(pooled)
        out["word_memory"] = self.word_memory(pooled)
        return out

    def pool_tokens(self, patches, hw, object_fields=None, order=None, weights=None) -> torch.Tensor:
        """patches `[B, S, h*w, 2C]` (+ object fields `[B, S, h*w, F]`) -> `[B, Nv, C']` float32."""
        b = patches.shape[0]
        x = patches.float()
        if object_fields is not None:
            x = torch.cat([x, object_fields.float()], -1)
        if self.cfg.vision_pool == "mean1":
            return x.mean(dim=(1, 2))[:, None]
        flat = x.reshape(b, -1, x.shape[-1])
        if order is not None:
            return torch.gather(flat, 1, order[..., None].expand(-1, -1, flat.shape[-1]))
        if weights is not None:
            return torch.einsum("bkp,bpc->bkc", weights.float(), flat)
        if self.cfg.vision_pool == "patch":
            return flat
        pool = torch.from_numpy(student_lib.pooling_matrix(hw[0], hw[1], self.cfg.pool_grid)).to(x.device)
        return torch.einsum("gp,bspc->bsgc", pool, x).reshape(b, -1, x.shape[-1])

    def _object_words(self, pooled, fn) -> torch.Tensor:
        f = torch_heads.split_features(pooled[..., 2 * self.cfg.aggregator.embed_dim:].float(),
                                       self.cfg.object_head.num_classes)
        return fn(f["objectness"], f["class_probs"], f["colour"],
                  self.decoder.get_input_embeddings().weight, self.cfg.word_tags)

    def _linear_inputs(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled tokens as the projector and word values read them (`Student._linear_inputs`):
        the object fields' geometry, from the centre on, times `geometry_gain`."""
        pooled = pooled.float()
        start = self.cfg.geometry_column
        if start is None:
            return pooled
        return torch.cat([pooled[..., :start], pooled[..., start:] * self.cfg.geometry_gain], dim=-1)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """`[B, Nv, C']` -> vision tokens `[B, Nv, D]` in the decoder's parameter dtype."""
        pooled = pooled.float()
        x = self.proj_out(F.gelu(self.proj_in(self._linear_inputs(pooled))))
        if self.cfg.word_tags is not None and self.cfg.word_tags.gain:
            x = x + self._object_words(pooled, torch_heads.tags)
        return x.to(self.decoder.dtype)

    def word_memory(self, pooled: torch.Tensor):
        if self.word_values is None:
            return None
        return (self._object_words(pooled, torch_heads.keys),
                self.word_values(self._linear_inputs(pooled)))

    def ground_words(self, emb: torch.Tensor, memory, questions: int) -> torch.Tensor:
        """Question embeddings `[B*Q, L, D]` plus what each word names in the scene
        (`Student.ground_words`)."""
        if memory is None:
            return emb
        keys, values = memory
        t = self.cfg.word_tags
        b = keys.shape[0]
        e = emb.float().reshape(b, questions, *emb.shape[1:])
        unit = e * torch.rsqrt((e * e).sum(-1, keepdim=True) + 1e-12)
        sim = torch.einsum("bqld,bnd->bqln", unit, keys.float())
        null = torch.full(sim.shape[:-1] + (1,), t.retrieve_threshold, dtype=sim.dtype, device=sim.device)
        w = torch.softmax(torch.cat([sim, null], -1) / t.retrieve_temperature, -1)[..., :-1]
        got = torch.einsum("bqln,bnd->bqld", w, values.float())
        return (e + got).reshape(emb.shape).to(emb.dtype)

    # -- sequences ------------------------------------------------------------------------------
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.get_input_embeddings()(ids)

    def _sequence(self, vision, prompt_ids, prompt_mask, answer_ids=None, answer_mask=None, memory=None):
        """Per question `[V][T][Q][A]` (or `[V][Q][T][A]`): embeddings `[B*Q, L, D]`, validity `[B*Q, L]`."""
        b, q, lp = prompt_ids.shape
        d = vision.shape[-1]
        k = self.cfg.num_latents
        before = k and self.cfg.latent_position == "before_question"
        parts = [vision]
        if before:
            parts.append(self.latents.to(vision.dtype)[None].expand(b, -1, -1))
        shared = torch.cat(parts, 1)
        shared = shared[:, None].expand(b, q, *shared.shape[1:]).reshape(b * q, -1, d)
        words = self.ground_words(self._embed(prompt_ids.reshape(b * q, lp)), memory, q)
        embs, valid = [shared, words], [torch.ones(shared.shape[:2], dtype=torch.bool),
                                        prompt_mask.reshape(b * q, lp).bool()]
        if k and not before:
            embs.append(self.latents.to(vision.dtype)[None].expand(b * q, -1, -1))
            valid.append(torch.ones(b * q, k, dtype=torch.bool))
        if answer_ids is not None:
            la = answer_ids.shape[-1]
            embs.append(self._embed(answer_ids.reshape(b * q, la)))
            valid.append(answer_mask.reshape(b * q, la).bool())
        return torch.cat(embs, 1), torch.cat([v.to(vision.device) for v in valid], 1)

    def _hidden(self, emb: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The decoder's final-norm hidden states `[N, L, D]`; padding anywhere in `valid`."""
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        out = self.decoder.model(inputs_embeds=emb, attention_mask=valid.long(), position_ids=positions,
                                 use_cache=False)
        return out.last_hidden_state

    def _answer_source_slots(self, prompt_mask: torch.Tensor, answer_len: int, p0: int) -> torch.Tensor:
        """`[B, Q, La]` index, in the per-question sequence (`p0` shared slots first), of the
        state that predicts each answer token (`Student._answer_source_slots`)."""
        k, lp = self.cfg.num_latents, prompt_mask.shape[-1]
        n_prompt = prompt_mask.long().sum(-1)
        if self.cfg.latent_position == "after_question" and k:
            first = torch.full_like(n_prompt, lp + k - 1)
            answer_start = lp + k
        else:
            first = n_prompt - 1
            answer_start = lp
        j = torch.arange(answer_len, device=prompt_mask.device)
        return p0 + torch.where(j == 0, first[..., None], answer_start + j - 1)

    @torch.no_grad()
    def forward(self, images, prompt_ids, prompt_mask, answer_ids, answer_mask) -> dict:
        """As `Student.__call__` (inference): images `[B, S, H, W, 3]` uint8 or float in [0, 1];
        prompt_ids/mask `[B, Q, Lp]` right-padded; answer_ids/mask `[B, Q, La]` (teacher-forced).
        Returns `answer_hidden [B, Q, La, D]`, `answer_logits [B, Q, La, V]` float32,
        `vision_tokens [B, Nv, D]` and, with the heads, `grounding [B, Q, 2, F]`, `relation [B, Q]`,
        `pose_enc_list`, `object_raw`, `depth [B, S, H, W]`, `depth_conf`, `det_logits`, `det_boxes`."""
        images = self._images(images)
        prompt_ids, prompt_mask, answer_ids, answer_mask = (
            _tensor(x) for x in (prompt_ids, prompt_mask, answer_ids, answer_mask))
        b, s, hh, ww, _ = images.shape
        q, lp = prompt_ids.shape[1:]
        la = answer_ids.shape[-1]
        self.cfg.check_lengths(s, lp, la)
        seen = self.see(images)
        out = {"vision_tokens": seen["vision"]}
        for key in ("pose_enc_list", "object_raw"):
            if key in seen:
                out[key] = seen[key]
        emb, valid = self._sequence(seen["vision"], prompt_ids, prompt_mask, answer_ids, answer_mask,
                                    seen["word_memory"])
        hidden = self._hidden(emb, valid)
        slots = self._answer_source_slots(prompt_mask, la, self.cfg.shared_prefix_length(s)).reshape(b * q, la)
        answer_hidden = torch.gather(hidden, 1, slots[..., None].expand(-1, -1, hidden.shape[-1]))
        out["answer_hidden"] = answer_hidden.reshape(b, q, la, -1)
        out["answer_logits"] = self.decoder.lm_head(answer_hidden).float().reshape(b, q, la, -1)
        if self.grounding_head is not None:
            first = out["answer_hidden"][:, :, 0].float()
            out["grounding"] = self.grounding_head(first).reshape(b, q, 2, -1)
            out["relation"] = self.relation_head(first)[..., 0]
        if self.depth_head is not None:
            depth, conf = self.depth_head(seen["layers"], (hh, ww), seen["patch_start_idx"],
                                          frames_chunk_size=self.cfg.depth_frames_chunk)
            out["depth"], out["depth_conf"] = depth[..., 0], conf
        if self.det_head is not None:
            patches = seen["patches"]
            out["det_logits"], out["det_boxes"] = self.det_head(patches.reshape(b, -1, patches.shape[-1]))
        return out

    def _images(self, images) -> torch.Tensor:
        images = _tensor(images)
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        dtype = next(self.aggregator.parameters()).dtype
        return images.to(dtype)

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, images, prompt_ids, prompt_mask, *, max_new_tokens: int = 8):
        """Greedy answers to every question (`Student.generate`): tokens `[B, Q, T]` (pad after
        EOS) and lengths `[B, Q]` (emitted tokens, EOS included)."""
        images = self._images(images)
        prompt_ids, prompt_mask = (_tensor(x) for x in (prompt_ids, prompt_mask))
        b, q = prompt_ids.shape[:2]
        self.cfg.check_lengths(images.shape[1], prompt_ids.shape[-1], max_new_tokens)
        seen = self.see(images)
        emb, valid = self._sequence(seen["vision"], prompt_ids, prompt_mask, memory=seen["word_memory"])
        # Left-pad (real tokens last, in order) so every row's next token follows its last slot.
        length = valid.shape[1]
        order = torch.argsort(valid.long() * length + torch.arange(length), dim=1, stable=True)
        emb = torch.gather(emb, 1, order[..., None].expand(-1, -1, emb.shape[-1]))
        mask = torch.gather(valid, 1, order).long()
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.decoder(inputs_embeds=emb, attention_mask=mask, position_ids=positions, use_cache=True)
        n = emb.shape[0]
        tokens = torch.full((n, max_new_tokens), self.pad_id, dtype=torch.long)
        lengths = torch.zeros(n, dtype=torch.long)
        done = torch.zeros(n, dtype=torch.bool)
        next_pos = positions[:, -1:] + 1
        for t in range(max_new_tokens):
            tok = out.logits[:, -1].float().argmax(-1)
            tokens[:, t] = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            lengths += (~done).long()
            done |= tok == self.eos_id
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype)], 1)
            out = self.decoder(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                               use_cache=True, **{_CACHE_ARG: getattr(out, _CACHE_ARG)})
            next_pos = next_pos + 1
        return tokens.reshape(b, q, -1), lengths.reshape(b, q)

    def answer(self, images, question: str | list[str], *, max_new_tokens: int = 8) -> str | list[str]:
        """Greedy answer(s) to `question` (one string or a list) about one scene.

        images: uint8 `[S, H, W, 3]`, the scene's views (view 0 is the reference camera the
        questions' left/right/front refer to); resized to the trained `image_size` when they
        differ (bilinear, antialiased).
        """
        if self.tokenizer is None:
            raise ValueError("TorchStudent.answer needs the tokenizer: build the model with torch_student.load(OUT)")
        views = torch.as_tensor(np.asarray(images))
        if views.ndim != 4 or views.shape[-1] != 3:
            raise ValueError(f"images: expected uint8 [S, H, W, 3] views of one scene, got shape "
                             f"{tuple(views.shape)}")
        if views.dtype != torch.uint8:
            raise ValueError(f"images: expected uint8 pixels (as the records store them), got {views.dtype}")
        size = self.cfg.image_size
        views = views.float() / 255.0
        if tuple(views.shape[1:3]) != (size, size):
            views = F.interpolate(views.permute(0, 3, 1, 2), size=(size, size), mode="bilinear",
                                  antialias=True, align_corners=False).clamp(0, 1).permute(0, 2, 3, 1)
        single = isinstance(question, str)
        questions = [question] if single else list(question)
        rows = [self.tokenizer.encode(qq, add_bos=True) for qq in questions]
        lp = max(map(len, rows))
        ids = torch.full((1, len(rows), lp), self.pad_id, dtype=torch.long)
        mask = torch.zeros((1, len(rows), lp), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[0, i, :len(r)] = torch.tensor(r)
            mask[0, i, :len(r)] = True
        tokens, lengths = self.generate(views[None], ids, mask, max_new_tokens=max_new_tokens)
        said = [self.tokenizer.decode(tokens[0, i, :int(lengths[0, i])].tolist()).strip()
                for i in range(len(rows))]
        return said[0] if single else said


# -- loading ------------------------------------------------------------------------------------
def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: not a complete export (rerun config.mode=export)")
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - corrupt headers raise library-specific errors
        raise ValueError(f"{path}: not a readable safetensors file ({e}); rerun the export") from e


def load(out_dir: str, *, dtype: torch.dtype | None = None) -> TorchStudent:
    """The exported student in `out_dir` as a `TorchStudent` in eval mode, in the export's dtype
    (or `dtype`)."""
    from transformers import LlamaForCausalLM

    from spatial_distill import tokenizer as tokenizer_lib

    path = os.path.join(out_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: {out_dir} is not a student export "
                                "(python run.py ... --config.mode=export --config.export.dir=OUT)")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("version") != CONFIG_VERSION:
        raise ValueError(f"{path}: version {meta.get('version')!r}, this code reads {CONFIG_VERSION}")
    cfg = config_from_json(meta["student"], f"{path}:student")
    decoder_dir = os.path.join(out_dir, DECODER_DIR)
    if not os.path.isdir(decoder_dir):
        raise FileNotFoundError(f"{decoder_dir} is missing: not a complete export")
    decoder = LlamaForCausalLM.from_pretrained(decoder_dir, dtype=dtype or "auto")
    tokenizer = tokenizer_lib.load_tokenizer(decoder_dir)
    tok = meta["tokenizer"]
    if (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) != (tok["bos_id"], tok["eos_id"], tok["pad_id"]):
        raise ValueError(f"{decoder_dir}: tokenizer special ids {(tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)} "
                         f"differ from {path}'s {(tok['bos_id'], tok['eos_id'], tok['pad_id'])}: a mixed export")
    if meta.get("prompt_template") != PROMPT_TEMPLATE:
        raise ValueError(f"{path}: prompt_template {meta.get('prompt_template')!r}; `answer` writes prompts as "
                         f"{PROMPT_TEMPLATE!r} (BOS, then the question): re-export with this version")
    model = TorchStudent(cfg, decoder, bos_id=tok["bos_id"], eos_id=tok["eos_id"], pad_id=tok["pad_id"],
                         tokenizer=tokenizer)
    tensors = {**_read_safetensors(os.path.join(out_dir, VGGT_FILE)),
               **_read_safetensors(os.path.join(out_dir, STUDENT_FILE))}
    model.set_dtype(dtype or decoder.dtype)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(DECODER_DIR + ".")}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    misshaped = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sorted(set(own) & set(tensors)) if tensors[k].shape != own[k].shape]
    if missing or unexpected or misshaped:
        raise ValueError(f"{out_dir}: the weights do not match {CONFIG_FILE}: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}, mis-shaped {misshaped[:8]}; re-export")
    model.load_state_dict(tensors, strict=False)  # copy_ casts each tensor to its parameter's dtype
    return model.eval()
