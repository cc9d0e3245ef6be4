"""Object ownership, colours, the object loss and VGGT's camera loss against hand-built cases."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines import synthetic
from data_pipelines.spatial_qa import Primitive
from spatial_distill import geometry
from spatial_distill.losses import objects as ol
from spatial_distill.models.camera_head import extri_intri_to_pose_encoding
from spatial_distill.models.object_head import ObjectHead, ObjectHeadConfig, cameras

HW = (56, 56)


def one_box_scene():
    """A red box straight in front of a camera; a second camera from the side."""
    box = Primitive("box", np.array([0.0, 0.0, 0.3]), np.array([0.6, 0.6, 0.6]), 0.0)
    k = np.array([[50.0, 0, 27.5], [0, 50.0, 27.5], [0, 0, 1]])
    poses = np.stack([synthetic.look_at(np.array([0.0, -3.0, 1.0]), np.array([0.0, 0.0, 0.3])),
                      synthetic.look_at(np.array([3.0, 0.0, 1.0]), np.array([0.0, 0.0, 0.3]))])
    albedo = np.array([[0.9, 0.1, 0.1]])
    views = [synthetic.render_view([box], albedo, k, p, HW) for p in poses]
    empty = [synthetic.render_view([], albedo[:0], k, p, HW) for p in poses]
    batch = {
        "rgb": jnp.asarray(np.stack([v[0] for v in views])[None]),
        "depth": jnp.asarray(np.stack([v[1] for v in views])[None]),
        "intrinsics": jnp.asarray(np.repeat(k[None], 2, 0)[None], jnp.float32),
        "cam_to_world": jnp.asarray(poses[None], jnp.float32),
        "boxes": jnp.asarray(np.concatenate([box.box()[None], np.zeros((1, 7))])[None], jnp.float32),
        "box_mask": jnp.asarray([[True, False]]),
        "labels": jnp.asarray([[0, -1]], jnp.int32),
    }
    box_pixels = np.stack([v[1] for v in views]) != np.stack([e[1] for e in empty])
    return batch, box_pixels


def test_ownership_finds_the_box_pixels_and_patches():
    batch, box_pixels = one_box_scene()
    owner, patch_owner = ol.ownership(batch["depth"], batch["intrinsics"], batch["cam_to_world"],
                                      batch["boxes"], batch["box_mask"], patch=14, stride=1)
    owner = np.asarray(owner)[0]
    # Pixels where the box changes the render are the box's; the rest are floor or sky.
    assert ((owner == 0) == box_pixels).mean() > 0.99
    assert set(np.unique(owner)) == {-1, 0}
    # A patch belongs to the box when >= 5% of its pixels do.
    frac = box_pixels.reshape(2, 4, 14, 4, 14).mean((2, 4)).reshape(2, 16)
    np.testing.assert_array_equal(np.asarray(patch_owner)[0] == 0, frac >= 0.05)
    # Subsampling every 2nd pixel gives the same patches up to the threshold's edge.
    _, sub = ol.ownership(batch["depth"], batch["intrinsics"], batch["cam_to_world"],
                          batch["boxes"], batch["box_mask"], patch=14, stride=2)
    assert (np.asarray(sub)[0] == np.asarray(patch_owner)[0]).mean() > 0.9
    with pytest.raises(ValueError, match="stride 3 must divide the patch size 14"):
        ol.ownership(batch["depth"], batch["intrinsics"], batch["cam_to_world"], batch["boxes"],
                     batch["box_mask"], patch=14, stride=3)


def test_observed_colour_is_the_mean_of_the_owned_pixels():
    batch, _ = one_box_scene()
    owner, _ = ol.ownership(batch["depth"], batch["intrinsics"], batch["cam_to_world"],
                            batch["boxes"], batch["box_mask"], patch=14, stride=1)
    colours, seen = ol.observed_colours(batch["rgb"], owner, 2, stride=1)
    rgb, own = np.asarray(batch["rgb"])[0] / 255.0, np.asarray(owner)[0]
    np.testing.assert_allclose(np.asarray(colours)[0, 0], rgb[own == 0].mean(0), atol=1e-5)
    assert np.asarray(colours)[0, 0].argmax() == 0  # a red box looks red
    np.testing.assert_array_equal(np.asarray(seen)[0], [True, False])
    np.testing.assert_array_equal(np.asarray(colours)[0, 1], 0.0)


def perfect_raw(targets, labels, grid, patch=14):
    """Raw object-head outputs that reproduce every target exactly (logits large)."""
    owner = np.asarray(targets["patch_owner"])
    idx = np.maximum(owner, 0)
    b, s, p = owner.shape
    take = lambda x: np.take_along_axis(np.asarray(x)[:, None], idx[..., None], 2)
    attrs, colours = take(targets["attributes"]), take(targets["colours"])
    uvz = np.take_along_axis(np.asarray(targets["uvz"]), idx[..., None], 2)
    cls = np.take_along_axis(np.broadcast_to(np.maximum(np.asarray(labels), 0)[:, None], (b, s, labels.shape[1])), idx, 2)
    raw = np.zeros((b, s, p, 15), np.float32)
    raw[..., 0] = np.where(owner >= 0, 30.0, -30.0)
    raw[..., 1:4] = 30.0 * np.eye(3)[cls]
    c = np.clip(colours, 1e-6, 1 - 1e-6)
    raw[..., 4:7] = np.log(c / (1 - c))
    raw[..., 7:9] = (uvz[..., :2] - geometry.patch_centres(*grid, patch)) / patch
    raw[..., 9] = np.log(uvz[..., 2])
    raw[..., 10:15] = attrs[..., 3:8]
    return jnp.asarray(raw)


def test_object_loss_is_zero_for_perfect_predictions_and_grows_with_errors():
    batch, _ = one_box_scene()
    targets = ol.object_targets(batch, patch=14, stride=1, margin=0.02, min_fraction=0.05)
    head = ObjectHead(ObjectHeadConfig(num_classes=3, hidden=8), 16, rngs=nnx.Rngs(0))
    raw = perfect_raw(targets, batch["labels"], (4, 4))
    ext, intr = geometry.relative_extrinsics(batch["cam_to_world"]), batch["intrinsics"]
    centres = head.centres(raw, ext, intr, (4, 4), 14)
    loss, m = ol.object_loss(head.split(raw), centres, targets, batch["labels"], patch=14, grid_hw=(4, 4))
    assert float(loss) < 1e-4, m
    assert float(m["objects/centre_err_m"]) < 1e-4 and float(m["objects/class_acc"]) == 1.0
    shifted = raw.at[..., 9].add(0.1)  # every depth 10.5% too far
    loss2, m2 = ol.object_loss(head.split(shifted), head.centres(shifted, ext, intr, (4, 4), 14),
                               targets, batch["labels"], patch=14, grid_hw=(4, 4))
    assert float(m2["objects/log_z"]) == pytest.approx(0.1, abs=1e-4)
    assert float(m2["objects/centre_err_m"]) == pytest.approx(0.1052 * 3.1, rel=0.1)  # ~3 m away
    assert float(loss2) > float(loss) + 0.1


def test_camera_loss_is_zero_at_the_truth():
    batch, _ = one_box_scene()
    enc = extri_intri_to_pose_encoding(geometry.relative_extrinsics(batch["cam_to_world"]),
                                       batch["intrinsics"], HW)
    loss, m = ol.camera_loss([enc + 0.5, enc], batch["cam_to_world"], batch["intrinsics"], HW)
    # Only the first iteration is off, by 0.5 on each of 9 entries, weighted 0.6.
    assert float(loss) == pytest.approx(0.6 * 0.5 * 9, rel=1e-4)
    assert float(m["camera/translation_l1"]) < 1e-5
    # The decoded cameras put the principal point at the data's pixel centre.
    ext, intr = cameras(enc, HW)
    np.testing.assert_allclose(np.asarray(intr)[0, :, :2, 2], 27.5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ext), np.asarray(geometry.relative_extrinsics(batch["cam_to_world"])),
                               atol=1e-4)
