"""Mesh creation and logical-axis sharding rules (DESIGN.md §6).

Parameters and activations are annotated with *logical* axis names (MaxText vocabulary:
`embed`, `mlp`, `heads`, `kv_heads`, `vocab`, `activation_batch`, ...). An ordered list of
rules maps each logical name to a mesh axis (or a tuple of mesh axes, or None); the first rule
naming a logical axis wins. A mesh axis is used at most once per array: a later logical axis
that would reuse it is left unsharded.

Parameters get their names from `nnx.with_partitioning(init, names)` (stored as the
`out_sharding` metadata of each `nnx.Param`); activations from `constrain(x, names)`, which is a
no-op unless a mesh and rules are active (`with axis_rules(mesh, rules): ...`), so models run
unchanged in tests and on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

# Rules used when a config gives none: batch over (data, fsdp), parameters FSDP-sharded on their
# embed dimension and tensor-parallel on heads/mlp/vocab.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("conv_in", "fsdp"),  # conv kernels FSDP-sharded on their input channels, like `embed`
    ("conv_out", "tensor"),
    ("norm", None),
)

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "spatial_distill_axis_rules", default=None
)


def mesh_shape(requested: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills the one `-1` entry of `requested` so the product equals `num_devices`.

    Raises ValueError naming the shape and the device count when they do not divide.
    """
    requested = tuple(int(x) for x in requested)
    if len(requested) != len(MESH_AXES):
        raise ValueError(f"mesh shape {requested} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if sum(x == -1 for x in requested) > 1:
        raise ValueError(f"mesh shape {requested}: at most one axis may be -1")
    if any(x == 0 or x < -1 for x in requested):
        raise ValueError(f"mesh shape {requested}: sizes must be positive or -1")
    known = math.prod(x for x in requested if x != -1)
    if num_devices % known:
        raise ValueError(
            f"mesh shape {requested} does not divide the {num_devices} available devices "
            f"(product of fixed axes = {known}); pick axis sizes whose product divides {num_devices}"
        )
    filled = tuple(num_devices // known if x == -1 else x for x in requested)
    if math.prod(filled) != num_devices:
        raise ValueError(
            f"mesh shape {requested} uses {math.prod(filled)} devices but {num_devices} are "
            "available; set one axis to -1 to fill the rest"
        )
    return filled


def make_mesh(requested: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (all global devices by default)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(requested, len(devices))
    try:
        grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - CPU / odd topologies: plain row-major order is fine
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; first matching rule wins, mesh axes used once.

    With `shape` and `mesh`, a dimension the mesh axes do not divide stays unsharded and leaves
    them to a later dimension (a patch-embed kernel `[14, 14, 3, 1024]` named (.., conv_in,
    embed) shards its 1024, not nothing)."""
    if names is None:
        return PartitionSpec()
    table: dict[str, str | Sequence[str] | None] = {}
    for logical, mesh_axes in rules:
        table.setdefault(logical, mesh_axes)
    used: set[str] = set()
    out = []
    for name in names:
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        if any(a in used for a in axes):
            out.append(None)
            continue
        if shape is not None and mesh is not None and shape[len(out)] % math.prod(mesh.shape[a] for a in axes):
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def divisible(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """`spec` with the mesh axes dropped from every dimension they do not divide: such a
    dimension is replicated. Odd widths are small by nature (a projector reading 128 vision
    channels + 15 object fields), and sharding one would fail at `device_put`."""
    out = []
    for dim, axes in zip(shape, spec):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axes if dim % ways == 0 else None)
    return PartitionSpec(*out)


def _param_names(variable) -> Sequence[str | None] | None:
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules):
    """NamedShardings for every variable of an (abstract) `nnx.State`, from its logical names."""

    def one(variable):
        names = _param_names(variable)
        shape = np.shape(variable.get_value())
        if names is not None and len(names) > len(shape):
            raise ValueError(f"logical names {names} have more axes than the value's {len(shape)}")
        spec = logical_to_spec(names, rules, shape, mesh) if names is not None else PartitionSpec()
        return variable.replace(NamedSharding(mesh, divisible(spec, shape, mesh)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Activates `mesh` and `rules` for `constrain` within the block (at trace time)."""
    token = _ACTIVE.set((mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, Rules] | None:
    """The mesh and rules of the enclosing `axis_rules` block (None outside one)."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; identity when no rules are active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))
