"""A Hugging Face teacher (`config.teacher.kind = "hf"`): any local causal LM or LLaVA-family
model, run by transformers in torch (for GPU users who have such a teacher at hand).

    causal LM   sees the `llava_v1` prompt without the image marker (text only)
    LLaVA       (`model_type: llava`) sees the first view, CLIP-preprocessed at the vision
                tower's size, its image token repeated once per image feature

Greedy answers come from `model.generate`, then one teacher-forced forward per batch gives the
logits at the answer positions. Nothing is downloaded (`local_files_only`) and no remote code
runs (`trust_remote_code` is never set). The student shares the teacher's tokenizer: ids are made
with the student's tokenizer, which `dump` checks against the checkpoint's own on a corpus.
A teacher whose vocabulary is larger than the tokenizer's (LLaVA-1.5-HF appends its image and pad
tokens after Llama's 32,000) is scored on the tokenizer's ids only, as `calibration()` records.
"""

from __future__ import annotations

import os

import numpy as np

from data_pipelines.sample import Sample
from spatial_distill.models.llava3d import IMAGE_TOKEN_INDEX
from spatial_distill.teacher import llava3d_inputs as inputs_lib
from spatial_distill.teacher.llava3d_teacher import checkpoint_revision
from spatial_distill.tokenizer import Tokenizer


class HFTeacher:
    """Implements `spatial_distill.teacher.base.Teacher` with a transformers model in torch."""

    def __init__(self, model, tokenizer: Tokenizer, *, teacher_id: str, revision: str,
                 max_new_tokens: int = 32, batch_size: int = 8):
        import torch

        self.torch, self.model, self.tokenizer = torch, model.eval(), tokenizer
        self.teacher_id, self.revision = teacher_id, revision
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        cfg = model.config
        self.is_llava = cfg.model_type == "llava"
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.vocab = int(text_cfg.vocab_size)
        if self.vocab < tokenizer.vocab_size:
            raise ValueError(f"teacher {teacher_id} has a vocabulary of {self.vocab}, smaller than "
                             f"the tokenizer's {tokenizer.vocab_size}; use the teacher's tokenizer "
                             "(config.tokenizer.path)")
        if self.is_llava:
            v = cfg.vision_config
            self.image_size = int(v.image_size)
            per_side = self.image_size // int(v.patch_size)
            full = cfg.vision_feature_select_strategy == "full"
            self.image_tokens = per_side**2 + (1 if full else 0)
            self.image_token_id = int(cfg.image_token_index)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def calibration(self) -> dict:
        out = {"kind": f"transformers {type(self.model).__name__}, greedy answers, teacher-forced logits",
               "teacher_template": inputs_lib.TEMPLATE + ("" if self.is_llava else " (no image marker)"),
               "dtype": str(next(self.model.parameters()).dtype),
               "max_new_tokens": self.max_new_tokens}
        if self.is_llava:
            out.update(image="view 0, CLIP-preprocessed", image_size=self.image_size,
                       image_tokens=self.image_tokens)
        if self.vocab > self.tokenizer.vocab_size:
            out["scored_vocab"] = f"first {self.tokenizer.vocab_size} of {self.vocab} ids"
        return out

    def prompt_ids(self, question: str) -> list[int]:
        text = inputs_lib.prompt(question)
        if not self.is_llava:
            text = text.replace("<image>\n", "")
        ids = inputs_lib.tokenize(text, lambda t: self.tokenizer.encode(t, add_bos=True),
                                  self.tokenizer.bos_id)
        if not self.is_llava:
            return ids
        out = []
        for i in ids:
            out.extend([self.image_token_id] * self.image_tokens if i == IMAGE_TOKEN_INDEX else [i])
        return out

    def _pixels(self, sample: Sample, n: int):
        if not self.is_llava:
            return None
        x = inputs_lib.clip_image(np.asarray(sample.rgb[0]), self.image_size)
        dtype = next(self.model.parameters()).dtype
        return self.torch.from_numpy(np.repeat(x[None], n, 0)).to(self.device, dtype)

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield slice(start, min(n, start + self.batch_size))

    def answer(self, sample: Sample, prompts) -> list[list[int]]:
        torch, eos, pad = self.torch, self.tokenizer.eos_id, self.tokenizer.pad_id
        rows = [self.prompt_ids(qa.question) for qa in sample.qa]
        out: list[list[int]] = []
        for sl in self._batches(len(rows)):
            batch = rows[sl]
            L = max(map(len, batch))
            ids = torch.full((len(batch), L), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), L), dtype=torch.long)
            for i, r in enumerate(batch):  # left padding: every row's next token is at L
                ids[i, L - len(r):], mask[i, L - len(r):] = torch.tensor(r), 1
            kwargs = {}
            if self.is_llava:
                kwargs["pixel_values"] = self._pixels(sample, len(batch))
            with torch.no_grad():
                seq = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          max_new_tokens=self.max_new_tokens, do_sample=False,
                                          eos_token_id=eos, pad_token_id=pad, **kwargs)
            for row in seq[:, L:].tolist():
                row = row[: row.index(eos) + 1] if eos in row else row
                out.append(row)
        return out

    def score(self, sample: Sample, prompts, answers) -> list[np.ndarray]:
        torch = self.torch
        rows = [self.prompt_ids(qa.question) + list(a) for qa, a in zip(sample.qa, answers)]
        out: list[np.ndarray] = []
        for sl in self._batches(len(rows)):
            batch, ans = rows[sl], answers[sl]
            L = max(map(len, batch))
            ids = torch.full((len(batch), L), self.tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), L), dtype=torch.long)
            for i, r in enumerate(batch):  # right padding: positions count from 0 in every row
                ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
            kwargs = {}
            if self.is_llava:
                kwargs["pixel_values"] = self._pixels(sample, len(batch))
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    **kwargs).logits.float().cpu().numpy()
            for i, (r, a) in enumerate(zip(batch, ans)):
                start = len(r) - len(a)
                out.append(logits[i, start - 1: len(r) - 1, : self.tokenizer.vocab_size])
        return out


def load(config, tokenizer: Tokenizer) -> HFTeacher:
    """The transformers model at `config.teacher.path` (local only, no remote code)."""
    import torch
    import transformers

    path = config.teacher.path
    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"config.teacher.kind='hf' needs config.teacher.path, a local "
                                f"Hugging Face model directory; got {path!r}")
    hf_config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    cls = (transformers.LlavaForConditionalGeneration if hf_config.model_type == "llava"
           else transformers.AutoModelForCausalLM)
    dtype = getattr(torch, config.teacher.dtype)
    model = cls.from_pretrained(path, local_files_only=True, dtype=dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    name = hf_config.name_or_path or os.path.basename(os.path.normpath(path))
    return HFTeacher(model, tokenizer, teacher_id=f"hf:{os.path.basename(os.path.normpath(name))}",
                     revision=checkpoint_revision(path), max_new_tokens=config.teacher.max_new_tokens,
                     batch_size=config.teacher.batch_size)


__all__ = ["HFTeacher", "load"]
