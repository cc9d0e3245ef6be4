"""VGGT's DPT head: dense depth / world points (+ confidence) from aggregator tokens.

Spec: `shared/reference/vggt.md` §5 and pitfall 7. Every frame is decoded independently:
four aggregator layers -> LayerNorm -> 1x1 projections at patch resolution (+ uv embedding) ->
resized to a 4-level pyramid (4x, 2x, 1x, 1/2x patch resolution) -> RefineNet fusion from coarse
to fine -> `output_conv1` -> bilinear (align_corners=True) to full image size (+ uv embedding) ->
`output_conv2` -> per-pixel activation, last channel = confidence.

Layout is channels-last (NHWC) throughout; the official checkpoint's NCHW / [out, in, kh, kw]
layouts are converted at load and export time (`load_torch` / `export_torch`).
The head computes in `promote(param_dtype, float32)` and casts the incoming tokens to it: float32
whatever the aggregator's dtype (spec pitfall 9), float64 for float64 parameters (x64 mode), which
is how the port is checked tightly against upstream's float64 run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from spatial_distill.models.state_dict import StateDict
from spatial_distill.models.vit_layers import layer_norm, stat_dtype
from spatial_distill.sharding import constrain

CONV_AXES = (None, None, "conv_in", "conv_out")
# Pyramid level -> index into DPTHead.resize_layers; level 2 keeps patch resolution (no module).
_RESIZE_SLOT = (0, 1, None, 2)


# ------------------------------------------------------------------------------------------------
# config


@dataclasses.dataclass(frozen=True)
class DPTConfig:
    """Constructor arguments of upstream's DPTHead (keys of the fixture's `depth_head` dict)."""

    dim_in: int = 2048  # width of the aggregator tokens (2 x embed_dim: frame + global)
    patch_size: int = 14  # image pixels per patch side
    features: int = 256  # width of the fusion pyramid
    out_channels: tuple[int, ...] = (256, 512, 1024, 1024)  # per-level 1x1 projection widths
    intermediate_layer_idx: tuple[int, ...] = (4, 11, 17, 23)  # layers read, fine -> coarse
    pos_embed: bool = True  # add the uv sinusoidal embedding (twice: pyramid and full resolution)
    feature_only: bool = False  # stop after output_conv1 + resize and return the feature map
    down_ratio: int = 1  # output resolution = image size / down_ratio
    output_dim: int = 4  # predicted channels incl. the confidence channel
    activation: str = "inv_log"  # activation of the prediction channels (see ACTIVATIONS)
    conf_activation: str = "expp1"  # activation of the last (confidence) channel

    def __post_init__(self):
        if len(self.out_channels) != 4 or len(self.intermediate_layer_idx) != 4:
            raise ValueError(
                f"DPTConfig: out_channels {self.out_channels} and intermediate_layer_idx "
                f"{self.intermediate_layer_idx} must each have 4 entries (one per pyramid level)"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"DPTConfig.activation={self.activation!r}; choose one of {sorted(ACTIVATIONS)}"
            )
        if self.conf_activation not in CONF_ACTIVATIONS:
            raise ValueError(
                f"DPTConfig.conf_activation={self.conf_activation!r}; choose one of "
                f"{sorted(CONF_ACTIVATIONS)}"
            )
        if not self.feature_only and self.output_dim < 2:
            raise ValueError(
                f"DPTConfig.output_dim={self.output_dim}: needs >= 2 (predictions + confidence)"
            )

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DPTConfig:
        """From a dict with upstream's argument names (e.g. config.json["depth_head"])."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(
                f"DPTConfig.from_json: unknown keys {unknown}; known keys are {sorted(fields)}"
            )
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)


def _inv_log(y):
    return jnp.sign(y) * jnp.expm1(jnp.abs(y))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "exp": jnp.exp,
    "inv_log": _inv_log,  # sign(y) * (exp(|y|) - 1)
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda y: y,
}
CONF_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "expp1": lambda c: 1 + jnp.exp(c),
    "expp0": jnp.exp,
    "sigmoid": jax.nn.sigmoid,
}


def activate_head(logits: jax.Array, activation: str, conf_activation: str):
    """logits `[..., C]` -> (pred `[..., C-1]`, conf `[...]`); the last channel is confidence."""
    pred = ACTIVATIONS[activation](logits[..., :-1])
    return pred, CONF_ACTIVATIONS[conf_activation](logits[..., -1])


# ------------------------------------------------------------------------------------------------
# position embedding and resizing (pure functions of static shapes)


