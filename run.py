"""Entry point: parse the config, dispatch on `config.mode` to one stage function.

  python run.py --config=configs/student.py:tiny --workdir=/tmp/sd
  python run.py --config=configs/student.py:tiny --workdir=/tmp/sd --config.mode=data

Each stage takes `(config, workdir)` and writes its outputs under `workdir` (see README.md).
"""

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
    import jax

    from configs import common

    config = FLAGS.config
    common.validate(config, num_devices=jax.device_count())

    from spatial_distill import stages  # after validation: a bad flag fails before heavy imports
    logging.info("config:\n%s", config)
    stages.run(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
