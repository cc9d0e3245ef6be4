"""The learning study's checkpoint selection (benchmarks/study_learning.py)."""

import os

import pytest

from benchmarks import study_learning


def test_checkpoint_steps_selects_saved_steps(tmp_path):
    for step in ("1000", "2603", "6000", "tmp_6000.orbax-checkpoint-tmp"):
        os.makedirs(tmp_path / step)
    assert study_learning.checkpoint_steps(str(tmp_path)) == [1000, 2603, 6000]
    assert study_learning.checkpoint_steps(str(tmp_path), "6000,1000,6000") == [1000, 6000]
    with pytest.raises(SystemExit, match=r"step\(s\) \[5000\].*saved: \[1000, 2603, 6000\]"):
        study_learning.checkpoint_steps(str(tmp_path), "5000,6000")
