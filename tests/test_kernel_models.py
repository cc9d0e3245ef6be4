"""Every model with the Pallas attention kernel selected equals itself on XLA attention.

The models are built with head_dim 64 (the kernel takes any multiple of 8; the tiny presets' 16
and 32 are covered in test_flash_attention), random weights, float32."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_distill import generate
from spatial_distill.models import clip, llama, llava3d, vggt

ATOL = 2e-5


def _same_weights(build):
    """The same random model twice, once per attention implementation."""
    a, b = build("xla"), build("pallas")
    nnx.update(b, nnx.state(a))
    return a, b


def test_llama_forward_and_kv_cache_generation():
    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=192, num_layers=2,
                            num_heads=2, num_kv_heads=1, max_position_embeddings=64)
    xla, pallas = _same_weights(lambda impl: llama.Llama(dataclasses.replace(cfg, attention_impl=impl),
                                                         rngs=nnx.Rngs(0)))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 11)))
    seg = jnp.asarray([[1] * 11, [1] * 7 + [0] * 4], jnp.int32)
    np.testing.assert_allclose(np.asarray(pallas(ids, segment_ids=seg)), np.asarray(xla(ids, segment_ids=seg)),
                               atol=ATOL)
    mask = jnp.ones((2, 11), bool)
    out = [generate.generate_from_ids(m, ids, mask, max_new_tokens=5, eos_id=1, pad_id=0)[0]
           for m in (xla, pallas)]
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(out[1]))


def test_vggt_aggregator_and_camera_head():
    base = vggt.VGGTConfig(
        aggregator=vggt.AggregatorConfig(img_size=28, embed_dim=128, depth=2, num_heads=2),
        aggregator_patch_embed_vit=vggt.PatchEmbedConfig(img_size=28, embed_dim=128, depth=1, num_heads=2),
        camera_head=vggt.CameraHeadConfig(dim_in=256, trunk_depth=1, num_heads=4),
        enable_depth=False, enable_point=False)
    xla, pallas = _same_weights(lambda impl: vggt.VGGT(dataclasses.replace(base, attention=impl),
                                                       rngs=nnx.Rngs(0)))
    images = jnp.asarray(np.random.default_rng(1).uniform(size=(1, 3, 3, 28, 42)), jnp.float32)
    a, b = xla(images), pallas(images)
    for la, lb in zip(a["aggregated_tokens"], b["aggregated_tokens"]):
        np.testing.assert_allclose(np.asarray(lb), np.asarray(la), atol=ATOL)
    np.testing.assert_allclose(np.asarray(b["pose_enc"]), np.asarray(a["pose_enc"]), atol=ATOL)


def test_clip_and_llava3d():
    cfg = llava3d.LLaVA3DConfig(
        llama=llama.LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=192, num_layers=1,
                                num_heads=2, max_position_embeddings=256),
        clip=clip.CLIPVisionConfig(hidden_size=128, intermediate_size=192, num_layers=2, num_heads=2,
                                   image_size=28, patch_size=14))

    def build(impl):
        c = dataclasses.replace(cfg, llama=dataclasses.replace(cfg.llama, attention_impl=impl),
                                clip=dataclasses.replace(cfg.clip, attention=impl))
        return llava3d.LLaVA3D(c, rngs=nnx.Rngs(0))

    xla, pallas = _same_weights(build)
    r = np.random.default_rng(2)
    images = r.normal(size=(1, 2, 3, 28, 28)).astype(np.float32)
    depths = r.uniform(0.5, 3, (1, 2, 28, 28)).astype(np.float32)
    poses = np.broadcast_to(np.eye(4, dtype=np.float32), (1, 2, 4, 4))
    K = np.broadcast_to(np.diag([30.0, 30.0, 1.0, 1.0]).astype(np.float32), (1, 2, 4, 4))
    ids = np.asarray([[1, 5, 6, llava3d.IMAGE_TOKEN_INDEX, 7, 8]])
    kw = dict(images=images, depths=depths, poses=poses, intrinsics=K)
    np.testing.assert_allclose(np.asarray(pallas(ids, **kw)), np.asarray(xla(ids, **kw)), atol=ATOL)
    jax.clear_caches()
