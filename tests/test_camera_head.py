"""Camera head and pose encoding (spatial_distill/models/camera_head.py).

The head is fed the official tiny-VGGT fixture's own aggregator outputs (no aggregator involved);
tolerances from shared/fixtures/vggt/tiny/README.md.
"""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.spatial.transform import Rotation

from spatial_distill.models.camera_head import (
    CameraHead,
    CameraHeadConfig,
    extri_intri_to_pose_encoding,
    mat_to_quat,
    pose_encoding_to_extri_intri,
    quat_to_mat,
)
from spatial_distill.models.state_dict import CheckpointMismatchError, StateDict, load_tensors

FIXTURES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "vggt"
TINY = FIXTURES / "tiny"
PREFIX = "camera_head"


@functools.cache
def tiny_config() -> CameraHeadConfig:
    return CameraHeadConfig.from_json(json.loads((TINY / "config.json").read_text())[PREFIX])


@functools.cache
def head_tensors() -> dict:
    tensors = load_tensors(TINY / "state_dict.safetensors")[0]
    return {k: v for k, v in tensors.items() if k.startswith(PREFIX + ".")}


@functools.cache
def npz(name: str) -> dict:
    with np.load(TINY / name) as z:
        return dict(z)


def abstract_head(cfg: CameraHeadConfig, param_dtype=jnp.float32) -> CameraHead:
    # Shapes only: eager random init would compile one tiny XLA program per parameter shape.
    return nnx.eval_shape(lambda: CameraHead(cfg, param_dtype=param_dtype, rngs=nnx.Rngs(0)))


@functools.cache
def load_head(param_dtype=jnp.float32) -> CameraHead:
    head = abstract_head(tiny_config(), param_dtype)
    sd = StateDict(head_tensors(), "tiny/state_dict.safetensors")
    head.load_torch(sd, PREFIX)
    sd.finish(what="camera head")
    graphdef, state = nnx.split(head)
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))


@nnx.jit
def run(head, tokens):
    return jnp.stack(head(tokens, num_iterations=4))


