"""Scene readers' throughput on one CPU core: samples/s read and decoded at 4 views of 518 x 518.

    python -m benchmarks.bench_readers [--scenes 6] [--repeats 3]

Writes scenes at real sizes to a temp dir: ScanNet as its exporter writes it (1296 x 968 JPEG
colour, 640 x 480 uint16 depth with its own intrinsics, 4x4 poses; both the exported-frame and the
posed_images layouts) and 3D-FRONT renders (518 x 518 PNG RGB and uint16 depth, OpenGL cameras,
boxes in scene.json). Each reader then builds the canonical 4-view, 518 x 518 `Sample`
(decode, colour resize, depth mapped to the colour camera, validation), pinned to one core with
one TF/BLAS thread. Best of `--repeats` passes over the scenes (the page cache is warm: the
decode and resampling cost is measured, not the disk).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time

os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data_pipelines import front3d, scannet  # noqa: E402

VIEWS, SIZE = 4, 518
COLOUR_HW, DEPTH_HW = (968, 1296), (480, 640)
K_COLOUR = np.array([[1170.2, 0, 647.8], [0, 1170.2, 483.8], [0, 0, 1]])
K_DEPTH = np.array([[577.6, 0, 318.9], [0, 577.6, 238.7], [0, 0, 1]])


def _texture(rng, hw) -> np.ndarray:
    """Smooth colour fields plus sensor-like noise: JPEG sizes like real frames (~200-300 KB)."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1)
    img = 127 + 90 * base + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _pose(i: int) -> np.ndarray:
    a = 0.3 * i
    pose = np.eye(4)
    pose[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
    pose[:3, 3] = [0.2 * i, 0.0, 1.5]
    return pose


def _depth(rng, hw) -> np.ndarray:
    return (1500 + 800 * rng.random(hw)).astype(np.uint16)


def _m(path: pathlib.Path, m: np.ndarray) -> None:
    path.write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in m) + "\n")


def write_scannet(root: pathlib.Path, n: int, rng) -> tuple[list, list]:
    exported, posed = [], []
    for s in range(n):
        d, p = root / "export" / f"scene{s:04d}_00", root / "posed_images" / f"scene{s:04d}_00"
        for sub in ("color", "depth", "pose", "intrinsic"):
            (d / sub).mkdir(parents=True)
        p.mkdir(parents=True)
        for i in range(VIEWS):
            colour, depth = Image.fromarray(_texture(rng, COLOUR_HW)), Image.fromarray(_depth(rng, DEPTH_HW))
            colour.save(d / "color" / f"{i}.jpg", quality=90)
            colour.save(p / f"{i:05d}.jpg", quality=90)
            depth.save(d / "depth" / f"{i}.png")
            depth.save(p / f"{i:05d}.png")
            _m(d / "pose" / f"{i}.txt", _pose(i))
            _m(p / f"{i:05d}.txt", _pose(i))
        for path, k in ((d / "intrinsic" / "intrinsic_color.txt", K_COLOUR), (d / "intrinsic" / "intrinsic_depth.txt", K_DEPTH),
                        (p / "intrinsic.txt", K_COLOUR), (p / "depth_intrinsic.txt", K_DEPTH)):
            k4 = np.eye(4)
            k4[:3, :3] = k
            _m(path, k4)
        exported.append(d)
        posed.append(p)
    return exported, posed


def write_front3d(root: pathlib.Path, n: int, rng) -> list:
    out = []
    for s in range(n):
        d = root / "front3d" / f"room{s:04d}"
        (d / "rgb").mkdir(parents=True)
        (d / "depth").mkdir()
        frames = []
        for i in range(VIEWS):
            Image.fromarray(_texture(rng, (SIZE, SIZE))).save(d / "rgb" / f"{i:04d}.png")
            Image.fromarray(_depth(rng, (SIZE, SIZE))).save(d / "depth" / f"{i:04d}.png")
            frames.append({"id": i, "cam_to_world": _pose(i).tolist()})
        k = [[450.0, 0, (SIZE - 1) / 2], [0, 450.0, (SIZE - 1) / 2], [0, 0, 1]]
        (d / "cameras.json").write_text(json.dumps({"convention": "opencv", "world_up": "z",
                                                    "intrinsics": k, "frames": frames}))
        boxes = [[0.5 * j, 1.0, 0.4, 0.6, 0.5, 0.8, 0.1 * j] for j in range(6)]
        (d / "scene.json").write_text(json.dumps({"boxes": boxes, "labels": [j % 3 for j in range(6)],
                                                  "label_names": ["chair", "table", "bed"] * 2}))
        out.append(d)
    return out


def rate(read, scenes, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in scenes:
            sample = read(s)
            assert sample.rgb.shape == (VIEWS, SIZE, SIZE, 3)
        best = max(best, len(scenes) / (time.perf_counter() - t0))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        exported, posed = write_scannet(root, args.scenes, rng)
        rooms = write_front3d(root, args.scenes, rng)
        size = sum(f.stat().st_size for f in exported[0].rglob("*") if f.is_file())
        print(f"{args.scenes} scenes per reader, {VIEWS} views -> {SIZE} x {SIZE}, one core "
              f"(ScanNet scene on disk: {size / 2**20:.1f} MiB for {VIEWS} frames)")
        hw = (SIZE, SIZE)
        for name, read, scenes in (
                ("scannet exported frames", lambda s: scannet.read_scene(s, num_views=VIEWS, image_size=hw,
                                                                         axis_align=np.eye(4)), exported),
                ("scannet posed_images", lambda s: scannet.read_scene(s, num_views=VIEWS, image_size=hw,
                                                                      axis_align=np.eye(4)), posed),
                ("3d-front renders", lambda s: front3d.read_scene(s, num_views=VIEWS, image_size=hw), rooms)):
            print(f"  {name:24s} {rate(read, scenes, args.repeats):6.2f} samples/s per core")


if __name__ == "__main__":
    main()
