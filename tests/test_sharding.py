import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from spatial_distill import sharding


def test_mesh_shape_fill_and_errors():
    assert sharding.mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert sharding.mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    assert sharding.mesh_shape((2, 4, 1), 8) == (2, 4, 1)
    with pytest.raises(ValueError, match="does not divide the 8"):
        sharding.mesh_shape((3, -1, 1), 8)
    with pytest.raises(ValueError, match="uses 4 devices but 8"):
        sharding.mesh_shape((2, 2, 1), 8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.mesh_shape((-1, -1, 1), 8)


def test_logical_to_spec_first_rule_wins_and_axes_used_once():
    rules = [("embed", "fsdp"), ("embed", "tensor"), ("mlp", "tensor"), ("heads", "tensor"),
             ("activation_batch", ("data", "fsdp"))]
    assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    # `heads` would reuse `tensor`, already taken by `mlp`.
    assert sharding.logical_to_spec(("mlp", "heads"), rules) == P("tensor", None)
    assert sharding.logical_to_spec(("activation_batch", None), rules) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("unknown",), rules) == P(None)


def test_state_shardings_from_param_metadata():
    mesh = sharding.make_mesh((1, 1, 1))
    model = nnx.eval_shape(lambda: nnx.Linear(
        4, 8, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
        rngs=nnx.Rngs(0)))
    sh = sharding.state_shardings(nnx.state(model), mesh, sharding.DEFAULT_RULES)
    assert sh["kernel"].get_value().spec == P("fsdp", "tensor")
    assert sh["bias"].get_value().spec == P()


def test_constrain_is_identity_without_rules():
    x = jnp.ones((2, 3))
    assert sharding.constrain(x, ("activation_batch", "activation_embed")) is x


def test_sharded_init_on_eight_devices():
    code = textwrap.dedent("""
        import jax, numpy as np
        from flax import nnx
        import spatial_distill
        from spatial_distill import sharding
        mesh = sharding.make_mesh((2, 2, 2))
        def make():
            return nnx.Linear(8, 16, kernel_init=nnx.with_partitioning(
                nnx.initializers.lecun_normal(), ("embed", "mlp")), rngs=nnx.Rngs(0))
        abstract = nnx.eval_shape(make)
        shard = sharding.state_shardings(nnx.state(abstract), mesh, sharding.DEFAULT_RULES)
        state = jax.jit(lambda: nnx.state(make()), out_shardings=shard)()
        k = state["kernel"].get_value()
        assert k.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor"), k.sharding
        assert k.addressable_shards[0].data.shape == (4, 8)
        ref = nnx.state(make())["kernel"].get_value()
        np.testing.assert_array_equal(np.asarray(k), np.asarray(ref))
        def f(x):
            with sharding.axis_rules(mesh):
                return sharding.constrain(x * 2, ("activation_batch", "activation_embed"))
        # An odd width (a projector over 128 + 15 channels) is replicated on that dimension only.
        odd = nnx.eval_shape(lambda: nnx.Linear(143, 16, kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ("embed", "mlp")), rngs=nnx.Rngs(0)))
        spec = sharding.state_shardings(nnx.state(odd), mesh, sharding.DEFAULT_RULES)["kernel"].get_value().spec
        assert spec == jax.sharding.PartitionSpec(None, "tensor"), spec
        y = jax.jit(f)(np.ones((8, 4), np.float32))
        want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None))
        assert y.sharding.is_equivalent_to(want, 2), y.sharding
        assert y.addressable_shards[0].data.shape == (2, 4)
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_an_axis_that_does_not_divide_a_dimension_passes_to_the_next():
    from jax.sharding import AbstractMesh

    mesh = AbstractMesh((1, 8, 2), sharding.MESH_AXES)
    names = (None, None, "conv_in", "embed")
    # A patch-embed kernel: 3 input channels cannot take fsdp=8, so its 1024 outputs do.
    assert sharding.logical_to_spec(names, sharding.DEFAULT_RULES, (14, 14, 3, 1024), mesh) == \
        P(None, None, None, "fsdp")
    assert sharding.logical_to_spec(names, sharding.DEFAULT_RULES, (14, 14, 16, 1024), mesh) == \
        P(None, None, "fsdp", None)
    # Without a shape the first name keeps the axis, as before.
    assert sharding.logical_to_spec(names, sharding.DEFAULT_RULES) == \
        P(None, None, "fsdp", None)
    assert sharding.logical_to_spec(("vocab", "embed"), sharding.DEFAULT_RULES, (32001, 2048), mesh) == \
        P(None, "fsdp")
