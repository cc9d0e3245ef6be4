"""`tfds build` with spatial_distill's scene sources registered (data_pipelines/tfds_sources.py).

    python -m data_pipelines.tfds_build spatial_synthetic/tiny --data_dir=DIR
    python -m data_pipelines.tfds_build scannet_scenes/518px_4views --manual_dir=SCANS --data_dir=DIR

TFDS's own build command and flags; its `tfds` executable needs apache-beam even to build
(tensorflow-datasets 4.9 imports the beam-based `convert_format` command at start), which this
entry point does not.
"""

import sys

from absl import app
from tensorflow_datasets.scripts.cli import build, cli_utils

from data_pipelines import tfds_sources  # noqa: F401 - registers the builders


def main(argv=None) -> None:
    parse = cli_utils.make_flags_parser(build.Args, description=__doc__.splitlines()[0])
    app.run(lambda args: args.execute(), argv=argv or sys.argv, flags_parser=parse)


if __name__ == "__main__":
    main()
