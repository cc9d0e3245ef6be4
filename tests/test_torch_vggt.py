"""PyTorch VGGT modules (`spatial_distill.export.torch_vggt`) against the official tiny fixture
(shared/fixtures/vggt/tiny) and against our Flax modules; bf16; strict key sets."""

import copy
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file

from spatial_distill.export import torch_vggt as T
from spatial_distill.models import vggt as V
from spatial_distill.models.camera_head import CameraHead, CameraHeadConfig
from spatial_distill.models.dpt import DPTConfig, DPTHead
from spatial_distill.models.state_dict import StateDict

TINY = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "vggt" / "tiny"
OUTPUT_KEYS = ("aggregated_tokens", "pose_enc_list", "depth", "depth_conf", "world_points",
               "world_points_conf")


def _torch_vggt(cfg: V.VGGTConfig) -> torch.nn.ModuleDict:
    """The four ported parts under their official attribute names (so keys carry the prefixes)."""
    return torch.nn.ModuleDict(dict(
        aggregator=T.Aggregator(cfg.aggregator, cfg.aggregator_patch_embed_vit),
        camera_head=T.CameraHead(cfg.camera_head),
        depth_head=T.DPTHead(cfg.depth_head),
        point_head=T.DPTHead(cfg.point_head),
    )).eval()


def _run(m: torch.nn.ModuleDict, images, chunk=None) -> dict[str, np.ndarray]:
    """images `[B, S, 3, H, W]` -> the fixture's output names as float numpy arrays."""
    x = torch.as_tensor(images)
    with torch.no_grad():
        layers, psi = m["aggregator"](x)
        hw = tuple(x.shape[-2:])
        out = {"aggregated_tokens": torch.stack(layers),
               "pose_enc_list": torch.stack(m["camera_head"](layers))}
        out["depth"], out["depth_conf"] = m["depth_head"](layers, hw, psi, chunk)
        out["world_points"], out["world_points_conf"] = m["point_head"](layers, hw, psi, chunk)
    assert psi == 5
    return {k: v.numpy() for k, v in out.items()}


@pytest.fixture(scope="module")
def checkpoint():
    """The fixture's official state dict without the (not ported) track head."""
    sd = load_file(TINY / "state_dict.safetensors")
    return {k: v for k, v in sd.items() if not k.startswith("track_head.")}


@pytest.fixture(scope="module")
def official(checkpoint):
    m = _torch_vggt(V.VGGTConfig.from_json(TINY / "config.json"))
    m.load_state_dict(checkpoint, strict=True)
    return m


@pytest.fixture(scope="module")
def inputs():
    return dict(np.load(TINY / "inputs.npz"))


@pytest.fixture(scope="module")
def outputs(official, inputs):
    return {c: _run(official, inputs[f"images_{c}"]) for c in "ab"}


# -- the official fixture -------------------------------------------------------------------------

def test_state_dict_is_the_official_key_set(official, checkpoint):
    got = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    assert got == {k: tuple(v.shape) for k, v in checkpoint.items()}
    # The ImageNet constants are non-persistent buffers, as upstream.
    assert {n for n, _ in official.named_buffers()} == {"aggregator._resnet_mean",
                                                        "aggregator._resnet_std"}


@pytest.mark.parametrize("case", "ab")
def test_outputs_match_official_float32(outputs, case):
    ref = np.load(TINY / "outputs.npz")
    for key in OUTPUT_KEYS:
        got, want = outputs[case][key], ref[f"{key}_{case}"]
        assert got.shape == want.shape and got.dtype == np.float32, key
        # README: atol = rtol = 1e-4 for a faithful port; measured here <= 3.4e-6 (the official
        # float32-vs-float64 gap itself is 3.8e-6).
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f"{key}_{case}")
        assert np.abs(got - want).max() < 1e-5, (key, np.abs(got - want).max())


