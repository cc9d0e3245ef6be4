"""The export stage: the latest checkpoint in WORKDIR as PyTorch artifacts (`config.mode=export`).

    python run.py --config=configs/student.py:tiny --workdir=W --config.mode=export \
        --config.export.dir=OUT [--config.export.dtype=bfloat16] [--config.export.overwrite=True]

OUT/
  decoder/          the decoder as a Hugging Face Llama directory (`hf_decoder.py`): stock
                    `LlamaForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load it
  vggt.safetensors  the student's VGGT parts (aggregator, and the camera and depth heads when it
                    has them) in the official model's key names and layouts
  student.safetensors   the rest of the student (object and box heads, projector, word values,
                    latents, grounding readouts), torch layouts
  student_config.json   the StudentConfig, tokenizer ids and prompt template: with the three
                    weight sets, `torch_student.load(OUT)` rebuilds the whole student in torch
  export.json       provenance: checkpoint step, code version, dtype, files, the model config

Each weight is stored once (the decoder only in decoder/, VGGT only in vggt.safetensors).

The checkpoint's own decoder layout (scanned or per-layer) is used whatever the config says, so
both export. Everything is written to `OUT.tmp-<pid>` and renamed at the end: a half-written
export never looks complete. An OUT that exists and is not empty is refused unless
`export.overwrite`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

import ml_collections
import numpy as np

from spatial_distill import prepare
from spatial_distill.eval import stage as eval_stage
from spatial_distill.export import (
    CONFIG_VERSION,
    DECODER_DIR,
    STUDENT_CONFIG,
    STUDENT_FILE,
    VGGT_FILE,
    hf_decoder,
)
from spatial_distill.teacher import dump
from spatial_distill.train import checkpoint as ckpt_lib

RECORD = "export.json"


class ExportError(ValueError):
    """The export cannot start or finish; the message names the field or path and the fix."""


def vggt_tensors(model) -> dict[str, np.ndarray]:
    """The student's VGGT parts under the official model's keys (`aggregator.*`,
    `camera_head.*`, `depth_head.*`)."""
    out = dict(model.aggregator.export_torch("aggregator"))
    if getattr(model, "camera_head", None) is not None:
        out.update(model.camera_head.export_torch("camera_head"))
    if getattr(model, "depth_head", None) is not None:
        out.update(model.depth_head.export_torch("depth_head"))
    return out


def _linear(module, prefix: str) -> dict[str, np.ndarray]:
    out = {f"{prefix}.weight": np.asarray(module.kernel.get_value()).T}
    if getattr(module, "bias", None) is not None:
        out[f"{prefix}.bias"] = np.asarray(module.bias.get_value())
    return out


def student_tensors(model) -> dict[str, np.ndarray]:
    """What the student holds besides VGGT and the decoder, in `torch_student.TorchStudent`'s
    key names and torch layouts."""
    out = {}
    if model.object_head is not None:
        out.update(model.object_head.export_torch("object_head"))
    if model.det_head is not None:
        out.update(model.det_head.export_torch("det_head"))
    for name in ("proj_in", "proj_out", "word_values", "grounding_head", "relation_head"):
        if getattr(model, name) is not None:
            out.update(_linear(getattr(model, name), name))
    if model.latents is not None:
        out["latents"] = np.asarray(model.latents.get_value())
    return out


def student_config(model, tokenizer) -> dict:
    """student_config.json: the model config and what answering needs besides the weights."""
    from spatial_distill.export import torch_student

    return {"version": CONFIG_VERSION, "student": torch_student.config_to_json(model.cfg),
            "tokenizer": {"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                          "pad_id": tokenizer.pad_id, "vocab_size": tokenizer.vocab_size,
                          "sha256": tokenizer.sha256},
            "prompt_template": dump.PROMPT_TEMPLATE}


def _save_vggt(tensors: dict[str, np.ndarray], path: str, dtype: str) -> None:
    from safetensors.torch import save_file

    save_file(hf_decoder._torch_tensors(tensors, dtype), path,
              metadata={"format": "pt", "producer": "spatial_distill export"})


def _target(config: ml_collections.ConfigDict) -> str:
    out = config.export.dir
    if not out:
        raise ExportError("config.export.dir is not set: --config.export.dir=OUT names the directory "
                          "the PyTorch artifacts go to")
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not config.export.overwrite:
        raise ExportError(f"config.export.dir = {out!r} exists and is not empty; choose another "
                          "directory or pass --config.export.overwrite=True to replace it")
    return out


def write(model, tokenizer, out: str, *, dtype: str = "float32", max_shard_bytes: int = 5 * 2**30,
          provenance: dict | None = None) -> dict:
    """Writes a Flax `Student`'s export to `out` (replaced if it exists) through `out.tmp-<pid>`;
    returns the export.json record."""
    if dtype not in hf_decoder.DTYPES:
        raise ExportError(f"config.export.dtype = {dtype!r}: choose one of {hf_decoder.DTYPES}")
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        decoder_files = hf_decoder.write(model.decoder, tokenizer, os.path.join(tmp, DECODER_DIR),
                                         dtype=dtype, max_shard_bytes=max_shard_bytes)
        vggt = vggt_tensors(model)
        _save_vggt(vggt, os.path.join(tmp, VGGT_FILE), dtype)
        rest = student_tensors(model)
        _save_vggt(rest, os.path.join(tmp, STUDENT_FILE), dtype)
        with open(os.path.join(tmp, STUDENT_CONFIG), "w") as f:
            json.dump(student_config(model, tokenizer), f, indent=1)
        record = {**(provenance or {}), "dtype": dtype, "code": ckpt_lib.code_version(),
                  "decoder_scan_layers": bool(model.decoder.config.scan_layers),
                  "files": {"decoder": sorted(os.listdir(os.path.join(tmp, DECODER_DIR))),
                            "decoder_weights": decoder_files, "vggt": VGGT_FILE,
                            "student": STUDENT_FILE, "student_config": STUDENT_CONFIG},
                  "vggt_parameters": int(sum(v.size for v in vggt.values())),
                  "student_parameters": int(sum(v.size for v in rest.values()))}
        with open(os.path.join(tmp, RECORD), "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def export(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes OUT (module doc) from the latest checkpoint of `workdir`; returns OUT."""
    out = _target(config)
    if config.export.dtype not in hf_decoder.DTYPES:  # before the (slow) restore
        raise ExportError(f"config.export.dtype = {config.export.dtype!r}: choose one of {hf_decoder.DTYPES}")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, keep=1, create=False) if os.path.isdir(ckpt_dir) else None
    step = None if ckpt is None else ckpt.latest_step()
    if step is None:
        raise ExportError(f"{ckpt_dir}: no checkpoint to export; train first (config.mode=train or pipeline)")
    meta = ckpt.meta(step)
    ckpt.close()
    config = copy.deepcopy(config)
    stored_scan = meta.get("scan_layers")
    if stored_scan is not None and bool(stored_scan) != bool(config.model.decoder.scan_layers):
        config.unlock()
        config.model.decoder.scan_layers = bool(stored_scan)  # export the layout the checkpoint has
        config.lock()
    model = eval_stage.restore_student(config, workdir)
    tokenizer = prepare.tokenizer(config, workdir)

    record = write(model, tokenizer, out, dtype=config.export.dtype,
                   max_shard_bytes=int(config.export.max_shard_bytes),
                   provenance={"checkpoint": os.path.join(ckpt_dir, str(step)), "step": int(step),
                               "model": ckpt_lib.config_dict(config)["model"]})
    print(f"  exported step {step} ({config.export.dtype}) to {out}: decoder/ (Hugging Face Llama, "
          f"{len(record['files']['decoder_weights'])} weight file(s)), {VGGT_FILE} ({record['vggt_parameters'] / 1e6:.2f}M "
          "parameters, official VGGT keys), "
          f"{STUDENT_FILE} ({record['student_parameters'] / 1e6:.2f}M), {STUDENT_CONFIG}", flush=True)
    return out
