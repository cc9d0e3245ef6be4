"""LLaVA-3D's input side: the `llava_v1` prompt, its chunk-wise tokenization, click prompts, and
the preprocessing of frames, depth, intrinsics and poses (spec `llava3d.md` §2, §4.6, §6).

Everything here reproduces upstream's numbers on upstream's inputs (the tiny fixture's raw
files -> its `pixel_values_*`, `depths`, `intrinsics`, `poses`), so the teacher sees at dump time
exactly what it saw in training. Resizes go through PIL, as upstream's do.

One upstream quirk is kept on purpose and can be switched off: the intrinsics' crop shift
(`cx -= (nw - nh) / 2`) is right only for landscape frames; for portrait frames upstream moves cx
the wrong way and leaves cy alone (`upstream_intrinsics=False` applies the true crop).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from spatial_distill.models.llava3d import IMAGE_TOKEN_INDEX, LOC_TOKEN_INDEX

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the human's questions.")
TEMPLATE = "llava_v1"
DEPTH_SCALE = {"scannet": 1000.0, "matterport3d": 4000.0}


# -- prompt (spec §6) ------------------------------------------------------------------------------
def prompt(query: str, answer: str | None = None) -> str:
    """The single-turn `llava_v1` prompt with the image marker first; with `answer`, the text
    that teacher-forces it (`" " + answer + "</s>"` closes the assistant turn)."""
    text = f"{SYSTEM} USER: <image>\n{query} ASSISTANT:"
    return text if answer is None else f"{text} {answer}</s>"


def tokenize(text: str, encode: Callable[[str], Sequence[int]], bos_id: int = 1) -> list[int]:
    """Upstream's `tokenizer_special_token`: split on `<image>` / `<boxes>` (kept), encode every
    text chunk on its own (`encode` adds BOS, as the Llama tokenizer does), emit BOS once and
    drop each chunk's leading BOS; `<image>` -> -200, `<boxes>` -> -300."""
    out = [bos_id]
    for chunk in re.split(r"(<image>|<boxes>)", text):
        if chunk == "<image>":
            out.append(IMAGE_TOKEN_INDEX)
        elif chunk == "<boxes>":
            out.append(LOC_TOKEN_INDEX)
        elif chunk:
            ids = list(encode(chunk))
            if not ids or ids[0] != bos_id:
                raise ValueError(f"the tokenizer did not start {chunk[:20]!r} with BOS {bos_id}; "
                                 "LLaVA's chunk rule expects the Llama tokenizer's add_bos=True")
            out.extend(ids[1:])
    return out


_CLICK = re.compile(r"\[\s*(-?[\d.]+(?:e-?\d+)?)\s*,\s*(-?[\d.]+(?:e-?\d+)?)\s*,\s*(-?[\d.]+(?:e-?\d+)?)"
                    r"(?:\s*,\s*-?[\d.]+(?:e-?\d+)?)*\s*\]")


def extract_click(query: str) -> tuple[str, np.ndarray | None]:
    """The first `[x, y, z, ...]` in a query becomes `<boxes>` and a click `[3]` (its first three
    numbers rounded to 3 decimals, axis-aligned metres), as upstream's run script does."""
    m = _CLICK.search(query)
    if m is None:
        return query, None
    click = np.asarray([round(float(m.group(i)), 3) for i in (1, 2, 3)], np.float32)
    return query[: m.start()] + "<boxes>" + query[m.end():], click


# -- frames (spec §2) ----------------------------------------------------------------------------------
def _short_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """The CLIP processor's resize: shorter side `size`, the longer `int(size * long / short)`."""
    return (size, int(size * h / w)) if w <= h else (int(size * w / h), size)


