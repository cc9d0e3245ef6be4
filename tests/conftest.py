"""Test-session settings shared by every test module."""

import os

# libtpu (the [tpu] extra, for the AOT / Mosaic tests) lets one process at a time hold it through
# a lockfile; the tests run in two pytest-xdist workers and only compile for TPU topologies on the
# CPU host, which is safe to do concurrently. Set before any test imports JAX.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
