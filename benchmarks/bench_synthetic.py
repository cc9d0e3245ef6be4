"""How fast the built-in synthetic scenes are generated and written (ScanNet layout, PNG).

    python benchmarks/bench_synthetic.py                          # 1,000 scenes, 112x112, 4 views
    python benchmarks/bench_synthetic.py --num_scenes=200 --image_size=224

Prints scenes/s and the wall time of a `--num_scenes` split at `--image_size` on `--workers`
processes (goal: 1,000 scenes at 112x112 in < 120 s on 2 workers), then times `--large_scenes`
scenes at `--large_size` (518, VGGT's input) and extrapolates a 1,000-scene split from them.
Writes into a temporary folder that is deleted afterwards.
"""

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from data_pipelines import scannet, synthetic  # noqa: E402


def _time_split(out_dir, num_scenes, image_size, num_views, workers, seed):
    start = time.perf_counter()
    dirs = synthetic.generate_split(out_dir, num_scenes=num_scenes, seed=seed,
                                    image_size=(image_size, image_size), num_views=num_views,
                                    workers=workers)
    return time.perf_counter() - start, dirs


def _cpu_per_scene(out_dir, num_scenes, image_size, num_views):
    """CPU seconds to generate and write one scene in this process: on a shared machine this,
    not the wall time, says what an idle one would do."""
    start = time.process_time()
    for i in range(num_scenes):
        sample = synthetic.generate_scene(synthetic.scene_seed(99, i), image_size=image_size,
                                          num_views=num_views)
        scannet.write_scene(sample, pathlib.Path(out_dir) / f"cpu{i}")
    return (time.process_time() - start) / num_scenes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_scenes", type=int, default=1000, help="scenes in the timed split")
    parser.add_argument("--image_size", type=int, default=112, help="square image side, pixels")
    parser.add_argument("--num_views", type=int, default=4, help="cameras per scene")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--large_size", type=int, default=518, help="side for the extrapolated run")
    parser.add_argument("--large_scenes", type=int, default=20,
                        help="scenes timed at --large_size (0 skips)")
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        wall, dirs = _time_split(pathlib.Path(tmp) / "split", args.num_scenes, args.image_size,
                                 args.num_views, args.workers, args.seed)
        print(f"{args.num_scenes} scenes at {args.image_size}x{args.image_size}, {args.num_views} "
              f"views, {args.workers} workers: {wall:.1f} s wall, {args.num_scenes / wall:.1f} scenes/s")
        stats = synthetic.split_stats(dirs)
        print(f"  objects/scene {stats['objects_per_scene']}, questions {stats['qa_per_kind']}, "
              f"yes fraction {stats['yes_fraction']}, depth {stats['depth_m']}")
        cpu = _cpu_per_scene(pathlib.Path(tmp) / "cpu", 20, args.image_size, args.num_views)
        print(f"  {cpu * 1000:.0f} ms CPU per scene in one process -> an idle machine would write "
              f"{args.num_scenes} scenes in ~{args.num_scenes * cpu / args.workers:.0f} s on "
              f"{args.workers} workers")
        if args.large_scenes:
            wall, _ = _time_split(pathlib.Path(tmp) / "large", args.large_scenes, args.large_size,
                                  args.num_views, args.workers, args.seed)
            per = wall / args.large_scenes
            cpu = _cpu_per_scene(pathlib.Path(tmp) / "cpu_large", 2, args.large_size, args.num_views)
            print(f"{args.large_scenes} scenes at {args.large_size}x{args.large_size}: {per:.2f} s/scene "
                  f"wall on {args.workers} workers -> 1,000 scenes in ~{1000 * per / 60:.1f} min; "
                  f"{cpu:.2f} s CPU per scene -> ~{1000 * cpu / args.workers / 60:.1f} min idle")


if __name__ == "__main__":
    main()