def clip_image(image: np.ndarray, size: int = 336) -> np.ndarray:
    """CLIP-336 preprocessing: uint8 `[H, W, 3]` -> float32 `[3, size, size]` (bicubic resize of
    the shorter side to `size`, centre crop, /255, per-channel normalisation)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"clip_image: expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    nw, nh = _short_side_size(w, h, size)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), resample=Image.BICUBIC))
    top, left = (nh - size) // 2, (nw - size) // 2
    crop = resized[top: top + size, left: left + size]
    x = (crop * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def pad_to_square(image: np.ndarray) -> np.ndarray:
    """`image_aspect_ratio='pad'`: centred (floor) on a square of the CLIP mean colour."""
    h, w = image.shape[:2]
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = [int(255 * m) for m in CLIP_MEAN]
    top, left = (side - h) // 2, (side - w) // 2
    out[top: top + h, left: left + w] = image
    return out


def image_2d(image: np.ndarray, aspect_ratio: str = "square", size: int = 336) -> np.ndarray:
    """2D mode: uint8 `[H, W, 3]` -> `[3, size, size]` (`process_images`)."""
    if aspect_ratio == "pad":
        image = pad_to_square(np.asarray(image))
    elif aspect_ratio != "square":
        raise ValueError(f"image_aspect_ratio={aspect_ratio!r}: LLaVA-3D uses 'square' or 'pad'")
    return clip_image(image, size)


def depth_map(depth: np.ndarray, size: int = 336, scale: float = 1000.0) -> tuple[np.ndarray, tuple[int, int]]:
    """Raw depth (uint16 millimetres, 0 = invalid) -> (float32 metres `[size, size]`, the resized
    uncropped (width, height)). Nearest resize so the shorter side is `size` (upstream computes
    the longer side as `int(long * (size / short))`, which can differ by one pixel from the RGB
    rule), then a centre crop whose box PIL rounds half to even. No inpainting: 0 stays 0."""
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise ValueError(f"depth_map: expected one [H, W] depth image, got shape {depth.shape}")
    h, w = depth.shape
    nw, nh = (size, int(h * (size / w))) if w <= h else (int(w * (size / h)), size)
    # PIL's NEAREST on a 16-bit PNG ("I;16") takes source floor((i + 0.5) * in / out); on 32-bit
    # images it rounds differently, so the index rule is applied here directly.
    rows = np.floor((np.arange(nh) + 0.5) * (h / nh)).astype(np.int64)
    cols = np.floor((np.arange(nw) + 0.5) * (w / nw)).astype(np.int64)
    top, left = round((nh - size) / 2), round((nw - size) / 2)  # PIL's crop: half to even
    cropped = depth[np.ix_(rows[top: top + size], cols[left: left + size])].astype(np.float32)
    return cropped / np.float32(scale), (nw, nh)


def intrinsic_matrix(K: np.ndarray, original: tuple[int, int], resized: tuple[int, int], *,
                     upstream_intrinsics: bool = True) -> np.ndarray:
    """K `[4, 4]` of an image of `original` (w, h), for the resized (w, h) then cropped square.
    Rows 0/1 are rescaled by nw/w0 and nh/h0; the crop shifts cx by (nw - nh)/2 as upstream
    does (right for landscape only), or, with `upstream_intrinsics=False`, the true crop:
    cx -= (nw - s)/2 and cy -= (nh - s)/2 with s = min(nw, nh)."""
    K = np.array(K, np.float64)
    if K.shape != (4, 4):
        raise ValueError(f"intrinsic_matrix: K must be 4x4, got {K.shape}")
    (w0, h0), (nw, nh) = original, resized
    K[0] /= w0 / nw
    K[1] /= h0 / nh
    if upstream_intrinsics:
        if nh > nw:
            warnings.warn("portrait frames: upstream LLaVA-3D shifts cx by (nw - nh)/2 < 0 and "
                          "leaves cy; kept for parity (upstream_intrinsics=False crops correctly)",
                          stacklevel=2)
        K[0, 2] -= (nw - nh) / 2
    else:
        s = min(nw, nh)
        K[0, 2] -= (nw - s) / 2
        K[1, 2] -= (nh - s) / 2
    return K.astype(np.float32)


def frame_indices(num_available: int, num_frames: int) -> list[int]:
    """Upstream's deterministic frame choice: stride `n // num_frames` when there are more
    frames, the list repeated when fewer."""
    if num_available <= 0:
        raise ValueError("a scene needs at least one frame")
    if num_available > num_frames:
        step = num_available // num_frames
        return [i * step for i in range(num_frames)]
    reps = math.ceil(num_frames / num_available)
    return (list(range(num_available)) * reps)[:num_frames]


def scene(rgb: Sequence[np.ndarray], depth: Sequence[np.ndarray], intrinsic: np.ndarray,
          poses: np.ndarray, axis_align: np.ndarray | None = None, *, size: int = 336,
          depth_scale: float = 1000.0, intrinsic_size: tuple[int, int] | None = None,
          upstream_intrinsics: bool = True) -> dict[str, np.ndarray]:
    """One scene's views -> the model's 3D inputs: `images` `[V, 3, size, size]`, `depths`
    `[V, size, size]` metres, `poses` `[V, 4, 4]` (axis-aligned camera-to-world: A @ pose) and
    `intrinsics` `[V, 4, 4]`.

    `intrinsic` is one K `[4, 4]` for every view (ScanNet's depth intrinsic) or one per view
    `[V, 4, 4]`; `intrinsic_size` the (w, h) it was calibrated for (default: the depth image's, as
    for ScanNet's depth intrinsic). The resized size comes from the last view's depth, as upstream."""
    V = len(rgb)
    if len(depth) != V or len(poses) != V:
        raise ValueError(f"scene: {V} colour frames, {len(depth)} depth maps and {len(poses)} poses")
    poses = np.asarray(poses, np.float64)
    bad = [i for i in range(V) if not np.isfinite(poses[i]).all()]
    if bad:
        raise ValueError(f"scene: poses of views {bad} hold inf/NaN (ScanNet's invalid frames); "
                         "drop those views before preprocessing")
    images = np.stack([clip_image(np.asarray(f), size) for f in rgb])
    maps = [depth_map(d, size, depth_scale) for d in depth]
    resized = maps[-1][1]
    K = np.asarray(intrinsic, np.float64)
    Ks = K[None].repeat(V, 0) if K.ndim == 2 else K
    if Ks.shape != (V, 4, 4):
        raise ValueError(f"scene: intrinsic must be [4, 4] or [{V}, 4, 4], got {K.shape}")
    original = intrinsic_size or (np.asarray(depth[-1]).shape[1], np.asarray(depth[-1]).shape[0])
    intrinsics = np.stack([intrinsic_matrix(k, original, resized, upstream_intrinsics=upstream_intrinsics)
                           for k in Ks])
    A = np.eye(4) if axis_align is None else np.asarray(axis_align, np.float64)
    return dict(images=images, depths=np.stack([m for m, _ in maps]),
                poses=(A[None] @ poses).astype(np.float32), intrinsics=intrinsics)


__all__ = ["CLIP_MEAN", "CLIP_STD", "DEPTH_SCALE", "SYSTEM", "TEMPLATE", "clip_image", "depth_map",
           "extract_click", "frame_indices", "image_2d", "intrinsic_matrix", "pad_to_square",
           "prompt", "scene", "tokenize"]
