"""spatial_distill: distil 3D spatial reasoning from LLaVA-3D into a VGGT + Llama student."""

from flax import nnx

# Parameters carry *logical* axis names (`embed`, `mlp`, ...) as metadata; they are turned into
# mesh shardings explicitly by `spatial_distill.sharding` when a train state is created. Flax's
# eager sharding would instead demand a mesh at construction time, which would make every model
# (tests, export, abstract counting with `jax.eval_shape`) depend on a global mesh context.
nnx.use_eager_sharding(False)

__version__ = "0.1.0"
