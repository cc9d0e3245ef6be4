"""The student: data, tokenizer, teacher records, model, training, mesh.

Presets (select with `:preset`):
  tiny   112 px frames, small VGGT and decoder; the built-in synthetic data; runs on 2 CPU cores.
  small  224 px, a wider model; a single GPU/TPU host.
  paper  518 px, VGGT-1B aggregator + 24-layer 2048-wide decoder (~2.29B), Llama-2 vocabulary.

Run:  python run.py --config=configs/student.py:tiny --workdir=/tmp/sd
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common

PRESETS = {
    # name: image px, train/eval scenes, decoder (vocab, hidden, layers, heads, kv heads, mlp), K
    "tiny": dict(image_size=112, train=1000, eval=200, vocab=512, hidden=128, layers=4,
                 heads=4, kv_heads=2, mlp=352, latents=8, batch=8, steps=300),
    "small": dict(image_size=224, train=4000, eval=500, vocab=32000, hidden=1024, layers=12,
                  heads=16, kv_heads=16, mlp=2816, latents=8, batch=32, steps=20000),
    "paper": dict(image_size=518, train=4000, eval=500, vocab=32000, hidden=2048, layers=24,
                  heads=16, kv_heads=16, mlp=5504, latents=8, batch=64, steps=20000),
}


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.mode = "pipeline"  # pipeline (every stage in order) | data
    c.seed = 0

    c.data = common.data_config(image_size=p["image_size"], num_train_scenes=p["train"],
                                num_eval_scenes=p["eval"])

    c.tokenizer = ml_collections.ConfigDict()
    # The teacher's tokenizer (a tokenizer.model / tokenizer.json or its directory). None: train
    # the built-in byte-level BPE on the synthetic QA and save it in WORKDIR/tokenizer.
    c.tokenizer.path = config_dict.placeholder(str)
    c.tokenizer.vocab_size = p["vocab"]  # size of the built-in BPE (must equal the decoder's)

    c.teacher = ml_collections.ConfigDict()
    c.teacher.k = 32  # top-K log-probs stored per answer token
    c.teacher.temperature = 1.0  # temperature of the stored teacher distribution

    c.model = ml_collections.ConfigDict()
    c.model.decoder = ml_collections.ConfigDict()
    c.model.decoder.vocab_size = p["vocab"]
    c.model.decoder.hidden_size = p["hidden"]
    c.model.decoder.num_layers = p["layers"]
    c.model.decoder.num_heads = p["heads"]
    c.model.decoder.num_kv_heads = p["kv_heads"]
    c.model.decoder.intermediate_size = p["mlp"]
    c.model.num_latents = p["latents"]  # Hidden-CoT latent tokens K (0 disables)

    c.train = ml_collections.ConfigDict()
    c.train.steps = p["steps"]
    c.train.batch_size = p["batch"]  # global batch (samples, each with all its questions)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 fills the remaining devices

    c.lock()
    return c
