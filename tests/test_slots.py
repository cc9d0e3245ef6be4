import jax.numpy as jnp
import numpy as np

from spatial_distill.models import slots

RED, BLUE = (0.9, 0.1, 0.1), (0.1, 0.2, 0.9)


def patches(rows):
    """rows of (objectness, centre, colour, class) -> the four `group` inputs with B = 1."""
    obj = jnp.asarray([[r[0] for r in rows]], jnp.float32)
    centres = jnp.asarray([[r[1] for r in rows]], jnp.float32)
    colours = jnp.asarray([[r[2] for r in rows]], jnp.float32)
    classes = jnp.asarray([[np.eye(3)[r[3]] for r in rows]], jnp.float32)
    return obj, centres, colours, classes


def group(rows, k, **kw):
    kw = {"radius": 0.5, "colour_scale": 0.15, "min_objectness": 0.5, **kw}
    return np.asarray(slots.group(*patches(rows), k, **kw))[0]


def test_patches_of_one_object_share_a_slot_weighted_by_objectness():
    rows = [(0.9, (0, 0, 2), RED, 0), (0.1, (3, 3, 3), (0.5, 0.5, 0.5), 0),
            (0.6, (1, 0, 2), BLUE, 1), (0.7, (0.2, 0, 2.1), RED, 0), (0.8, (1.1, 0, 2), BLUE, 1)]
    w = group(rows, 3)
    np.testing.assert_allclose(w[0], [0.9 / 1.6, 0, 0, 0.7 / 1.6, 0], rtol=1e-6)  # red: strongest seed
    np.testing.assert_allclose(w[1], [0, 0, 0.6 / 1.4, 0, 0.8 / 1.4], rtol=1e-6)  # blue
    np.testing.assert_array_equal(w[2], 0)  # only background (objectness 0.1) is left: empty


def test_colour_centre_and_class_each_split_slots():
    base = (0.9, (0, 0, 2), RED, 0)
    far = (0.8, (0.8, 0, 2), RED, 0)  # same look, 0.8 m away
    other_colour = (0.8, (0.1, 0, 2), BLUE, 0)
    other_class = (0.8, (0.1, 0, 2), RED, 2)
    for second in (far, other_colour, other_class):
        w = group([base, second], 2)
        np.testing.assert_allclose(w, [[1, 0], [0, 1]], err_msg=str(second))
    np.testing.assert_allclose(group([base, far], 2, radius=1.0)[0], [0.9 / 1.7, 0.8 / 1.7], rtol=1e-6)


def test_every_patch_in_at_most_one_slot_and_k_caps_the_slots():
    r = np.random.default_rng(0)
    rows = [(float(r.uniform(0.5, 1)), tuple(r.normal(size=3)), tuple(r.uniform(size=3)), int(r.integers(3)))
            for _ in range(40)]
    w = group(rows, 6)
    assert w.shape == (6, 40)
    assert ((w > 0).sum(0) <= 1).all()
    np.testing.assert_allclose(w.sum(1), 1, rtol=1e-6)  # 40 strong patches fill all 6 slots