@pytest.mark.parametrize("case", ["a", "b"])
def test_matches_fixture_float32(case):
    out = npz("outputs.npz")
    with jax.default_matmul_precision("highest"):
        poses = np.asarray(run(load_head(), jnp.asarray(out[f"aggregated_tokens_{case}"])))
    np.testing.assert_allclose(poses, out[f"pose_enc_list_{case}"], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(poses[-1], out[f"pose_enc_{case}"], atol=1e-4, rtol=1e-4)
    # The FoV entries went through ReLU, the others did not.
    assert (poses[..., 7:] >= 0).all() and (poses[..., :7] < 0).any()


def float64_poses(case: str):
    out64 = npz("outputs_f64.npz")
    with jax.enable_x64(True):
        tokens = jnp.asarray(out64[f"aggregated_tokens_{case}"], jnp.float64)
        head = load_head(jnp.float64)
        poses = nnx.jit(lambda m, t: jnp.stack(m(t, num_iterations=4)))(head, tokens)
    assert poses.dtype == jnp.float64
    return np.asarray(poses), out64[f"pose_enc_list_{case}"]


@pytest.mark.parametrize("case", ["a", "b"])
def test_matches_fixture_float64(case):
    # Nothing in the camera head is kept in float32 upstream, so a float64 run agrees to
    # rounding (measured ~3e-15; the README reports ~1e-14 for the whole model on case b).
    poses, want = float64_poses(case)
    np.testing.assert_allclose(poses, want, atol=1e-12, rtol=0)


def test_bf16_tokens_run_in_float32():
    tokens = jnp.asarray(npz("outputs.npz")["aggregated_tokens_b"])
    poses = nnx.jit(lambda m, t: m(t, num_iterations=1))(load_head(), tokens.astype(jnp.bfloat16))
    assert len(poses) == 1 and poses[0].shape == (1, 2, 9) and poses[0].dtype == jnp.float32


def test_export_round_trip_is_bit_exact():
    exported = load_head().export_torch(PREFIX)
    assert set(exported) == set(head_tensors())
    for k, v in head_tensors().items():
        assert exported[k].dtype == v.dtype and np.array_equal(exported[k], v), k


def test_loader_reports_missing_unexpected_and_misshaped_keys():
    tensors = dict(head_tensors())
    del tensors["camera_head.trunk.1.ls2.gamma"]
    tensors["camera_head.trunk.0.attn.q_norm.weight"] = np.ones(32, np.float32)
    tensors["camera_head.embed_pose.weight"] = np.zeros((128, 7), np.float32)
    head = abstract_head(tiny_config())
    sd = StateDict(tensors, "broken.safetensors")
    head.load_torch(sd, PREFIX)
    with pytest.raises(CheckpointMismatchError) as err:
        sd.finish(what="camera head")
    msg = str(err.value)
    assert "missing keys (1): camera_head.trunk.1.ls2.gamma" in msg
    assert "unexpected keys (1): camera_head.trunk.0.attn.q_norm.weight" in msg
    assert "camera_head.embed_pose.weight: checkpoint (128, 7)" in msg


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown keys \\['depth'\\]"):
        CameraHeadConfig.from_json({"dim_in": 128, "depth": 2})
    with pytest.raises(ValueError, match="pose_encoding_type='absT_quaR_OneFLM1'"):
        CameraHeadConfig(pose_encoding_type="absT_quaR_OneFLM1")
    with pytest.raises(ValueError, match="fl_act='softplus'"):
        CameraHeadConfig(fl_act="softplus")
    with pytest.raises(ValueError, match="expected \\[B, S, P, 128\\]"):
        load_head()([jnp.zeros((1, 2, 21, 64))])


def test_vggt_1b_size_keys_and_logical_axes():
    manifest = json.loads((FIXTURES / "vggt_1b_manifest.json").read_text())
    head = abstract_head(CameraHeadConfig())
    leaves = jax.tree.leaves(nnx.state(head, nnx.Param),
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
    total = sum(int(np.prod(v.get_value().shape)) for v in leaves)
    assert total == manifest["split_params"][PREFIX]
    assert manifest["split_params"][PREFIX] == 216_174_610
    trunk = nnx.state(head.trunk, nnx.Param)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trunk)) == 201_449_472
    for v in leaves:
        names = v.get_metadata().get("out_sharding")
        shape = v.get_value().shape
        assert names is not None and len(names) == len(shape), (names, shape)
    # Export abstractly: zero-stride placeholders give exact shapes without allocating 216M floats.
    graphdef, state = nnx.split(head)
    fill = lambda x: np.broadcast_to(np.zeros((), np.dtype(x.dtype)), x.shape)
    shadow = nnx.merge(graphdef, jax.tree.map(fill, state))
    shapes = {k: tuple(v.shape) for k, v in shadow.export_torch(PREFIX).items()}
    want = [(k, tuple(s)) for k, s in manifest["state_dict"].items() if k.startswith(PREFIX + ".")]
    assert list(shapes.items()) == want


# ------------------------------------------------------------------------------------------------
# pose encoding


