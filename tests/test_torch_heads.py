"""The PyTorch heads (export/torch_heads.py) against their Flax originals, weights moved by the
Flax `export_torch` dicts; and the detection head's Flax torch-layout round trip."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spatial_distill.models import object_head as oh
from spatial_distill.models import slots, word_tags
from spatial_distill.models.heads import DetectionHead, DetHeadConfig
from spatial_distill.models.state_dict import StateDict

try:
    import torch

    from spatial_distill.export import torch_heads as th
except ImportError:  # the round trip below needs no torch
    torch = th = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")

IMAGE_HW, PATCH = (56, 56), 14  # a 4 x 4 patch grid
GRID = (IMAGE_HW[0] // PATCH, IMAGE_HW[1] // PATCH)


def assert_close(name, flax_out, torch_out, atol=1e-4):
    want, got = np.array(flax_out), torch_out.detach().numpy()
    assert want.shape == got.shape and got.dtype == np.float32, (name, want.shape, got.shape, got.dtype)
    err = float(np.abs(want - got).max())
    print(f"{name}: max abs error {err:.2e}")
    assert err < atol, (name, err)


def t(x):
    return torch.from_numpy(np.array(x))


def det_cfg():
    return DetHeadConfig(num_queries=6, num_classes=3, dim=32, num_layers=2, num_heads=4)


# Compiled once per module structure: eager JAX compiles every op on first use, which would
# take most of this file's time budget.
flax_forward = nnx.jit(lambda m, *args: m(*args))
flax_features = nnx.jit(lambda m, raw, enc: m.features(raw, enc, IMAGE_HW, PATCH))
flax_register = nnx.jit(lambda m, raw, ext, intr: m.register_views(raw, ext, intr, GRID, PATCH))


@pytest.fixture(scope="module")
def det_head():
    return DetectionHead(det_cfg(), 24, rngs=nnx.Rngs(0))


def test_detection_head_torch_layout_round_trip_is_bit_exact(det_head):
    other = DetectionHead(det_cfg(), 24, rngs=nnx.Rngs(1))
    exported = det_head.export_torch("det_head")
    assert exported["det_head.layers.1.cross_attn.o.weight"].shape == (32, 32)
    assert exported["det_head.input_proj.weight"].shape == (32, 24)  # torch [out, in]
    assert exported["det_head.queries.weight"].shape == (6, 32)
    sd = StateDict(exported)
    other.load_torch(sd, "det_head")
    sd.finish()
    again = other.export_torch("det_head")
    assert again.keys() == exported.keys()
    for k in exported:
        np.testing.assert_array_equal(again[k], exported[k], err_msg=k)
    tokens = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 24)), jnp.float32)
    for x, y in zip(flax_forward(det_head, tokens), flax_forward(other, tokens), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    sd = StateDict({k: v for k, v in exported.items() if k != "det_head.box_out.bias"})
    other.load_torch(sd, "det_head")
    with pytest.raises(ValueError, match="det_head.box_out.bias"):
        sd.finish()


@needs_torch
def test_detection_head_matches_flax(det_head):
    exported = det_head.export_torch("det_head")
    head = th.load_export(th.DetectionHead(det_cfg(), 24), exported, "det_head")
    assert sorted(head.state_dict()) == sorted(k.removeprefix("det_head.") for k in exported)
    tokens = np.random.default_rng(0).normal(size=(2, 20, 24)).astype(np.float32)
    mask = np.ones((2, 20), bool)
    mask[0, 15:] = False
    mask[1] = False  # no visible token: cross-attention reads nothing
    # The Flax head runs with masks only (one compile): all-True is what no mask means.
    for name, m in (("detection", None), ("detection masked", mask)):
        want = flax_forward(det_head, jnp.asarray(tokens), jnp.ones((2, 20), bool) if m is None else jnp.asarray(m))
        with torch.no_grad():
            got = head(t(tokens), None if m is None else t(m))
        assert_close(f"{name} logits", want[0], got[0])
        assert_close(f"{name} boxes", want[1], got[1])


# -- object head ---------------------------------------------------------------------------------
def pose_encoding(rotations, translations, fov=(0.9, 1.0)):
    """`[B, S, 9]` from per-view axis-angle rotations `[B, S, 3]` and translations `[B, S, 3]`."""
    angle = np.linalg.norm(rotations, axis=-1, keepdims=True)
    axis = rotations / np.maximum(angle, 1e-12)
    quat = np.concatenate([axis * np.sin(angle / 2), np.cos(angle / 2)], -1)
    fovs = np.broadcast_to(np.asarray(fov, np.float32), rotations.shape[:-1] + (2,))
    return np.concatenate([translations, quat, fovs], -1).astype(np.float32)


def scene_raw(true_enc, num_classes=3, seed=0):
    """Raw object-head outputs `[B, S, 16, 12 + C]` where 5 patches of each view see 5 objects
    (distinct colours and classes) consistently with the cameras of `true_enc`; sample 1 sees none."""
    r = np.random.default_rng(seed)
    b, s, _ = true_enc.shape
    ext, intr = (np.asarray(x, np.float64) for x in oh.cameras(jnp.asarray(true_enc), IMAGE_HW))
    points = np.stack([r.uniform(-0.8, 0.8, 5), r.uniform(-0.6, 0.6, 5), r.uniform(2.5, 4.0, 5)], -1)
    colours = np.array([(0.9, 0.1, 0.1), (0.1, 0.9, 0.1), (0.1, 0.1, 0.9), (0.9, 0.9, 0.1), (0.1, 0.9, 0.9)])
    owned = np.array([0, 3, 6, 9, 13])
    c = num_classes
    raw = r.normal(size=(b, s, GRID[0] * GRID[1], 12 + c))
    raw[..., 0] = -8.0
    centres = np.asarray(oh.geometry.patch_centres(*GRID, PATCH))
    for v in range(s):
        cam = points @ ext[0, v, :, :3].T + ext[0, v, :, 3]
        uv = cam[:, :2] / cam[:, 2:] * intr[0, v, [0, 1], [0, 1]] + intr[0, v, :2, 2]
        raw[0, v, owned, 0] = 8.0
        raw[0, v, owned, 1:1 + c] = 6.0 * np.eye(c)[np.arange(5) % c]
        raw[0, v, owned, 1 + c:4 + c] = np.log(colours / (1 - colours))
        raw[0, v, owned, 4 + c:6 + c] = (uv - centres[owned]) / PATCH
        raw[0, v, owned, 6 + c] = np.log(cam[:, 2]) + r.normal(scale=0.003, size=5)  # not an exact fit
    return raw.astype(np.float32)


@pytest.fixture(scope="module")
def object_heads():
    cfg = oh.ObjectHeadConfig(num_classes=3, hidden=32)
    flax_head = oh.ObjectHead(cfg, 16, rngs=nnx.Rngs(0))
    head = th.load_export(th.ObjectHead(cfg, 16), flax_head.export_torch("object_head"), "object_head")
    return flax_head, head


@pytest.fixture(scope="module")
def poses():
    r = np.random.default_rng(1)
    rot, trans = r.normal(scale=0.15, size=(2, 3, 3)), r.normal(scale=0.3, size=(2, 3, 3))
    rot[:, 0], trans[:, 0] = 0.0, 0.0
    true_enc = pose_encoding(rot, trans)
    # The camera head's guess is off by a few degrees and centimetres in views 1..
    wrong = pose_encoding(rot + r.normal(scale=0.05, size=rot.shape), trans + r.normal(scale=0.05, size=trans.shape))
    return true_enc, wrong


@needs_torch
def test_object_head_outputs_and_cameras_match_flax(object_heads, poses):
    flax_head, head = object_heads
    patches = np.random.default_rng(2).normal(size=(2, 3, 16, 16)).astype(np.float32)
    _, enc = poses
    with torch.no_grad():
        raw = np.array(flax_forward(flax_head, jnp.asarray(patches)))
        assert_close("object raw", raw, head(t(patches)))
        for want, got, name in zip(oh.cameras(jnp.asarray(enc), IMAGE_HW), th.cameras(t(enc), IMAGE_HW),
                                   ("extrinsics", "intrinsics"), strict=True):
            assert_close(f"cameras {name}", want, got)
        raw[..., 9] += 1.0  # depths of ~e metres, not ~1
        fields = flax_features(flax_head, jnp.asarray(raw), jnp.asarray(enc))
        assert_close("object features", fields, head.features(t(raw), t(enc), IMAGE_HW, PATCH))
        want, got = oh.split_features(fields, 3), th.split_features(t(fields), 3)
        for k in want:
            assert_close(f"split_features {k}", want[k], got[k])


@needs_torch
def test_object_head_registered_views_match_flax(object_heads, poses):
    flax_head, head = object_heads
    true_enc, enc = poses
    raw = scene_raw(true_enc)
    ext, intr = oh.cameras(jnp.asarray(enc), IMAGE_HW)
    want = np.asarray(flax_register(flax_head, jnp.asarray(raw), ext, intr))
    truth = np.asarray(oh.cameras(jnp.asarray(true_enc), IMAGE_HW)[0])
    # The fit moved sample 0's views to the true cameras; sample 1 (no objects) kept the guess.
    np.testing.assert_allclose(want[0], truth[0], atol=2e-2)
    assert np.abs(want[0, 1:] - np.asarray(ext[0, 1:])).max() > 2e-2
    np.testing.assert_array_equal(want[1], np.asarray(ext[1]))
    with torch.no_grad():
        got = head.register_views(t(raw), t(ext), t(intr), GRID, PATCH)
        assert_close("registered extrinsics", want, got)
        cfg = oh.ObjectHeadConfig(num_classes=3, hidden=32, register_views=True)
        flax_head = oh.ObjectHead(cfg, 16, rngs=nnx.Rngs(0))
        head = th.load_export(th.ObjectHead(cfg, 16), flax_head.export_torch("object_head"), "object_head")
        want = flax_features(flax_head, jnp.asarray(raw), jnp.asarray(enc))
        assert_close("registered features", want, head.features(t(raw), t(enc), IMAGE_HW, PATCH))


@needs_torch
def test_weighted_kabsch_handles_reflections_like_flax():
    r = np.random.default_rng(3)
    src = r.normal(size=(4, 6, 3)).astype(np.float32)
    dst = src.copy()
    dst[:2, :, 2] *= -1  # a mirror image: the best orthogonal map is a reflection, R must not be
    weights = np.broadcast_to(np.eye(6, dtype=np.float32), (4, 6, 6)).copy()
    prior = np.broadcast_to(np.eye(3, dtype=np.float32), (4, 3, 3))
    want = oh.geometry.weighted_kabsch(*map(jnp.asarray, (src, dst, weights, prior)), prior_weight=1e-3)
    got = th.weighted_kabsch(*map(t, (src, dst, weights, prior)), prior_weight=1e-3)
    np.testing.assert_allclose(np.linalg.det(got[0].numpy()), 1.0, atol=1e-5)
    for name, x, y in zip(("R", "t", "total"), want, got, strict=True):
        assert_close(f"kabsch {name}", x, y)


@needs_torch
def test_a_strict_load_names_missing_and_stray_keys(object_heads):
    flax_head, _ = object_heads
    cfg = flax_head.cfg
    exported = flax_head.export_torch("object_head")
    with pytest.raises(RuntimeError, match="fc1.bias"):
        th.load_export(th.ObjectHead(cfg, 16), {k: v for k, v in exported.items() if k != "object_head.fc1.bias"},
                       "object_head")
    with pytest.raises(RuntimeError, match="other.weight"):
        th.load_export(th.ObjectHead(cfg, 16), {**exported, "other.weight": np.zeros(1)}, "object_head")


# -- slots and word tags ---------------------------------------------------------------------------
@needs_torch
def test_slots_group_matches_flax():
    r = np.random.default_rng(4)
    owner = r.integers(4, size=(2, 40))  # 4 objects, their patches scattered about them
    obj = r.uniform(size=(2, 40)).astype(np.float32)
    obj[0, 5] = obj[0, 7] = 0.95  # a tie: both pick the first
    centres = (r.normal(size=(2, 4, 3))[np.arange(2)[:, None], owner]
               + r.normal(scale=0.2, size=(2, 40, 3))).astype(np.float32)
    colours = np.clip(r.uniform(size=(2, 4, 3))[np.arange(2)[:, None], owner]
                      + r.normal(scale=0.05, size=(2, 40, 3)), 0, 1).astype(np.float32)
    classes = (0.7 * np.eye(3)[owner % 3] + 0.3 * r.dirichlet(np.ones(3), size=(2, 40))).astype(np.float32)
    kw = dict(radius=0.5, colour_scale=0.15, min_objectness=0.5)
    want = slots.group(*map(jnp.asarray, (obj, centres, colours, classes)), 12, **kw)
    got = th.slots_group(*map(t, (obj, centres, colours, classes)), 12, **kw)
    assert_close("slots", want, got)
    np.testing.assert_array_equal(np.asarray(want) > 0, got.numpy() > 0)
    assert (got.numpy().sum(-1) == 0).any() and ((got.numpy() > 0).sum(-1) > 1).any()  # empty and shared slots


@needs_torch
@pytest.mark.parametrize("with_colours", [True, False])
def test_word_tags_and_keys_match_flax(with_colours):
    cfg = word_tags.WordTagConfig(
        class_ids=((4,), (5,), (6,)), gain=3.0, colour_temperature=0.01,
        colour_ids=((7,), (8,), (9, 10)) if with_colours else (),
        colour_prototypes=((0.5, 0.05, 0.05), (0.05, 0.1, 0.5), (0.3, 0.6, 0.3)) if with_colours else ())
    r = np.random.default_rng(5)
    emb = r.normal(size=(16, 8)).astype(np.float32)
    args = (r.uniform(size=(2, 5)), r.dirichlet(np.ones(3), size=(2, 5)), r.uniform(size=(2, 5, 3)))
    args = tuple(a.astype(np.float32) for a in args) + (emb,)
    for name in ("tags", "keys"):
        want = getattr(word_tags, name)(*map(jnp.asarray, args), cfg)
        assert_close(f"word {name} (colours: {with_colours})", want, getattr(th, name)(*map(t, args), cfg))
