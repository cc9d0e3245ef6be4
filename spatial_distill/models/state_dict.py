"""Reading official PyTorch-format checkpoints into NNX modules, safely and by key name.

Checkpoints are untrusted input: safetensors first (`safetensors.numpy`, whose header parser
bounds-checks every offset); a torch `.pt/.bin` only through `torch.load(weights_only=True)`.
Nothing is ever unpickled.

`StateDict` hands out tensors by key, converts layouts (torch Linear `[out, in]` -> Flax
`[in, out]`, Conv `[out, in, kh, kw]` -> `[kh, kw, in, out]`) and records every key it was asked
for, so a loader can end with `finish()`: one error that names every missing, unexpected and
mis-shaped key at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import numpy as np
from flax import nnx


def read_config(config, default_where: str) -> tuple[dict, str]:
    """A model config as a dict, from a config.json path (or its directory), a mapping, or a
    transformers config object; returns (dict, where it came from, for error messages)."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            return json.load(f), path
    if isinstance(config, Mapping):
        return dict(config), default_where
    if hasattr(config, "to_dict"):
        return config.to_dict(), type(config).__name__
    raise TypeError(f"{default_where}: expected a config.json path, a dict or a transformers config, "
                    f"got {type(config).__name__}")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: lists every offending key."""


def load_tensors(path_or_state_dict, *, source: str | None = None) -> tuple[dict[str, np.ndarray], str]:
    """Returns `({key: np.ndarray}, source_name)` from a path or an in-memory state dict.

    Accepts a `.safetensors` file, a directory holding `*.safetensors` (all shards are merged),
    a torch `.pt/.pth/.bin` file (loaded with `weights_only=True`), or a mapping of arrays /
    torch tensors.
    """
    if isinstance(path_or_state_dict, Mapping):
        return {k: _to_numpy(v) for k, v in path_or_state_dict.items()}, source or "<state dict>"
    path = os.fspath(path_or_state_dict)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; pass a .safetensors file, a "
                                "directory of them, or a torch .pt/.bin state dict")
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"checkpoint directory {path!r} holds no *.safetensors file")
        out: dict[str, np.ndarray] = {}
        for f in files:
            part, _ = load_tensors(os.path.join(path, f))
            dup = out.keys() & part.keys()
            if dup:
                raise CheckpointMismatchError(f"{path}/{f}: keys repeated across shards: {sorted(dup)[:5]}")
            out.update(part)
        return out, path
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        try:
            return dict(load_file(path)), path
        except TypeError as e:
            if "bfloat16" not in str(e):
                raise CheckpointMismatchError(f"{path}: not a readable safetensors file ({e})") from e
            return _load_bfloat16_safetensors(path), path
        except Exception as e:  # noqa: BLE001 - corrupt headers raise library-specific errors
            raise CheckpointMismatchError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path}: reading a torch checkpoint needs torch (pip install "
                          "'spatial_distill[torch]'), or convert it to safetensors") from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: _to_numpy(v) for k, v in obj.items()}, path


def _load_bfloat16_safetensors(path: str) -> dict[str, np.ndarray]:
    """numpy has no bfloat16, so `safetensors.numpy` refuses such files (LLaVA checkpoints are
    often bf16): read them through its JAX reader on the host CPU, as ml_dtypes bfloat16."""
    import jax
    from safetensors import safe_open

    with jax.default_device(jax.devices("cpu")[0]), safe_open(path, framework="flax") as f:
        return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118 - not a dict


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor; bf16 has no numpy dtype
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        return v.numpy()
    return np.asarray(v)


class StateDict:
    """Key-tracking view of a checkpoint. Collects problems; `finish()` raises them together."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str = "<state dict>"):
        self.tensors = dict(tensors)
        self.source = source
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.misshaped: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def get(self, key: str, shape: Iterable[int] | None = None) -> np.ndarray | None:
        """The tensor under `key` as stored (torch layout); None (recorded) if absent/mis-shaped."""
        if key not in self.tensors:
            self.missing.append(key)
            return None
        self.used.add(key)
        value = self.tensors[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            self.misshaped.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(shape)}")
            return None
        return value

    # -- assignment into NNX variables ---------------------------------------------------------
    def assign(self, variable: nnx.Variable, key: str, transform=None) -> None:
        """Sets `variable` from `key` after `transform` (a torch->flax layout function)."""
        value = self.get(key)
        if value is None:
            return
        if transform is not None:
            value = transform(value)
        target = variable.get_value()
        if tuple(value.shape) != tuple(target.shape):
            self.misshaped.append(
                f"{key}: checkpoint {tuple(self.tensors[key].shape)} -> {tuple(value.shape)} "
                f"vs model {tuple(target.shape)}"
            )
            return
        variable.set_value(np.asarray(value, dtype=np.dtype(target.dtype)))

    def linear(self, module: nnx.Linear, prefix: str) -> None:
        """torch `nn.Linear` at `prefix` (weight `[out, in]`, optional bias) -> `nnx.Linear`."""
        self.assign(module.kernel, f"{prefix}.weight", lambda w: w.T)
        if getattr(module, "bias", None) is not None:
            self.assign(module.bias, f"{prefix}.bias")

    def layernorm(self, module, prefix: str) -> None:
        """torch LayerNorm/GroupNorm/RMSNorm (`weight`, optional `bias`) -> NNX norm."""
        if getattr(module, "scale", None) is not None:
            self.assign(module.scale, f"{prefix}.weight")
        if getattr(module, "bias", None) is not None:
            self.assign(module.bias, f"{prefix}.bias")

    def conv(self, module: nnx.Conv, prefix: str) -> None:
        """torch Conv2d (`[out, in, kh, kw]`) -> NHWC `nnx.Conv` (`[kh, kw, in, out]`)."""
        self.assign(module.kernel, f"{prefix}.weight", lambda w: w.transpose(2, 3, 1, 0))
        if getattr(module, "bias", None) is not None:
            self.assign(module.bias, f"{prefix}.bias")

    def finish(self, *, ignore_unused: Iterable[str] = (), what: str = "model") -> None:
        """Raises one CheckpointMismatchError naming every missing/unexpected/mis-shaped key."""
        ignore = set(ignore_unused)
        unexpected = sorted(k for k in self.tensors if k not in self.used and k not in ignore)
        if not (self.missing or unexpected or self.misshaped):
            return
        lines = [f"{self.source} does not match the {what}:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(self.missing))
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if self.misshaped:
            lines.append(f"  mis-shaped keys ({len(self.misshaped)}): " + "; ".join(self.misshaped))
        lines.append("  Check that the checkpoint and the config describe the same architecture.")
        raise CheckpointMismatchError("\n".join(lines))