def test_float64_matches_official_float64(official, inputs):
    """Upstream keeps the ImageNet constants, RoPE angles, pos-embed resize and uv embedding in
    float32 in a float64 run, as this port does: measured <= 1e-14 on both cases."""
    ref = np.load(TINY / "outputs_f64.npz")
    m64 = copy.deepcopy(official).double()
    for case in "ab":
        got = _run(m64, inputs[f"images_{case}"].astype(np.float64))
        for key in OUTPUT_KEYS:
            np.testing.assert_allclose(got[key], ref[f"{key}_{case}"], atol=1e-12, rtol=0,
                                       err_msg=f"{key}_{case}")


def test_frame_chunks_and_kept_layers_change_nothing(official, inputs, outputs):
    got = _run(official, inputs["images_a"], chunk=4)  # 6 frames: chunks of 4 and 2
    for key in ("depth", "depth_conf", "world_points", "world_points_conf"):
        np.testing.assert_allclose(got[key], outputs["a"][key], atol=1e-6, rtol=0, err_msg=key)
    with torch.no_grad():
        layers, _ = official["aggregator"](torch.as_tensor(inputs["images_b"]), keep_layers=[1, -1])
    assert layers[0] is None and layers[2] is None
    for i in (1, 3):
        np.testing.assert_array_equal(layers[i].numpy(), outputs["b"]["aggregated_tokens"][i])


def test_bfloat16_parameters_stay_close_to_float32(official, inputs, outputs):
    mb = copy.deepcopy(official).to(torch.bfloat16)
    # The ImageNet constants are not rounded by .to(bf16) (they stay float32, as in the Flax port).
    assert mb["aggregator"]._resnet_mean.dtype == torch.float32
    got = _run(mb, inputs["images_b"])
    for key in OUTPUT_KEYS:
        # The residual stream, the returned tokens and the heads stay float32.
        assert got[key].dtype == np.float32, key
        ref = outputs["b"][key]
        rel = np.abs(got[key] - ref).max() / np.abs(ref).max()
        # bf16 matmuls over 2 DINO + 8 aggregator blocks, bf16-rounded head weights, random
        # weights: measured 5.4e-3 (tokens), 2.9e-2 (poses), <= 1.1e-2 (dense outputs).
        assert rel < (1.5e-2 if key == "aggregated_tokens" else 6e-2), (key, rel)


def test_meta_device_build_and_assign_load(checkpoint, inputs, outputs):
    with torch.device("meta"):  # no random init: how a 1B model is best built
        m = _torch_vggt(V.VGGTConfig.from_json(TINY / "config.json"))
    m.load_state_dict(checkpoint, strict=True, assign=True)
    got = _run(m.to("cpu"), inputs["images_b"])  # .to() also materialises the ImageNet buffers
    for key in OUTPUT_KEYS:
        np.testing.assert_array_equal(got[key], outputs["b"][key], err_msg=key)


def test_strict_load_rejects_missing_and_extra_keys(official, checkpoint):
    fresh = _torch_vggt(V.VGGTConfig.from_json(TINY / "config.json"))
    missing = dict(checkpoint)
    del missing["aggregator.frame_blocks.0.attn.q_norm.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*frame_blocks\.0\.attn\.q_norm\."):
        fresh.load_state_dict(missing, strict=True)
    extra = {**checkpoint, "depth_head.resize_layers.2.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*resize_layers\.2\.weight"):
        fresh.load_state_dict(extra, strict=True)
    bad = {**checkpoint, "camera_head.embed_pose.weight": torch.zeros(9, 128)}
    with pytest.raises(RuntimeError, match=r"size mismatch for camera_head\.embed_pose\.weight"):
        fresh.load_state_dict(bad, strict=True)


# -- parity with the Flax modules at another size -------------------------------------------------

