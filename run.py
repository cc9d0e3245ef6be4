"""Entry point: parse the config, dispatch on `config.mode` to one stage function.

  python run.py --config=configs/student.py:tiny --workdir=/tmp/sd
  python run.py --config=configs/student.py:tiny --workdir=/tmp/sd --config.mode=data

Each stage takes `(config, workdir)` and writes its outputs under `workdir` (see README.md). The
terminal shows stage lines, progress bars and results; logs go to `workdir/run.log`, and an error
prints one line there (its traceback in the log).
"""

import os
import platform
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:preset]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for data, records, checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def hugepage_malloc_env(env: dict[str, str], *, system: str, libc: tuple[str, str],
                        thp_mode: str) -> dict[str, str] | None:
    """The environment to re-execute under so that glibc's malloc asks for transparent huge pages,
    or None to run as is. XLA:CPU allocates and frees its temporaries every step (~256 MiB in the
    tiny train step); in 4 KiB pages the kernel zero-fills each on first touch: ~65,000 page faults
    and ~20% of the main job's CPU time (docs/benchmarks.md). glibc reads `GLIBC_TUNABLES` only
    when a process starts. A user's own `GLIBC_TUNABLES` is kept as it is (set
    `glibc.malloc.hugetlb=0` to opt out); other C libraries, glibc before 2.35 (no such tunable) and
    THP mode `never` run as is. `thp_mode`: /sys/kernel/mm/transparent_hugepage/enabled."""
    name, version = libc
    if system != "Linux" or name != "glibc" or "GLIBC_TUNABLES" in env or "[never]" in thp_mode:
        return None
    try:
        if tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
            return None
    except ValueError:
        return None
    return {**env, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def _reexec_with_hugepage_malloc():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp_mode = f.read()
    except OSError:
        return
    env = hugepage_malloc_env(dict(os.environ), system=platform.system(), libc=platform.libc_ver(),
                              thp_mode=thp_mode)
    if env is not None:
        try:
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
        except OSError:  # no re-executable interpreter: run as is, only slower
            pass


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from spatial_distill import console

    # From here the terminal shows stage lines, progress bars and results; library logs and
    # native stderr go to WORKDIR/run.log.
    log_path = console.redirect(FLAGS.workdir)
    try:
        import jax

        from configs import common

        config = FLAGS.config
        # An AOT compile checks the mesh against its target topology's devices, not this host's.
        common.validate(config, num_devices=None if config.mode == "aot" else jax.device_count())

        # After validation: a bad flag fails before the heavy imports.
        from spatial_distill import stages
        logging.info("GLIBC_TUNABLES=%s", os.environ.get("GLIBC_TUNABLES"))
        logging.info("config:\n%s", config)
        stages.run(config, FLAGS.workdir)
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to resume (log: {log_path})", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - every failure: one line here, the traceback in the log
        console.fail(e, log_path)
        sys.exit(1)


if __name__ == "__main__":
    _reexec_with_hugepage_malloc()
    app.run(main)
