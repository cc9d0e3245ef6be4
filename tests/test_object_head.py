"""The object head: per-view object centres composed into camera 0's frame, and views registered
onto view 0 by their objects when the camera head is wrong."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data_pipelines import synthetic
from spatial_distill import geometry
from spatial_distill.losses import objects as ol
from spatial_distill.models.object_head import ObjectHead, ObjectHeadConfig
from tests.test_losses_objects import perfect_raw


@pytest.fixture(scope="module")
def scene_batch():
    scenes = [synthetic.generate_scene(synthetic.scene_seed(5, i), image_size=(112, 112)) for i in range(3)]
    n = max(len(s.boxes) for s in scenes)
    return {"rgb": jnp.asarray(np.stack([s.rgb for s in scenes])),
            "depth": jnp.asarray(np.stack([s.depth for s in scenes])),
            "intrinsics": jnp.asarray(np.stack([s.intrinsics for s in scenes])),
            "cam_to_world": jnp.asarray(np.stack([s.cam_to_world for s in scenes])),
            "boxes": jnp.asarray(np.stack([np.pad(s.boxes, ((0, n - len(s.boxes)), (0, 0))) for s in scenes])),
            "box_mask": jnp.asarray(np.stack([np.arange(n) < len(s.boxes) for s in scenes])),
            "labels": jnp.asarray(np.stack([np.pad(s.labels, (0, n - len(s.labels)), constant_values=-1)
                                            for s in scenes]))}


def test_registration_recovers_the_cameras_from_the_objects(scene_batch):
    b = scene_batch
    targets = ol.object_targets(b, patch=14, stride=2, margin=0.02, min_fraction=0.02)
    raw = perfect_raw(targets, b["labels"], (8, 8))
    head = ObjectHead(ObjectHeadConfig(num_classes=3, hidden=8, register_views=True), 16, rngs=nnx.Rngs(0))
    truth = np.asarray(geometry.relative_extrinsics(b["cam_to_world"]))
    wrong = jnp.broadcast_to(jnp.eye(3, 4), truth.shape)  # a camera head that knows nothing
    got = np.asarray(head.register_views(raw, wrong, b["intrinsics"], (8, 8), 14))
    np.testing.assert_allclose(got[:, 0], truth[:, 0], atol=1e-6)
    # Perfect per-view centres, unique colours: the rigid fit is exact up to the weak prior.
    np.testing.assert_allclose(got[..., :3], truth[..., :3], atol=2e-2)
    np.testing.assert_allclose(got[..., 3], truth[..., 3], atol=5e-2)
    # ... and the composed centres land on the objects, seen from any view.
    centres = np.asarray(head.centres(raw, jnp.asarray(got), b["intrinsics"], (8, 8), 14))
    owner = np.asarray(targets["patch_owner"])
    attrs = np.take_along_axis(np.asarray(targets["attributes"])[:, None], np.maximum(owner, 0)[..., None], 2)
    err = np.linalg.norm(centres - attrs[..., :3], axis=-1)[owner >= 0]
    assert err.max() < 0.1, err.max()


def test_views_without_matches_keep_the_camera_head(scene_batch):
    b = scene_batch
    targets = ol.object_targets(b, patch=14, stride=2, margin=0.02, min_fraction=0.02)
    raw = perfect_raw(targets, b["labels"], (8, 8)).at[..., 0].set(-30.0)  # no patch sees an object
    head = ObjectHead(ObjectHeadConfig(num_classes=3, hidden=8, register_views=True), 16, rngs=nnx.Rngs(0))
    ext = geometry.relative_extrinsics(b["cam_to_world"]) + 0.01
    got = head.register_views(raw, ext, b["intrinsics"], (8, 8), 14)
    np.testing.assert_array_equal(np.asarray(got[:, 1:]), np.asarray(ext[:, 1:]))
