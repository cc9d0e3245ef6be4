"""User-supplied QA files (`data_pipelines.user_qa`)."""

import json

import numpy as np
import pytest

from data_pipelines import user_qa
from data_pipelines.sample import QA, Sample


def sample(n_boxes=3, qa=()):
    return Sample(
        sample_id="scene0000_00",
        rgb=np.zeros((1, 4, 4, 3), np.uint8), depth=np.ones((1, 4, 4), np.float32),
        intrinsics=np.array([[[2, 0, 2], [0, 2, 2], [0, 0, 1]]], np.float32),
        cam_to_world=np.eye(4, dtype=np.float32)[None],
        boxes=np.tile(np.array([[0, 0, 0.5, 1, 1, 1, 0]], np.float32), (n_boxes, 1)),
        labels=np.arange(n_boxes, dtype=np.int32), label_names=("bed", "desk", "chair")[:n_boxes],
        qa=qa).validate()


GOOD = [
    {"scene_id": "scene0000_00", "question": "Is the bed near the desk?", "answer": "no",
     "kind": "proximity", "subjects": [0, 1]},
    {"scene_id": "scene0001_00", "question": "How many chairs are there?", "answer": "4",
     "kind": "describe"},
    {"scene_id": "scene0000_00", "question": "Is the chair to the left of the desk?", "answer": "yes",
     "kind": "orientation", "subjects": [2, 1]},
]


def write(tmp_path, lines):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_reads_good_lines_in_file_order(tmp_path):
    path = write(tmp_path, [GOOD[0], "", "   ", GOOD[1], GOOD[2]])
    got = user_qa.read_qa_file(path)
    assert list(got) == ["scene0000_00", "scene0001_00"]
    assert got["scene0000_00"] == (
        QA("Is the bed near the desk?", "no", "proximity", (0, 1)),
        QA("Is the chair to the left of the desk?", "yes", "orientation", (2, 1)))
    assert got["scene0001_00"] == (QA("How many chairs are there?", "4", "describe", ()),)


def test_each_bad_line_is_named_with_file_line_and_field(tmp_path):
    bad = {
        2: ('{"scene_id": "scene0000_00", "question": "Is it?"', "not valid JSON"),
        3: ({k: v for k, v in GOOD[0].items() if k != "answer"}, "field 'answer' is missing"),
        4: ({**GOOD[0], "kind": "colour"}, "field 'kind' is 'colour', not a known kind; use one of"),
        5: ({**GOOD[0], "subjects": [0, "bed"]}, "field 'subjects' holds \"bed\"; subjects must be integers"),
        6: ({**GOOD[0], "subjects": [0, 1.5]}, "field 'subjects' holds 1.5"),
        7: ({**GOOD[0], "subjects": [True]}, "field 'subjects' holds true"),
        8: ({**GOOD[0], "subjects": [-1]}, "field 'subjects' holds -1"),
        9: ({**GOOD[0], "subjects": 3}, "field 'subjects' must be a list"),
        10: ({**GOOD[0], "answer": 3}, "field 'answer' must be a non-empty string, got 3"),
        11: ({**GOOD[0], "scene_id": ""}, "field 'scene_id' must be a non-empty string"),
        12: ({**GOOD[0], "subject": [0, 1]}, "field 'subject' is not part of the schema"),
        13: ([GOOD[0]], "a line must be a JSON object"),
    }
    lines = [GOOD[0]] + [bad[i][0] for i in sorted(bad)] + [GOOD[1]]
    path = write(tmp_path, lines)
    with pytest.raises(user_qa.UserQAError) as info:
        user_qa.read_qa_file(path)
    err = info.value
    assert f"{path}: {len(bad)} bad line(s)" in str(err)
    assert len(err.errors) == len(bad)
    for (number, (_, message)), got in zip(sorted(bad.items()), err.errors):
        assert got.startswith(f"{path}:{number}: "), got
        assert message in got, (number, got)
        assert got in str(err)
    # A missing file names its path.
    with pytest.raises(user_qa.UserQAError, match="QA file .*nope.jsonl does not exist"):
        user_qa.read_qa_file(tmp_path / "nope.jsonl")


def test_attach_validates_subjects_against_the_boxes(tmp_path):
    own = QA("How many objects are in the scene?", "three", "describe")
    s = sample(3, qa=(own,))
    qas = user_qa.read_qa_file(write(tmp_path, GOOD))["scene0000_00"]
    out = user_qa.attach(s, qas)
    assert out.qa == qas and out.sample_id == s.sample_id and out.boxes is s.boxes
    assert out.validate() is out
    assert user_qa.attach(s, qas, keep_existing=True).qa == (own, *qas)
    with pytest.raises(user_qa.UserQAError,
                       match=r"scene 'scene0000_00': question 'Is the chair to the left of the "
                             r"desk\?' refers to object id 2, but the scene has 2 boxes"):
        user_qa.attach(sample(2), qas)