def uv_grid(h: int, w: int, image_hw: tuple[int, int]) -> np.ndarray:
    """`[h, w, 2]` float64 (u, v): centred grid, diagonal 2, shaped like the image."""
    aspect = image_hw[1] / image_hw[0]
    diag = np.sqrt(aspect**2 + 1.0)
    span_x, span_y = aspect / diag, 1.0 / diag
    u = np.linspace(-span_x * (w - 1) / w, span_x * (w - 1) / w, w)
    v = np.linspace(-span_y * (h - 1) / h, span_y * (h - 1) / h, h)
    uu, vv = np.meshgrid(u, v, indexing="xy")
    return np.stack([uu, vv], axis=-1)


def _pos_embed_parts(h: int, w: int, channels: int, image_hw: tuple[int, int]):
    """The embedding is separable: (per-column `[w, C/2]`, per-row `[h, C/2]`) halves, float32."""
    if channels % 4:
        raise ValueError(f"dpt_pos_embed: channels={channels} must be a multiple of 4")
    q = channels // 4
    omega = 100.0 ** (-np.arange(q) / q)
    grid = uv_grid(h, w, image_hw)

    def sincos(p):
        angle = p[:, None] * omega
        table = np.concatenate([np.sin(angle), np.cos(angle)], axis=-1)
        return table.astype(np.float32) * np.float32(0.1)

    return sincos(grid[0, :, 0]), sincos(grid[:, 0, 1])


def dpt_pos_embed(h: int, w: int, channels: int, image_hw: tuple[int, int]) -> np.ndarray:
    """The uv sinusoidal embedding the DPT head adds to a `[h, w, channels]` map, 0.1 included.

    Channels are [sin(u w_k), cos(u w_k), sin(v w_k), cos(v w_k)], w_k = 100^(-k/(C/4)).
    Computed in float64 and returned as float32 in every mode: upstream casts the table to
    float32 even in a float64 run, so a float64 port must add the same float32 values.
    """
    cols, rows = _pos_embed_parts(h, w, channels, image_hw)
    half = channels // 2
    return np.concatenate([np.broadcast_to(cols[None], (h, w, half)),
                           np.broadcast_to(rows[:, None], (h, w, half))], axis=-1)


