import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from spatial_distill.models.state_dict import CheckpointMismatchError, StateDict, load_tensors


def _torch_like():
    r = np.random.default_rng(0)
    return {"fc.weight": r.normal(size=(3, 2)).astype(np.float32),
            "fc.bias": r.normal(size=(3,)).astype(np.float32),
            "conv.weight": r.normal(size=(4, 2, 3, 3)).astype(np.float32),
            "conv.bias": r.normal(size=(4,)).astype(np.float32)}


def test_linear_and_conv_layout_match_torch_semantics():
    sd = _torch_like()
    lin = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    conv = nnx.Conv(2, 4, (3, 3), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
    reader = StateDict(sd)
    reader.linear(lin, "fc")
    reader.conv(conv, "conv")
    reader.finish()
    x = np.random.default_rng(1).normal(size=(5, 2)).astype(np.float32)
    np.testing.assert_allclose(lin(jnp.asarray(x)), x @ sd["fc.weight"].T + sd["fc.bias"], rtol=1e-6)
    img = np.random.default_rng(2).normal(size=(1, 6, 6, 2)).astype(np.float32)
    # torch Conv2d (cross-correlation) computed directly.
    pad = np.pad(img, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = np.zeros((1, 6, 6, 4), np.float32)
    for i in range(6):
        for j in range(6):
            patch = pad[0, i:i + 3, j:j + 3, :]  # [3, 3, in]
            ref[0, i, j] = np.einsum("hwc,ochw->o", patch, sd["conv.weight"]) + sd["conv.bias"]
    np.testing.assert_allclose(conv(jnp.asarray(img)), ref, atol=1e-5)


def test_all_problems_reported_at_once():
    sd = _torch_like()
    del sd["fc.bias"]
    sd["extra.weight"] = np.zeros(2, np.float32)
    sd["conv.weight"] = np.zeros((4, 2, 5, 5), np.float32)
    reader = StateDict(sd, "ckpt.safetensors")
    reader.linear(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), "fc")
    reader.conv(nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(0)), "conv")
    with pytest.raises(CheckpointMismatchError) as e:
        reader.finish()
    msg = str(e.value)
    assert "ckpt.safetensors does not match" in msg
    assert "missing keys (1): fc.bias" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "conv.weight: checkpoint (4, 2, 5, 5)" in msg


def test_load_tensors_safetensors_torch_and_errors(tmp_path):
    sd = _torch_like()
    save_file(sd, str(tmp_path / "m.safetensors"))
    got, src = load_tensors(tmp_path / "m.safetensors")
    assert src.endswith("m.safetensors") and set(got) == set(sd)
    np.testing.assert_array_equal(got["conv.weight"], sd["conv.weight"])
    got_dir, _ = load_tensors(tmp_path)
    assert set(got_dir) == set(sd)
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointMismatchError, match="not a readable safetensors file"):
        load_tensors(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tensors(tmp_path / "none.safetensors")
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, tmp_path / "m.pt")
    got_pt, _ = load_tensors(tmp_path / "m.pt")
    np.testing.assert_array_equal(got_pt["fc.weight"], sd["fc.weight"])
    # A pickle holding arbitrary objects is refused by weights_only=True, never executed.
    torch.save({"obj": object()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only"):
        load_tensors(tmp_path / "evil.pt")


def test_bfloat16_safetensors_load_as_ml_dtypes_bfloat16(tmp_path):
    """numpy lacks bfloat16, so safetensors.numpy refuses such files; they still load, exactly."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    w = torch.tensor([[1.5, -2.0], [3.140625, 0.0078125]], dtype=torch.bfloat16)
    save_torch({"w": w, "b": torch.ones(2)}, str(tmp_path / "bf16.safetensors"))
    got, _ = load_tensors(tmp_path / "bf16.safetensors")
    assert got["w"].dtype == jnp.bfloat16 and got["b"].dtype == np.float32
    np.testing.assert_array_equal(got["w"].astype(np.float32), w.float().numpy())
