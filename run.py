"""Entry point: parse the config, dispatch on `config.mode` to one stage function.

  python run.py --config=configs/student.py:tiny --workdir=/tmp/sd
  python run.py --config=configs/student.py:tiny --workdir=/tmp/sd --config.mode=data

Each stage takes `(config, workdir)` and writes its outputs under `workdir` (see README.md). The
terminal shows stage lines, progress bars and results; logs go to `workdir/run.log`, and an error
prints one line there (its traceback in the log).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:preset]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for data, records, checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


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
        logging.info("config:\n%s", config)
        stages.run(config, FLAGS.workdir)
    except KeyboardInterrupt:
        print(f"interrupted; rerun the same command to resume (log: {log_path})", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - every failure: one line here, the traceback in the log
        console.fail(e, log_path)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