def _add_pos_embed(x: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
    """x `[N, h, w, C]` + the uv embedding for its own (h, w, C)."""
    _, h, w, c = x.shape
    # Broadcast in the graph: a full-resolution table as a constant would be 137 MB at 518x518.
    cols, rows = (jnp.asarray(t) for t in _pos_embed_parts(h, w, c, image_hw))
    table = jnp.concatenate([jnp.broadcast_to(cols[None], (h, w, c // 2)),
                             jnp.broadcast_to(rows[:, None], (h, w, c // 2))], axis=-1)
    return x + table


def _taps(n_in: int, n_out: int, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lo, hi) and weight of hi for align_corners=True linear interpolation.

    Coordinates are computed in the tensor's float type, as upstream's kernel does, so float32
    and float64 runs each round like the reference.
    """
    ft = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    scale = ft(n_in - 1) / ft(n_out - 1) if n_out > 1 else ft(0)
    src = scale * np.arange(n_out, dtype=ft)
    lo = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo.astype(ft)).astype(ft)


def resize_bilinear_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize with align_corners=True (corner pixels map to corner pixels).

    x `[N, H, W, C]` -> `[N, size[0], size[1], C]`. `jax.image.resize` has no align_corners mode.
    Width is interpolated first, then height, the same association as upstream's kernel.
    """
    _, h_in, w_in, _ = x.shape
    lo, hi, f = _taps(w_in, size[1], x.dtype)
    f = jnp.asarray(f, x.dtype)[:, None]
    x = jnp.take(x, lo, axis=2) * (1 - f) + jnp.take(x, hi, axis=2) * f
    lo, hi, f = _taps(h_in, size[0], x.dtype)
    f = jnp.asarray(f, x.dtype)[:, None, None]
    return jnp.take(x, lo, axis=1) * (1 - f) + jnp.take(x, hi, axis=1) * f


# ------------------------------------------------------------------------------------------------
# modules


def _conv(cin, cout, k, *, stride=1, pad=0, bias=True, param_dtype, rngs) -> nnx.Conv:
    return nnx.Conv(
        cin, cout, (k, k), strides=stride, padding=((pad, pad), (pad, pad)), use_bias=bias,
        param_dtype=param_dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), CONV_AXES),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
    )


def _deconv(c, k, *, param_dtype, rngs) -> nnx.ConvTranspose:
    """ConvTranspose with kernel = stride = k: each input pixel becomes a k x k output block."""
    return nnx.ConvTranspose(
        c, c, (k, k), strides=(k, k), padding="VALID", param_dtype=param_dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), CONV_AXES),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)),
    )


class ResidualConvUnit(nnx.Module):
    """RCU(x) = conv2(relu(conv1(relu(x)))) + relu(x).

    The residual is relu(x), not x: upstream's in-place ReLU overwrites its input before the add,
    and the released weights were trained that way.
    """

    def __init__(self, features: int, *, param_dtype, rngs: nnx.Rngs):
        self.conv1 = _conv(features, features, 3, pad=1, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = _conv(features, features, 3, pad=1, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(x)
        return self.conv2(jax.nn.relu(self.conv1(x))) + x


class FusionBlock(nnx.Module):
    """RefineNet step: out_conv(upsample(RCU2(main + RCU1(skip)), size)).

    The coarsest block has no skip input and no RCU1.
    """

    def __init__(self, features: int, *, has_skip: bool, param_dtype, rngs: nnx.Rngs):
        rcu = lambda: ResidualConvUnit(features, param_dtype=param_dtype, rngs=rngs)
        self.resConfUnit1 = rcu() if has_skip else None
        self.resConfUnit2 = rcu()
        self.out_conv = _conv(features, features, 1, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, skip=None, size=None):
        if self.resConfUnit1 is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        # Without a target size, upstream doubles the resolution (scale_factor=2).
        size = (2 * x.shape[1], 2 * x.shape[2]) if size is None else size
        return self.out_conv(resize_bilinear_align_corners(x, size))


class DPTHead(nnx.Module):
    """Dense prediction head (depth or world points, with confidence) from aggregator tokens.

    Submodules are grouped in lists (`projects`, `resize_layers`, `layer_rn`, `refinenets`,
    `output_conv2`); `_torch_params` maps each to its official key.
    """

    def __init__(self, cfg: DPTConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = stat_dtype(param_dtype)
        f, oc, pd = cfg.features, cfg.out_channels, param_dtype
        self.norm = layer_norm(cfg.dim_in, 1e-5, self.dtype, pd, rngs)
        self.projects = nnx.List(
            [_conv(cfg.dim_in, c, 1, param_dtype=pd, rngs=rngs) for c in oc]
        )
        # Pyramid: 4x and 2x up by deconvolution, level 2 untouched, 1/2 by a stride-2 conv
        # (explicit (1, 1) padding: "SAME" pads (0, 1) on even sizes and shifts the grid).
        self.resize_layers = nnx.List([
            _deconv(oc[0], 4, param_dtype=pd, rngs=rngs),
            _deconv(oc[1], 2, param_dtype=pd, rngs=rngs),
            _conv(oc[3], oc[3], 3, stride=2, pad=1, param_dtype=pd, rngs=rngs),
        ])
        self.layer_rn = nnx.List(
            [_conv(c, f, 3, pad=1, bias=False, param_dtype=pd, rngs=rngs) for c in oc]
        )
        self.refinenets = nnx.List(
            [FusionBlock(f, has_skip=i < 3, param_dtype=pd, rngs=rngs) for i in range(4)]
        )
        if cfg.feature_only:
            self.output_conv1 = _conv(f, f, 3, pad=1, param_dtype=pd, rngs=rngs)
            self.output_conv2 = None
        else:
            self.output_conv1 = _conv(f, f // 2, 3, pad=1, param_dtype=pd, rngs=rngs)
            self.output_conv2 = nnx.List([
                _conv(f // 2, 32, 3, pad=1, param_dtype=pd, rngs=rngs),
                _conv(32, cfg.output_dim, 1, param_dtype=pd, rngs=rngs),
            ])

    # -- stages (frames flattened into the batch axis N) -----------------------------------------
    def levels(self, tokens: Sequence[jax.Array], patch_start_idx: int) -> tuple[jax.Array, ...]:
        """The 4 selected layers' patch tokens in the head's dtype, each `[B*S, h*w, dim_in]`."""
        out = []
        for i in self.cfg.intermediate_layer_idx:
            t = tokens[i]
            if t.ndim != 4 or t.shape[-1] != self.cfg.dim_in:
                raise ValueError(
                    f"DPTHead: aggregator layer {i} has shape {t.shape}; expected [B, S, P, "
                    f"{self.cfg.dim_in}] (dim_in of the config)"
                )
            t = t[:, :, patch_start_idx:].astype(self.dtype)
            t = t.reshape(-1, *t.shape[2:])  # frames are independent: fold S into the batch
            out.append(constrain(t, ("activation_batch", "activation_length", "activation_embed")))
        return tuple(out)

    def fuse(self, levels: Sequence[jax.Array], image_hw: tuple[int, int]) -> jax.Array:
        """levels `4 x [N, h*w, dim_in]` -> `output_conv1` output `[N, 8h, 8w, C1]`."""
        h, w = image_hw[0] // self.cfg.patch_size, image_hw[1] // self.cfg.patch_size
        pyramid = []
        for j, x in enumerate(levels):
            if x.shape[1] != h * w:
                raise ValueError(
                    f"DPTHead: {x.shape[1]} patch tokens per frame, but image {tuple(image_hw)} "
                    f"with patch_size {self.cfg.patch_size} has {h}x{w}={h * w}; pass the image "
                    "size the tokens came from and the aggregator's patch_start_idx"
                )
            x = self.projects[j](self.norm(x).reshape(x.shape[0], h, w, -1))
            if self.cfg.pos_embed:
                x = _add_pos_embed(x, image_hw)
            if _RESIZE_SLOT[j] is not None:
                x = self.resize_layers[_RESIZE_SLOT[j]](x)
            pyramid.append(self.layer_rn[j](x))
        l1, l2, l3, l4 = pyramid
        rn1, rn2, rn3, rn4 = self.refinenets
        out = rn4(l4, size=l3.shape[1:3])
        out = rn3(out, l3, size=l2.shape[1:3])
        out = rn2(out, l2, size=l1.shape[1:3])
        return self.output_conv1(rn1(out, l1))

    def upsample(self, fused: jax.Array, image_hw: tuple[int, int]) -> jax.Array:
        """`[N, 8h, 8w, C1]` -> `[N, H/down_ratio, W/down_ratio, C1]` (+ uv embedding)."""
        h, w = image_hw[0] // self.cfg.patch_size, image_hw[1] // self.cfg.patch_size
        scale = self.cfg.patch_size / self.cfg.down_ratio
        x = resize_bilinear_align_corners(fused, (int(h * scale), int(w * scale)))
        return _add_pos_embed(x, image_hw) if self.cfg.pos_embed else x

    def logits(self, features: jax.Array) -> jax.Array:
        """`[N, H, W, C1]` -> raw per-pixel outputs `[N, H, W, output_dim]`."""
        conv_a, conv_b = self.output_conv2
        return conv_b(jax.nn.relu(conv_a(features)))

    # -- public entry points ---------------------------------------------------------------------
    def _map_frames(self, fn, tokens, patch_start_idx, frames_chunk_size):
        levels = self.levels(tokens, patch_start_idx)
        b, s = tokens[self.cfg.intermediate_layer_idx[0]].shape[:2]
        n = b * s
        if frames_chunk_size is None or n <= frames_chunk_size:
            out = fn(levels)
        else:
            # Frames are independent, and the full-resolution maps dominate memory (~1.1 GiB of
            # forward + backward temporaries per 518 px frame): a sequential scan over k chunks,
            # each recomputed in the backward pass (jax.checkpoint, so the scan saves only its
            # inputs), keeps one chunk's maps live without changing any value. Step j takes
            # frames j, j + k, j + 2k, ...: with frames sharded in contiguous blocks over
            # devices, every step then works on every device's own frames.
            k = next(d for d in range(-(-n // frames_chunk_size), n + 1) if n % d == 0)
            interleave = lambda a: a.reshape(n // k, k, *a.shape[1:]).swapaxes(0, 1)  # noqa: E731
            step = jax.checkpoint(fn)
            _, out = jax.lax.scan(lambda c, lv: (c, step(lv)), None, tuple(interleave(a) for a in levels))
            out = jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(n, *a.shape[2:]), out)
        return jax.tree.map(lambda a: a.reshape(b, s, *a.shape[1:]), out)

    def features(self, tokens, image_hw, patch_start_idx, *, frames_chunk_size=8) -> jax.Array:
        """Full-resolution feature map before `output_conv2`: `[B, S, H/down, W/down, C1]`.

        C1 = features // 2 (features when feature_only). `tokens` is indexable by aggregator
        layer id (list of `[B, S, P, dim_in]`, or the stacked `[L, B, S, P, dim_in]`).
        """
        image_hw = tuple(int(v) for v in image_hw)
        fn = lambda lv: self.upsample(self.fuse(lv, image_hw), image_hw)
        return self._map_frames(fn, tokens, patch_start_idx, frames_chunk_size)

    def __call__(self, tokens, image_hw, patch_start_idx, *, frames_chunk_size=8):
        """Per-layer tokens `[B, S, P, dim_in]` -> (pred, conf).

        pred `[B, S, H, W, output_dim - 1]` (activated), conf `[B, S, H, W]`. With
        `feature_only` returns `features(...)` instead.
        """
        if self.cfg.feature_only:
            return self.features(tokens, image_hw, patch_start_idx,
                                 frames_chunk_size=frames_chunk_size)
        image_hw = tuple(int(v) for v in image_hw)

        def fn(lv):
            raw = self.logits(self.upsample(self.fuse(lv, image_hw), image_hw))
            return activate_head(raw, self.cfg.activation, self.cfg.conf_activation)

        return self._map_frames(fn, tokens, patch_start_idx, frames_chunk_size)

    # -- official checkpoint ---------------------------------------------------------------------
    def _torch_params(self, prefix: str) -> Iterator[tuple[str, nnx.Variable, str]]:
        """(official key, variable, layout) for every parameter, in upstream's order."""
        p = f"{prefix}."

        def conv(key, m, layout="conv"):
            yield f"{key}.weight", m.kernel, layout
            if m.bias is not None:
                yield f"{key}.bias", m.bias, "free"

        yield f"{p}norm.weight", self.norm.scale, "free"
        yield f"{p}norm.bias", self.norm.bias, "free"
        for j, m in enumerate(self.projects):
            yield from conv(f"{p}projects.{j}", m)
        # resize_layers.2 is an Identity upstream and has no keys.
        for level, slot in enumerate(_RESIZE_SLOT):
            if slot is not None:
                layout = "deconv" if level < 2 else "conv"
                yield from conv(f"{p}resize_layers.{level}", self.resize_layers[slot], layout)
        for j, m in enumerate(self.layer_rn):
            yield from conv(f"{p}scratch.layer{j + 1}_rn", m)
        for j, rn in enumerate(self.refinenets):
            key = f"{p}scratch.refinenet{j + 1}"
            yield from conv(f"{key}.out_conv", rn.out_conv)
            for unit in ("resConfUnit1", "resConfUnit2"):
                rcu = getattr(rn, unit)
                if rcu is not None:
                    yield from conv(f"{key}.{unit}.conv1", rcu.conv1)
                    yield from conv(f"{key}.{unit}.conv2", rcu.conv2)
        yield from conv(f"{p}scratch.output_conv1", self.output_conv1)
        if self.output_conv2 is not None:
            # output_conv2.1 is the parameter-free ReLU.
            yield from conv(f"{p}scratch.output_conv2.0", self.output_conv2[0])
            yield from conv(f"{p}scratch.output_conv2.2", self.output_conv2[1])

    def load_torch(self, sd: StateDict, prefix: str) -> None:
        """Fills every parameter from official keys under `prefix` (e.g. "depth_head").

        Problems are recorded in `sd`; the caller's `sd.finish()` reports them all at once.
        """
        for key, var, layout in self._torch_params(prefix):
            sd.assign(var, key, TO_FLAX[layout])

    def export_torch(self, prefix: str) -> dict[str, Any]:
        """Official key -> numpy tensor in torch layout (possibly a non-contiguous view)."""
        params = self._torch_params(prefix)
        return {key: _export(var, TO_TORCH[layout]) for key, var, layout in params}


# torch <-> flax layouts. A ConvTranspose with stride = kernel maps each input pixel to one output
# block, out[i*k + a] += x[i] * W[:, :, a]; Flax's (non-transposed) ConvTranspose correlates the
# dilated input with its kernel, which is that block pattern mirrored, hence the spatial flip.
TO_FLAX: dict[str, Callable] = {
    "free": lambda w: w,
    "conv": lambda w: w.transpose(2, 3, 1, 0),  # [out, in, kh, kw] -> [kh, kw, in, out]
    # [in, out, kh, kw] -> [kh, kw, in, out], mirrored in kh and kw.
    "deconv": lambda w: w.transpose(2, 3, 0, 1)[::-1, ::-1],
}
TO_TORCH: dict[str, Callable] = {
    "free": lambda w: w,
    "conv": lambda w: w.transpose(3, 2, 0, 1),
    "deconv": lambda w: w[::-1, ::-1].transpose(2, 3, 0, 1),
}


def _export(var: nnx.Variable, to_torch: Callable) -> np.ndarray:
    # Views, not copies: exporting a zero-stride placeholder module (abstract shape listing)
    # must not materialise the weights.
    return to_torch(np.asarray(var.get_value()))