def random_cameras(n: int, seed: int):
    rng = np.random.default_rng(seed)
    rot = Rotation.random(n, random_state=seed).as_matrix()
    extrinsics = np.concatenate([rot, rng.uniform(-3, 3, (n, 3, 1))], axis=-1)
    extrinsics = extrinsics.reshape(2, n // 2, 3, 4)
    focal = rng.uniform(100, 800, (n, 2))
    intrinsics = np.zeros((n, 3, 3))
    intrinsics[:, 0, 0], intrinsics[:, 1, 1] = focal[:, 0], focal[:, 1]
    intrinsics[:, 0, 2], intrinsics[:, 1, 2], intrinsics[:, 2, 2] = 518 / 2, 392 / 2, 1.0
    return extrinsics, intrinsics.reshape(2, n // 2, 3, 3)


def test_quaternion_matrix_conversions_agree_with_scipy():
    rots = Rotation.random(64, random_state=1)
    quat = rots.as_quat()  # scipy is scalar-last (x, y, z, w), like the encoding
    with jax.enable_x64(True):
        to_mat = jax.jit(quat_to_mat)
        np.testing.assert_allclose(to_mat(jnp.asarray(quat)), rots.as_matrix(), atol=1e-12)
        # Not normalised: dividing by |q|^2 makes the scale irrelevant.
        np.testing.assert_allclose(to_mat(jnp.asarray(3.0 * quat)), rots.as_matrix(), atol=1e-12)
        q = np.asarray(jax.jit(mat_to_quat)(jnp.asarray(rots.as_matrix())))
    assert (q[:, 3] >= 0).all()
    np.testing.assert_allclose(q, quat * np.sign(quat[:, 3:]), atol=1e-12)


def test_mat_to_quat_near_half_turns():
    # w ~ 0: the scalar part cannot anchor the solution; another component must.
    axes = np.eye(3).tolist() + [[1 / np.sqrt(2), 1 / np.sqrt(2), 0.0]]
    rots = Rotation.from_rotvec(np.asarray(axes) * (np.pi - 1e-7))
    with jax.enable_x64(True):
        q = np.asarray(jax.jit(mat_to_quat)(jnp.asarray(rots.as_matrix())))
        back = np.asarray(jax.jit(quat_to_mat)(jnp.asarray(q)))
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(back, rots.as_matrix(), atol=1e-12)


def test_pose_encoding_round_trip_on_random_rigid_poses():
    extrinsics, intrinsics = random_cameras(8, seed=3)
    hw = (392, 518)
    encode = jax.jit(extri_intri_to_pose_encoding, static_argnums=2)
    decode = jax.jit(pose_encoding_to_extri_intri, static_argnums=1)
    with jax.enable_x64(True):
        enc = encode(jnp.asarray(extrinsics), jnp.asarray(intrinsics), hw)
        assert enc.shape == (2, 4, 9) and enc.dtype == jnp.float64
        ext2, int2 = decode(enc, hw)
        np.testing.assert_allclose(ext2, extrinsics, atol=1e-12)
        np.testing.assert_allclose(int2, intrinsics, atol=1e-9)
        quat_norm = np.linalg.norm(np.asarray(enc[..., 3:7]), axis=-1)
        np.testing.assert_allclose(quat_norm, 1.0, atol=1e-12)
    # FoV from focal length with the principal point at the centre.
    np.testing.assert_allclose(enc[..., 7], 2 * np.arctan(196 / intrinsics[..., 1, 1]), atol=1e-12)
    np.testing.assert_allclose(enc[..., 8], 2 * np.arctan(259 / intrinsics[..., 0, 0]), atol=1e-12)
    # float32 round trip on the same poses.
    enc32 = encode(jnp.asarray(extrinsics, jnp.float32), jnp.asarray(intrinsics, jnp.float32), hw)
    ext32, int32 = decode(enc32, hw)
    assert ext32.dtype == jnp.float32
    np.testing.assert_allclose(ext32, extrinsics, atol=1e-5)
    np.testing.assert_allclose(int32, intrinsics, rtol=1e-5)


def test_fixture_pose_encodings_decode_to_rotations():
    # Raw head outputs have non-unit quaternions; decoding must still give proper rotations.
    enc = npz("outputs_f64.npz")["pose_enc_b"]
    with jax.enable_x64(True):
        decode = jax.jit(pose_encoding_to_extri_intri, static_argnums=1)
        ext, intr = decode(jnp.asarray(enc), (56, 56))
    rot = np.asarray(ext)[..., :3]
    eye = np.broadcast_to(np.eye(3), rot.shape)
    np.testing.assert_allclose(rot @ np.swapaxes(rot, -1, -2), eye, atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ext)[..., 3], enc[..., :3], atol=0)
    with np.errstate(divide="ignore"):  # a ReLU-clamped FoV of 0 means an infinite focal length
        fy = 28 / np.tan(enc[..., 7] / 2)
        np.testing.assert_allclose(np.asarray(intr)[..., 1, 1], fy, rtol=1e-12)