def _redraw(sd: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Weights with no near-zero path (Flax init has 1e-6 tokens and 0.01 LayerScales, which
    would hide bugs), drawn like the fixture's `reinit` recipe."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in sd.items():
        n = rng.standard_normal(v.shape)
        if k.endswith("gamma"):
            w = rng.uniform(0.3, 0.7, v.shape)
        elif v.ndim == 1 and (".norm" in k or "_norm" in k):
            w = (1 + 0.2 * n) if k.endswith("weight") else 0.1 * n
        elif k.endswith("bias"):
            w = 0.05 * n
        elif k.endswith("weight"):
            deconv = "resize_layers.0" in k or "resize_layers.1" in k  # [in, out, k, k]
            fan_in = v.shape[0] if deconv else np.prod(v.shape[1:])
            w = n / np.sqrt(fan_in)
        else:  # free tokens and tables
            w = 0.5 * n
        out[k] = w.astype(v.dtype)
    return out


@pytest.fixture(scope="module")
def flax_parity():
    """Flax aggregator + camera head + depth head at embed_dim 32, depth 2, 2 heads, DINO grid
    2x2 (so 28x42 images interpolate the pos-embed), with redrawn weights; and the torch twin
    loaded (strict) from their `export_torch`."""
    vit = V.PatchEmbedConfig(img_size=28, embed_dim=32, depth=1, num_heads=2, num_register_tokens=2)
    agg_cfg = V.AggregatorConfig(img_size=28, embed_dim=32, depth=2, num_heads=2,
                                 num_register_tokens=2)
    cam_cfg = CameraHeadConfig(dim_in=64, trunk_depth=1, num_heads=2)
    dpt_cfg = DPTConfig(dim_in=64, features=16, out_channels=(8, 16, 32, 32),
                        intermediate_layer_idx=(0, 1, 0, 1), output_dim=2, activation="exp")
    # Built abstractly (shapes only: an eager random init costs tens of seconds) and filled with
    # redrawn weights through the official-key loader; `export_torch` then feeds the torch twin.
    flax = nnx.eval_shape(lambda: {
        "aggregator": V.Aggregator(agg_cfg, vit, rngs=nnx.Rngs(0)),
        "camera_head": CameraHead(cam_cfg, rngs=nnx.Rngs(1)),
        "depth_head": DPTHead(dpt_cfg, rngs=nnx.Rngs(2))})
    graphdef, state = nnx.split(flax)
    shadow = nnx.merge(graphdef, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state))
    shapes = {k: v for p, m in shadow.items() for k, v in m.export_torch(p).items()}
    sd = StateDict(_redraw(shapes, seed=1))
    for prefix, mod in flax.items():
        mod.load_torch(sd, prefix)
    sd.finish()
    graphdef, state = nnx.split(flax)
    flax = nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))
    torch_m = torch.nn.ModuleDict(dict(aggregator=T.Aggregator(agg_cfg, vit),
                                       camera_head=T.CameraHead(cam_cfg),
                                       depth_head=T.DPTHead(dpt_cfg))).eval()
    reexported = {}
    for prefix, mod in flax.items():
        reexported.update({k: torch.from_numpy(np.array(v))
                           for k, v in mod.export_torch(prefix).items()})
    torch_m.load_state_dict(reexported, strict=True)
    return flax, torch_m


def test_matches_flax_modules(flax_parity):
    flax, torch_m = flax_parity
    images = np.random.default_rng(2).uniform(0, 1, (1, 2, 3, 28, 42)).astype(np.float32)

    @nnx.jit
    def forward(f, x):
        layers, psi = f["aggregator"](jnp.moveaxis(x, 2, -1))
        out = {"tokens": jnp.stack(layers), "poses": jnp.stack(f["camera_head"](layers))}
        out["depth"], out["conf"] = f["depth_head"](layers, (28, 42), psi)
        return out

    with jax.default_matmul_precision("highest"):
        want = forward(flax, jnp.asarray(images))
    with torch.no_grad():
        t_layers, t_psi = torch_m["aggregator"](torch.from_numpy(images))
        got = {"tokens": torch.stack(t_layers),
               "poses": torch.stack(torch_m["camera_head"](t_layers))}
        got["depth"], got["conf"] = torch_m["depth_head"](t_layers, (28, 42), t_psi, 1)
    assert t_psi == 3
    assert got["depth"].shape == (1, 2, 28, 42, 1) and got["conf"].shape == (1, 2, 28, 42)
    assert got["poses"].shape == (4, 1, 2, 9)
    for key, ref in want.items():
        np.testing.assert_allclose(got[key].numpy(), np.asarray(ref), atol=1e-4, rtol=1e-4,
                                   err_msg=key)
