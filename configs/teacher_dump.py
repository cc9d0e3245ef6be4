"""The teacher dump alone: run the teacher over the data and write teacher records.

Same fields as `configs/student.py` (the dump must agree with the student on data, tokenizer
and top-K), with `mode = "dump"`:

  python run.py --config=configs/teacher_dump.py:tiny --workdir=/tmp/sd
"""

from configs import student


def get_config(preset: str = "tiny"):
    c = student.get_config(preset)
    c.mode = "dump"
    return c
