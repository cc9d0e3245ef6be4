"""VGGT port against the official PyTorch fixtures (shared/fixtures/vggt), plus the VGGT-1B key
manifest, loader/exporter, input validation, bf16 and remat."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spatial_distill.models import vggt as V
from spatial_distill.models.state_dict import CheckpointMismatchError, load_tensors
from spatial_distill.sharding import axis_rules, make_mesh

FIXTURES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "vggt"
TINY = FIXTURES / "tiny"
OUTPUT_KEYS = ("aggregated_tokens", "pose_enc", "pose_enc_list", "depth", "depth_conf",
               "world_points", "world_points_conf")
TRACK = 65_941_396


def _stack(v):
    return np.stack([np.asarray(x) for x in v]) if isinstance(v, list) else np.asarray(v)


@pytest.fixture(scope="module")
def tensors():
    return load_tensors(TINY / "state_dict.safetensors")[0]


@pytest.fixture(scope="module")
def inputs():
    return dict(np.load(TINY / "inputs.npz"))


@pytest.fixture(scope="module")
def model():
    return V.load_official(TINY / "state_dict.safetensors", TINY / "config.json")


def _forward(m, images):
    with jax.default_matmul_precision("highest"):
        return jax.tree.map(np.asarray, nnx.jit(lambda mm, x: mm(x))(m, jnp.asarray(images)))


@pytest.fixture(scope="module")
def outputs(model, inputs):
    return {c: _forward(model, inputs[f"images_{c}"]) for c in "ab"}


# -- numerics against the official float32 run ------------------------------------------------

@pytest.mark.parametrize("case", "ab")
def test_outputs_match_official_float32(outputs, case):
    ref = np.load(TINY / "outputs.npz")
    got = outputs[case]
    assert got["patch_start_idx"] == 5
    assert len(got["pose_enc_list"]) == 4 and len(got["aggregated_tokens"]) == 4
    for key in OUTPUT_KEYS:  # fixture README: atol = rtol = 1e-4 (measured port error ~4e-6)
        np.testing.assert_allclose(_stack(got[key]), ref[f"{key}_{case}"], atol=1e-4, rtol=1e-4,
                                   err_msg=f"{key}_{case}")


@pytest.mark.parametrize("case", "ab")
def test_aggregator_intermediates(model, inputs, case):
    inter = np.load(TINY / "intermediates.npz")
    images = inputs[f"images_{case}"]
    b, s, _, hh, ww = images.shape
    h, w = hh // 14, ww // 14
    agg = model.aggregator
    np.testing.assert_allclose(np.asarray(agg.patch_embed.pos_embed_for(h, w)),
                               inter[f"dino_pos_embed_used_{case}"], atol=1e-5, rtol=1e-4)
    with jax.default_matmul_precision("highest"):
        tokens = np.asarray(nnx.jit(lambda a, x: a.embed(x))(agg, jnp.moveaxis(images, 2, -1)))
    p = tokens.shape[2]
    np.testing.assert_allclose(tokens.reshape(b * s, p, -1), inter[f"tokens_into_frame_block0_{case}"],
                               atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(tokens[:, :, 5:].reshape(b * s, h * w, -1),
                               inter[f"dino_x_norm_patchtokens_{case}"], atol=1e-4, rtol=1e-4)
    # A single frame uses the slot-0 (reference) tokens, exactly as frame 0 of a longer sequence.
    with jax.default_matmul_precision("highest"):
        single = np.asarray(nnx.jit(lambda a, x: a.embed(x))(agg, jnp.moveaxis(images[:1, :1], 2, -1)))
    # Another batch shape compiles to other float32 summation orders: allow ~10 ulp.
    np.testing.assert_allclose(single[0, 0], tokens[0, 0], atol=1e-5, rtol=0)
    pos_frame, pos_global = agg.positions(b, s, h, w)
    np.testing.assert_array_equal(pos_frame, inter[f"rope_pos_frame_{case}"])
    np.testing.assert_array_equal(pos_global, inter[f"rope_pos_global_{case}"])


def test_four_dim_input_and_kept_layers(tensors, inputs, outputs):
    cfg = V.VGGTConfig.from_json(TINY / "config.json", enable_camera=False, enable_depth=False,
                                 enable_point=False, keep_layers=(1, 3))
    agg_only = V.load_official(tensors, cfg)
    # Under a (1-device) mesh with the default rules, so every `constrain` is exercised too.
    with axis_rules(make_mesh((1, 1, -1), jax.devices()[:1])):
        got = _forward(agg_only, inputs["images_b"][0])  # [S, 3, H, W]: batch axis added
    assert set(got) == {"aggregated_tokens", "patch_start_idx"}
    layers = got["aggregated_tokens"]
    assert layers[0] is None and layers[2] is None
    for i in (1, 3):
        np.testing.assert_array_equal(layers[i], outputs["b"]["aggregated_tokens"][i])


# -- float64 against the official float64 run ---------------------------------------------------

@pytest.mark.slow
def test_float64_matches_official_float64(tensors, inputs):
    """README: upstream keeps the ImageNet constants, RoPE angles and the DINO pos-embed resize in
    float32 even in float64, as this port does. Then case b (no resize) matches the aggregator and
    camera head to ~1e-14 and the DPT outputs to ~1e-8; case a is limited to ~1e-6 by the float32
    bicubic resize of the pos-embed."""
    ref = np.load(TINY / "outputs_f64.npz")
    with jax.enable_x64(True):
        cfg = V.VGGTConfig.from_json(TINY / "config.json", dtype="float64")
        m = V.load_official(tensors, cfg, dtype=jnp.float64)
        got = {c: _forward(m, inputs[f"images_{c}"].astype(np.float64)) for c in "ab"}
    # Measured: case a <= 3.9e-7 (aggregated_tokens), case b <= 7e-15 on every output.
    for key in OUTPUT_KEYS:
        assert _stack(got["b"][key]).dtype == np.float64, key
        np.testing.assert_allclose(_stack(got["a"][key]), ref[f"{key}_a"], atol=1e-5, rtol=0,
                                   err_msg=f"{key}_a")
    tight = {"aggregated_tokens": 1e-10, "pose_enc": 1e-10, "pose_enc_list": 1e-10, "depth": 1e-7,
             "depth_conf": 1e-7, "world_points": 1e-7, "world_points_conf": 1e-7}
    for key, tol in tight.items():
        np.testing.assert_allclose(_stack(got["b"][key]), ref[f"{key}_b"], atol=tol, rtol=0, err_msg=key)


# -- units at real sizes ------------------------------------------------------------------------

def test_dino_pos_embed_interpolation_all_cases():
    f = np.load(FIXTURES / "units" / "dino_pos_embed_interp.npz")
    vit = V.PatchEmbedConfig(embed_dim=16, depth=0, num_heads=1)
    pe = V.DinoPatchEmbed(vit, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    pe.pos_embed.set_value(jnp.asarray(f["pos_embed_in"]))
    cases = [k.removeprefix("pos_embed_out_") for k in f if k.startswith("pos_embed_out_")]
    assert len(cases) == 7
    for hw in cases:
        hh, ww = map(int, hw.split("x"))
        got = np.asarray(jax.jit(pe.pos_embed_for, static_argnums=(0, 1))(hh // 14, ww // 14))
        np.testing.assert_allclose(got, f[f"pos_embed_out_{hw}"], atol=1e-5, rtol=0, err_msg=hw)


# -- VGGT-1B, abstractly ---------------------------------------------------------------------------

def test_vggt_1b_abstract_keys_shapes_and_counts():
    manifest = json.loads((FIXTURES / "vggt_1b_manifest.json").read_text())
    m = V.abstract_model(V.VGGTConfig.vggt_1b())
    want = {k: tuple(v) for k, v in manifest["state_dict"].items() if not k.startswith("track_head.")}
    got = V.official_shapes(m)
    assert list(got) == list(want)  # same keys in upstream order
    assert got == want
    assert V.count_params(m) == manifest["total_params"] - TRACK == 1_256_537_516 - TRACK
    split = manifest["split_params"]
    assert V.count_params(m.aggregator) == split["aggregator"]
    for name, head in m.heads().items():
        assert V.count_params(head) == split[name], name


def test_every_parameter_has_logical_names():
    m = V.abstract_model(V.VGGTConfig.from_json(TINY / "config.json"))
    for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.get_value().shape), (path, names)


# -- loader / exporter ------------------------------------------------------------------------------

def test_export_round_trip_is_bit_exact(model, tensors):
    out = V.export_official(model)
    want = {k: v for k, v in tensors.items() if not k.startswith("track_head.")}
    assert out.keys() == want.keys()
    for k, v in want.items():
        assert out[k].dtype == v.dtype and np.array_equal(out[k], v), k
    assert "aggregator.patch_embed.mask_token" in out
    assert not any("_resnet" in k for k in out)


def test_loader_reports_every_problem_at_once(tensors):
    bad = dict(tensors)
    del bad["aggregator.frame_blocks.2.attn.k_norm.bias"]
    bad["aggregator.extra_token"] = np.zeros(3, np.float32)
    bad["depth_head.projects.1.weight"] = np.zeros((5, 128, 1, 1), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        V.load_official(bad, TINY / "config.json")
    msg = str(e.value)
    for key in ("aggregator.frame_blocks.2.attn.k_norm.bias", "aggregator.extra_token",
                "depth_head.projects.1.weight"):
        assert key in msg, key


def test_loader_ignores_track_and_disabled_heads_only(tensors):
    cfg = V.VGGTConfig.from_json(TINY / "config.json", enable_camera=False, enable_point=False)
    m = V.load_official(tensors, cfg)  # camera_head.*, point_head.*, track_head.* present: ignored
    assert set(m.heads()) == {"depth_head"}
    with pytest.raises(CheckpointMismatchError, match="aggregator.camera_token"):
        V.load_official({k: v for k, v in tensors.items() if k != "aggregator.camera_token"}, cfg)


def test_config_from_json_and_errors():
    d = json.loads((TINY / "config.json").read_text())
    cfg = V.VGGTConfig.from_json(d)
    assert cfg.aggregator.depth == 4 and cfg.aggregator_patch_embed_vit.depth == 2
    assert cfg.depth_head.output_dim == 2 and cfg.point_head.activation == "inv_log"
    assert cfg.camera_head.trunk_depth == 2
    with pytest.raises(ValueError, match="bogus"):
        V.VGGTConfig.from_json({**d, "bogus": 1})
    with pytest.raises(ValueError, match="wrong_key"):
        V.VGGTConfig.from_json({**d, "aggregator": {**d["aggregator"], "wrong_key": 1}})
    with pytest.raises(ValueError, match=r"lacks layers \[0, 1, 2\]"):
        dataclasses.replace(cfg, keep_layers=(3,))
    big = V.VGGTConfig.vggt_1b()
    assert (big.aggregator.embed_dim, big.aggregator.depth, big.aggregator.rope_freq) == (1024, 24, 100.0)
    assert big.depth_head.intermediate_layer_idx == (4, 11, 17, 23)


# -- input validation ---------------------------------------------------------------------------

def test_image_errors_name_the_problem(model):
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model(np.zeros((1, 2, 3, 43, 56), np.float32))
    with pytest.raises(ValueError, match="has 4 entries, need 3"):
        model(np.zeros((1, 2, 4, 42, 56), np.float32))
    with pytest.raises(ValueError, match="got shape"):
        model(np.zeros((3, 42, 56), np.float32))
    with pytest.raises(ValueError, match="expected RGB in"):
        model(np.full((1, 1, 3, 14, 14), 255.0, np.float32))


def test_range_check_is_skipped_under_jit():
    images = jnp.full((1, 1, 3, 14, 14), 255.0)
    assert float(jax.jit(lambda x: (V.check_images(x), x.sum())[1])(images)) == 255.0 * 3 * 14 * 14
    with pytest.raises(ValueError, match="multiples"):
        jax.jit(V.check_images)(jnp.zeros((1, 1, 3, 15, 14)))


# -- compute dtype and rematerialisation -------------------------------------------------------

def _aggregator_only(tensors, **kw):
    cfg = V.VGGTConfig.from_json(TINY / "config.json", enable_camera=False, enable_depth=False,
                                 enable_point=False, **kw)
    return V.load_official(tensors, cfg)


def test_bf16_aggregator_close_to_float32(tensors, inputs):
    m = _aggregator_only(tensors, dtype="bfloat16")
    got = _stack(nnx.jit(lambda mm, x: mm(x)["aggregated_tokens"])(m, jnp.asarray(inputs["images_b"])))
    ref = np.load(TINY / "outputs.npz")["aggregated_tokens_b"]  # official float32
    assert got.dtype == np.float32  # residual stream and outputs stay float32
    # bf16 matmuls (8-bit mantissa) over 2 DINO + 8 aggregator blocks on this random-weight
    # model: measured max |err| / max |ref| = 5.1e-3 (case b), 5.6e-3 (case a).
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 1.5e-2, rel


def test_bf16_aggregator_feeds_float32_heads():
    cfg = V.VGGTConfig.from_json(TINY / "config.json", dtype="bfloat16")
    graphdef, state = nnx.split(V.abstract_model(cfg))
    out = jax.eval_shape(lambda st, x: nnx.merge(graphdef, st)(x), state,
                         jax.ShapeDtypeStruct((1, 2, 3, 28, 28), jnp.float32))
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        assert out[key].dtype == jnp.float32, key
    assert out["aggregated_tokens"][-1].dtype == jnp.float32


@pytest.mark.slow
def test_remat_gives_identical_outputs_and_gradients(tensors, inputs):
    images = jnp.asarray(np.moveaxis(inputs["images_b"], 2, -1))

    def run(remat):
        agg = _aggregator_only(tensors, remat=remat).aggregator

        def loss(a):
            layers, _ = a(images)
            return sum(jnp.sum(t**2) for t in layers)

        with jax.default_matmul_precision("highest"):
            fwd = _stack(nnx.jit(lambda a: a(images)[0])(agg))
            grads = nnx.jit(nnx.grad(loss))(agg)
        return fwd, grads

    f0, g0 = run(False)
    f1, g1 = run(True)
    np.testing.assert_array_equal(f1, f0)  # remat changes only what the backward pass stores
    # The backward graphs differ (recompute vs. stored residuals), so XLA fuses and reassociates
    # float32 sums differently: measured gradient gaps ~1e-6 of each tensor's max.
    for (path, a), (_, b) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1), strict=True):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        np.testing.assert_allclose(b, a, atol=1e-5 * np.abs(a).max(), rtol=0, err_msg=str(path))
