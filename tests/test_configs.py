import subprocess
import sys
from pathlib import Path

import pytest

from configs import common, student

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
def test_presets_validate(preset):
    c = student.get_config(preset)
    common.validate(c, num_devices=1)
    assert c.data.image_size % 14 == 0


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        student.get_config("huge")


def test_config_is_locked_against_typos():
    c = student.get_config("tiny")
    with pytest.raises(AttributeError, match="stpes"):
        c.train.stpes = 3


@pytest.mark.parametrize("field,value,msg", [
    ("train.steps", -1, r"config.train.steps = -1: must be >= 0"),
    ("teacher.k", 600, r"config.teacher.k = 600: must be between 1 and the vocabulary size 384"),
    ("data.image_size", 100, r"config.data.image_size = 100: must be a positive multiple"),
    ("mode", "fly", r"config.mode = 'fly': must be one of"),
    ("tokenizer.vocab_size", 1000, r"config.tokenizer.vocab_size = 1000"),
    ("model.attention", "flash9", r"config.model.attention = 'flash9': choose one of"),
    ("teacher.kind", "gpt4", r"config.teacher.kind = 'gpt4': choose oracle .*, llava3d .* or hf"),
    ("teacher.kind", "llava3d", r"config.teacher.path = None: teacher.kind='llava3d' needs a local"),
    ("teacher.geometry", "lidar", r"config.teacher.geometry = 'lidar': choose sensor or vggt"),
    ("teacher.llava_mode", "4d", r"config.teacher.llava_mode = '4d'"),
    ("teacher.dtype", "int8", r"config.teacher.dtype = 'int8'"),
    ("teacher.max_new_tokens", 0, r"config.teacher.max_new_tokens = 0: must be >= 1"),
])
def test_bad_values_name_the_field(field, value, msg):
    c = student.get_config("tiny")
    section, key = field.split(".") if "." in field else (None, field)
    (c[section] if section else c)[key] = value
    with pytest.raises(ValueError, match=msg):
        common.validate(c, num_devices=1)


def test_mesh_must_divide_devices_and_batch():
    c = student.get_config("tiny")
    c.mesh.shape = (3, 1, 1)
    with pytest.raises(ValueError, match=r"config.mesh.shape = \(3, 1, 1\).*does not divide the 8"):
        common.validate(c, num_devices=8)
    c.mesh.shape = (-1, 1, 1)
    c.train.batch_size = 6
    with pytest.raises(ValueError, match=r"config.train.batch_size = 6: must divide .* 8 ways"):
        common.validate(c, num_devices=8)


def test_command_line_override_and_unknown_field():
    cmd = [sys.executable, "run.py", "--config=configs/student.py:tiny", "--workdir=/tmp/unused",
           "--config.train.stepz=10"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "stepz" in r.stderr
    cmd[-1] = "--config.train.steps=-5"
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "config.train.steps = -5: must be >= 0" in r.stderr
